"""Train a detector on a dataset root with Lightning: the pieces the train command will call.

``fit_detector`` reads the root (any supported format), builds the module, caches the frozen
backbone's maps when the backbone does not train, fits with Lightning (best ``val/map_50``
kept by ``ModelCheckpoint``) and tests the best weights. It returns the metrics and the
timings; writing reports is the command layer's job.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from tl_cli.core.console import progress, say
from tl_cli.tasks.detection.cache import MAX_BYTES, CachedMaps, collate_cached, plan_views
from tl_cli.tasks.detection.dataset import DetectionDataset, collate
from tl_cli.tasks.detection.formats import read_detection
from tl_cli.tasks.detection.module import DetectionModule


class _EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.train_seconds: list[float] = []
        self.val_seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_seconds.append(time.perf_counter() - self._t)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._v = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_seconds.append(time.perf_counter() - self._v)


def fit_detector(
    root: str | Path,
    out_dir: str | Path,
    train_backbone: bool = False,
    freeze_early: bool = True,
    backbone: dict[str, Any] | None = None,
    head: str = "fcos",
    image_size: int = 512,
    fpn_channels: int = 128,
    head_convs: int = 4,
    epochs: int = 20,
    batch_size: int = 4,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    backbone_lr_mult: float = 0.1,
    augment: str = "default",
    cache_views: int = 4,
    cache_max_bytes: int = MAX_BYTES,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    split_seed: int = 0,
    accelerator: str = "cpu",
    gradient_clip_val: float | None = 10.0,
    cache: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Fit and test; returns metrics (``test/map_50`` ...), timings and the module.

    ``cache``: the ``(train, val)`` :class:`CachedMaps` of an earlier run with the same
    backbone, data and image size (returned as ``out["cache"]``), reused instead of recomputed.
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    data = read_detection(root, val_fraction, test_fraction, split_seed)
    names = data.class_names
    module = DetectionModule(
        backbone or {"name": "efficientnet_lite0"},
        names,
        head=head,
        image_size=image_size,
        fpn_channels=fpn_channels,
        head_convs=head_convs,
        train_backbone=train_backbone,
        freeze_early=freeze_early,
        lr=lr,
        weight_decay=weight_decay,
        backbone_lr_mult=backbone_lr_mult,
    )
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        module = module.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    cache_seconds = 0.0
    views = 0
    if not train_backbone and cache is not None:
        train_ds, val_ds = cache
        views = len(train_ds.views)
    elif not train_backbone and cache_views > 0:
        views = plan_views(
            module.detector, len(data.splits["train"]), image_size, cache_views, cache_max_bytes
        )
        if views:
            module.detector.to(device)
            n_tr, n_val = len(data.splits["train"]), len(data.splits["val"])
            total = views * -(-n_tr // 8) + -(-n_val // 8)
            with progress("caching backbone maps", total) as advance:
                train_ds: Any = CachedMaps(
                    module.detector,
                    data.splits["train"],
                    names,
                    image_size,
                    augment,
                    views,
                    device,
                    advance,
                )
                # validation images are never augmented: their maps are cached once too
                val_ds: Any = CachedMaps(
                    module.detector,
                    data.splits["val"],
                    names,
                    image_size,
                    augment,
                    1,
                    device,
                    advance,
                )
            module.detector.cpu()
            cache_seconds = time.perf_counter() - t0
            say(
                f"cached backbone maps: {views} views x {len(train_ds)} train images and "
                f"{len(val_ds)} val images in {cache_seconds:.0f}s"
            )
    if views:
        train_loader = DataLoader(
            train_ds,
            batch_size=batch_size,
            shuffle=True,
            collate_fn=collate_cached,
            drop_last=False,
        )
    else:
        train_loader = DataLoader(
            DetectionDataset(data.splits["train"], names, image_size, True, augment),
            batch_size=batch_size,
            shuffle=True,
            collate_fn=collate,
        )
    if views:
        val_loader = DataLoader(val_ds, batch_size=batch_size, collate_fn=collate_cached)
    else:
        val_loader = DataLoader(
            DetectionDataset(data.splits["val"], names, image_size),
            batch_size=batch_size,
            collate_fn=collate,
        )
    timer = _EpochTimer()
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=str(Path(out_dir) / "checkpoints"),
        monitor="val/map_50",
        mode="max",
        save_last=False,
        filename="best",
    )
    trainer = pl.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        max_epochs=epochs,
        precision="16-mixed" if gpu else "32-true",
        callbacks=[ckpt, timer],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=gradient_clip_val,
        default_root_dir=str(out_dir),
    )
    t1 = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    fit_seconds = time.perf_counter() - t1
    out: dict[str, Any] = {
        "format": data.format,
        "classes": names,
        "images": {k: len(v) for k, v in data.splits.items()},
        "cache_views": views,
        "cache_seconds": round(cache_seconds, 1),
        "fit_seconds": round(fit_seconds, 1),
        "train_seconds_per_epoch": round(
            sum(timer.train_seconds) / max(1, len(timer.train_seconds)), 2
        ),
        "val_seconds_per_epoch": round(sum(timer.val_seconds) / max(1, len(timer.val_seconds)), 2),
        "best_val_map_50": float(ckpt.best_model_score)
        if ckpt.best_model_score is not None
        else None,
        "best_path": ckpt.best_model_path,
    }
    if "test" in data.splits:
        test_loader = DataLoader(
            DetectionDataset(data.splits["test"], names, image_size),
            batch_size=batch_size,
            collate_fn=collate,
        )
        res = trainer.test(
            module, test_loader, ckpt_path=ckpt.best_model_path or None, verbose=False
        )
        out.update({k: round(float(v), 4) for k, v in res[0].items()})
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    out["module"] = module
    out["data"] = data
    out["cache"] = (train_ds, val_ds) if views else None
    return out
