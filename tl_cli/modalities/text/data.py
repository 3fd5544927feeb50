"""Labelled texts: a CSV/TSV/JSONL file (val and test carved), split files, or class folders of
.txt files; the text data module (``dataset=text``), tokenized and padded per batch."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from tl_cli.core.console import say
from tl_cli.core.errors import TLError
from tl_cli.data.base import DATASETS, TransferDataModule, stratified_split
from tl_cli.modalities.text.backbone import effective_text_preprocessing
from tl_cli.modalities.text.files import (
    TEXT_EXTS,
    TextItem,
    decode_text,
    has_column,
    read_class_folders,
    read_table,
    read_text_lines,
)
from tl_cli.modalities.text.tokenizer import pad_batch, rust_errors, tokenizer_for


class TextDataset(Dataset):
    """``(token ids, label)`` rows, tokenized lazily (truncation happens in the collate)."""

    def __init__(self, items: Sequence[tuple[TextItem, int]], tokenizer: Any) -> None:
        self.items = list(items)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        item, label = self.items[i]
        with rust_errors(f"text {i} ({item.text[:40]!r})"):
            return self.tokenizer.encode(item.text).ids, label


class TextCollate:
    """Pads a batch to its longest sequence (dynamic padding), after truncation to max_length."""

    def __init__(self, pad_id: int, max_length: int) -> None:
        self.pad_id, self.max_length = int(pad_id), int(max_length)

    def __call__(
        self, batch: list[tuple[list[int], int]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids = [b[0] for b in batch]
        y = torch.tensor([int(b[1]) for b in batch], dtype=torch.long)
        return pad_batch(ids, self.pad_id, self.max_length), y


class TextDataModule(TransferDataModule):
    """Labelled texts. ``root`` is one of:

    * a ``.csv`` / ``.tsv`` / ``.jsonl`` file: val and test are carved (stratified, seeded);
    * a directory with ``train.<ext>`` (+ ``val.<ext>``, + ``test.<ext>``) of one format: val is
      carved from train when absent;
    * a directory of class folders holding ``.txt`` files (one document per file): val carved.

    Args:
        text_column, label_column: column (CSV/TSV header) or key (JSONL) names.
        max_length: tokens per text (truncated); None: the model's default (at most 256).
        test_fraction: share of each class carved as test from a single file.
        carve: False (``tl eval dataset.root=OTHER``): a single file or class folders are not
            split; every row lands in train and is scored whole.
    """

    item_noun = "texts"
    val_hint = "a val file (val.csv/.tsv/.jsonl beside train.*)"

    name = "text"

    def __init__(
        self,
        root: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        max_length: int | None = None,
        test_fraction: float = 0.2,
        augment: str = "none",
        carve: bool = True,
        **kw: Any,
    ) -> None:
        kw.pop("image_size", None)
        super().__init__(augment=augment, **kw)
        self.root = root
        self.text_column = str(text_column)
        self.label_column = str(label_column)
        self.max_length = max_length
        self.test_fraction = test_fraction
        self.carve = bool(carve)
        self.skipped_empty = 0
        self.tokenizer: Any = None

    # -- scanning
    def _scan(self) -> None:
        if not self.root:
            raise TLError(
                "dataset.root is not set: pass dataset.root=FILE (.csv/.tsv/.jsonl) or a directory"
            )
        root = Path(os.path.expanduser(str(self.root)))
        if not root.exists():
            raise TLError(f"dataset.root={root} does not exist")
        raw: dict[str, tuple[list[str], list[str]]] = {}
        if root.is_file():
            raw["all"] = self._read(root)
            self.layout = "single file, val + test carved"
        else:
            found_files = sorted(
                p
                for p in root.iterdir()
                if p.is_file()
                and p.suffix.lower() in TEXT_EXTS
                and p.stem in ("train", "val", "test")
            )
            files = {p.stem: p for p in found_files}
            if files:
                if "train" not in files:
                    raise TLError(
                        f"{root}: has {', '.join(p.name for p in found_files)} but no train file"
                    )
                if len({p.suffix.lower() for p in found_files}) > 1 or len(found_files) != len(
                    files
                ):
                    raise TLError(
                        f"{root}: split files mix formats ({', '.join(p.name for p in found_files)}); use one"
                    )
                for s in ("train", "val", "test"):
                    if s in files:
                        raw[s] = self._read(files[s])
                self.layout = " + ".join(
                    files[s].name for s in ("train", "val", "test") if s in files
                )
            else:
                found, skipped = read_class_folders(root)
                if not found:
                    raise TLError(
                        f"{root}: no train.csv/.tsv/.jsonl and no class folders of .txt files"
                    )
                self.skipped_empty += skipped
                texts = [t for c in sorted(found) for t in found[c]]
                labels = [c for c in sorted(found) for _ in found[c]]
                raw["all"] = (texts, labels)
                self.layout = "class folders of .txt"
                if skipped:
                    say(f"{root}: skipped {skipped} empty .txt file(s)")
        base = raw.get("all") or raw["train"]
        classes = sorted(set(base[1]))
        where = str(root)
        if len(classes) < 2:
            raise TLError(
                f"{where}: the label column {self.label_column!r} has {len(classes)} class"
                f"{'' if len(classes) == 1 else 'es'} ({', '.join(classes)}); a classifier needs at least 2"
            )
        idx = {c: i for i, c in enumerate(classes)}
        for s, (_, labels) in raw.items():
            extra = sorted(set(labels) - set(classes))
            if extra:
                raise TLError(f"{where}: {s} has label(s) not in train: {', '.join(extra[:5])}")
        items = {
            s: [(TextItem(t), idx[y]) for t, y in zip(texts, labels, strict=True)]
            for s, (texts, labels) in raw.items()
        }
        if "all" in items and not self.carve:
            items["train"], items["val"] = items.pop("all"), []
        elif "all" in items:
            all_items = items.pop("all")
            carve_test = root.is_file()
            self._check_counts(all_items, classes, where, carve_test)
            if carve_test:
                all_items, items["test"] = self._carve(
                    all_items, classes, self.test_fraction, where, "test"
                )
            items["train"], items["val"] = self._carve(
                all_items, classes, self.val_fraction, where, "val"
            )
        elif "val" not in items:
            self._check_counts(items["train"], classes, where, False)
            items["train"], items["val"] = self._carve(
                items["train"], classes, self.val_fraction, where, "val"
            )
            self.layout += ", val carved"
        self.class_names = classes
        self.splits = {k: items[k] for k in ("train", "val", "test") if k in items}

    def _read(self, path: Path) -> tuple[list[str], list[str]]:
        texts, labels, skipped = read_table(path, self.text_column, self.label_column)
        if skipped:
            self.skipped_empty += skipped
            say(f"{path}: skipped {skipped} empty text(s)")
        if not texts:
            raise TLError(f"{path}: no non-empty texts in column {self.text_column!r}")
        return texts, labels  # type: ignore[return-value]

    def _check_counts(
        self, items: list[tuple[TextItem, int]], classes: list[str], where: str, test: bool
    ) -> None:
        if not self.carve:  # nothing is held out: no minimum per class
            return
        fractions = {"val_fraction": self.val_fraction}
        if test:
            fractions["test_fraction"] = self.test_fraction
        for k, v in fractions.items():
            try:
                ok = 0.0 < float(v) < 1.0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise TLError(f"dataset.{k}={v} must be between 0 and 1 (exclusive)")
        need = 3 if test else 2
        counts = Counter(y for _, y in items)
        for y, c in enumerate(classes):
            if counts[y] < need:
                carve = " and ".join(f"dataset.{k}={v}" for k, v in fractions.items())
                raise TLError(
                    f"{where}: class {c!r} has {counts[y]} row(s); carving {carve} needs at least "
                    f"{need} per class (add rows, or give {'val/test' if test else 'val'} files)"
                )

    def _carve(self, items, classes, fraction, where, what):
        if not self.carve:
            return list(items), []
        keep, held = stratified_split(
            [y for _, y in items], fraction, self.split_seed, classes, where
        )
        return [items[i] for i in keep], [items[i] for i in held]

    # -- a target domain (tl_cli.transfer.adapt)
    def read_target(self, root: Path) -> list[tuple[Any, str | None]]:
        """A target domain (``dataset.target_root``), nothing carved: a .csv/.tsv/.jsonl file
        (labelled when it has ``label_column``, else texts only), a .txt file (one text per line,
        unlabelled), or a folder: split files (``train``/``val``/``test``), class folders of .txt
        (labelled), or a flat folder of .txt documents and tables."""
        if root.is_file():
            return self._target_file(root)
        split_files = sorted(
            p
            for p in root.iterdir()
            if p.is_file()
            and p.suffix.lower() in (*TEXT_EXTS, ".txt")
            and not p.name.startswith(".")
        )
        if (
            any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
            and not split_files
        ):
            found, skipped = read_class_folders(root)
            self.skipped_empty += skipped
            return [(TextItem(t), c) for c in sorted(found) for t in found[c]]
        if not split_files:
            raise TLError(
                f"dataset.target_root={root}: no .csv/.tsv/.jsonl/.txt files and no class folders "
                "of .txt files"
            )
        out: list[tuple[Any, str | None]] = []
        for f in split_files:
            if f.suffix.lower() == ".txt":  # one document per file, as in class folders
                text = decode_text(f, f.read_bytes())
                if text.strip():
                    out.append((TextItem(text), None))
                else:
                    self.skipped_empty += 1
            else:
                out += self._target_file(f)
        return out

    def _target_file(self, path: Path) -> list[tuple[Any, str | None]]:
        ext = path.suffix.lower()
        if ext == ".txt":
            texts, skipped = read_text_lines(path)
            labels: list[str | None] = [None] * len(texts)
        elif ext in TEXT_EXTS:
            label = self.label_column if has_column(path, self.label_column) else None
            texts, labels, skipped = read_table(path, self.text_column, label)
        else:
            raise TLError(f"dataset.target_root={path}: not a {', '.join(TEXT_EXTS)} or .txt file")
        self.skipped_empty += skipped
        if not texts:
            raise TLError(f"dataset.target_root={path}: no non-empty texts")
        return [(TextItem(t), y) for t, y in zip(texts, labels, strict=True)]

    # -- preprocessing
    def preprocessing_overrides(self) -> dict[str, Any]:
        return {"max_length": int(self.max_length)} if self.max_length else {}

    def set_preprocessing(self, prep: dict[str, Any]) -> None:
        if prep.get("modality") != "text":
            raise TLError(
                "dataset=text needs a text backbone (backbone=minilm or backbone=hf); "
                f"this one reads {prep.get('modality', 'images')}"
            )
        self.preprocessing = effective_text_preprocessing(prep, self.max_length)
        self.tokenizer = tokenizer_for(self.preprocessing)

    # -- datasets and loaders
    def dataset(self, split: str, train_aug: bool | None = None) -> TextDataset:
        return TextDataset(self.split_items(split), self.tokenizer)

    def collate_fn(self, ds: Any = None) -> TextCollate:
        assert self.preprocessing is not None
        return TextCollate(self.preprocessing["pad_id"], self.preprocessing["max_length"])

    def describe(self) -> str:
        s = super().describe()
        return s + (f", {self.skipped_empty} empty text(s) skipped" if self.skipped_empty else "")


DATASETS.register("text", TextDataModule)
