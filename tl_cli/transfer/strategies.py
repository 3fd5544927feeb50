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
from typing import Any

from tl_cli.core.registry import Registry

NEVER = None  # unfreeze epoch of a group that never trains
#: ``strategy.head_scale``: how ``tl_cli.transfer.probe.fit_probe`` scales features for the fit
HEAD_SCALES = ("dim", "global")
#: ``strategy.backbone_lr_mult=auto`` / ``head_lr_mult=auto``: the values measured for the task
#: and modality (``TransferTask.auto_lr_mults``)
AUTO = "auto"


STRATEGIES: Registry[TransferStrategy] = Registry("strategy")  # filled below


@dataclass(frozen=True)
class GroupPlan:
    """When a backbone block group starts training, and its LR relative to ``optimizer.lr``."""

    unfreeze_epoch: int | None
    lr_mult: float


class TransferStrategy:
    """Base class. Subclasses implement :meth:`group_plans`.

    Args:
        backbone_lr_mult: backbone LR = ``optimizer.lr`` x this; ``auto``: the task's measured
            value (:meth:`resolve_auto`, called by the task before its policy is planned).
        layer_decay: if set (e.g. 0.75), each group below the deepest gets this factor once
            more (BEiT/ELECTRA layer-wise LR decay).
        train_bn: train the BatchNorm layers of frozen groups (affine params and running
            stats). Default False: frozen BN runs in eval mode and its stats never move.
        bn: BatchNorm of the groups that *do* train: ``frozen`` (eval mode: the pretrained
            running statistics stay; scale and shift still train, as Keras recommends for
            fine-tuning) or ``train`` (batch statistics, running stats updated).
        head_fit: ``lbfgs``: before training, fit the head to convergence on frozen backbone
            features (``tl_cli.transfer.probe``: L-BFGS, L2 chosen by cross-validation); ``sgd``: the head
            starts at random and only the optimizer trains it.
        head_scale: how the L-BFGS fit scales the features (``tl_cli.transfer.probe.fit_probe``):
            ``dim`` (each feature standardised on the train split) or ``global`` (centred, one
            scale for all). Only the fit sees it: the scaling is folded into the head's weights.
    """

    name = "base"

    def __init__(
        self,
        backbone_lr_mult: float | str = 0.1,
        layer_decay: float | None = None,
        train_bn: bool = False,
        l2sp_alpha: float = 0.0,
        bn: str = "frozen",
        head_fit: str = "sgd",
        head_scale: str = "dim",
    ) -> None:
        #: options given as ``auto``, resolved by :meth:`resolve_auto` (name -> resolved or None)
        self.auto: dict[str, float | None] = {}
        if backbone_lr_mult == AUTO:
            self.auto["backbone_lr_mult"] = None
            backbone_lr_mult = 0.1  # a placeholder until the task resolves it
        elif isinstance(backbone_lr_mult, str):
            raise ValueError(
                f"strategy.backbone_lr_mult={backbone_lr_mult!r} must be a number >= 0 or auto"
            )
        if bn not in ("frozen", "train"):
            raise ValueError(f"strategy.bn={bn!r} must be frozen or train")
        if head_fit not in ("lbfgs", "sgd"):
            raise ValueError(f"strategy.head_fit={head_fit!r} must be lbfgs or sgd")
        if head_scale not in HEAD_SCALES:
            raise ValueError(f"strategy.head_scale={head_scale!r} must be dim or global")
        self.head_scale = head_scale
        self.bn = bn
        self.head_fit = head_fit
        if l2sp_alpha < 0:
            raise ValueError(f"strategy.l2sp_alpha={l2sp_alpha} must be >= 0")
        self.l2sp_alpha = float(l2sp_alpha)
        if backbone_lr_mult < 0:
            raise ValueError(f"strategy.backbone_lr_mult={backbone_lr_mult} must be >= 0")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"strategy.layer_decay={layer_decay} must be in (0, 1]")
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.layer_decay = layer_decay
        self.train_bn = bool(train_bn)

    @staticmethod
    def before_scan(dm: Any) -> None:
        """Called by ``tl_cli.run.training.build`` before the data module scans its source."""

    @staticmethod
    def after_scan(dm: Any) -> None:
        """Called by ``tl_cli.run.training.build`` after the scan (class names and splits known)."""

    def lr_mults(self, n_groups: int) -> list[float]:
        d = self.layer_decay or 1.0
        return [self.backbone_lr_mult * d ** (n_groups - 1 - i) for i in range(n_groups)]

    def group_plans(self, n_groups: int) -> list[GroupPlan]:  # pragma: no cover - abstract
        raise NotImplementedError

    def phase_mult(self, epoch: int) -> float:
        """Extra LR factor for every group at `epoch` (LP-FT lowers everything after the probe)."""
        return 1.0

    @property
    def backbone_ever_trains(self) -> bool:
        return any(p.unfreeze_epoch is not None for p in self.group_plans(1)) or self.train_bn

    #: the head's LR as a multiple of ``optimizer.lr`` (None: 1.0); see :attr:`head_lr_factor`
    head_lr_mult: float | None = None

    def resolve_auto(self, backbone_lr_mult: float, head_lr_mult: float, why: str) -> None:
        """Give the options set to ``auto`` the task's values (``TransferTask.auto_lr_mults``).

        Called once by the task, after it has settled ``head_fit`` and before its policy plans
        the parameter groups. ``why`` says where the values come from (shown in the summary).
        """
        if "backbone_lr_mult" in self.auto:
            self.backbone_lr_mult = float(backbone_lr_mult)
            self.auto["backbone_lr_mult"] = self.backbone_lr_mult
        if "head_lr_mult" in self.auto:
            self.head_lr_mult = float(head_lr_mult)
            self.auto["head_lr_mult"] = self.head_lr_mult
        if self.auto:
            self.auto_reason = why

    #: where the ``auto`` values came from (set by :meth:`resolve_auto`)
    auto_reason: str | None = None

    @property
    def head_lr_factor(self) -> float:
        """The head's LR as a multiple of ``optimizer.lr`` (``strategy.head_lr_mult``, default 1).

        ``tl finetune`` sets ``auto``: 0.1 for an image classifier whose head is fitted by L-BFGS
        (it starts at its optimum, where one AdamW step at 1e-3 moved the logit margin of a
        separable two-class set by 1.0 of a fitted margin of 2.5, at 1e-4 by 0.1:
        scripts/bench_finetune_step.py, issue 24); 1.0 for a head that starts at random.
        """
        return 1.0 if self.head_lr_mult is None else float(self.head_lr_mult)

    @property
    def head_only_epochs(self) -> int:
        """Epochs before any optimizer step: 1 when the head is fitted by L-BFGS and the backbone
        trains afterwards, else 0.

        That epoch scores the fitted head alone (fastai's frozen epoch of ``fine_tune``): its
        validation makes the head-only state a ``best.ckpt`` candidate, so fine-tuning can never
        leave a checkpoint worse on val than the head it started from. Every group's plan (the
        head's too) starts one epoch later; ``trainer.max_epochs`` counts the epochs after it.
        """
        return 1 if self.head_fit == "lbfgs" and self.backbone_ever_trains else 0


@STRATEGIES.register("feature_extraction")
class FeatureExtraction(TransferStrategy):
    """Frozen backbone, only the head trains (a linear probe with a linear head)."""

    name = "feature_extraction"

    def __init__(
        self,
        train_bn: bool = False,
        cache_features: bool = True,
        cache_dir: str | None = None,
        cache_views: int = 0,
        backbone_lr_mult: float = 0.1,
        head_fit: str = "lbfgs",
        head_scale: str = "global",
    ) -> None:
        super().__init__(
            backbone_lr_mult=backbone_lr_mult,
            train_bn=train_bn,
            head_fit=head_fit,
            head_scale=head_scale,
        )
        if cache_views < 0:
            raise ValueError(f"strategy.cache_views={cache_views} must be >= 0")
        self.cache_features = bool(cache_features)
        self.cache_dir = cache_dir
        self.cache_views = int(cache_views)

    def group_plans(self, n_groups: int) -> list[GroupPlan]:
        return [GroupPlan(NEVER, m) for m in self.lr_mults(n_groups)]


@STRATEGIES.register("finetune")
class Finetune(TransferStrategy):
    """Everything trains from the start (after the head-only epoch of an L-BFGS head), the backbone
    at ``optimizer.lr x backbone_lr_mult`` and the head at ``optimizer.lr x head_lr_mult``."""

    name = "finetune"

    def __init__(
        self,
        backbone_lr_mult: float | str = AUTO,
        layer_decay: float | None = None,
        train_bn: bool = False,
        l2sp_alpha: float = 0.0,
        bn: str = "frozen",
        head_fit: str = "lbfgs",
        head_scale: str = "dim",
        head_lr_mult: float | str | None = AUTO,
    ) -> None:
        super().__init__(
            backbone_lr_mult, layer_decay, train_bn, l2sp_alpha, bn, head_fit, head_scale
        )
        if head_lr_mult == AUTO:
            self.auto["head_lr_mult"] = None
            head_lr_mult = None  # 1.0 until the task resolves it
        elif isinstance(head_lr_mult, str):
            raise ValueError(
                f"strategy.head_lr_mult={head_lr_mult!r} must be a number >= 0 or auto"
            )
        if head_lr_mult is not None and head_lr_mult < 0:
            raise ValueError(f"strategy.head_lr_mult={head_lr_mult} must be >= 0")
        self.head_lr_mult = head_lr_mult

    def group_plans(self, n_groups: int) -> list[GroupPlan]:
        return [GroupPlan(0, m) for m in self.lr_mults(n_groups)]


@STRATEGIES.register("freeze_unfreeze")
class FreezeUnfreeze(TransferStrategy):
    """Head alone for ``unfreeze_at_epoch`` epochs, then the whole backbone at a low LR."""

    name = "freeze_unfreeze"

    def __init__(
        self,
        unfreeze_at_epoch: int = 1,
        backbone_lr_mult: float = 0.1,
        layer_decay: float | None = None,
        train_bn: bool = False,
        l2sp_alpha: float = 0.0,
        bn: str = "frozen",
        head_fit: str = "sgd",
        head_scale: str = "dim",
    ) -> None:
        super().__init__(
            backbone_lr_mult, layer_decay, train_bn, l2sp_alpha, bn, head_fit, head_scale
        )
        if unfreeze_at_epoch < 0:
            raise ValueError(f"strategy.unfreeze_at_epoch={unfreeze_at_epoch} must be >= 0")
        self.unfreeze_at_epoch = int(unfreeze_at_epoch)

    def group_plans(self, n_groups: int) -> list[GroupPlan]:
        return [GroupPlan(self.unfreeze_at_epoch, m) for m in self.lr_mults(n_groups)]


@STRATEGIES.register("gradual_unfreeze")
class GradualUnfreeze(TransferStrategy):
    """ULMFiT-style: block groups unfreeze from the top (deepest) down at ``milestones``.

    The backbone's block groups (stem first) are split, deepest first, into ``len(milestones)``
    contiguous chunks of near-equal size; chunk j starts training at epoch ``milestones[j]``.
    With milestones ``[1, 2, 3]`` and 18 groups, the top 6 groups join at epoch 1, the next 6 at
    epoch 2 and the stem-side 6 at epoch 3. The head trains from epoch 0.
    """

    name = "gradual_unfreeze"

    def __init__(
        self,
        milestones: list[int] | tuple[int, ...] = (1, 2, 3),
        backbone_lr_mult: float = 0.1,
        layer_decay: float | None = None,
        train_bn: bool = False,
        l2sp_alpha: float = 0.0,
        bn: str = "frozen",
        head_fit: str = "sgd",
        head_scale: str = "dim",
    ) -> None:
        super().__init__(
            backbone_lr_mult, layer_decay, train_bn, l2sp_alpha, bn, head_fit, head_scale
        )
        ms = [int(m) for m in milestones]
        if not ms or any(m < 0 for m in ms) or ms != sorted(ms):
            raise ValueError(
                f"strategy.milestones={list(milestones)} must be a non-empty ascending list of epochs >= 0"
            )
        self.milestones = ms

    def group_plans(self, n_groups: int) -> list[GroupPlan]:
        mults = self.lr_mults(n_groups)
        k = min(len(self.milestones), n_groups)
        plans = []
        for i in range(n_groups):
            depth = n_groups - 1 - i  # 0 = deepest group
            chunk = depth * k // n_groups
            plans.append(GroupPlan(self.milestones[chunk], mults[i]))
        return plans


@STRATEGIES.register("lp_ft")
class LPFT(TransferStrategy):
    """LP-FT (Kumar et al., ICLR 2022): linear probe, then fine-tune everything at a lower LR.

    For ``probe_epochs`` only the head trains (at ``optimizer.lr``); then the backbone joins and
    every group, the head included, trains at ``optimizer.lr x ft_lr_mult`` (layer_decay still
    applies to the backbone). Starting fine-tuning from a good head keeps the pretrained
    features from being distorted by a random head's large early gradients.
    """

    name = "lp_ft"

    def __init__(
        self,
        probe_epochs: int = 2,
        ft_lr_mult: float = 0.1,
        layer_decay: float | None = None,
        train_bn: bool = False,
        l2sp_alpha: float = 0.0,
        bn: str = "frozen",
        head_fit: str = "sgd",
        head_scale: str = "dim",
    ) -> None:
        super().__init__(1.0, layer_decay, train_bn, l2sp_alpha, bn, head_fit, head_scale)
        if probe_epochs < 0 or ft_lr_mult <= 0:
            raise ValueError("strategy.probe_epochs must be >= 0 and strategy.ft_lr_mult > 0")
        self.probe_epochs = int(probe_epochs)
        self.ft_lr_mult = float(ft_lr_mult)

    def group_plans(self, n_groups: int) -> list[GroupPlan]:
        return [GroupPlan(self.probe_epochs, m) for m in self.lr_mults(n_groups)]

    def phase_mult(self, epoch: int) -> float:
        return 1.0 if epoch < self.probe_epochs else self.ft_lr_mult
