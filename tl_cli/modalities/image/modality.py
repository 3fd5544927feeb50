"""Images in `tl predict` and `tl export`: which files to read, how, and the graph's input."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tl_cli.data.scan import IMAGE_FORMATS_HINT, image_extensions, looks_like_image
from tl_cli.modalities.base import MODALITIES, Modality

if TYPE_CHECKING:  # torch and torchvision load when images are read, not to name the modality
    import torch


@MODALITIES.register("image")
class ImageModality(Modality):
    """Still images: float32 NCHW, normalised with the checkpoint's mean and std."""

    name = "image"
    noun = "images"
    folder_dataset = "imagefolder"

    @property
    def extensions(self) -> tuple[str, ...]:  # type: ignore[override]
        return image_extensions()

    def find(self, inputs: Any) -> list[Any]:
        """Files with an image extension, and files whose content Pillow recognises."""
        from tl_cli.data.inputs import find_inputs

        return find_inputs(
            inputs, self.extensions, self.noun, sniff=looks_like_image, formats=IMAGE_FORMATS_HINT
        )

    def loader(self, prep: dict[str, Any]) -> Callable[[Any], Any]:
        from tl_cli.modalities.image.data import eval_transform, load_image

        tf = eval_transform(prep)
        return lambda path: tf(load_image(path))

    def example(self, prep: dict[str, Any], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        import torch

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
