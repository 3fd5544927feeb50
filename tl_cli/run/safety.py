"""Faults during training: nothing half-written, nothing garbage saved, a clean stop on Ctrl-C.

* `AtomicCheckpointIO`: every checkpoint Lightning writes (best.ckpt, last.ckpt) goes to a temp
  file in the same folder, is fsynced, then renamed over the old one with ``os.replace``. A kill
  at any instant leaves either the old complete file or the new complete file, never half of one.
  (Lightning's own writer stages the file in the system temp dir and moves it: not atomic across
  filesystems, and not fsynced.)
* `TrainingGuard` (a callback):
  - stops at the first NaN/inf training loss, before the backward pass and optimizer step can
    spread it into the weights, and refuses to write a checkpoint whose weights or validation
    loss are not finite, so the last good checkpoint on disk is kept;
  - on SIGINT (Ctrl-C) or SIGTERM, keeps the ``last.ckpt`` of the last finished epoch (the
    unfinished epoch is redone on resume: Lightning's mid-epoch restarts skip that epoch's
    validation); if this run has not finished an epoch yet, writes ``last.ckpt`` from the current
    state instead, so there is always something to resume from;
  - removes temp files that a killed run left in the checkpoint folder.
* `fit`: ``trainer.fit`` that turns an interrupt into a one-line TLError (exit 130 for SIGINT,
  143 for SIGTERM) naming the checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from tl_cli.core.checkpoint import atomic_save, read_checkpoint
from tl_cli.core.errors import EXIT_FAILED, TLError
from tl_cli.core.outputs import TMP_SUFFIX, claim_pending


class NonFiniteError(TLError):
    """The loss (or the weights) became NaN/inf; the run stopped without saving the bad state."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=EXIT_FAILED)


# --------------------------------------------------------------------------- atomic writes


def stale_temp_files(folder: Path) -> list[Path]:
    """Temp files a killed writer left behind (``.<name>.ckpt.<random>.tmp``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f".*.ckpt.*{TMP_SUFFIX}") if p.is_file())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with atomic, durable writes for local paths."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        # remote (fsspec) paths: Lightning's own writer
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


class RunCheckpoint(pl.callbacks.ModelCheckpoint):
    """A ModelCheckpoint whose best-tracking survives a resume into a new run dir.

    Lightning restores ``best_model_score`` only when the checkpoint's ``dirpath`` equals this
    one's; a resume into a new run dir (the default: every run gets a new dir) therefore started
    from no best at all, saved the first resumed epoch as ``best.ckpt`` whatever its score, while
    the restored history still named an earlier epoch as the best (issue #11). Here the old
    run's best file is copied into the new dir and the tracking state carries over, so
    ``best.ckpt``, ``best_epoch``, ``val/*`` and ``test/*`` describe the same weights. When the old
    best file is gone, tracking restarts and ``first_epoch`` tells the summary to look only at
    the epochs of this run.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first_epoch = 0
        self._restarted = False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old_dir = state_dict.get("dirpath", self.dirpath)
        if old_dir == self.dirpath or self.dirpath is None:
            return super().load_state_dict(state_dict)
        old_best = state_dict.get("best_model_path") or ""
        if self.monitor is None:  # last.ckpt: nothing to carry over
            return
        if old_best and _is_tl_checkpoint(old_best):
            new_best = str(Path(self.dirpath) / Path(old_best).name)
            from pytorch_lightning.utilities import rank_zero_only

            if rank_zero_only.rank == 0 and Path(old_best).resolve() != Path(new_best).resolve():
                _atomic_copy(Path(old_best), Path(new_best))
            self.best_model_score = state_dict["best_model_score"]
            self.best_model_path = new_best
            self.kth_best_model_path = new_best
            self.kth_value = state_dict.get("kth_value", self.kth_value)
            # save_top_k=1: the one best model, now at its new path
            self.best_k_models = (
                {new_best: self.best_model_score} if self.best_model_score is not None else {}
            )
        else:
            self._restarted = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._restarted:
            self.first_epoch = trainer.current_epoch


def _is_tl_checkpoint(path: str) -> bool:
    """The resumed checkpoint names its run's best file: copy it only if it really is a tl
    checkpoint (a crafted path must not pull an arbitrary file into the run dir)."""
    p = Path(path)
    if p.suffix != ".ckpt" or not p.is_file():
        return False
    try:
        read_checkpoint(p)
    except TLError:
        return False
    return True


def _atomic_copy(src: Path, dst: Path) -> None:
    import shutil

    from tl_cli.core.outputs import atomic_path

    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst, keep_suffix=False) as tmp:  # a copy beside it, then renamed
        shutil.copyfile(src, tmp)


def last_checkpoint_callback(ckpt_dir: str | os.PathLike[str]) -> pl.callbacks.ModelCheckpoint:
    """A ModelCheckpoint that rewrites ``last.ckpt`` at the end of every epoch.

    ``ModelCheckpoint(save_last=True)`` with a monitor writes last.ckpt only when it also writes a
    top-k checkpoint (Lightning 2.6: "saves a last.ckpt copy whenever a checkpoint file gets
    saved"), so after the best epoch last.ckpt would go stale and a resume would redo epochs.
    """
    return RunCheckpoint(
        dirpath=str(ckpt_dir),
        filename="last",
        monitor=None,
        save_top_k=1,
        save_last=False,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )


def checkpoint_plugins() -> list[Any]:
    """The ``plugins=`` list for the Trainer."""
    return [AtomicCheckpointIO()]


# --------------------------------------------------------------------------- untrusted checkpoints


# --------------------------------------------------------------------------- the guard


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def first_nonfinite(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating tensor holding a NaN/inf, or None.

    A quick pass first (one sum per tensor, one ``isfinite`` over the stacked sums per device: a
    checkpoint of 300 tensors and 3.4M weights in about 2 ms); only when that finds something is
    the culprit located tensor by tensor with an exact ``isfinite``.
    """
    floats = {
        n: t for n, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
    }
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in floats.values():
        by_device.setdefault(t.device, []).append(t.detach())
    with torch.no_grad():
        # a NaN or inf anywhere makes its tensor's sum NaN or inf, so finite sums clear every
        # tensor at once (about 10x faster than an isfinite over their concatenation: no copy).
        # A sum can also overflow on finite values: then the exact check below decides.
        if all(
            bool(torch.isfinite(torch.stack([t.sum() for t in ts])).all())
            for ts in by_device.values()
        ):
            return None
    return next((n for n, t in floats.items() if not _finite(t)), None)


class TrainingGuard(pl.Callback):
    """Stop on a NaN/inf loss, never checkpoint bad weights, save ``last.ckpt`` on an interrupt.

    Args:
        last_path: where ``last.ckpt`` lives (written on SIGINT/SIGTERM).
    """

    def __init__(self, last_path: str | os.PathLike[str]) -> None:
        self.last_path = Path(last_path)
        self.interrupt: BaseException | None = None
        self.saved_on_interrupt: Path | None = None
        self.kept_on_interrupt: Path | None = None
        self.save_error: str | None = None
        self._mtime_at_start: int | None = None
        self._resumed_from_last = False

    def _last_mtime(self) -> int | None:
        try:
            return self.last_path.stat().st_mtime_ns
        except OSError:
            return None

    # -- housekeeping
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            # the run dir (RUN/checkpoints/last.ckpt -> RUN): locked from here on, if tl train
            # checked it but could not lock it yet (it did not exist). Before a resume restores
            # the checkpoint callbacks (which may copy the old best.ckpt in).
            claim_pending(self.last_path.parent.parent)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mtime_at_start = self._last_mtime()
        resumed = trainer.ckpt_path
        self._resumed_from_last = (
            bool(resumed) and Path(str(resumed)).resolve() == self.last_path.resolve()
        )
        if trainer.is_global_zero:
            for p in stale_temp_files(self.last_path.parent):
                with contextlib.suppress(OSError):
                    p.unlink()

    # -- NaN / inf
    def _stop(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str, where: str
    ) -> NonFiniteError:
        lr = (getattr(pl_module, "hparams", {}) or {}).get("optimizer", {}).get("lr")
        hint = (
            f"optimizer.lr={lr} is probably too high"
            if lr is not None
            else "the learning rate is probably too high"
        )
        kept = (
            f"the last good checkpoint is kept: {self.last_path}"
            if self.last_path.is_file()
            else "no checkpoint had been written yet"
        )
        return NonFiniteError(f"training stopped at {where}: {what} ({hint}); {kept}")

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # Before backward and the optimizer step: the weights are still those of the last good step.
        if not _finite(loss):
            where = f"epoch {trainer.current_epoch + 1}, step {trainer.global_step + 1}"
            raise self._stop(
                trainer,
                pl_module,
                f"the training loss is {float(loss.detach().float().mean())}",
                where,
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs before ModelCheckpoint's on_validation_end (Lightning puts checkpoint callbacks last).
        if trainer.sanity_checking:
            return
        v = trainer.callback_metrics.get("val/loss")
        v = float(v) if isinstance(v, torch.Tensor | float | int) else None
        if v is not None and not math.isfinite(v):
            raise self._stop(
                trainer,
                pl_module,
                f"the validation loss is {v}",
                f"the end of epoch {trainer.current_epoch + 1}",
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The last line of defence: no checkpoint with NaN/inf weights is ever written.
        bad = first_nonfinite(checkpoint.get("state_dict", {}))
        if bad is not None:
            where = f"epoch {trainer.current_epoch + 1}, step {trainer.global_step}"
            raise self._stop(
                trainer,
                pl_module,
                f"weight {bad} is not finite, so no checkpoint was written",
                where,
            )

    # -- interrupts
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        self.interrupt = exception
        now = self._last_mtime()
        if now is not None and (now != self._mtime_at_start or self._resumed_from_last):
            # this run's last finished epoch (or the checkpoint it resumed from): keep it
            self.kept_on_interrupt = self.last_path
            return
        if trainer.world_size > 1:
            return  # a save needs every rank at a barrier; keep the last end-of-epoch last.ckpt
        # a second Ctrl-C must not cut the save short (ValueError: not on the main thread)
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            trainer.save_checkpoint(str(self.last_path))
            self.saved_on_interrupt = self.last_path
        except Exception as e:  # noqa: BLE001 - report, keep whatever last.ckpt there is
            self.save_error = str(e).splitlines()[0] if str(e) else type(e).__name__


def resume_command(cfg: Any, last_path: Path, out: Path) -> str:
    """A copy-pasteable command that resumes this run: its overrides + ckpt_path + hydra.run.dir."""
    import shlex

    try:
        from hydra.core.hydra_config import HydraConfig

        task = [
            o
            for o in HydraConfig.get().overrides.task
            if not o.startswith(("ckpt_path=", "hydra.run.dir=", "output_dir="))
        ]
        given = " ".join(shlex.quote(o) for o in task)
    except Exception:  # noqa: BLE001 - composed outside a Hydra app (tests, API): no overrides known
        given = "<same overrides>"
    cmd = f"tl {cfg.get('command', 'train')} {given}".rstrip()
    return f"{cmd} ckpt_path={shlex.quote(str(last_path))} hydra.run.dir={shlex.quote(str(out))}"


def fit(
    trainer: pl.Trainer,
    guard: TrainingGuard,
    module: pl.LightningModule,
    data: Any,
    ckpt_path: str | None,
    resume_hint: str,
) -> None:
    """``trainer.fit`` that reports an interrupt as one line (TLError, exit 130/143).

    Lightning turns Ctrl-C into ``sys.exit(1)`` and SIGTERM into a SystemExit with code 0; both are
    caught here once Lightning has torn down, so the process exits with the conventional code.
    """
    try:
        trainer.fit(
            module,
            datamodule=data,
            ckpt_path=ckpt_path or None,
            weights_only=True if ckpt_path else None,
        )
    except SystemExit:
        if not trainer.interrupted:
            raise
    if trainer.interrupted or guard.interrupt is not None:
        sigterm = isinstance(guard.interrupt, SIGTERMException)
        what = "SIGTERM" if sigterm else "SIGINT"
        last = guard.last_path
        if guard.kept_on_interrupt is not None:
            state = (
                f"kept {last} from the last finished epoch (the unfinished one is redone on resume)"
            )
        elif guard.saved_on_interrupt is not None:
            state = f"saved the current state to {last}"
        else:
            why = (
                f" (saving the current state failed: {guard.save_error})"
                if guard.save_error
                else ""
            )
            raise TLError(
                f"training interrupted ({what}) before any checkpoint was written{why}; nothing to resume",
                exit_code=143 if sigterm else 130,
            )
        raise TLError(
            f"training interrupted ({what}); {state}; resume with: {resume_hint}",
            exit_code=143 if sigterm else 130,
        )
