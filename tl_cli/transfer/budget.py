"""``trainer.max_epochs=auto``: a training budget that fits the data (the default).

A fixed number of epochs scales the number of optimizer steps with the data set: 10 epochs of
90 images at batch 32 are 30 steps, too few for anything to converge, while 10 epochs of 50,000
images are 15,600. ``auto`` keeps the epoch count for large sets and guarantees small ones a
minimum number of optimizer steps:

* runs that take optimizer steps: ``epochs = clamp(ceil(MIN_STEPS / steps_per_epoch),
  MIN_EPOCHS, MAX_EPOCHS)``: 10 epochs whenever an epoch has at least 10 steps (320 images at
  batch 32), more for smaller sets (up to 30 epochs), so that every run takes at least
  ``MIN_STEPS`` (100) steps where 30 epochs allow it;
* runs that take none (a frozen backbone whose linear head was fitted to convergence by L-BFGS,
  prototypes): 1 epoch, whose validation scores the fitted head. More epochs would only repeat
  that validation and rewrite the checkpoints.

An explicit ``trainer.max_epochs=N`` is kept as given.

Wall clock. After the first epoch that trains, ``tl`` prints when the run will end and what chose
its length. Two limits cut the epochs at that point (and re-fit the LR schedule, so its decay
still completes): the user's ``trainer.max_time`` (Lightning's own key, which Lightning also
enforces), and, for ``max_epochs=auto`` on a CPU, `CPU_WALL_S` (30 minutes): the step-based rule
above assumes an epoch costs little, which holds for cached features and GPUs, not for
fine-tuning a backbone on a few CPU cores. A cut run keeps at least `MIN_EPOCHS_AFTER_CUT` epochs.
"""

from __future__ import annotations

import math
from typing import Any

#: at least this many optimizer steps per run (where MAX_EPOCHS allows)
MIN_STEPS = 100
#: the epochs of a run on a large data set (tl's fixed default before ``auto``)
MIN_EPOCHS = 10
#: never more epochs than this on a tiny data set
MAX_EPOCHS = 30
#: what Lightning is given until the data's size is known (replaced before the first epoch)
PLACEHOLDER = MIN_EPOCHS


def is_auto(trainer_cfg: Any) -> bool:
    return str(trainer_cfg.get("max_epochs")) == "auto"


def steps_per_epoch(
    num_train: int, batch_size: int, world_size: int = 1, accumulate: int = 1
) -> int:
    """Optimizer steps in one epoch over ``num_train`` items (Lightning's arithmetic, no drop_last)."""
    batches = math.ceil(max(1, num_train) / max(1, batch_size) / max(1, world_size))
    return max(1, math.ceil(batches / max(1, accumulate)))


def auto_epochs(spe: int) -> int:
    """Epochs for a run with ``spe`` optimizer steps per epoch."""
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(MIN_STEPS / max(1, spe)))))


def resolve(trainer: Any, dm: Any, module: Any) -> int:
    """Set ``trainer``'s max_epochs for ``max_epochs=auto`` (before fit); returns it.

    ``module.auto_epochs`` tells the task to cut the run to one epoch if, at fit start, its head
    turns out to be fitted to convergence with nothing left to train.
    """
    n = len(dm.splits["train"])
    batch = int(getattr(dm, "batch_size", None) or 32)
    spe = steps_per_epoch(
        n, batch, int(trainer.world_size), int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    )
    epochs = auto_epochs(spe)
    trainer.fit_loop.max_epochs = epochs
    module.auto_epochs = True
    return epochs


# --------------------------------------------------------------------------- wall clock
#: ``max_epochs=auto`` on a CPU: a run whose epochs train is cut to end within this many seconds
#: (measured on its first training epoch); a GPU keeps the step-based budget above
CPU_WALL_S = 30 * 60
#: a cut run keeps at least this many epochs (the LR schedule needs room to warm up and decay)
MIN_EPOCHS_AFTER_CUT = 3


def max_time_seconds(value: Any) -> float | None:
    """Lightning's ``trainer.max_time`` in seconds: "DD:HH:MM:SS", a dict of days/hours/minutes/
    seconds, or a timedelta; None when unset or not understood (Lightning itself checks it)."""
    import datetime

    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        try:
            return datetime.timedelta(**{k: float(v) for k, v in value.items()}).total_seconds()
        except (TypeError, ValueError):
            return None
    parts = str(value).split(":")
    if len(parts) != 4:
        return None
    try:
        d, h, m, s = (float(p) for p in parts)
    except ValueError:
        return None
    return ((d * 24 + h) * 60 + m) * 60 + s


def wall_cap(trainer_cfg: Any, auto: bool, on_cpu: bool) -> tuple[float | None, str]:
    """The wall-clock limit the epochs are fitted to, and its name in words: the user's
    ``trainer.max_time``, else `CPU_WALL_S` for ``max_epochs=auto`` on a CPU, else none."""
    user = max_time_seconds(trainer_cfg.get("max_time"))
    if user is not None:
        return user, f"trainer.max_time={trainer_cfg.get('max_time')}"
    if auto and on_cpu:
        return float(CPU_WALL_S), f"max_epochs=auto's {CPU_WALL_S // 60}-minute limit on CPU"
    return None, ""


def epochs_within(seconds_left: float, epoch_s: float, done: int, total: int) -> int:
    """The epochs a run can have when ``done`` took ``epoch_s`` each and ``seconds_left`` remain
    of its limit: never more than ``total``, never fewer than `MIN_EPOCHS_AFTER_CUT` (or
    ``done + 1``)."""
    more = int(max(0.0, seconds_left) // max(epoch_s, 1e-6))
    return min(total, max(done + more, MIN_EPOCHS_AFTER_CUT, done + 1))


def shrink(trainer: Any, module: Any, epochs: int) -> bool:
    """Cut a running fit to ``epochs`` epochs and re-fit the LR schedule to the shorter run (so
    its warm-up and decay still complete); False when the module's schedule is not tl's."""
    from tl_cli.transfer.schedulers import shape_fn

    info = getattr(module, "budget_info", None) or {}
    policy = getattr(module, "policy", None)
    cfgs = getattr(trainer, "lr_scheduler_configs", None) or []
    if not info or policy is None or len(cfgs) != 1 or not hasattr(cfgs[0].scheduler, "lr_lambdas"):
        return False
    spe = int(info["steps_per_epoch"])
    skipped = int(info.get("head_only_epochs", 0)) * spe
    steps = max(1, epochs * spe - skipped)
    sched_cfg = {**dict(module.hparams.scheduler), "_state": getattr(module, "plateau", None)}
    sched = cfgs[0].scheduler
    sched.lr_lambdas = policy.lr_lambdas(sched.optimizer, shape_fn(sched_cfg, steps, spe), spe)
    trainer.fit_loop.max_epochs = epochs
    info["epochs"] = epochs - int(info.get("head_only_epochs", 0))
    if info.get("steps"):
        info["steps"] = steps
    return True


def reason(trainer_cfg: Any, epochs: int, spe: int, from_command_line: bool | None) -> str:
    """What chose the number of epochs, in words (the budget line after the first epoch)."""
    if is_auto(trainer_cfg):
        return (
            f"trainer.max_epochs=auto chose {epochs} epochs ({spe} optimizer steps each; at least "
            f"{MIN_STEPS} steps and {MIN_EPOCHS}-{MAX_EPOCHS} epochs)"
        )
    where = {True: "on the command line", False: "a config default", None: "as given"}
    return f"trainer.max_epochs={trainer_cfg.get('max_epochs')} ({where[from_command_line]})"
