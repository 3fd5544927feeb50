"""Reading labelled text files (.csv, .tsv, .jsonl; class folders of .txt): plain Python, no torch.

Kept apart from the text backbones and data module so that a table's columns are checked before
torch loads (`check_table`, run by `tl_cli.run.early` through `tl_cli.data.checks`): a CSV without
its label column is one line in about a second. Errors name the file, the line and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_cli.core.errors import TLError
from tl_cli.data.checks import CHECKS

TEXT_EXTS = (".csv", ".tsv", ".jsonl")


@dataclass(frozen=True)
class TextItem:
    """One document. Not a bare ``str``: the feature cache keys it by content, not ``os.stat``."""

    text: str

    def cache_bytes(self) -> bytes:
        return hashlib.sha256(self.text.encode()).digest()

    def __str__(self) -> str:  # what reports (misclassified.csv) show
        return self.text


def decode_text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TLError(
            f"{path}: line {line}: bytes that are not UTF-8 ({data[e.start : e.start + 4]!r}); "
            "save the file as UTF-8"
        ) from None


def read_table(
    path: Path, text_column: str | None, label_column: str | None
) -> tuple[list[str], list[str | None], int]:
    """(texts, labels, skipped_empty) of a .csv/.tsv/.jsonl file; errors name the file and line.

    ``label_column=None`` reads texts only (predict). Empty or whitespace-only texts are skipped.
    """
    ext = path.suffix.lower()
    if ext not in TEXT_EXTS:
        raise TLError(f"{path}: not a {', '.join(TEXT_EXTS)} file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TLError(f"{path}: cannot read ({e.strerror or e})") from None
    content = decode_text(path, data)
    del data
    texts: list[str] = []
    labels: list[str | None] = []
    skipped = 0
    want = [c for c in (text_column, label_column) if c is not None]

    def add(text: Any, label: Any, line: int) -> None:
        nonlocal skipped
        if text is None or not str(text).strip():
            skipped += 1
            return
        if label_column is not None:
            if label is None or (isinstance(label, str) and not label.strip()):
                raise TLError(f"{path}: line {line}: empty {label_column!r} value")
            label = _label_str(label)
        texts.append(str(text))
        labels.append(label)

    if ext == ".jsonl":
        for i, raw in enumerate(content.splitlines(), 1):
            if not raw.strip():
                continue
            row = _json_row(raw, path, i, text_column, label_column)
            add(row[text_column], row.get(label_column) if label_column else None, i)
        return texts, labels, skipped

    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(content, newline=""), delimiter="\t" if ext == ".tsv" else ",")
    header = _header(reader, path, want)
    idx = _columns(header, path, text_column, label_column)
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not f.strip() for f in row):
                continue
            if len(row) <= max(idx.values()):
                raise TLError(
                    f"{path}: line {line}: {len(row)} field(s), the header has {len(header)}"
                )
            add(
                row[idx[text_column]] if text_column else None,
                row[idx[label_column]] if label_column else None,
                line,
            )
    except csv.Error as e:
        raise TLError(f"{path}: line {reader.line_num}: {e}") from None
    return texts, labels, skipped


def _key(c: str, text_column: str | None) -> str:
    return f"dataset.{'text' if c == text_column else 'label'}_column"


def _header(reader: Any, path: Path, want: list[str]) -> list[str]:
    """The header row of a CSV/TSV reader, stripped; errors name the file."""
    try:
        header = next(reader)
    except StopIteration:
        raise TLError(
            f"{path}: empty file (expected a header row with {', '.join(want)})"
        ) from None
    except csv.Error as e:
        raise TLError(f"{path}: line 1: {e}") from None
    return [h.strip() for h in header]


def _columns(
    header: list[str], path: Path, text_column: str | None, label_column: str | None
) -> dict[str, int]:
    """Column name -> index of the text and label columns; one line naming a missing one."""
    idx = {}
    for c in (text_column, label_column):
        if c is None:
            continue
        if c not in header:
            raise TLError(
                f"{path}: no column {c!r} (columns: {', '.join(header)}); set {_key(c, text_column)}"
            )
        idx[c] = header.index(c)
    return idx


def _json_row(
    raw: str, path: Path, line: int, text_column: str | None, label_column: str | None
) -> dict[str, Any]:
    """One JSONL line as an object holding the text and label keys; errors name the line."""
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TLError(f"{path}: line {line}: not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise TLError(f"{path}: line {line}: expected a JSON object per line")
    for c in (text_column, label_column):
        if c is not None and c not in row:
            raise TLError(
                f"{path}: line {line}: no {c!r} key (keys: {', '.join(map(str, row))}); "
                f"set {_key(c, text_column)}"
            )
    return row


def check_table(path: Path, text_column: str | None, label_column: str | None) -> None:
    """The checks `read_table` makes on a table's header (CSV/TSV) or first row (JSONL), reading
    only that far: a missing text or label column is one line before anything loads."""
    ext = path.suffix.lower()
    if ext not in TEXT_EXTS:
        return  # read_table says what is wrong with it
    want = [c for c in (text_column, label_column) if c is not None]
    try:
        with path.open("rb") as f:
            first = b""
            for raw in f:
                first = raw
                if ext != ".jsonl" or raw.strip():
                    break
    except OSError:
        return  # read_table reports it
    text = decode_text(path, first)
    if ext == ".jsonl":
        if text.strip():
            _json_row(text, path, 1, text_column, label_column)
        return
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if ext == ".tsv" else ",")
    _columns(_header(reader, path, want), path, text_column, label_column)


def check_text_dataset(dataset: dict[str, Any]) -> None:
    """``dataset=text``: its table's (or train table's) columns, before torch loads."""
    root = dataset.get("root")
    if not root:
        return
    p = Path(os.path.expanduser(str(root)))
    text_col = str(dataset.get("text_column") or "text")
    label_col = str(dataset.get("label_column") or "label")
    if p.is_file():
        check_table(p, text_col, label_col)
    elif p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and f.stem == "train" and f.suffix.lower() in TEXT_EXTS:
                check_table(f, text_col, label_col)


CHECKS["text"] = check_text_dataset


def has_column(path: Path, column: str) -> bool:
    """Whether a .csv/.tsv file's header (a .jsonl file's first object) names ``column``."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            if path.suffix.lower() == ".jsonl":
                for raw in fh:
                    if raw.strip():
                        row = json.loads(raw)
                        return isinstance(row, dict) and column in row
                return False
            header = next(csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    except (StopIteration, UnicodeDecodeError, json.JSONDecodeError, csv.Error):
        return False  # read_table then names the problem
    except OSError as e:
        raise TLError(f"{path}: cannot read ({e.strerror or e})") from None
    return column in [h.strip() for h in header]


def _label_str(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def read_text_lines(path: Path) -> tuple[list[str], int]:
    """A .txt file with one text per line (predict): (texts, skipped empty lines)."""
    try:
        content = decode_text(path, path.read_bytes())
    except OSError as e:
        raise TLError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = content.splitlines()
    texts = [t for t in lines if t.strip()]
    return texts, len(lines) - len(texts)


def read_class_folders(root: Path) -> tuple[dict[str, list[str]], int]:
    """root/<class>/*.txt, one document per file: ({class: texts}, skipped empty)."""
    out: dict[str, list[str]] = {}
    skipped = 0
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in d.rglob("*.txt") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise TLError(f"{d}: class folder has no .txt files")
        texts = []
        for f in files:
            t = decode_text(f, f.read_bytes())
            if t.strip():
                texts.append(t)
            else:
                skipped += 1
        out[d.name] = texts
    return out, skipped
