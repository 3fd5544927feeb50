"""Lightning callbacks that record and print a training run: one line per epoch everywhere, a live
bar on a terminal, plain progress lines in logs, and when the run will end.

They live apart from `tl_cli.core.console` so that printing a line never imports Lightning:
``tl`` answers ``--help`` and config errors before torch loads.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import pytorch_lightning as pl

from tl_cli.core.console import Ticker, duration, rank_zero, say
from tl_cli.core.errors import log_line
from tl_cli.core.metrics import EPOCH_METRICS


class History(pl.Callback):
    """Per-epoch metrics (train and val), kept in memory for metrics.json and the summary.

    Each row holds ``steps``, the optimizer steps the epoch took; ``lr`` only when it took some
    (an epoch that scores a fitted head takes none, and its scheduler's LR means nothing).
    """

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._t0 = 0.0
        self._step0 = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.time()  # a resume can start mid-epoch
        self._step0 = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.time()
        self._step0 = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row: dict[str, float] = {"epoch": trainer.current_epoch}
        for k, v in trainer.callback_metrics.items():
            if k.startswith(("train/", "val/")):
                row[k] = float(v)
        row["seconds"] = round(time.time() - self._t0, 3)
        # Lightning counts a step whose training_step returned None (nothing to update) as taken:
        # a task that knows its epoch only scored (a fitted head, a head-only epoch) says so
        scores_only = getattr(pl_module, "scores_only", None)
        stepped = not (callable(scores_only) and scores_only())
        row["steps"] = int(trainer.global_step - self._step0) if stepped else 0
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if opt is not None and opt.param_groups and row["steps"] > 0:
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


class SteppedLRMonitor(pl.callbacks.LearningRateMonitor):
    """Lightning's LR monitor (an ``lr-*`` column per param group in metrics.csv and the other
    loggers), silent for an epoch that takes no optimizer step (a fitted head, the head-only epoch
    before fine-tuning): an LR there would read as if the epoch trained at it."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        scores_only = getattr(trainer.lightning_module, "scores_only", None)
        if callable(scores_only) and scores_only():
            return
        super().on_train_epoch_start(trainer, *args, **kwargs)


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
    """One line per finished epoch, numbered from 1, on a terminal and in logs alike; in logs
    (not a terminal) also a plain progress line every `PLAIN_EVERY_S` seconds inside a long
    epoch (training and validation batches) and the final test pass, so CI shows the run is
    alive."""

    def __init__(self, history: History, keys: tuple[str, ...] | list[str] = EPOCH_METRICS) -> None:
        self.history = history
        self.keys = tuple(keys)  # the task's epoch_metrics
        self._ticker: Ticker | None = None
        self._val: Ticker | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.num_training_batches
        total = int(total) if isinstance(total, int | float) and total != float("inf") else None
        self._ticker = Ticker(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", total)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self._ticker is not None and trainer.is_global_zero:
            self._ticker.update(batch_idx + 1)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            self._val = None
            return
        totals = trainer.num_val_batches
        total = int(sum(totals)) if isinstance(totals, list) else None
        self._val = Ticker(f"epoch {trainer.current_epoch + 1} validation", total)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:  # noqa: ANN001
        if self._val is not None and trainer.is_global_zero:
            self._val.update(batch_idx + 1)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        totals = trainer.num_test_batches
        self._val = Ticker("testing the best checkpoint", int(sum(totals)) if totals else None)

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:  # noqa: ANN001
        if self._val is not None and trainer.is_global_zero:
            self._val.update(batch_idx + 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ticker = None
        if not trainer.is_global_zero or not self.history.epochs:
            return
        row = self.history.epochs[-1]
        parts = [f"epoch {int(row['epoch']) + 1}/{trainer.max_epochs}"]
        for k in self.keys:
            if k not in row:
                continue
            part = f"{k} {row[k]:.4f}"
            if k == "train/loss" and "train/ce" in row:
                # the objective (label smoothing, class weights) is not comparable with val/loss
                part += f" (objective; cross-entropy {row['train/ce']:.4f})"
            parts.append(part)
        if "lr" in row:  # only an epoch that took optimizer steps has an LR worth printing
            parts.append(f"lr {row['lr']:.2e}")
        elif row.get("steps") == 0:
            parts.append("no optimizer step")
        parts.append(f"{row['seconds']:.1f}s")
        say_above_bar(trainer, "  ".join(parts))


class BudgetLine(pl.Callback):
    """After the first epoch that trains: when the run will end, what chose its length, and,
    where the budget allows it, a run cut to fit a wall-clock limit (`tl_cli.transfer.budget`).

    ``reason``: what set the epochs, in words (``trainer.max_epochs=auto: ...``). ``cap_s``:
    the wall-clock limit (seconds) the epochs are cut to fit, or None; ``cap_why`` names it.
    """

    def __init__(
        self,
        history: History,
        reason: str,
        cap_s: float | None = None,
        cap_why: str = "",
        min_remaining_s: float = 60.0,
    ) -> None:
        self.history = history
        self.reason = reason
        self.cap_s = cap_s
        self.cap_why = cap_why
        self.min_remaining_s = min_remaining_s
        self.done = False
        self._t_fit = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_fit = time.time()
        epochs = int(trainer.max_epochs or 1)
        if getattr(pl_module, "head_converged", False) and epochs > 1 and rank_zero():
            # an explicit count on a converged head: say that the epochs will not train
            say(
                f"[bold]budget[/] {self.reason}: the head is fitted by L-BFGS and the backbone "
                f"is frozen, so the {epochs} epochs take no optimizer step and score the same "
                "head (trainer.max_epochs=auto runs one; strategy.head_fit=sgd trains the head)"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done or not self.history.epochs:
            return
        row = self.history.epochs[-1]
        if not row.get("steps"):
            return  # a head-only or scoring epoch says nothing about the cost of one that trains
        self.done = True
        from tl_cli.transfer import budget

        epoch_s = float(row["seconds"])
        done = trainer.current_epoch + 1
        total = int(trainer.max_epochs or done)
        cut = ""
        if self.cap_s is not None:
            elapsed = time.time() - self._t_fit
            fit = budget.epochs_within(self.cap_s - elapsed, epoch_s, done, total)
            if trainer.world_size > 1:  # every rank must stop at the same epoch: rank 0 decides
                fit = int(trainer.strategy.broadcast(fit, src=0))
            if fit < total and budget.shrink(trainer, pl_module, fit):
                cut = (
                    f"; cut from {total} to {fit} epochs to fit {self.cap_why} "
                    f"(the LR schedule now ends at epoch {fit})"
                )
                total = fit
        left = max(0, total - done) * epoch_s
        if left < self.min_remaining_s and not cut:
            return
        end = datetime.now() + timedelta(seconds=left)
        when = end.strftime("%H:%M") if left < 20 * 3600 else end.strftime("%Y-%m-%d %H:%M")
        if rank_zero():
            say_above_bar(
                trainer,
                f"[bold]budget[/] {self.reason}{cut}; an epoch takes {duration(epoch_s)}: "
                f"{total - done} more end at about {when} (in {duration(left)}); "
                "shorter: trainer.max_epochs=N or trainer.max_time=DD:HH:MM:SS",
            )


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
