"""Box-aware image transforms (torchvision ``transforms.v2`` with ``tv_tensors.BoundingBoxes``).

Every image is resized so that its long side is ``image_size`` (up or down, aspect kept): the
detector then sees objects at one scale whatever the camera, and a CPU can train it. Training
adds a horizontal flip, a scale jitter around that size and a random crop back to at most
``image_size`` per side; v2 moves the boxes with the pixels and ``SanitizeBoundingBoxes`` drops
the ones a crop cut to nothing (and their labels). Boxes go back to original pixels with
:func:`to_original` (the per-image ``scale`` recorded here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from tl_cli.core.errors import TLError

#: training augmentation presets (dataset.augment)
AUGMENTS = ("none", "flip", "default")


class RandomCropMax(v2.Transform):
    """Crop each side to at most ``size`` pixels at a random offset (no padding).

    After a scale jitter an image can exceed ``image_size``; this brings it back without
    padding small images up (the model pads a batch to its largest image anyway).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch, cw = min(h, self.size), min(w, self.size)
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def resize_long_side(size: int) -> v2.Transform:
    """The eval resize: the long side becomes ``size`` (small images are scaled up too)."""
    return v2.Resize(size=None, max_size=int(size), antialias=True)


def build_transforms(image_size: int, train: bool, augment: str = "default") -> v2.Transform:
    """The v2 pipeline for one split; inputs are ``(uint8 image, target dict)``.

    ``augment``: ``none`` (resize only), ``flip`` (+ horizontal flip), ``default`` (+ scale
    jitter 0.75-1.25 of the resized size and a random crop to ``image_size``): mild on purpose,
    because defaults must hold on small sets from any domain (a text-heavy or a medical image
    does not survive strong photometric changes).
    """
    if augment not in AUGMENTS:
        raise TLError(f"dataset.augment={augment!r} must be one of {', '.join(AUGMENTS)}")
    steps: list[v2.Transform] = [resize_long_side(image_size)]
    if train and augment != "none":
        steps.append(v2.RandomHorizontalFlip(0.5))
        if augment == "default":
            s = int(image_size)
            steps += [v2.ScaleJitter((s, s), scale_range=(0.75, 1.25)), RandomCropMax(s)]
        steps.append(v2.SanitizeBoundingBoxes(min_size=2.0, labels_getter=_labels_getter))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def _labels_getter(inputs: Any) -> tuple[torch.Tensor, ...]:
    target = inputs[1]
    return (target["labels"], target["ignore"])


def load_image(path: str | Path) -> torch.Tensor:
    """RGB uint8 ``(3, H, W)``, EXIF orientation applied (as photo viewers show it)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            return F.pil_to_tensor(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise TLError(f"{path}: not a readable image ({type(e).__name__})") from None


def make_target(
    boxes: Any, labels: Any, ignore: Any, height: int, width: int
) -> dict[str, torch.Tensor]:
    """A v2-ready target: ``BoundingBoxes`` (XYXY, canvas = the image) + labels + ignore."""
    return {
        "boxes": tv_tensors.BoundingBoxes(
            torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(int(height), int(width)),
        ),
        "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
        "ignore": torch.as_tensor(ignore, dtype=torch.bool).reshape(-1),
    }


def to_original(boxes: torch.Tensor, scale: torch.Tensor | tuple[float, float]) -> torch.Tensor:
    """Boxes in the resized image -> original pixels (``scale`` = resized / original, (sx, sy))."""
    sx, sy = (float(v) for v in scale)
    factor = boxes.new_tensor([sx, sy, sx, sy])
    return boxes / factor
