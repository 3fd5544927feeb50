"""The transfer policy: which parameters train when, at which LR, and what BatchNorm does.

A `TransferPolicy` is built from a strategy (``tl_cli.transfer.strategies``) and a task module that has a
``backbone`` exposing ``block_groups()``. It works for any modality: it only sees parameter
names in ordered block groups. The task module delegates to it and holds no policy itself:

* **Plan.** Every parameter gets (unfreeze epoch or never, LR multiplier, group label). Backbone
  parameters follow the strategy's per-group plan; every other trainable submodule (the head, a
  domain discriminator, ...) trains from epoch 0 at ``optimizer.lr``; submodules listed in
  ``frozen`` (a teacher) never train.
* **Apply.** At every epoch start: ``requires_grad`` and BatchNorm modes. Frozen BatchNorm runs in
  eval mode with running stats that never move (not Lightning's ``freeze(train_bn=False)``, which
  keeps batch statistics: Lightning #15062). With ``strategy.bn=frozen`` (the default) so does the
  BatchNorm of groups that train (scale and shift still learn; Keras's fine-tuning advice): the
  features the head was fitted on do not shift when the backbone joins.
* **Optimizer groups.** Fixed for the whole run; a group's LR is gated to 0 until its unfreeze
  epoch by one ``LambdaLR``, so schedulers and resume survive unfreezing (Lightning #6891, #8720).
* **L2-SP** and the **DDP late-unfreeze gradient sync** (Lightning #20340).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tl_cli.transfer.strategies import TransferStrategy

_BN = (nn.modules.batchnorm._BatchNorm,)
_NO_DECAY_NDIM = 1  # biases and norm scales


class TransferPolicy:
    """The strategy applied to one task module.

    Args:
        strategy: the transfer strategy (a pure per-group plan).
        module: the task module; ``module.backbone`` must expose ``block_groups()``.
        frozen: names of top-level submodules that never train (e.g. a distillation teacher).
    """

    def __init__(
        self, strategy: TransferStrategy, module: nn.Module, frozen: tuple[str, ...] = ()
    ) -> None:
        self.strategy = strategy
        self.module = module
        self.frozen = tuple(frozen)
        self.plan = self._param_plan()
        self._frozen_bn: list[nn.Module] = []
        self._ddp_registered: set[str] | None = None
        # L2-SP: the pretrained starting point (kept out of the state dict: it is the init itself)
        self._l2sp_ref: dict[str, torch.Tensor] = (
            {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
            if strategy.l2sp_alpha > 0
            else {}
        )

    # ------------------------------------------------------------------ plan
    @property
    def backbone(self) -> nn.Module:
        return self.module.backbone

    def _param_plan(self) -> dict[str, tuple[int | None, float, str]]:
        """param name -> (unfreeze epoch or None, LR multiplier, group label)."""
        groups = self.backbone.block_groups()
        plans = self.strategy.group_plans(len(groups))
        # the head-only epoch (an L-BFGS head before fine-tuning) shifts every group, the head's too
        shift = self.head_only_epochs
        bn_params = {
            f"backbone.{mn}.{pn}"
            for mn, m in self.backbone.named_modules()
            if isinstance(m, _BN)
            for pn, _ in m.named_parameters(recurse=False)
        }
        out: dict[str, tuple[int | None, float, str]] = {}
        for gi, (names, plan) in enumerate(zip(groups, plans, strict=True)):
            for n in names:
                full = f"backbone.{n}"
                ue = None if plan.unfreeze_epoch is None else plan.unfreeze_epoch + shift
                if self.strategy.train_bn and full in bn_params:
                    ue = shift  # BN of frozen groups trains from the start
                out[full] = (ue, plan.lr_mult, f"backbone.{gi}")
        for n, _ in self.module.named_parameters():
            if n in out:
                continue
            top = n.split(".", 1)[0]
            if top == "backbone":  # every backbone parameter must be in a group
                raise RuntimeError(f"backbone parameter outside any block group: {n}")
            out[n] = (None if top in self.frozen else shift, 1.0, top)
        return out

    @property
    def head_only_epochs(self) -> int:
        """Epochs that only score the L-BFGS head, before anything trains (see the strategy)."""
        return int(getattr(self.strategy, "head_only_epochs", 0))

    def head_only(self, epoch: int) -> bool:
        """Whether `epoch` only scores the fitted head (no parameter trains, no optimizer step)."""
        return epoch < self.head_only_epochs

    def trainable_at(self, epoch: int) -> set[str]:
        return {n for n, (ue, _, _) in self.plan.items() if ue is not None and epoch >= ue}

    @property
    def backbone_ever_trains(self) -> bool:
        return any(
            ue is not None for n, (ue, _, _) in self.plan.items() if n.startswith("backbone.")
        )

    @property
    def can_cache_features(self) -> bool:
        """Backbone features never change during the run, and the strategy asks for caching."""
        return (
            bool(getattr(self.strategy, "cache_features", False)) and not self.backbone_ever_trains
        )

    def apply(self, epoch: int) -> None:
        """Set requires_grad and BatchNorm modes for `epoch` (idempotent).

        The head-only epoch keeps the ``requires_grad`` of the first training epoch (DDP registers
        those parameters when it wraps the model) but takes no step, and every BatchNorm layer stays
        in eval mode, so the model it scores is exactly the fitted head on the pretrained backbone.
        """
        head_only = self.head_only(epoch)
        live = self.trainable_at(max(epoch, self.head_only_epochs))
        for n, p in self.module.named_parameters():
            p.requires_grad_(n in live)
        frozen = []
        for name, sub in self.module.named_children():
            if name in self.frozen:
                frozen.extend(m for m in sub.modules() if isinstance(m, _BN))
        for m in self.backbone.modules():
            if isinstance(m, _BN):
                ps = list(m.parameters(recurse=False))
                if (
                    head_only
                    or (ps and not any(p.requires_grad for p in ps))
                    or (not ps and not live)
                ):
                    frozen.append(m)
                elif (
                    getattr(self.strategy, "bn", "train") == "frozen" and not self.strategy.train_bn
                ):
                    frozen.append(m)  # strategy.bn=frozen: pretrained stats kept, affine trains
                else:
                    m.train(self.module.training)  # an unfrozen BN follows the module's mode
        self._frozen_bn = frozen
        self.fix_bn()

    def fix_bn(self) -> None:
        """Frozen BatchNorm back to eval mode (Lightning calls ``module.train()`` around validation)."""
        for m in self._frozen_bn:
            m.eval()

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups keyed by (unfreeze epoch, LR multiplier, decay); never-trained params are left out."""
        buckets: dict[tuple, dict[str, Any]] = {}
        params = dict(self.module.named_parameters())
        # backbone groups that join at different epochs get the epoch in their name (backbone@e2)
        staged = (
            len(
                {
                    ue
                    for n, (ue, _, _) in self.plan.items()
                    if n.startswith("backbone.") and ue is not None
                }
            )
            > 1
        )
        for n, (ue, mult, label) in self.plan.items():
            if ue is None:
                continue
            decay = params[n].ndim > _NO_DECAY_NDIM
            if self._l2sp_ref and n.startswith("backbone."):
                decay = False  # L2-SP replaces weight decay on the backbone
            key = (ue, mult, decay, label if self.strategy.layer_decay else label.split(".")[0])
            b = buckets.setdefault(
                key,
                {
                    "params": [],
                    "lr": base_lr * mult,
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": key[3]
                    + (f"@e{ue}" if staged and key[3].startswith("backbone") else "")
                    + ("" if decay else "/no_decay"),
                    "unfreeze_epoch": ue,
                    "lr_mult": mult,
                },
            )
            b["params"].append(params[n])
        return list(buckets.values())

    def lr_lambdas(self, optimizer: torch.optim.Optimizer, shape: Any, steps_per_epoch: int):
        """One LR factor function per param group: the schedule's shape, gated by the plan."""
        from tl_cli.transfer.schedulers import gated

        shift = self.head_only_epochs
        return [
            gated(
                shape,
                g["unfreeze_epoch"],
                steps_per_epoch,
                lambda e: self.strategy.phase_mult(e - shift),
                offset=shift,
            )
            for g in optimizer.param_groups
        ]

    # ------------------------------------------------------------------ L2-SP
    @property
    def l2sp_alpha(self) -> float:
        return self.strategy.l2sp_alpha if self._l2sp_ref else 0.0

    def l2sp_penalty(self) -> torch.Tensor:
        """Squared distance of the training backbone weights from the pretrained ones."""
        total = torch.zeros((), device=next(self.backbone.parameters()).device)
        for n, p in self.backbone.named_parameters():
            if p.requires_grad:
                ref = self._l2sp_ref[n]
                if ref.device != p.device:
                    ref = self._l2sp_ref[n] = ref.to(p.device)
                total = total + (p - ref).pow(2).sum()
        return total

    # ------------------------------------------------------------------ DDP
    def on_fit_start(self, world_size: int) -> None:
        """Remember which params DDP registered for all-reduce (those training at wrap time).

        DDP wraps the model after setup("fit") applied epoch 0's plan; params unfrozen later are
        never synced by DDP and the ranks silently drift apart (Lightning #20340).
        """
        self._ddp_registered = None
        if (
            world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            self._ddp_registered = {n for n, p in self.module.named_parameters() if p.requires_grad}

    def sync_late_grads(self) -> None:
        """All-reduce the gradients of params that joined after DDP wrapped the model."""
        if not self._ddp_registered:
            return
        late = [
            p
            for n, p in self.module.named_parameters()
            if p.requires_grad and p.grad is not None and n not in self._ddp_registered
        ]
        if late:
            sync_grads(late)


def sync_grads(params: list[torch.Tensor]) -> None:
    """Average the gradients of `params` over all ranks in one flat all-reduce."""
    world = torch.distributed.get_world_size()
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= world
    i = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[i : i + n].view_as(p.grad))
        i += n
