"""Classification heads, registered by name. Each takes ``in_features`` and ``num_classes`` from
the run; configs (and checkpoints) give only ``name`` and the options below."""

from __future__ import annotations

import torch
from torch import nn

from tl_cli.core.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")


def _check_dropout(dropout: float) -> float:
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout={dropout} must be in [0, 1)")
    return float(dropout)


#: ``head.norm``: what the head does to the features before its first layer (``auto``: the task
#: decides, ``TransferTask.build_head``; a head built without a task reads them as they are)
FEATURE_NORMS = ("none", "l2", "auto")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Each feature vector divided by its L2 norm: the head reads directions, not lengths."""
    return nn.functional.normalize(x, p=2.0, dim=-1, eps=1e-12)


def _check_norm(norm: str) -> str:
    if norm not in FEATURE_NORMS:
        raise ValueError(f"head.norm={norm!r} must be none, l2 or auto")
    return "none" if norm == "auto" else norm


@HEADS.register("linear")
class LinearHead(nn.Sequential):
    """Dropout (optional) then one linear layer: the classic linear probe; with ``norm=l2`` each
    feature vector is first scaled to unit length.

    ``norm``: ``none`` (the layer reads the backbone's features as they are; what a checkpoint
    without the option means), ``l2`` (tl's default for feature extraction on images: issue
    24, docs/benchmarks.md) or ``auto`` (configs/head/linear.yaml: the task resolves it before
    building the head and stores the answer; a head built on its own takes ``none``). The
    normalisation is in the head's ``forward``, so ``tl train``'s cached features, ``tl eval``,
    ``tl predict``, the adaptation methods and ``tl export`` (ONNX, TorchScript) all apply it; it
    has no weights, so the state dict is the same either way.
    """

    def __init__(
        self, in_features: int, num_classes: int, dropout: float = 0.0, norm: str = "none"
    ) -> None:
        dropout = _check_dropout(dropout)
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)
        self.norm = _check_norm(norm)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """What the head's layers read: ``x``, L2-normalised when ``norm=l2`` (the L-BFGS fit
        fits the last layer on these)."""
        return l2_normalize(x) if self.norm == "l2" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.prepare(x))


@HEADS.register("mlp")
class MLPHead(nn.Sequential):
    """Linear -> norm -> GELU -> dropout -> linear; more capacity when features are far from the task."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 512,
        dropout: float = 0.2,
        norm: bool = True,
    ) -> None:
        if int(hidden) < 1:
            raise ValueError(f"hidden={hidden} must be >= 1")
        super().__init__(
            nn.Linear(in_features, int(hidden)),
            nn.LayerNorm(int(hidden)) if norm else nn.Identity(),
            nn.GELU(),
            nn.Dropout(_check_dropout(dropout)),
            nn.Linear(int(hidden), num_classes),
        )
