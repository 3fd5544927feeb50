"""Data modules every modality shares: the base LightningDataModule, the class-folder layouts,
the seeded stratified carve, epoch-seeded samplers and the ``DATASETS`` registry.

Each data module scans its source once (``prepare()``), so the class names are known before the
model is built, and takes the backbone's preprocessing (``set_preprocessing``) so that inputs
follow the pretrained weights rather than a hard-coded guess. A modality subclasses
`TransferDataModule` (or `ClassFolderDataModule` for one folder per class) and supplies how an
item is read (``loader``) and transformed (``transform``); ``modalities/image/data.py`` is the
reference.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from tl_cli.core.errors import TLError
from tl_cli.core.registry import Registry
from tl_cli.core.values import check_dataset_values
from tl_cli.data.scan import check_split_depth, drop_corrupt


def default_num_workers() -> int:
    """One loader process per spare core, capped at 8; 0 on a single-core machine."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def effective_preprocessing(prep: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """The backbone's preprocessing with ``dataset.image_size`` applied (crop ratio kept)."""
    out = dict(prep)
    if image_size:
        out["input_size"] = int(image_size)
    return out


class ItemDataset(Dataset):
    """``(item, label)`` pairs, an item loader and a transform."""

    def __init__(
        self,
        items: Sequence[tuple[Any, int]],
        loader: Callable[[Any], Any],
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


@dataclass(frozen=True)
class FileKind:
    """What a folder dataset reads: file extensions and the words its error lines use.

    ``sniff``: a file with another extension is one of these when ``sniff(path)`` says its
    content is (images: whatever Pillow recognises); ``formats``: how error lines name the
    accepted files (default: the extensions).
    """

    exts: tuple[str, ...]
    noun: str  # "image"
    plural: str  # "images"
    sniff: Callable[[Path], bool] | None = None
    formats: str | None = None

    @property
    def placeholder(self) -> str:
        return f"<{self.noun}>"

    @property
    def listing(self) -> str:
        return self.formats or ", ".join(self.exts)

    def matches(self, p: Path) -> bool:
        if p.name.startswith("."):
            return False
        return p.suffix.lower() in self.exts or (self.sniff is not None and self.sniff(p))


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_class_folders(
    split_dir: Path, kind: FileKind, others: list[Path] | None = None
) -> dict[str, list[Path]]:
    """Map class name -> sorted files of ``kind`` in ``split_dir/<class>/**``; errors name the path.

    ``others`` collects the (not hidden) files of the class folders that are not of ``kind``
    (notes, CSVs): they are skipped, and the caller says how many.
    """
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
        files, skipped = [], []
        for p in sorted(d.rglob("*")):
            if p.is_file() or p.is_symlink():
                if kind.matches(p):
                    files.append(p)
                elif not any(part.startswith(".") for part in p.relative_to(d).parts):
                    skipped.append(p)
        if others is not None:
            others.extend(skipped)
        if not files:
            raise TLError(f"{d}: class folder has no {kind.plural} ({kind.listing})")
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
    #: how a user adds a validation split to this kind of data (warnings name it)
    val_hint = "a val/ folder"

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
        #: item -> raw input (a path -> an image, a clip, ...): set by the modality's module
        self.loader: Callable[[Any], Any] | None = None
        self.layout = ""
        #: False: no val/test carve, every labelled item stays in train (folders the user split
        #: are kept). ``tl eval dataset.root=OTHER`` scores a folder whole; prototypes use every
        #: item. Set before ``prepare()``.
        self.carve = True
        self._scanned = False

    # -- scanning
    def prepare(self) -> TransferDataModule:
        """Scan the source once: class names, splits. Safe to call repeatedly."""
        if not self._scanned:
            self._scan()
            from tl_cli.core.checkpoint import looks_like_interpolation

            # a checkpoint stores the class names and refuses any that reads as an interpolation:
            # refused here too, so no run trains to a checkpoint that predict then refuses
            bad = next((c for c in self.class_names if looks_like_interpolation(str(c))), None)
            if bad is not None:
                raise TLError(
                    f"class {bad!r}: a class name may not contain '${{' (it reads as an OmegaConf "
                    "interpolation, which tl checkpoints refuse); rename that folder or label"
                )
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
    def split_items(self, split: str) -> list[tuple[Any, int]]:
        """The (item, label) pairs of a split, once the data is scanned and preprocessing set."""
        self.prepare()
        if self.preprocessing is None:
            raise RuntimeError("set_preprocessing() must be called before building datasets")
        if split not in self.splits:
            raise TLError(f"dataset has no {split!r} split (available: {', '.join(self.splits)})")
        return self.splits[split]

    def dataset(self, split: str, train_aug: bool | None = None) -> ItemDataset:
        items = self.split_items(split)
        aug = split == "train" if train_aug is None else train_aug
        return ItemDataset(items, self.loader, self.transform(aug))

    def transform(self, train_aug: bool) -> Callable | None:
        """Raw input -> model input, following ``self.preprocessing`` (the modality's own)."""
        return None

    def make_loader(
        self, ds: Dataset, shuffle: bool, collate_fn: Callable | None = None
    ) -> DataLoader:
        """A loader of ``ds``: epoch-seeded shuffling (balanced with ``dataset.balance=sampler``),
        this module's batch size, workers and ``collate_fn(ds)`` unless one is given."""
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
            collate_fn=collate_fn or self.collate_fn(ds),
            # a last batch of one image breaks BatchNorm in train mode
            drop_last=shuffle and n > self.batch_size and n % self.batch_size == 1,
        )

    def collate_fn(self, ds: Dataset | None = None) -> Callable | None:
        """How samples of ``ds`` become a batch (None: torch's default); text and audio pad per
        batch here."""
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

    def read_target(self, root: Path) -> list[tuple[Any, str | None]]:
        """The inputs of a target domain (``dataset.target_root``, ``tl_cli.transfer.adapt``) read
        the way this dataset reads its own, each with its class name, or None when unlabelled.
        Nothing is carved: every input is the target's. A data module that reads files overrides it."""
        raise TLError(f"dataset={self.name} cannot read a target domain (dataset.target_root)")


class ClassFolderDataModule(TransferDataModule):
    """Folders of files, one folder per class (``kind`` says which files). Three layouts:

    * ``root/train`` + ``root/val`` (+ optional ``root/test``)
    * ``root/train`` + ``root/test``: val is carved out of train
    * ``root/<class>/*``: val is carved out of everything
    """

    #: the files this folder dataset reads, and the check that finds unreadable ones (set by the
    #: modality's subclass: images, audio clips, ...)
    kind: FileKind
    scan_files: Callable[..., list[Any]]

    def __init__(self, root: str | None = None, skip_corrupt: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.root = root
        # unreadable images: fail before training (default), or skip them with a warning
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped_corrupt: list[Any] = []  # tl_cli.data.scan.BadImage, for metrics.json

    def _folders(self, split_dir: Path) -> dict[str, list[Path]]:
        """``scan_class_folders`` + the corrupt-image scan (tl_cli.data.scan); files that are not
        of the dataset's kind are skipped and counted (one line)."""
        others: list[Path] = []
        listed = scan_class_folders(split_dir, self.kind, others)
        if others:
            from tl_cli.core.console import say

            eg = ", ".join(p.name for p in others[:3]) + (", ..." if len(others) > 3 else "")
            say(
                f"{split_dir}: skipped {len(others)} file(s) that are not {self.kind.plural} ({eg})"
            )
        self.skipped_other = getattr(self, "skipped_other", 0) + len(others)
        found, bad = drop_corrupt(
            listed,
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

    def read_target(self, root: Path) -> list[tuple[Any, str | None]]:
        """Class folders (``root/<class>/*``, or ``root/train`` [+ ``val``, ``test``] of them):
        labelled; a flat folder of files (at any depth below, no class folders): unlabelled.
        Unreadable files fail the scan or are skipped (``dataset.skip_corrupt``), as the source's."""
        if not root.is_dir():
            raise TLError(
                f"dataset.target_root={root} is not a directory (class folders of "
                f"{self.kind.plural}, or a flat folder of them)"
            )
        subs = {d.name for d in _class_dirs(root)}
        direct = [p for p in root.iterdir() if p.is_file() and self.kind.matches(p)]
        if direct and not subs:  # a flat folder: unlabelled inputs
            files = sorted(p for p in root.rglob("*") if p.is_file() and self.kind.matches(p))
            kept, bad = drop_corrupt(
                {"": files}, root, self.skip_corrupt, scan=self.scan_files, noun=self.kind.noun
            )
            self.skipped_corrupt.extend(bad)
            return [(str(p), None) for p in kept[""]]
        dirs = [root / s for s in ("train", "val", "test") if s in subs] or [root]
        out: list[tuple[Any, str | None]] = []
        for d in dirs:
            found = self._folders(d)
            out += [(str(p), c) for c in sorted(found) for p in found[c]]
        return out

    def _carve(self, items: list[tuple[Any, int]], classes: list[str], where: Path):
        if not self.carve:  # scored whole, or every item a support item: nothing held out
            return list(items), []
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


#: dataset.name -> data module. Checkpoints store this name and plain options, never a class path.
DATASETS: Registry[TransferDataModule] = Registry("dataset")
