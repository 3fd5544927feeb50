"""Image data: decoding any still image, the eval and training transforms (following the
backbone's preprocessing), image folders (three layouts), the built-in sample, CIFAR."""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from tl_cli.core.errors import TLError
from tl_cli.data.base import (
    DATASETS,
    ClassFolderDataModule,
    FileKind,
    ItemDataset,
    TransferDataModule,
    stratified_split,
)
from tl_cli.data.scan import (
    IMAGE_FORMATS_HINT,
    image_extensions,
    looks_like_image,
    open_image,
    scan_images,
)

#: every still-image extension Pillow reads (.jpg, .png, .tif, .pgm, .gif, ...); a file with
#: another extension counts when Pillow recognises its content
IMG_EXTS = image_extensions()
SAMPLE_ROOT = Path(__file__).resolve().parents[2] / "sample_data"


def sample_root() -> str:
    """Path of the built-in sample dataset (used by ``configs/dataset/sample.yaml``)."""
    return str(SAMPLE_ROOT)


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open any still image Pillow reads as 8-bit RGB (what every backbone takes), applying its
    EXIF orientation; a multi-frame file (GIF, TIFF stack) gives its first frame.

    Modes: 16-bit greyscale is scaled from its full range (65535 -> 255, so brightness keeps its
    meaning across images), 32-bit integer and float greyscale from [0, their maximum] (float
    images in [0, 1] from [0, 1]); grey, bilevel, palette and CMYK are converted; transparency is
    composited on white. Decompression-bomb-sized images (over PIL's ``MAX_IMAGE_PIXELS``) and
    unreadable files raise a TLError naming the file.
    """
    with open_image(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            # 16-bit / 32-bit greyscale: scale to 8 bits instead of clipping at 255
            import numpy as np

            arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            top = float(arr.max()) if arr.size else 0.0
            if im.mode.startswith("I;16"):
                hi = 65535.0
            elif im.mode == "F" and 0.0 <= float(arr.min() if arr.size else 0.0) and top <= 1.0:
                hi = 1.0
            else:
                hi = max(top, 1.0)
            im = Image.fromarray(np.rint(arr / hi * 255.0).clip(0, 255).astype("uint8"), mode="L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")


# --------------------------------------------------------------------------- transforms


def _interp(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name)
    except ValueError:
        return T.InterpolationMode.BILINEAR


def eval_transform(prep: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to size/crop_pct, centre-crop, normalise (torchvision/timm eval)."""
    size = int(prep["input_size"])
    resize = int(math.floor(size / float(prep.get("crop_pct", 0.875))))
    return T.Compose(
        [
            T.Resize(resize, interpolation=_interp(prep["interpolation"])),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(prep["mean"], prep["std"]),
        ]
    )


def train_transform(
    prep: dict[str, Any], augment: str = "light"
) -> Callable[[Image.Image], torch.Tensor]:
    """Light augmentation: a mild random-resized crop and a horizontal flip.

    Transfer learning keeps augmentation gentle: the pretrained features already encode
    most invariances, and heavy crops hurt small datasets.
    """
    if augment in (None, "none", False):
        return eval_transform(prep)
    if augment != "light":
        raise TLError(f"dataset.augment={augment!r} must be 'light' or 'none'")
    size = int(prep["input_size"])
    return T.Compose(
        [
            T.RandomResizedCrop(
                size, scale=(0.5, 1.0), interpolation=_interp(prep["interpolation"])
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(prep["mean"], prep["std"]),
        ]
    )


# --------------------------------------------------------------------------- datasets


class _ArrayLoader:
    """Loads image ``i`` from an in-memory uint8 array (CIFAR)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __call__(self, i: int) -> Image.Image:
        return Image.fromarray(self.data[i])


IMAGE_FILES = FileKind(
    IMG_EXTS, "image", "images", sniff=looks_like_image, formats=IMAGE_FORMATS_HINT
)


# --------------------------------------------------------------------------- data modules


class ImageInputs:
    """Images in: the training or eval transform of the backbone's preprocessing."""

    preprocessing: dict[str, Any]
    augment: str

    def transform(self, train_aug: bool) -> Callable:
        if train_aug:
            return train_transform(self.preprocessing, self.augment)
        return eval_transform(self.preprocessing)


class ImageFolderDataModule(ImageInputs, ClassFolderDataModule):
    """Folders of images, one folder per class (layouts: `ClassFolderDataModule`)."""

    name = "imagefolder"
    kind = IMAGE_FILES
    scan_files = staticmethod(scan_images)

    def __init__(self, root: str | None = None, skip_corrupt: bool = False, **kw: Any) -> None:
        super().__init__(root=root, skip_corrupt=skip_corrupt, **kw)
        self.loader = load_image


class SampleDataModule(ImageFolderDataModule):
    """The built-in sample: 10 CIFAR-10 classes, 60 train + 20 test images each, inside the package.

    ``root`` stays None in configs and checkpoints, so it resolves to the installed package on
    whatever machine evaluates the checkpoint.
    """

    name = "sample"

    def __init__(self, root: str | None = None, **kw: Any) -> None:
        super().__init__(root=root or sample_root(), **kw)


class TorchvisionDataModule(ImageInputs, TransferDataModule):
    """CIFAR-10 / CIFAR-100 from torchvision (downloaded to ``root`` when missing)."""

    SETS = {
        "cifar10": ("CIFAR10", "cifar-10-batches-py"),
        "cifar100": ("CIFAR100", "cifar-100-python"),
    }

    def __init__(
        self,
        name: str = "cifar10",
        root: str = "~/.cache/tl/datasets",
        download: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if name not in self.SETS:
            raise TLError(f"dataset.name={name!r} must be one of {', '.join(self.SETS)}")
        self.name = name
        self.root = root
        self.download = download

    def _scan(self) -> None:
        import torchvision

        cls_name, folder = self.SETS[self.name]
        root = Path(os.path.expanduser(str(self.root)))
        cls = getattr(torchvision.datasets, cls_name)
        if not (root / folder).is_dir():
            if not self.download:
                raise TLError(
                    f"{self.name} not found at {root / folder} and dataset.download=false"
                )
            from tl_cli.core import network

            reason = network.probe("https://www.cs.toronto.edu")
            if reason:
                raise TLError(
                    f"cannot download {self.name}: {reason}. Put the extracted {folder}/ folder in {root} "
                    f"(dataset.root), or use dataset=imagefolder"
                )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train = cls(str(root), train=True, download=self.download)
                test = cls(str(root), train=False, download=self.download)
        except (OSError, RuntimeError) as e:
            raise TLError(
                f"cannot load {self.name} from {root}: {str(e).splitlines()[0]}"
            ) from None
        self.class_names = list(train.classes)
        items = [(i, int(y)) for i, y in enumerate(train.targets)]
        keep, held = stratified_split(
            [y for _, y in items], self.val_fraction, self.split_seed, self.class_names, str(root)
        )
        # train/val index the train array, test indexes the test array: two loaders
        self._train_loader, self._test_loader = _ArrayLoader(train.data), _ArrayLoader(test.data)
        self.splits = {
            "train": [items[i] for i in keep],
            "val": [items[i] for i in held],
            "test": [(i, int(y)) for i, y in enumerate(test.targets)],
        }
        self.layout = "torchvision train/test, val carved from train"

    def dataset(self, split: str, train_aug: bool | None = None) -> ItemDataset:
        ds = super().dataset(split, train_aug)
        ds.loader = self._test_loader if split == "test" else self._train_loader
        return ds


# --------------------------------------------------------------------------- registry

DATASETS.register("imagefolder", ImageFolderDataModule)
DATASETS.register("sample", SampleDataModule)
for _set in TorchvisionDataModule.SETS:
    DATASETS.register(_set, functools.partial(TorchvisionDataModule, name=_set))
