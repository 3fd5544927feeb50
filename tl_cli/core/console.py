"""Console output: rich progress on a terminal, one plain line per epoch elsewhere (CI)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
from rich.console import Console
from rich.table import Table

from tl_cli.core.errors import log_line
from tl_cli.core.metrics import EPOCH_METRICS

# Not a terminal (CI logs, pipes): no wrapping at 80 columns.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def interactive() -> bool:
    """A terminal a person watches (not CI, not a pipe)."""
    return sys.stdout.isatty() and not os.environ.get("CI")


def rank_zero() -> bool:
    return (
        int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    )


def say(msg: str) -> None:
    """Print a (rich markup) line, and write it to the run's log file."""
    if rank_zero():
        console.print(msg)
        from rich.text import Text

        log_line(Text.from_markup(msg).plain)


def show(renderable: Any) -> None:
    """Print a rich renderable (a table), and write its plain text to the run's log file."""
    if rank_zero():
        console.print(renderable)
        plain = Console(width=120, color_system=None, soft_wrap=True)
        with plain.capture() as cap:
            plain.print(renderable)
        log_line("\n" + cap.get().rstrip())


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def warn(msg: str) -> None:
    """One line a practitioner would say, marked so it stands out in a log."""
    say(f"[bold yellow]warning[/] {msg}")


@contextlib.contextmanager
def progress(desc: str, total: int) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callable: a rich bar on a terminal, start/end lines otherwise."""
    if interactive() and rank_zero():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as p:
            task = p.add_task(desc, total=total)
            t0 = time.time()
            yield lambda: p.advance(task)
        # the bar goes; its timing stays
        say(f"{desc}: {total} batch{'' if total == 1 else 'es'} in {time.time() - t0:.1f}s")
        return
    t0 = time.time()
    yield lambda: None
    say(f"{desc}: {total} batch{'' if total == 1 else 'es'} in {time.time() - t0:.1f}s")


def fmt(v: Any, key: str = "") -> str:
    if isinstance(v, float) and key.endswith("seconds"):
        return f"{v:.1f}s"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


class History(pl.Callback):
    """Per-epoch metrics (train and val), kept in memory for metrics.json and the summary."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._t0 = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.time()  # a resume can start mid-epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row: dict[str, float] = {"epoch": trainer.current_epoch}
        for k, v in trainer.callback_metrics.items():
            if k.startswith(("train/", "val/")):
                row[k] = float(v)
        row["seconds"] = round(time.time() - self._t0, 3)
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if opt is not None and opt.param_groups:
            # the head's LR (other groups are multiples of it; metrics.csv has every group)
            g = next(
                (g for g in opt.param_groups if str(g.get("name", "")).startswith("head")), None
            )
            row["lr"] = float((g or opt.param_groups[0])["lr"])
        joined = unfrozen_at(pl_module, trainer.current_epoch)
        if joined and trainer.current_epoch > 0:
            row["unfrozen"] = joined  # type: ignore[assignment]
        self.epochs.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = list(state.get("epochs", []))


def say_above_bar(trainer: pl.Trainer, msg: str) -> None:
    """``say``, printed through a live rich progress bar's console (above the bar, not into it)."""
    bar = trainer.progress_bar_callback
    live = getattr(bar, "progress", None) if isinstance(bar, pl.callbacks.RichProgressBar) else None
    if live is not None and rank_zero():
        live.console.print(msg, soft_wrap=True)
        from rich.text import Text

        log_line(Text.from_markup(msg).plain)
        return
    say(msg)


def unfrozen_at(pl_module: Any, epoch: int) -> list[str]:
    """The backbone block groups that start training at ``epoch`` (policy plan labels)."""
    plan = getattr(getattr(pl_module, "policy", None), "plan", None) or {}
    return sorted(
        {lab for ue, _, lab in plan.values() if ue == epoch and lab.startswith("backbone")},
        key=lambda lab: int(lab.split(".")[-1]) if lab.split(".")[-1].isdigit() else 0,
    )


class UnfreezeLines(pl.Callback):
    """One line at the epoch a backbone block group joins training (freeze_unfreeze, ...)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        e = trainer.current_epoch
        joined = unfrozen_at(pl_module, e)
        if not joined or e == 0 or not trainer.is_global_zero:
            return
        groups = getattr(getattr(pl_module, "backbone", None), "block_groups", lambda: [])()
        idx = [int(g.split(".")[-1]) for g in joined if g.split(".")[-1].isdigit()]
        span = f"{min(idx)}-{max(idx)}" if len(idx) > 1 else str(idx[0]) if idx else "?"
        say_above_bar(
            trainer,
            f"epoch {e + 1}: unfreezing backbone block group(s) {span} "
            f"({len(joined)} of {len(groups)}); they train from now on",
        )


class EpochLines(pl.Callback):
    """One line per finished epoch, numbered from 1, on a terminal and in logs alike."""

    def __init__(self, history: History, keys: tuple[str, ...] | list[str] = EPOCH_METRICS) -> None:
        self.history = history
        self.keys = tuple(keys)  # the task's epoch_metrics

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.history.epochs:
            return
        row = self.history.epochs[-1]
        parts = [f"epoch {int(row['epoch']) + 1}/{trainer.max_epochs}"]
        parts += [f"{k} {row[k]:.4f}" for k in self.keys if k in row]
        if "lr" in row:
            parts.append(f"lr {row['lr']:.2e}")
        parts.append(f"{row['seconds']:.1f}s")
        say_above_bar(trainer, "  ".join(parts))


def summary_table(title: str, metrics: dict[str, Any], keys: list[str] | None = None) -> None:
    if not rank_zero():
        return
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in keys or list(metrics):
        if k in metrics and not isinstance(metrics[k], dict | list):
            t.add_row(k, fmt(metrics[k], k))
    show(t)


def stage_table(rows: list[dict[str, Any]]) -> None:
    """``head only`` vs ``fine-tuned``: each stage's best epoch, and which one best.ckpt holds."""
    if not rank_zero():
        return
    t = Table(title="head only vs fine-tuned (best epoch of each)", header_style="bold")
    cols = ["train/acc", "val/acc", "val/loss"]
    t.add_column("stage")
    t.add_column("epoch", justify="right")
    for c in cols:
        t.add_column(c, justify="right")
    t.add_column("best.ckpt")
    for r in rows:
        t.add_row(
            r["stage"],
            str(r["epoch"]),
            *(fmt(r[c], c) if c in r else "-" for c in cols),
            "yes" if r.get("in_best_ckpt") else "",
        )
    show(t)


class EpochBar(pl.callbacks.RichProgressBar):
    """Lightning's rich bar, numbered from 1 (``Epoch 3/3``), with the running train loss.

    The bar goes at the end of each epoch; `EpochLines` leaves one line per finished epoch.
    """

    def __init__(self) -> None:
        super().__init__(leave=False)
        self._loss_sum = 0.0
        self._loss_n = 0

    def _get_train_description(self, current_epoch: int) -> str:
        d = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            d += f"/{self.trainer.max_epochs}"
        return d

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss_sum, self._loss_n = 0.0, 0
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss_sum += float(loss.detach())
            self._loss_n += 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if self._loss_n and trainer.training:
            items["loss"] = f"{self._loss_sum / self._loss_n:.4f}"
        return items
