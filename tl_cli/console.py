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
    if rank_zero():
        console.print(msg)


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
            yield lambda: p.advance(task)
        return
    t0 = time.time()
    yield lambda: None
    say(f"{desc}: {total} batches in {time.time() - t0:.1f}s")


def fmt(v: Any) -> str:
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
        self.epochs.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = list(state.get("epochs", []))


class EpochLines(pl.Callback):
    """One line per epoch for logs that are not a terminal."""

    def __init__(self, history: History) -> None:
        self.history = history

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.history.epochs:
            return
        row = self.history.epochs[-1]
        parts = [f"epoch {int(row['epoch']) + 1}/{trainer.max_epochs}"]
        parts += [
            f"{k} {row[k]:.4f}"
            for k in ("train/loss", "train/acc", "val/loss", "val/acc")
            if k in row
        ]
        parts.append(f"{row['seconds']:.1f}s")
        console.print("  ".join(parts))


def summary_table(title: str, metrics: dict[str, Any], keys: list[str] | None = None) -> None:
    if not rank_zero():
        return
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in keys or list(metrics):
        if k in metrics and not isinstance(metrics[k], dict | list):
            t.add_row(k, fmt(metrics[k]))
    console.print(t)
