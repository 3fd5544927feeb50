"""Transfer strategies: which backbone block groups train from which epoch, at which LR.

A strategy is a pure plan, a function of the epoch, so the freeze state never has to be saved
or restored: a resumed run recomputes it from the epoch it resumes at. The module applies the
plan (``requires_grad``, BatchNorm mode) at every epoch start, and the LR scheduler gates each
param group's LR by the same plan, so the optimizer's param groups never change mid-run (the
cause of Lightning #6891, #8720 and Flash #1321).

Lightning's distribution strategy is a different thing: it stays ``trainer.strategy``.
"""

from __future__ import annotations

from dataclasses import dataclass

NEVER = None  # unfreeze epoch of a group that never trains


@dataclass(frozen=True)
class GroupPlan:
    """When a backbone block group starts training, and its LR relative to ``optimizer.lr``."""

    unfreeze_epoch: int | None
    lr_mult: float


class TransferStrategy:
    """Base class. Subclasses implement :meth:`group_plans`.

    Args:
        backbone_lr_mult: backbone LR = ``optimizer.lr`` x this.
        layer_decay: if set (e.g. 0.75), each group below the deepest gets this factor once
            more (BEiT/ELECTRA layer-wise LR decay).
        train_bn: train the BatchNorm layers of frozen groups (affine params and running
            stats). Default False: frozen BN runs in eval mode and its stats never move.
    """

    name = "base"

    def __init__(self, backbone_lr_mult: float = 0.1, layer_decay: float | None = None, train_bn: bool = False) -> None:
        if backbone_lr_mult < 0:
            raise ValueError(f"strategy.backbone_lr_mult={backbone_lr_mult} must be >= 0")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"strategy.layer_decay={layer_decay} must be in (0, 1]")
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.layer_decay = layer_decay
        self.train_bn = bool(train_bn)

    def lr_mults(self, n_groups: int) -> list[float]:
        d = self.layer_decay or 1.0
        return [self.backbone_lr_mult * d ** (n_groups - 1 - i) for i in range(n_groups)]

    def group_plans(self, n_groups: int) -> list[GroupPlan]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def backbone_ever_trains(self) -> bool:
        return any(p.unfreeze_epoch is not None for p in self.group_plans(1)) or self.train_bn


class FeatureExtraction(TransferStrategy):
    """Frozen backbone, only the head trains (a linear probe with a linear head)."""

    name = "feature_extraction"

    def __init__(self, train_bn: bool = False, cache_features: bool = True, backbone_lr_mult: float = 0.1) -> None:
        super().__init__(backbone_lr_mult=backbone_lr_mult, train_bn=train_bn)
        self.cache_features = bool(cache_features)

    def group_plans(self, n_groups: int) -> list[GroupPlan]:
        return [GroupPlan(NEVER, m) for m in self.lr_mults(n_groups)]


class Finetune(TransferStrategy):
    """Everything trains from the start; the backbone at a lower LR."""

    name = "finetune"

    def group_plans(self, n_groups: int) -> list[GroupPlan]:
        return [GroupPlan(0, m) for m in self.lr_mults(n_groups)]


class FreezeUnfreeze(TransferStrategy):
    """Head alone for ``unfreeze_at_epoch`` epochs, then the whole backbone at a low LR."""

    name = "freeze_unfreeze"

    def __init__(self, unfreeze_at_epoch: int = 1, backbone_lr_mult: float = 0.1, layer_decay: float | None = None, train_bn: bool = False) -> None:
        super().__init__(backbone_lr_mult, layer_decay, train_bn)
        if unfreeze_at_epoch < 0:
            raise ValueError(f"strategy.unfreeze_at_epoch={unfreeze_at_epoch} must be >= 0")
        self.unfreeze_at_epoch = int(unfreeze_at_epoch)

    def group_plans(self, n_groups: int) -> list[GroupPlan]:
        return [GroupPlan(self.unfreeze_at_epoch, m) for m in self.lr_mults(n_groups)]
