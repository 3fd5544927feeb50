"""``dataset=detection``: a VOC / COCO / YOLO root as a tl data module.

Class names are ``["__background__", *objects]``: torchvision's detectors reserve label 0 for
the background, so index ``i`` of ``class_names`` is label ``i`` everywhere (targets, outputs,
the checkpoint), and a one-class set (raccoons) still has the two names a checkpoint needs.
Split items are ``(Sample, -1)``: a detection image has no single class label (run-level class
balance checks skip ``-1``).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from tl_cli.core.errors import TLError
from tl_cli.data.base import DATASETS, TransferDataModule
from tl_cli.tasks.detection.cache import MAX_BYTES, CachedMaps, collate_cached, plan_views
from tl_cli.tasks.detection.dataset import DetectionDataset, collate
from tl_cli.tasks.detection.formats import read_detection

BACKGROUND = "__background__"


@DATASETS.register("detection")
class DetectionData(TransferDataModule):
    """Boxes in Pascal VOC, COCO or YOLO (see ``formats``), images resized to ``image_size``
    on the long side.

    Args:
        root: the dataset folder.
        image_size: the long side after resizing (boxes follow).
        test_fraction: share carved as test/ when the root is one pool.
        cache_views: views per training image the frozen-backbone cache keeps (view 0 plain).
        cache_max_bytes: the cache's memory cap (fewer views, or none, above it).
        other arguments: as :class:`TransferDataModule` (``augment``: light | none).
    """

    name = "detection"
    #: ``tl eval dataset.root=OTHER`` reads another VOC/COCO/YOLO root with this module (not the
    #: image modality's class folders), at the checkpoint's image_size, carving nothing
    reads_any_root = True

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 384,
        batch_size: int = 4,
        num_workers: int | None = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        augment: str = "light",
        balance: str | None = None,
        target_root: str | None = None,
        cache_views: int = 4,
        cache_max_bytes: int = MAX_BYTES,
    ) -> None:
        super().__init__(
            image_size,
            batch_size,
            num_workers,
            val_fraction,
            split_seed,
            augment,
            balance,
            target_root,
        )
        if image_size is None:
            raise TLError("dataset.image_size must be set for detection (e.g. 384)")
        if balance:
            raise TLError(
                "dataset.balance is not supported for detection (boxes, not image labels)"
            )
        if target_root:
            raise TLError("dataset.target_root (domain adaptation) is not supported for detection")
        if not 0 <= int(cache_views) <= 16:
            raise TLError(f"dataset.cache_views={cache_views} must be between 0 and 16")
        self.root = root
        self.test_fraction = float(test_fraction)
        self.cache_views = int(cache_views)
        self.cache_max_bytes = int(cache_max_bytes)
        self.info: Any = None

    @property
    def aug_preset(self) -> str:
        return "default" if self.augment in ("light", True) else "none"

    def _scan(self) -> None:
        if not self.root:
            raise TLError("dataset.root is not set: pass dataset.root=DIR (VOC, COCO or YOLO)")
        # carve False (tl eval dataset.root=OTHER): the folder is scored whole, nothing held out
        self.info = read_detection(
            self.root, self.val_fraction, self.test_fraction, self.split_seed, self.carve
        )
        self.class_names = [BACKGROUND, *self.info.class_names]
        self.splits = {k: [(s, -1) for s in v] for k, v in self.info.splits.items()}
        how = "carved" if self.info.carved else "split folders" if self.carve else "scored whole"
        self.layout = f"{self.info.format}, {how}"

    @property
    def object_names(self) -> list[str]:
        return self.class_names[1:]

    def samples(self, split: str) -> list[Any]:
        return [s for s, _ in self.split_items(split)]

    def dataset(self, split: str, train_aug: bool | None = None) -> DetectionDataset:
        aug = split == "train" if train_aug is None else train_aug
        return DetectionDataset(
            self.samples(split), self.object_names, int(self.image_size), aug, self.aug_preset
        )

    def collate_fn(self, ds: Dataset | None = None):
        return collate

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        boxes = sum(s.num_boxes for v in self.info.splits.values() for s in v)
        bg = sum(self.info.backgrounds.values())
        extra = f", {self.info.clipped} boxes clipped to their image" if self.info.clipped else ""
        return (
            f"{self.name}: {len(self.object_names)} object classes ({', '.join(self.object_names[:8])}"
            f"{', ...' if len(self.object_names) > 8 else ''}), {boxes} boxes, {sizes} images"
            f" ({self.layout}; {bg} background images{extra})"
        )


class CachedDetectionData(pl.LightningDataModule):
    """Frozen backbone: train/val served from cached multi-scale maps (computed in ``setup``
    on the first call, on the module's device), test from images."""

    def __init__(self, dm: DetectionData, task: Any) -> None:
        super().__init__()
        self.dm = dm
        self.task = task  # the backbone is task.backbone: the task moves as a whole
        self.train_maps: CachedMaps | None = None
        self.val_maps: CachedMaps | None = None
        self.views = 0

    # attributes the run layer reads from a data module
    def __getattr__(self, name: str) -> Any:
        if name in ("dm", "task") or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.dm, name)

    def setup(self, stage: str | None = None) -> None:
        if stage not in (None, "fit", "validate") or self.train_maps is not None:
            return
        from tl_cli.core.console import progress, say

        dm = self.dm
        train, val = dm.samples("train"), dm.samples("val")
        detector = self.task.detector
        self.views = plan_views(
            detector, len(train), int(dm.image_size), dm.cache_views, dm.cache_max_bytes
        )
        if self.views == 0:
            say("backbone maps not cached (dataset.cache_views=0 or over the memory cap)")
            return
        # setup() runs before Lightning moves the model: compute on the trainer's device
        trainer = self.__dict__.get("trainer")
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        home = next(self.task.parameters()).device
        self.task.to(device)
        total = self.views * -(-len(train) // 8) + -(-len(val) // 8)
        try:
            with progress("caching backbone maps", total) as advance:
                args = (dm.object_names, int(dm.image_size), dm.aug_preset)
                self.train_maps = CachedMaps(detector, train, *args, self.views, device, advance)
                self.val_maps = CachedMaps(detector, val, *args, 1, device, advance)
        finally:
            self.task.to(home)
        mb = (self.train_maps.nbytes() + self.val_maps.nbytes()) / 2**20
        say(
            f"cached backbone maps: {self.views} views of {len(train)} train images, {len(val)} val ({mb:.0f} MB)"
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_maps is None:
            return self.dm.train_dataloader()
        return self.dm.make_loader(self.train_maps, shuffle=True, collate_fn=collate_cached)

    def val_dataloader(self) -> DataLoader:
        if self.val_maps is None:
            return self.dm.val_dataloader()
        return self.dm.make_loader(self.val_maps, shuffle=False, collate_fn=collate_cached)

    def test_dataloader(self) -> DataLoader:
        return self.dm.test_dataloader()


def to_device(targets: list[dict[str, torch.Tensor]], device: Any) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]
