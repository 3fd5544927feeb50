"""Frozen-backbone feature maps, computed once: the pyramid and head then train on them.

With the backbone frozen (``tl train``), every epoch would push the same images through the
same network; on a CPU that pass is most of an epoch. The cache runs it ``views`` times per
training image instead (view 0 un-augmented, the others drawn from the training augmentation:
flip, scale jitter, crop) and keeps the multi-scale maps in float16. Each epoch then serves one
view per image at random, so the head still sees augmented data.

Memory: about ``C3*(S/8)^2 + C4*(S/16)^2 + C5*(S/32)^2`` halves per image and view (0.5 MB for
EfficientNet-Lite0 at 512 px); ``views`` shrinks to fit ``max_bytes`` and the cache is skipped
(live backbone) when even one view does not fit.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from tl_cli.tasks.detection.dataset import DetectionDataset
from tl_cli.tasks.detection.model import Detector, pad_maps

#: default cap on the cache's memory
MAX_BYTES = 2 * 1024**3


def bytes_per_view(detector: Detector, image_size: int) -> int:
    """Upper bound of one image's maps (a square ``image_size`` image), float16."""
    body = detector.body
    channels = getattr(body, "out_channels", None)
    strides = getattr(body, "strides", None)
    if channels is None or strides is None:
        with torch.no_grad():
            maps = body(torch.zeros(1, 3, 64, 64))
        channels = [m.shape[1] for m in maps.values()]
        strides = [64 // m.shape[-1] for m in maps.values()]
    s = -(-int(image_size) // 32) * 32
    return sum(2 * c * (s // st) ** 2 for c, st in zip(channels, strides, strict=True))


def plan_views(
    detector: Detector, n_images: int, image_size: int, views: int, max_bytes: int
) -> int:
    """How many views fit in ``max_bytes`` (0: none, train on the live backbone)."""
    per = bytes_per_view(detector, image_size) * max(1, n_images)
    return max(0, min(int(views), int(max_bytes // per)))


class CachedMaps(Dataset):
    """Items ``(maps, size, target)``: one of the cached views of each training image.

    Args:
        detector: its body computes the maps (in eval mode, no gradient).
        samples, class_names, image_size, augment: as for :class:`DetectionDataset`.
        views: how many views per image (view 0 is not augmented).
        device: where the body runs; maps are stored on the CPU in float16.
        progress: optional ``advance()`` callback per batch of ``batch_size`` images.
        batch_size: images per body pass (same-shape images batch together).
    """

    def __init__(
        self,
        detector: Detector,
        samples: list[Any],
        class_names: list[str],
        image_size: int,
        augment: str,
        views: int,
        device: torch.device | str = "cpu",
        progress: Any = None,
        batch_size: int = 8,
    ) -> None:
        self.views: list[list[tuple[tuple[Tensor, ...], tuple[int, int], dict[str, Tensor]]]] = []
        was = detector.training
        detector.eval()
        try:
            for v in range(int(views)):
                ds = DetectionDataset(
                    samples, class_names, image_size, train=v > 0, augment=augment
                )
                self.views.append(_compute(detector, ds, device, progress, batch_size))
        finally:
            detector.train(was)
        self.keys = [str(i) for i in range(len(self.views[0][0][0]))] if self.views else []

    def __len__(self) -> int:
        return len(self.views[0]) if self.views else 0

    def __getitem__(self, i: int) -> tuple[tuple[Tensor, ...], tuple[int, int], dict[str, Tensor]]:
        return self.views[random.randrange(len(self.views))][i]

    def nbytes(self) -> int:
        return sum(
            m.numel() * m.element_size() for v in self.views for maps, _, _ in v for m in maps
        )


def _compute(detector: Detector, ds: DetectionDataset, device: Any, progress: Any, batch_size: int):
    out = []
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            items = [ds[i] for i in range(start, min(len(ds), start + batch_size))]
            images = [img.to(device) for img, _ in items]
            maps, sizes = detector.body_maps(images)
            for j, (_, t) in enumerate(items):
                h, w = sizes[j]
                own = _crop_own(maps, j, h, w, detector.first_stride)
                target = {k: t[k] for k in ("boxes", "labels", "ignore", "scale", "index")}
                out.append((own, (h, w), target))
            if progress is not None:
                progress()
    return out


def _crop_own(maps: OrderedDict[str, Tensor], j: int, h: int, w: int, first_stride: int):
    """Image ``j``'s maps without the batch padding, stored as float16 on the CPU."""
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32  # its own padded size (multiple of 32)
    first = next(iter(maps.values()))
    full_h = first.shape[-2] * first_stride
    out = []
    for m in maps.values():
        stride = full_h // m.shape[-2]
        out.append(m[j, :, : ph // stride, : pw // stride].to("cpu", torch.float16).contiguous())
    return tuple(out)


def collate_cached(
    batch: list[Any],
) -> tuple[OrderedDict[str, Tensor], list[tuple[int, int]], list]:
    """Cached items -> (padded float32 maps, image sizes, targets)."""
    maps = [OrderedDict((str(k), m.float()) for k, m in enumerate(item[0])) for item in batch]
    return pad_maps(maps), [item[1] for item in batch], [item[2] for item in batch]
