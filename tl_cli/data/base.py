"""Datasets as LightningDataModules: image folders (three layouts), the built-in sample, CIFAR.

Each data module scans its source once (``prepare()``), so the class names are known before
the model is built, and takes the backbone's preprocessing (``set_preprocessing``) so that
transforms follow the pretrained weights rather than a hard-coded ImageNet guess.
"""

from __future__ import annotations

import functools
import math
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from tl_cli.core.errors import TLError
from tl_cli.core.registry import Registry
from tl_cli.data.scan import check_split_depth, drop_corrupt, open_image, scan_images

IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SAMPLE_ROOT = Path(__file__).resolve().parent.parent / "sample_data"


def sample_root() -> str:
    """Path of the built-in sample dataset (used by ``configs/dataset/sample.yaml``)."""
    return str(SAMPLE_ROOT)


def default_num_workers() -> int:
    """One loader process per spare core, capped at 8; 0 on a single-core machine."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open any still image as RGB, applying its EXIF orientation.

    Decompression-bomb-sized images (over PIL's ``MAX_IMAGE_PIXELS``) and unreadable files raise
    a TLError naming the file.
    """
    with open_image(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit / 32-bit integer greyscale: scale to 8 bits instead of clipping at 255
            import numpy as np

            arr = np.asarray(im, dtype=np.float64)
            hi = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            im = Image.fromarray((arr / hi * 255.0).clip(0, 255).astype("uint8"), mode="L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")


# --------------------------------------------------------------------------- transforms


def effective_preprocessing(prep: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """The backbone's preprocessing with ``dataset.image_size`` applied (crop ratio kept)."""
    out = dict(prep)
    if image_size:
        out["input_size"] = int(image_size)
    return out


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


class ImageListDataset(Dataset):
    """``(item, label)`` pairs, an item loader and a transform."""

    def __init__(
        self,
        items: Sequence[tuple[Any, int]],
        loader: Callable[[Any], Image.Image],
        transform: Callable | None,
    ) -> None:
        self.items = list(items)
        self.loader = loader
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item, label = self.items[i]
        img = self.loader(item)
        return (self.transform(img) if self.transform else img), label


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle that is a pure function of (seed, epoch).

    Lightning calls ``set_epoch`` before every epoch, so a run resumed at epoch e sees exactly the
    batches the uninterrupted run saw (the default sampler draws from the global RNG, which a
    resume does not restore). The seed is torch's initial seed, i.e. the run's ``seed``.
    """

    def __init__(self, n: int, seed: int | None = None) -> None:
        self.n = n
        self.seed = torch.initial_seed() if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def generator(self) -> torch.Generator:
        """This epoch's generator: a pure function of (seed, epoch)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator()).tolist())


class EpochBalanced(EpochShuffle):
    """``dataset.balance=sampler``: n draws with replacement, each class equally likely.

    Like :class:`EpochShuffle`, a pure function of (seed, epoch), so a resume sees the same batches.
    """

    def __init__(self, labels: Sequence[int], seed: int | None = None) -> None:
        y = torch.as_tensor(list(labels), dtype=torch.long)
        super().__init__(len(y), seed)
        self.weights = (1.0 / torch.bincount(y).double())[y]

    def __iter__(self):
        return iter(
            torch.multinomial(self.weights, self.n, True, generator=self.generator()).tolist()
        )


BALANCE = (None, "none", "weights", "sampler")


class _ArrayLoader:
    """Loads image ``i`` from an in-memory uint8 array (CIFAR)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __call__(self, i: int) -> Image.Image:
        return Image.fromarray(self.data[i])


@dataclass(frozen=True)
class FileKind:
    """What a folder dataset reads: file extensions and the words its error lines use."""

    exts: tuple[str, ...]
    noun: str  # "image"
    plural: str  # "images"

    @property
    def placeholder(self) -> str:
        return f"<{self.noun}>"

    def matches(self, p: Path) -> bool:
        return p.suffix.lower() in self.exts and not p.name.startswith(".")


IMAGE_FILES = FileKind(IMG_EXTS, "image", "images")


def _is_image(p: Path) -> bool:
    return IMAGE_FILES.matches(p)


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_class_folders(split_dir: Path, kind: FileKind = IMAGE_FILES) -> dict[str, list[Path]]:
    """Map class name -> sorted files of ``kind`` in ``split_dir/<class>/**``; errors name the path."""
    ph = kind.placeholder
    stray = sorted(p for p in split_dir.iterdir() if p.is_file() and kind.matches(p))
    if stray:
        raise TLError(
            f"{split_dir}: {len(stray)} {kind.noun}(s) directly in this folder (e.g. {stray[0].name}); "
            f"expected {split_dir}/<class>/{ph}"
        )
    out: dict[str, list[Path]] = {}
    for d in _class_dirs(split_dir):
        # a dangling symlink stays in the list: the corrupt-file scan reports (or skips) it
        files = sorted(
            p for p in d.rglob("*") if (p.is_file() or p.is_symlink()) and kind.matches(p)
        )
        if not files:
            raise TLError(f"{d}: class folder has no {kind.plural} ({', '.join(kind.exts)})")
        out[d.name] = files
    if len(out) < 2:
        raise TLError(
            f"{split_dir}: found {len(out)} class folder(s); a classifier needs at least 2 "
            f"(expected {split_dir}/<class>/{ph})"
        )
    return out


def stratified_split(
    labels: Sequence[int],
    fraction: float,
    seed: int,
    class_names: Sequence[str],
    where: str,
    noun: str = "image",
) -> tuple[list[int], list[int]]:
    """Indices (keep, held_out): a seeded, per-class split; every class keeps at least one of each."""
    if not 0.0 < float(fraction) < 1.0:
        raise TLError(f"dataset.val_fraction={fraction} must be between 0 and 1 (exclusive)")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    rng = random.Random(seed)
    keep, held = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        if len(idx) < 2:
            raise TLError(
                f"{where}: class {class_names[y]!r} has {len(idx)} {noun}; dataset.val_fraction={fraction} "
                f"needs at least 2 per class to carve a validation split (add {noun}s or a val/ folder)"
            )
        idx = idx[:]
        rng.shuffle(idx)
        n_val = min(len(idx) - 1, max(1, round(len(idx) * float(fraction))))
        held.extend(idx[:n_val])
        keep.extend(idx[n_val:])
    return sorted(keep), sorted(held)


# --------------------------------------------------------------------------- data modules


class TransferDataModule(pl.LightningDataModule):
    """Shared loaders and transforms; subclasses implement ``_scan``.

    Args:
        image_size: input size; ``None`` uses the backbone's pretrained size.
        batch_size: per-device batch size.
        num_workers: loader processes; ``None`` follows the machine's cores.
        val_fraction: share of each class carved from train when there is no val split.
        split_seed: seed of that carve (fixed, so changing ``seed`` keeps the same split).
        augment: ``light`` or ``none`` for training images.
        balance: imbalanced classes: ``weights`` (class-weighted training loss), ``sampler``
            (class-balanced batches, drawn with replacement) or null (as the data comes).
        target_root: a target-domain folder for ``adapt=...`` (``tl_cli.transfer.adapt``); its labels,
            if any, only score the target.
    """

    #: what one input is called in messages (warnings about the splits)
    item_noun = "images"

    name = "data"

    def __init__(
        self,
        image_size: int | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        augment: str = "light",
        balance: str | None = None,
        target_root: str | None = None,
    ) -> None:
        super().__init__()
        from tl_cli.run.validate import check_dataset_values

        check_dataset_values(image_size, batch_size, num_workers, val_fraction, split_seed, augment)
        if balance not in BALANCE:
            raise TLError(f"dataset.balance={balance!r} must be weights, sampler or null")
        self.balance = None if balance == "none" else balance
        #: the target domain (tl_cli.transfer.adapt scans it with this reader; labels never train)
        self.target_root = target_root
        self.image_size = image_size
        self.batch_size = int(batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.augment = augment
        self.preprocessing: dict[str, Any] | None = None
        self.class_names: list[str] = []
        self.splits: dict[str, list[tuple[Any, int]]] = {}
        self.loader: Callable[[Any], Image.Image] = load_image
        self.layout = ""
        self._scanned = False

    # -- scanning
    def prepare(self) -> TransferDataModule:
        """Scan the source once: class names, splits. Safe to call repeatedly."""
        if not self._scanned:
            self._scan()
            self._scanned = True
        return self

    def _scan(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def preprocessing_overrides(self) -> dict[str, Any]:
        """What this dataset changes in the backbone's preprocessing (``image_size``)."""
        return {"image_size": int(self.image_size)} if self.image_size else {}

    def set_preprocessing(self, prep: dict[str, Any]) -> None:
        self.preprocessing = effective_preprocessing(prep, self.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def has_split(self, split: str) -> bool:
        self.prepare()
        return bool(self.splits.get(split))

    # -- datasets and loaders
    def dataset(self, split: str, train_aug: bool | None = None) -> ImageListDataset:
        self.prepare()
        if self.preprocessing is None:
            raise RuntimeError("set_preprocessing() must be called before building datasets")
        if split not in self.splits:
            raise TLError(f"dataset has no {split!r} split (available: {', '.join(self.splits)})")
        aug = split == "train" if train_aug is None else train_aug
        tf = (
            train_transform(self.preprocessing, self.augment)
            if aug
            else eval_transform(self.preprocessing)
        )
        return ImageListDataset(self.splits[split], self.loader, tf)

    def make_loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        n = len(ds)  # type: ignore[arg-type]
        sampler: torch.utils.data.Sampler | None = EpochShuffle(n) if shuffle else None
        if shuffle and self.balance == "sampler" and hasattr(ds, "items"):
            sampler = EpochBalanced([y for _, y in ds.items])
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=self.collate_fn(),
            # a last batch of one image breaks BatchNorm in train mode
            drop_last=shuffle and n > self.batch_size and n % self.batch_size == 1,
        )

    def collate_fn(self) -> Callable | None:
        """How samples become a batch (None: torch's default); text pads per batch here."""
        return None

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def train_dataloader(self) -> DataLoader:
        return self.make_loader(self.dataset("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.make_loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.make_loader(self.dataset("test"), shuffle=False)

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return f"{self.name}: {self.num_classes} classes, {sizes} ({self.layout})"


class ImageFolderDataModule(TransferDataModule):
    """Folders of images, one folder per class. Three layouts are accepted:

    * ``root/train`` + ``root/val`` (+ optional ``root/test``)
    * ``root/train`` + ``root/test``: val is carved out of train
    * ``root/<class>/*``: val is carved out of everything
    """

    name = "imagefolder"
    #: the files this folder dataset reads, and the check that finds unreadable ones
    kind: FileKind = IMAGE_FILES
    scan_files: Callable[..., list[Any]] = staticmethod(scan_images)

    def __init__(self, root: str | None = None, skip_corrupt: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.root = root
        # unreadable images: fail before training (default), or skip them with a warning
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped_corrupt: list[Any] = []  # tl_cli.data.scan.BadImage, for metrics.json

    def _folders(self, split_dir: Path) -> dict[str, list[Path]]:
        """``scan_class_folders`` + the corrupt-image scan (tl_cli.data.scan)."""
        found, bad = drop_corrupt(
            scan_class_folders(split_dir, self.kind),
            split_dir,
            self.skip_corrupt,
            scan=self.scan_files,
            noun=self.kind.noun,
        )
        self.skipped_corrupt.extend(bad)
        return found

    def _root(self) -> Path:
        root = Path(os.path.expanduser(str(self.root)))
        if not root.exists():
            raise TLError(f"dataset.root={root} does not exist")
        if not root.is_dir():
            raise TLError(f"dataset.root={root} is not a directory")
        return root

    def _scan(self) -> None:
        if not self.root:
            raise TLError(
                "dataset.root is not set: pass dataset.root=DIR (a folder of class folders)"
            )
        root = self._root()
        sub = {d.name for d in _class_dirs(root)}
        if "train" in sub:
            train = self._folders(root / "train")
            classes = sorted(train)
            splits: dict[str, list[tuple[Any, int]]] = {"train": _items(train, classes)}
            for s in ("val", "test"):
                if s in sub:
                    found = self._folders(root / s)
                    _check_same_classes(classes, sorted(found), root / s, root / "train")
                    splits[s] = _items(found, classes)
            if "val" not in splits:
                splits["train"], splits["val"] = self._carve(
                    splits["train"], classes, root / "train"
                )
                self.layout = (
                    "train/ + test/, val carved from train"
                    if "test" in splits
                    else "train/ only, val carved"
                )
            else:
                self.layout = "train/ + val/" + (" + test/" if "test" in splits else "")
            # keep a stable order: train, val, test
            splits = {k: splits[k] for k in ("train", "val", "test") if k in splits}
        else:
            # root/training/<class>/...: files one level too deep
            check_split_depth(root, sub, self.kind.placeholder)
            found = self._folders(root)
            classes = sorted(found)
            tr, va = self._carve(_items(found, classes), classes, root)
            splits = {"train": tr, "val": va}
            self.layout = "class folders, val carved"
        self.class_names = classes
        self.splits = splits

    def _carve(self, items: list[tuple[Any, int]], classes: list[str], where: Path):
        keep, held = stratified_split(
            [y for _, y in items],
            self.val_fraction,
            self.split_seed,
            classes,
            str(where),
            self.kind.noun,
        )
        return [items[i] for i in keep], [items[i] for i in held]


def _items(found: dict[str, list[Path]], classes: list[str]) -> list[tuple[Any, int]]:
    idx = {c: i for i, c in enumerate(classes)}
    return [(str(p), idx[c]) for c in sorted(found) for p in found[c]]


def _check_same_classes(expected: list[str], got: list[str], where: Path, ref: Path) -> None:
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"extra {', '.join(extra)}")
        raise TLError(f"{where}: class folders differ from {ref}: {'; '.join(parts)}")


class SampleDataModule(ImageFolderDataModule):
    """The built-in sample: 10 CIFAR-10 classes, 60 train + 20 test images each, inside the package.

    ``root`` stays None in configs and checkpoints, so it resolves to the installed package on
    whatever machine evaluates the checkpoint.
    """

    name = "sample"

    def __init__(self, root: str | None = None, **kw: Any) -> None:
        super().__init__(root=root or sample_root(), **kw)


class TorchvisionDataModule(TransferDataModule):
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
            from tl_cli.modalities.backbones import _probe

            reason = _probe("https://www.cs.toronto.edu")
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

    def dataset(self, split: str, train_aug: bool | None = None) -> ImageListDataset:
        ds = super().dataset(split, train_aug)
        ds.loader = self._test_loader if split == "test" else self._train_loader
        return ds


# --------------------------------------------------------------------------- registry

#: dataset.name -> data module. Checkpoints store this name and plain options, never a class path.
DATASETS: Registry[TransferDataModule] = Registry("dataset")
DATASETS.register("imagefolder", ImageFolderDataModule)
DATASETS.register("sample", SampleDataModule)
for _set in TorchvisionDataModule.SETS:
    DATASETS.register(_set, functools.partial(TorchvisionDataModule, name=_set))

#: modality -> the dataset that reads a user's folder (``tl eval checkpoint=... dataset.root=DIR``)
FOLDER_DATASETS: dict[str, str] = {"image": "imagefolder"}
