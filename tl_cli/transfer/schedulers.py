"""LR schedules as step -> factor functions, gated per param group by the transfer strategy.

One ``LambdaLR`` carries both the schedule shape and the strategy's gate (LR 0 before a
group's unfreeze epoch), so the set of param groups is fixed for the whole run and a resumed
run restores the scheduler exactly (its state is the step count).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tl_cli.core.errors import TLError

SCHEDULES = ("none", "cosine", "onecycle", "step", "plateau")


def shape_fn(cfg: dict[str, Any], total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The schedule's LR factor at an optimizer step (0-based)."""
    name = cfg.get("name", "none")
    if name == "none":
        return lambda step: 1.0
    if name == "cosine":
        warmup = warmup_steps(cfg, total_steps, steps_per_epoch)
        floor = float(cfg.get("min_lr_ratio", 0.0))
        total = max(total_steps, warmup + 1)

        def cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

        return cosine
    if name == "onecycle":
        # OneCycle's shape (Smith): ramp up for pct_start of the run, cosine-anneal down. As a factor
        # of each group's own LR, so groups that join later follow the same curve (Flash #1321).
        pct = float(cfg.get("pct_start", 0.3))
        div, final_div = float(cfg.get("div_factor", 25.0)), float(cfg.get("final_div_factor", 1e4))
        up = max(1, int(pct * total_steps))

        def onecycle(step: int) -> float:
            if step < up:
                t = step / up
                lo = 1 / div
                return lo + (1 - lo) * 0.5 * (1 - math.cos(math.pi * t))
            t = min(1.0, (step - up) / max(1, total_steps - up))
            lo = 1 / (div * final_div)
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))

        return onecycle
    if name == "step":
        every = max(1, int(round(float(cfg.get("step_epochs", 3)) * steps_per_epoch)))
        gamma = float(cfg.get("gamma", 0.1))
        return lambda step: gamma ** (step // every)
    if name == "plateau":
        # the factor lives in a PlateauState the module updates after each validation
        state = cfg.get("_state")
        if state is None:
            raise TLError("scheduler=plateau needs the training module (internal error)")
        return lambda step: state.factor
    raise TLError(f"scheduler.name={name!r} must be one of {', '.join(SCHEDULES)}")


def warmup_steps(cfg: dict[str, Any], total_steps: int, steps_per_epoch: int) -> int:
    """Linear warm-up length in optimizer steps (cosine): ``warmup_epochs`` if set, else
    ``warmup_fraction`` of the run, so a short run is not all warm-up."""
    if cfg.get("name", "none") != "cosine":
        return 0
    if cfg.get("warmup_epochs") is not None:
        return int(round(float(cfg["warmup_epochs"]) * steps_per_epoch))
    return int(round(float(cfg.get("warmup_fraction", 0.0) or 0.0) * total_steps))


def gated(
    shape: Callable[[int], float],
    unfreeze_epoch: int | None,
    steps_per_epoch: int,
    phase: Callable[[int], float] = lambda epoch: 1.0,
    offset: int = 0,
) -> Callable[[int], float]:
    """LR factor for one param group: 0 before its unfreeze epoch, then schedule x phase factor.

    ``offset``: epochs at the start that take no step (the head-only epoch of an L-BFGS head):
    the schedule's shape starts after them, so its warm-up and decay cover the steps that train.
    """
    if unfreeze_epoch is None:
        return lambda step: 0.0
    skip = offset * steps_per_epoch
    start = max(unfreeze_epoch * steps_per_epoch, skip)
    return lambda step: (
        shape(step - skip) * phase(step // steps_per_epoch) if step >= start else 0.0
    )


class PlateauState:
    """ReduceLROnPlateau as a factor: multiply by `factor` when `monitor` stops improving.

    Kept outside torch's ReduceLROnPlateau, which rewrites param-group LRs directly and so fights
    any other schedule and breaks when groups change (Lightning #8720).
    """

    def __init__(
        self,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 2,
        threshold: float = 1e-4,
        min_factor: float = 1e-3,
    ) -> None:
        if mode not in ("min", "max"):
            raise TLError(f"scheduler.mode={mode!r} must be min or max")
        self.mode, self.mult, self.patience, self.threshold, self.min_factor = (
            mode,
            float(factor),
            int(patience),
            float(threshold),
            float(min_factor),
        )
        self.factor = 1.0
        self.best: float | None = None
        self.bad_epochs = 0

    def update(self, value: float) -> None:
        better = self.best is None or (
            value < self.best - self.threshold
            if self.mode == "min"
            else value > self.best + self.threshold
        )
        if better:
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.factor = max(self.min_factor, self.factor * self.mult)
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, float | int | None]:
        return {"factor": self.factor, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, d: dict) -> None:
        self.factor, self.best, self.bad_epochs = (
            float(d["factor"]),
            d["best"],
            int(d["bad_epochs"]),
        )
