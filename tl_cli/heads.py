"""Classification heads. Each takes ``in_features`` and ``num_classes`` from the run."""

from __future__ import annotations

from torch import nn


class LinearHead(nn.Sequential):
    """Dropout (optional) then one linear layer: the classic linear probe."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)


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
        super().__init__(
            nn.Linear(in_features, hidden),
            nn.LayerNorm(hidden) if norm else nn.Identity(),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
