"""Modalities: what `tl predict` and `tl export` need to know about a checkpoint's inputs.

A checkpoint records its modality (``tl.modality``, from ``backbone.modality``). Predict asks it
which inputs to collect and how to read one; export asks it for example inputs, their names and
how the exported graph's input tensors become what the backbone takes. Training never comes
here: data modules read their own files, following the backbone's ``preprocessing``.

To add a modality, subclass `Modality`, register it in ``MODALITIES`` and import the module in
``tl_cli/components.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from tl_cli.core.errors import TLError
from tl_cli.core.registry import Registry


class Modality:
    """The input side of one modality. Subclasses fill in every method."""

    name = "base"
    #: the noun used in messages (``images``, ``texts``, ``clips``)
    noun = "inputs"

    def find(self, inputs: Any) -> list[Any]:  # pragma: no cover - abstract
        """The items ``inputs=`` names (paths, texts, ...), in order."""
        raise NotImplementedError

    def protected(self, inputs: Any, items: list[Any]) -> list[str]:
        """Files an output must never replace (the inputs themselves)."""
        return [str(i) for i in items]

    def item_name(self, item: Any) -> str:
        """What the ``path`` column of predictions shows for an item."""
        return str(item)

    def loader(self, prep: dict[str, Any]) -> Callable[[Any], Any]:  # pragma: no cover
        """item -> one model input (a tensor or a dict of tensors), raising on a bad item."""
        raise NotImplementedError

    def collate(self, inputs: list[Any], prep: dict[str, Any]) -> Any:
        """A batch from single inputs (default: stack tensors)."""
        return torch.utils.data.default_collate(inputs)

    # -- export
    def example(self, prep: dict[str, Any], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        """Seeded example inputs, one tensor per graph input."""
        raise NotImplementedError  # pragma: no cover

    def input_names(self, prep: dict[str, Any]) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def dynamic_axes(self, prep: dict[str, Any]) -> dict[str, dict[int, str]]:
        """Free axes of each graph input (default: the batch axis)."""
        return {n: {0: "batch"} for n in self.input_names(prep)}

    def axis_min(self, prep: dict[str, Any]) -> dict[str, int]:
        """The smallest size of a named free axis the graph supports (default: 1)."""
        return {}

    def pack(self, *tensors: torch.Tensor) -> Any:
        """The exported graph's inputs -> what the backbone takes (default: the one tensor)."""
        return tensors[0]

    def describe_input(self, prep: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
        """The sidecar's ``input`` entry: names, shapes, dtype, how to preprocess."""
        raise NotImplementedError

    def sidecar_extras(self, prep: dict[str, Any]) -> dict[str, Any]:
        """Anything else a deployment needs in the sidecar (text: the tokenizer)."""
        return {}


#: tl.modality -> Modality
MODALITIES: Registry[Modality] = Registry("modality")


class ReadEach(Dataset):
    """(input or None, index, error) per item: a bad item is reported, not raised."""

    def __init__(self, items: list[Any], load: Callable[[Any], Any]) -> None:
        self.items, self.load = items, load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, int, str | None]:
        try:
            return self.load(self.items[i]), i, None
        except TLError as e:  # the loader's own message names the file and the problem
            return None, i, str(e)[:300]
        except Exception as e:  # noqa: BLE001 - decoders raise many types for broken files
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return None, i, f"{type(e).__name__}: {msg}"[:300]


def collate_reads(modality: Modality, prep: dict[str, Any]) -> Callable:
    """A collate_fn for `ReadEach`: (batch or None, indices, [(index, error)])."""

    def collate(batch: list[tuple[Any, int, str | None]]):
        good = [(x, i) for x, i, err in batch if err is None]
        errors = [(i, err) for _, i, err in batch if err is not None]
        x = modality.collate([g[0] for g in good], prep) if good else None
        return x, [g[1] for g in good], errors

    return collate


@MODALITIES.register("image")
class ImageModality(Modality):
    """Still images: float32 NCHW, normalised with the checkpoint's mean and std."""

    name = "image"
    noun = "images"

    def find(self, inputs: Any) -> list[Any]:
        from tl_cli.data.base import IMG_EXTS
        from tl_cli.data.inputs import find_inputs

        return find_inputs(inputs, IMG_EXTS, self.noun)

    def loader(self, prep: dict[str, Any]) -> Callable[[Any], Any]:
        from tl_cli.data.base import eval_transform, load_image

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


def modality_of(meta: dict[str, Any]) -> Modality:
    """The modality a checkpoint's metadata names (``image`` for tl 0.1 checkpoints)."""
    import tl_cli.components  # noqa: F401 - every modality registered

    return MODALITIES.get(str(meta.get("modality", "image")))()
