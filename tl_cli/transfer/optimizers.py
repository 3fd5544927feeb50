"""Optimizers by name. ``optimizer.lr`` is the head's LR; the transfer policy derives every
backbone group's LR from it. Configs and checkpoints give ``name`` and the options below."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tl_cli.core.registry import Registry

#: name -> a builder taking the run's param groups, then the options.
OPTIMIZERS: Registry[Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = Registry(
    "optimizer"
)


def _check(lr: float, weight_decay: float) -> None:
    if not float(lr) > 0:
        raise ValueError(f"lr={lr} must be > 0")
    if float(weight_decay) < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0")


@OPTIMIZERS.register("adamw")
def adamw(lr: float = 1e-3, weight_decay: float = 0.01, betas: tuple = (0.9, 0.999)):
    _check(lr, weight_decay)
    return lambda groups: torch.optim.AdamW(
        groups, lr=float(lr), weight_decay=float(weight_decay), betas=tuple(betas)
    )


@OPTIMIZERS.register("adam")
def adam(lr: float = 1e-3, weight_decay: float = 0.0, betas: tuple = (0.9, 0.999)):
    _check(lr, weight_decay)
    return lambda groups: torch.optim.Adam(
        groups, lr=float(lr), weight_decay=float(weight_decay), betas=tuple(betas)
    )


@OPTIMIZERS.register("sgd")
def sgd(lr: float = 0.01, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 1e-4):
    _check(lr, weight_decay)
    if not 0 <= float(momentum) < 1:
        raise ValueError(f"momentum={momentum} must be in [0, 1)")
    return lambda groups: torch.optim.SGD(
        groups,
        lr=float(lr),
        momentum=float(momentum),
        nesterov=bool(nesterov) and float(momentum) > 0,
        weight_decay=float(weight_decay),
    )
