"""SimCLR continued pretraining (Chen et al., 2020) and ``init=RUN``: the method `tl pretrain` runs.

Two augmented views of each image go through the backbone and a projection head; the NT-Xent loss
pulls the two views of an image together and pushes the other images of the batch away. The
loss, the projection head and the view augmentation come from `lightly` (``NTXentLoss``,
``SimCLRProjectionHead``, ``SimCLRTransform``). ``init=RUN`` points ``backbone.weights_path`` at a
pretrain run's ``backbone.safetensors`` after checking the backbone it was pretrained from.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from tl_cli.core.console import say
from tl_cli.core.errors import TLError
from tl_cli.core.outputs import write_bytes
from tl_cli.core.registry import plain

#: what `tl pretrain` writes and ``init=RUN`` reads
WEIGHTS_FILE = "backbone.safetensors"
SIDECAR = "pretrain.json"


class TwoViews(torch.utils.data.Dataset):
    """Unlabelled images -> a list of augmented views (``lightly``'s multi-view transforms)."""

    def __init__(self, paths: list[Path], transform: Any) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        from tl_cli.modalities.image.data import load_image

        return self.transform(load_image(self.paths[i]))


def view_transform(prep: dict[str, Any], p: dict[str, Any]) -> Any:
    """SimCLR's two-view augmentation at the backbone's input size, normalised as it expects."""
    from lightly.transforms import SimCLRTransform

    size = int(prep["input_size"])
    return SimCLRTransform(
        input_size=size,
        min_scale=float(p["min_scale"]),
        cj_strength=float(p["color_jitter"]),
        # blur washes out small images (CIFAR, icons): lightly's CIFAR recipes turn it off
        gaussian_blur=0.5 if size >= 96 else 0.0,
        normalize={"mean": list(prep["mean"]), "std": list(prep["std"])},
    )


def warmup_cosine(step: int, warmup: int, total: int, start: int = 0) -> float:
    """LR factor: 0 before ``start``, linear warm-up over ``warmup`` steps, cosine to 0 at ``total``."""
    if step < start:
        return 0.0
    s = step - start
    span = max(1, total - start)
    if warmup > 0 and s < warmup:
        return (s + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, span - warmup))))


class SimCLRModule(pl.LightningModule):
    """Backbone + SimCLR projection head, trained with NT-Xent on two views per image."""

    def __init__(self, backbone: nn.Module, p: dict[str, Any], max_steps: int) -> None:
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = backbone
        nf = int(backbone.num_features)
        self.head = SimCLRProjectionHead(nf, int(p["hidden_dim"]), int(p["projection_dim"]))
        self.criterion = NTXentLoss(temperature=float(p["temperature"]))
        self.p = p
        self.max_steps = int(max_steps)
        self.losses: list[float] = []

    def train(self, mode: bool = True) -> SimCLRModule:
        super().train(mode)
        if mode and self.p["bn"] == "frozen":  # keep the pretrained BatchNorm statistics
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def on_train_epoch_start(self) -> None:
        self.train()  # Lightning keeps modules' modes as they are: set them (BN frozen) here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0, x1 = batch
        z = self(torch.cat([x0, x1]))  # one pass: BatchNorm (if training) sees both views
        loss = self.criterion(*z.chunk(2))
        self.losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:
        p = self.p
        lr = float(p["lr"])
        groups = [
            {"params": [q for q in self.backbone.parameters() if q.requires_grad], "lr": lr},
            {"params": list(self.head.parameters()), "lr": lr * float(p["head_lr_mult"])},
        ]
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=float(p["weight_decay"]))
        warm, head_warm, total = int(p["warmup_steps"]), int(p["head_warmup_steps"]), self.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            [
                lambda s: warmup_cosine(s, warm, total, start=head_warm),  # backbone
                lambda s: warmup_cosine(s, warm, total),  # projection head
            ],
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The architecture's own state dict (classifier already removed), as `_load_weights_file` reads."""
    model = getattr(backbone, "model", backbone)
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_backbone(backbone: nn.Module, path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save

    write_bytes(path, save(backbone_state(backbone), metadata={"format": "pt", **meta}))


def resolve_init(init: Any, backbone_cfg: Any) -> str:
    """``init=RUN`` (a pretrain run dir or its backbone.safetensors) -> the weights file path.

    The sidecar beside it must name the same backbone as this run's ``backbone.name``.
    """
    raw = str(init)
    p = Path(os.path.expanduser(raw))
    f = p / WEIGHTS_FILE if p.is_dir() else p
    if not f.is_file():
        raise TLError(
            f"init={raw}: no {WEIGHTS_FILE} there (init takes a tl pretrain run dir or its {WEIGHTS_FILE})"
        )
    if f.suffix != ".safetensors":
        raise TLError(f"init={raw}: expected a .safetensors file written by tl pretrain")
    side = f.parent / SIDECAR
    try:
        meta = json.loads(side.read_text())
        name = meta["backbone"]["name"]
        if not isinstance(name, str):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise TLError(
            f"init={raw}: {side} is missing or unreadable; pass backbone.weights_path={f} to load "
            "the weights without the backbone check"
        ) from None
    want = (plain(backbone_cfg) or {}).get("name")
    if name != want:
        raise TLError(
            f"init={raw} was pretrained from backbone {name!r}, but this run's backbone is "
            f"{want!r}: add backbone.name={name} (or backbone={name})"
        )
    return str(f.resolve())


def apply_init(cfg: DictConfig) -> None:
    """`tl train/finetune init=RUN`: set ``backbone.weights_path`` to the pretrained weights."""
    init = cfg.get("init")
    if not init:
        return
    if (plain(cfg.backbone) or {}).get("weights_path"):
        raise TLError("pass init=RUN or backbone.weights_path=FILE, not both")
    path = resolve_init(init, cfg.backbone)
    with open_dict(cfg):
        cfg.backbone.weights_path = path
    say(f"init={init}: backbone weights from {path}")
