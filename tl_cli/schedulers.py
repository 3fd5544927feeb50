"""LR schedules as step -> factor functions, gated per param group by the transfer strategy.

One ``LambdaLR`` carries both the schedule shape and the strategy's gate (LR 0 before a
group's unfreeze epoch), so the set of param groups is fixed for the whole run and a resumed
run restores the scheduler exactly (its state is the step count).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tl_cli.errors import TLError

SCHEDULES = ("none", "cosine")


def shape_fn(cfg: dict[str, Any], total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The schedule's LR factor at an optimizer step (0-based)."""
    name = cfg.get("name", "none")
    if name == "none":
        return lambda step: 1.0
    if name == "cosine":
        warmup = int(round(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch))
        floor = float(cfg.get("min_lr_ratio", 0.0))
        total = max(total_steps, warmup + 1)

        def cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

        return cosine
    raise TLError(f"scheduler.name={name!r} must be one of {', '.join(SCHEDULES)}")


def gated(shape: Callable[[int], float], unfreeze_epoch: int | None, steps_per_epoch: int) -> Callable[[int], float]:
    """LR factor for one param group: 0 before its unfreeze epoch, the schedule after."""
    if unfreeze_epoch is None:
        return lambda step: 0.0
    start = unfreeze_epoch * steps_per_epoch
    return lambda step: shape(step) if step >= start else 0.0
