"""Images in `tl predict` and `tl export`: which files to read, how, and the graph's input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tl_cli.modalities.base import MODALITIES, Modality
from tl_cli.modalities.image.data import IMG_EXTS, eval_transform, load_image


@MODALITIES.register("image")
class ImageModality(Modality):
    """Still images: float32 NCHW, normalised with the checkpoint's mean and std."""

    name = "image"
    noun = "images"
    folder_dataset = "imagefolder"
    extensions = IMG_EXTS

    def loader(self, prep: dict[str, Any]) -> Callable[[Any], Any]:
        tf = eval_transform(prep)
        return lambda path: tf(load_image(path))

    def example(self, prep: dict[str, Any], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        size = int(prep["input_size"])
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, 3, size, size, generator=g),)

    def input_names(self, prep: dict[str, Any]) -> list[str]:
        return ["image"]

    def describe_input(self, prep: dict[str, Any]) -> dict[str, Any]:
        size = int(prep["input_size"])
        return {
            "name": "image",
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW",
            "transform": f"RGB in [0, 1], resize short side to floor({size} / crop_pct), centre crop {size}, (x - mean) / std",
        }
