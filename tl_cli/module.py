"""TransferModule: pretrained backbone + new head + loss + metrics + the strategy's plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from tl_cli import __version__
from tl_cli.data import effective_preprocessing
from tl_cli.errors import TLError
from tl_cli.schedulers import PlateauState, gated, shape_fn
from tl_cli.strategies import TransferStrategy

_BN = (nn.modules.batchnorm._BatchNorm,)
_NO_DECAY_NDIM = 1  # biases and norm scales


class TransferModule(pl.LightningModule):
    """A pretrained backbone with a swappable head, trained by a transfer strategy.

    All arguments are plain containers so the checkpoint loads with ``weights_only=True``
    and alone is enough to rebuild the model for ``tl eval``.

    Args:
        backbone, head, strategy, optimizer, scheduler: config dicts (``_target_`` style).
        class_names: index -> name; the head's width.
        image_size: input size override (``dataset.image_size``); None keeps the backbone's.
        label_smoothing: cross-entropy label smoothing for training.
        pretrained: False when rebuilding from a checkpoint (no weights are loaded or fetched).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        head: dict[str, Any],
        strategy: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        class_names: list[str],
        image_size: int | None = None,
        label_smoothing: float = 0.0,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pretrained"])
        self.class_names = list(class_names)
        self.backbone = instantiate(backbone, pretrained=pretrained, _convert_="all")
        self.head = instantiate(
            head, in_features=self.backbone.num_features, num_classes=len(class_names)
        )
        try:
            self.strategy: TransferStrategy = instantiate(strategy, _convert_="all")
        except Exception as e:  # Hydra wraps constructor errors
            raise TLError(f"strategy: {_root_cause(e)}") from None
        self.preprocessing = effective_preprocessing(self.backbone.preprocessing, image_size)
        self.label_smoothing = float(label_smoothing)
        self._plan = self._param_plan()
        self._frozen_bn: list[nn.Module] = []
        sched = dict(scheduler)
        self.plateau = (
            PlateauState(
                **{k: sched[k] for k in ("mode", "factor", "patience", "threshold") if k in sched}
            )
            if sched.get("name") == "plateau"
            else None
        )
        # L2-SP: the pretrained starting point, kept out of the state dict (it is the init itself)
        self._l2sp_ref: dict[str, torch.Tensor] = (
            {n: p.detach().clone() for n, p in self.backbone.named_parameters()}
            if self.strategy.l2sp_alpha > 0
            else {}
        )
        n = len(class_names)
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.test_acc = MulticlassAccuracy(n, average="micro")
        self.test_f1 = MulticlassF1Score(n, average="macro")
        self.apply_plan(0)

    # ------------------------------------------------------------------ plan
    def _param_plan(self) -> dict[str, tuple[int | None, float, str]]:
        """param name -> (unfreeze epoch or None, LR multiplier, group label)."""
        groups = self.backbone.block_groups()
        plans = self.strategy.group_plans(len(groups))
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
                ue = plan.unfreeze_epoch
                if self.strategy.train_bn and full in bn_params:
                    ue = 0  # BN of frozen groups trains from the start
                out[full] = (ue, plan.lr_mult, f"backbone.{gi}")
        for n, _ in self.head.named_parameters():
            out[f"head.{n}"] = (0, 1.0, "head")
        missing = [n for n, _ in self.named_parameters() if n not in out]
        if missing:  # every parameter must be planned, or it would silently never train
            raise RuntimeError(f"parameters outside any block group: {missing[:5]}")
        return out

    def trainable_at(self, epoch: int) -> set[str]:
        return {n for n, (ue, _, _) in self._plan.items() if ue is not None and epoch >= ue}

    def apply_plan(self, epoch: int) -> None:
        """Set requires_grad and BatchNorm modes for `epoch` (idempotent)."""
        live = self.trainable_at(epoch)
        for n, p in self.named_parameters():
            p.requires_grad_(n in live)
        frozen = []
        for m in self.backbone.modules():
            if isinstance(m, _BN):
                ps = list(m.parameters(recurse=False))
                if (ps and not any(p.requires_grad for p in ps)) or (not ps and not live):
                    frozen.append(m)
                else:
                    m.train(self.training)  # an unfrozen BN follows the module's mode again
        self._frozen_bn = frozen
        self._fix_bn()

    def _fix_bn(self) -> None:
        for m in self._frozen_bn:
            m.eval()

    def train(self, mode: bool = True) -> TransferModule:
        # Lightning calls train() around validation; frozen BN must stay in eval mode.
        super().train(mode)
        if mode:
            self._fix_bn()
        return self

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.apply_plan(0)

    def on_train_epoch_start(self) -> None:
        self.apply_plan(self.current_epoch)

    # ------------------------------------------------------------------ DDP
    def on_fit_start(self) -> None:
        # DDP registers for gradient all-reduce only the params that required grad when it wrapped
        # the model (in strategy.setup, after setup("fit") applied epoch 0's plan). Params unfrozen
        # later are never synced by DDP and the ranks silently drift apart (Lightning #20340).
        # We remember DDP's set and all-reduce the others ourselves in on_after_backward.
        self._ddp_registered: set[str] | None = None
        if (
            self.trainer.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            self._ddp_registered = {n for n, p in self.named_parameters() if p.requires_grad}

    def on_after_backward(self) -> None:
        if not getattr(self, "_ddp_registered", None):
            return
        late = [
            p
            for n, p in self.named_parameters()
            if p.requires_grad and p.grad is not None and n not in self._ddp_registered
        ]
        if late:
            sync_grads(late)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B,C,H,W) or cached features (B,F) -> logits."""
        return self.head(x) if x.ndim == 2 else self(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.logits(x)
        loss = F.cross_entropy(out, y, label_smoothing=self.label_smoothing)
        if self._l2sp_ref:
            penalty = self.l2sp_penalty()
            self.log("train/l2sp", penalty, on_step=False, on_epoch=True)
            loss = loss + self.strategy.l2sp_alpha * penalty
        self.train_acc(out, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self.logits(x)
        self.val_acc(out, y)
        self.log("val/loss", F.cross_entropy(out, y), on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def l2sp_penalty(self) -> torch.Tensor:
        """Squared distance of the training backbone weights from the pretrained ones."""
        total = torch.zeros((), device=self.device)
        for n, p in self.backbone.named_parameters():
            if p.requires_grad:
                ref = self._l2sp_ref[n]
                if ref.device != p.device:
                    ref = self._l2sp_ref[n] = ref.to(p.device)
                total = total + (p - ref).pow(2).sum()
        return total

    def on_validation_epoch_end(self) -> None:
        if self.plateau is not None and not self.trainer.sanity_checking:
            monitor = dict(self.hparams.scheduler).get("monitor", "val/loss")
            if monitor not in self.trainer.callback_metrics:
                raise TLError(
                    f"scheduler.monitor={monitor!r} is not a logged metric (try val/loss or val/acc)"
                )
            self.plateau.update(float(self.trainer.callback_metrics[monitor]))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self.logits(x)
        self.test_acc(out, y)
        self.test_f1(out, y)
        self.log("test/loss", F.cross_entropy(out, y), on_epoch=True, sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True)
        self.log("test/macro_f1", self.test_f1, on_epoch=True)

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups keyed by (unfreeze epoch, LR multiplier, decay); never-trained params are left out."""
        buckets: dict[tuple, dict[str, Any]] = {}
        params = dict(self.named_parameters())
        # backbone groups that join at different epochs get the epoch in their name (backbone@e2)
        staged = (
            len(
                {
                    ue
                    for n, (ue, _, _) in self._plan.items()
                    if n.startswith("backbone.") and ue is not None
                }
            )
            > 1
        )
        for n, (ue, mult, label) in self._plan.items():
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

    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer)
        base_lr = float(opt_cfg.get("lr", 1e-3))
        wd = float(opt_cfg.get("weight_decay", 0.0))
        groups = self.param_groups(base_lr, wd)
        if not groups:
            raise TLError("nothing to train: the strategy freezes every parameter")
        try:
            optimizer = instantiate(opt_cfg, _partial_=True)(groups)
        except TypeError as e:
            raise TLError(f"optimizer: {e}") from None
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, int(self.trainer.max_epochs or 1))
        spe = max(1, total // epochs)
        shape = shape_fn({**dict(self.hparams.scheduler), "_state": self.plateau}, total, spe)
        lambdas = [
            gated(shape, g["unfreeze_epoch"], spe, self.strategy.phase_mult)
            for g in optimizer.param_groups
        ]
        scheduler = LambdaLR(optimizer, lambdas)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tl"] = {
            "version": __version__,
            "class_names": list(self.class_names),
            "preprocessing": dict(self.preprocessing),
            "backbone": self.backbone.name,
            "strategy": self.strategy.name,
            "dataset": getattr(self, "dataset_config", None),
        }
        if self.plateau is not None:
            checkpoint["tl_plateau"] = self.plateau.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.plateau is not None and "tl_plateau" in checkpoint:
            self.plateau.load_state_dict(checkpoint["tl_plateau"])


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


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a tl checkpoint safely: ``weights_only=True`` (no pickled code runs) and only tl's
    own classes accepted as ``_target_`` (a plain-data checkpoint is also a recipe)."""
    from tl_cli.safety import read_untrusted_checkpoint

    return read_untrusted_checkpoint(path)


def load_module(path: str | Path) -> tuple[TransferModule, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint alone (no network, no original config)."""
    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    module = TransferModule(**hp, pretrained=False)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise TLError(
            f"checkpoint={path}: weights do not fit the model it describes ({str(e).splitlines()[0][:160]})"
        ) from None
    module.eval()
    return module, ckpt
