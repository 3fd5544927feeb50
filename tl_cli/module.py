"""TransferModule: pretrained backbone + new head + loss + metrics + the strategy's plan."""

from __future__ import annotations

import pickle
import zipfile
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
from tl_cli.schedulers import gated, shape_fn
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
        self.head = instantiate(head, in_features=self.backbone.num_features, num_classes=len(class_names))
        try:
            self.strategy: TransferStrategy = instantiate(strategy, _convert_="all")
        except Exception as e:  # Hydra wraps constructor errors
            raise TLError(f"strategy: {_root_cause(e)}") from None
        self.preprocessing = effective_preprocessing(self.backbone.preprocessing, image_size)
        self.label_smoothing = float(label_smoothing)
        self._plan = self._param_plan()
        self._frozen_bn: list[nn.Module] = []
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
        for n, (ue, mult, label) in self._plan.items():
            if ue is None:
                continue
            decay = params[n].ndim > _NO_DECAY_NDIM
            key = (ue, mult, decay, label if self.strategy.layer_decay else label.split(".")[0])
            b = buckets.setdefault(
                key,
                {
                    "params": [],
                    "lr": base_lr * mult,
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": key[3] + ("" if decay else "/no_decay"),
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
        shape = shape_fn(dict(self.hparams.scheduler), total, spe)
        lambdas = [gated(shape, g["unfreeze_epoch"], spe) for g in optimizer.param_groups]
        scheduler = LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a tl checkpoint safely (``weights_only=True``: no code in it can run)."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise TLError(f"checkpoint={p}: file not found")
    if not p.is_file():
        raise TLError(f"checkpoint={p}: not a file")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0][:160]
        raise TLError(
            f"checkpoint={p}: refused: it holds Python objects that are not plain data, and tl loads "
            f"checkpoints with weights_only=True ({first})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise TLError(f"checkpoint={p}: not a readable checkpoint (truncated or not a torch file: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "tl" not in ckpt or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise TLError(f"checkpoint={p}: not a tl checkpoint (no 'tl' metadata, hyper_parameters or state_dict)")
    return ckpt


def load_module(path: str | Path) -> tuple[TransferModule, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint alone (no network, no original config)."""
    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    module = TransferModule(**hp, pretrained=False)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise TLError(f"checkpoint={path}: weights do not fit the model it describes ({str(e).splitlines()[0][:160]})") from None
    module.eval()
    return module, ckpt
