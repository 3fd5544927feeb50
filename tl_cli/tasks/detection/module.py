"""The detection LightningModule: losses from torchvision's heads, COCO mAP on val/test.

Batches are either ``(images, targets)`` (live backbone: fine-tuning, eval, predict) or
``(maps, sizes, targets)`` from :mod:`cache` (frozen backbone). Predictions are mapped back
to original pixels before scoring, so every metric and output speaks the user's pixels.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from tl_cli.core.errors import TLError
from tl_cli.tasks.detection import metrics as M
from tl_cli.tasks.detection.model import build_detector
from tl_cli.tasks.detection.transforms import to_original
from tl_cli.transfer.schedulers import shape_fn


class DetectionModule(pl.LightningModule):
    """A detector trained under a simple transfer policy.

    Args:
        backbone: tl backbone config (``{"name": "efficientnet_lite0"}``) or a COCO detector name.
        class_names: index -> name.
        head: fcos | retinanet | fasterrcnn.
        image_size, fpn_channels, head_convs: see :func:`model.build_detector`.
        train_backbone: False = ``tl train`` (frozen body); True = ``tl finetune``.
        freeze_early: when fine-tuning, keep the stem and stride-2/4 stages frozen.
        lr, weight_decay, backbone_lr_mult: AdamW; the body trains at ``lr * backbone_lr_mult``.
        warmup_fraction, min_lr_ratio: the cosine schedule, stepped per batch.
        pretrained: False when rebuilding from a checkpoint.
    """

    monitor = M.MONITOR

    def __init__(
        self,
        backbone: dict[str, Any],
        class_names: list[str],
        head: str = "fcos",
        image_size: int = 512,
        fpn_channels: int = 128,
        head_convs: int = 4,
        train_backbone: bool = False,
        freeze_early: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        backbone_lr_mult: float = 0.1,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.01,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pretrained"])
        if not class_names:
            raise TLError("task=detection needs at least one class")
        self.class_names = list(class_names)
        self.detector = build_detector(
            dict(backbone), class_names, head, image_size, fpn_channels, head_convs, pretrained
        )
        self.train_backbone = bool(train_backbone)
        for p in self.detector.body_parameters():
            p.requires_grad_(self.train_backbone)
        if freeze_early:
            for p in self.detector.early_parameters():
                p.requires_grad_(False)
        self.val_map = M.make_metric()
        self.test_map = M.make_metric(extended=True)
        #: test predictions/targets in original pixels (error analysis, drawings)
        self.test_outputs: list[tuple[int, dict[str, Tensor], dict[str, Tensor]]] = []
        self.test_result: dict[str, Any] = {}

    # ------------------------------------------------------------------ mode
    def train(self, mode: bool = True) -> DetectionModule:
        super().train(mode)
        if mode and not self.train_backbone:
            self.detector.body.eval()  # a frozen body never changes (no dropout / drop-path)
        return self

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if isinstance(batch[0], OrderedDict):  # cached maps
            maps, sizes, targets = batch
            losses = self.detector.losses(maps, sizes, targets)
        else:
            images, targets = batch
            losses = self.detector(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise TLError(
                "the detection loss is not finite (diverged); lower optimizer.lr or check boxes"
            )
        bs = len(targets)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        for k, v in losses.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def predict_original(self, batch: Any):
        """Detections and targets in original pixels, from images or cached maps."""
        if isinstance(batch[0], OrderedDict):
            maps, sizes, targets = batch
            dets = self.detector.detect(maps, sizes)
        else:
            images, targets = batch
            dets = self.detector(images)
        preds, gts = [], []
        for d, t in zip(dets, targets, strict=True):
            preds.append({**d, "boxes": to_original(d["boxes"], t["scale"])})
            gts.append({**t, "boxes": to_original(t["boxes"], t["scale"])})
        return preds, gts

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        preds, gts = self.predict_original(batch)
        self.val_map.update(*M.metric_inputs(preds, gts))

    def on_validation_epoch_end(self) -> None:
        result = self.val_map.compute()
        self.val_map.reset()
        for k in M.KEYS:
            self.log(f"val/{k}", float(result[k]), prog_bar=k == "map_50")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        preds, gts = self.predict_original(batch)
        self.test_map.update(*M.metric_inputs(preds, gts))
        for p, t in zip(preds, gts, strict=True):
            self.test_outputs.append(
                (
                    int(t["index"]),
                    {k: v.cpu() for k, v in p.items()},
                    {k: v.cpu() for k, v in t.items()},
                )
            )

    def on_test_epoch_start(self) -> None:
        self.test_outputs = []

    def on_test_epoch_end(self) -> None:
        result = self.test_map.compute()
        self.test_map.reset()
        self.test_result = result
        flat = M.summarise(result, self.class_names, "test")
        for k, v in flat.items():
            self.log(k, v)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.detector.head_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [
            {"params": decay, "lr": hp.lr, "weight_decay": hp.weight_decay},
            {"params": no_decay, "lr": hp.lr, "weight_decay": 0.0},
        ]
        if self.train_backbone:
            body = [p for p in self.detector.body_parameters() if p.requires_grad]
            blr = hp.lr * hp.backbone_lr_mult
            groups += [
                {
                    "params": [p for p in body if p.ndim > 1],
                    "lr": blr,
                    "weight_decay": hp.weight_decay,
                },
                {"params": [p for p in body if p.ndim <= 1], "lr": blr, "weight_decay": 0.0},
            ]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, int(self.trainer.max_epochs or 1))
        shape = shape_fn(
            {
                "name": "cosine",
                "warmup_fraction": hp.warmup_fraction,
                "min_lr_ratio": hp.min_lr_ratio,
            },
            total,
            max(1, total // epochs),
        )
        sched = LambdaLR(opt, shape)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
