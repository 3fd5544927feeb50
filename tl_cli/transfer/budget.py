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

An explicit ``trainer.max_epochs=N`` is always kept as given.
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
