"""Classification heads, registered by name. Each takes ``in_features`` and ``num_classes`` from
the run; configs (and checkpoints) give only ``name`` and the options below."""

from __future__ import annotations

from torch import nn

from tl_cli.core.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")


def _check_dropout(dropout: float) -> float:
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout={dropout} must be in [0, 1)")
    return float(dropout)


@HEADS.register("linear")
class LinearHead(nn.Sequential):
    """Dropout (optional) then one linear layer: the classic linear probe."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        dropout = _check_dropout(dropout)
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)


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
