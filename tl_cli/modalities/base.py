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
from typing import TYPE_CHECKING, Any

from tl_cli.core.errors import TLError
from tl_cli.core.registry import Registry

if TYPE_CHECKING:  # torch loads when a modality reads or batches inputs, not to name one
    import torch


class Modality:
    """The input side of one modality. Subclasses fill in every method."""

    name = "base"
    #: the noun used in messages (``images``, ``texts``, ``clips``)
    noun = "inputs"
    #: the first column of ``tl predict``'s CSV (and key of its JSON rows): what it holds, a file
    #: ``path`` (images, clips) or the ``text`` itself
    item_column = "path"
    #: the ``dataset.name`` that reads a user's own data of this modality (a folder of class
    #: folders, a CSV, ...): ``tl eval dataset.root=DIR``, ``tl train modality=X dataset.root=...``
    folder_dataset = "imagefolder"

    #: the file extensions of this modality's inputs (``find``'s default reads files)
    extensions: tuple[str, ...] = ()

    def find(self, inputs: Any) -> list[Any]:
        """The items ``inputs=`` names (paths, texts, ...), in order: by default the files with
        one of ``extensions`` that ``inputs`` names (a folder, a file, a glob or a list)."""
        from tl_cli.data.inputs import find_inputs

        return find_inputs(inputs, self.extensions, self.noun)

    def protected(self, inputs: Any, items: list[Any]) -> list[str]:
        """Files an output must never replace (the inputs themselves)."""
        return [str(i) for i in items]

    def item_name(self, item: Any) -> str:
        """What the ``item_column`` of predictions shows for an item."""
        return str(item)

    def loader(self, prep: dict[str, Any]) -> Callable[[Any], Any]:  # pragma: no cover
        """item -> one model input (a tensor or a dict of tensors), raising on a bad item."""
        raise NotImplementedError

    def collate(self, inputs: list[Any], prep: dict[str, Any]) -> Any:
        """A batch from single inputs (default: stack tensors)."""
        from torch.utils.data import default_collate

        return default_collate(inputs)

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


class ReadEach:
    """(input or None, index, error) per item: a bad item is reported, not raised (a map-style
    dataset for torch's DataLoader)."""

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


def collate_reads(collate_inputs: Callable[[list[Any]], Any]) -> Callable:
    """A collate_fn for `ReadEach`: (batch or None, indices, [(index, error)]); the inputs that
    were read are batched by ``collate_inputs``."""

    def collate(batch: list[tuple[Any, int, str | None]]):
        good = [(x, i) for x, i, err in batch if err is None]
        errors = [(i, err) for _, i, err in batch if err is not None]
        x = collate_inputs([g[0] for g in good]) if good else None
        return x, [g[1] for g in good], errors

    return collate


#: modality name -> the module that registers it (imported on its first lookup only: naming the
#: image modality's folder dataset in `tl_cli.run.preflight` loads no text or audio code)
_PROVIDERS = {
    "image": "tl_cli.modalities.image.modality",
    "text": "tl_cli.modalities.text.modality",
    "audio": "tl_cli.modalities.audio.modality",
}


def get_modality(name: str) -> Modality:
    """The registered modality ``name`` (image, text, audio); an unknown name lists them all."""
    import importlib

    for key, module in _PROVIDERS.items():
        if key == str(name) or str(name) not in _PROVIDERS:
            importlib.import_module(module)
    return MODALITIES.get(str(name))()


def modality_of(meta: dict[str, Any]) -> Modality:
    """The modality a checkpoint's metadata names (``image`` for tl 0.1 checkpoints)."""
    return get_modality(str(meta.get("modality", "image")))
