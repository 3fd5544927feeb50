"""Detection samples as tensors: one image and its target per item, a list per batch.

Detection batches are lists (images differ in size; the model pads them), so ``collate`` keeps
them as lists. Targets carry ``labels`` 1..C (0 is torchvision's background index, the same
for every head), an ``ignore`` mask (VOC ``difficult``, COCO ``iscrowd``), the index of the
sample and ``scale`` (resized / original, per axis) that maps boxes back to original pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from tl_cli.tasks.detection.formats import Sample
from tl_cli.tasks.detection.transforms import build_transforms, load_image, make_target


class DetectionDataset(Dataset):
    """``(image float [0, 1] (3, H, W), target)`` for each sample, transformed by v2.

    Args:
        samples: the split's records (``formats.Sample``).
        class_names: index -> name; a box's label is its index + 1.
        image_size: the long side after resizing.
        train: augment (flip, scale jitter, crop) when True.
        augment: ``transforms.AUGMENTS`` preset.
    """

    def __init__(
        self,
        samples: list[Sample],
        class_names: list[str],
        image_size: int,
        train: bool = False,
        augment: str = "default",
    ) -> None:
        self.samples = samples
        self.class_names = list(class_names)
        self._index = {n: i + 1 for i, n in enumerate(self.class_names)}
        self.image_size = int(image_size)
        self.train = train
        self.transform = build_transforms(image_size, train, augment)

    def __len__(self) -> int:
        return len(self.samples)

    def raw(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The untransformed uint8 image and its target in original pixels."""
        s = self.samples[i]
        img = load_image(s.path)
        h, w = img.shape[-2:]
        labels = [self._index[n] for n in s.names]
        return img, make_target(s.boxes, labels, s.ignore, h, w)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        img, target = self.raw(i)
        h, w = img.shape[-2:]
        img, target = self.transform(img, target)
        nh, nw = img.shape[-2:]
        return img, {
            "boxes": target["boxes"].as_subclass(torch.Tensor),
            "labels": target["labels"],
            "ignore": target["ignore"],
            "index": torch.tensor(i),
            "orig_size": torch.tensor([h, w]),
            # resized / original; with augmentation it describes the resize step only
            "scale": torch.tensor([nw / w, nh / h], dtype=torch.float32),
        }


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list, list]:
    """Keep images and targets as lists (detection models take lists of any-size images)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
