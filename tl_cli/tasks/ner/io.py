"""Reading and writing NER data: CoNLL-style text and JSONL, split layouts, predict inputs.

CoNLL-style (``.conll``, ``.txt``, ``.bio``, ``.iob``): one token per line, the tag in the LAST
column, tab separated (or runs of spaces when a file has no tab), other columns (POS, chunk)
ignored, a blank line between sentences, ``-DOCSTART-`` lines skipped. JSONL: one
``{"tokens": [...], "tags": [...]}`` object per line. Every error names the file and the line.

``dataset.root`` is a directory with ``train.*`` (+ ``dev.*`` or ``val.*``, + ``test.*``) or a
single file, from which val and test are carved by sentence with a fixed seed.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tl_cli.core.errors import TLError
from tl_cli.modalities.text.files import (
    decode_text,
)  # UTF-8, naming the file and line of a bad byte
from tl_cli.tasks.ner import schemes
from tl_cli.tasks.ner.schemes import SchemeReport, Tagged

CONLL_EXTS = (".conll", ".txt", ".bio", ".iob")
JSONL_EXTS = (".jsonl",)
NER_EXTS = CONLL_EXTS + JSONL_EXTS
DOCSTART = "-DOCSTART-"


@dataclass
class Sentence:
    """Words and their tags (as read; ``tags`` is empty for unlabelled input)."""

    tokens: list[str]
    tags: list[str]
    where: str = ""
    lines: list[int] = field(default_factory=list)  # the source line of each token

    def tagged(self) -> Tagged:
        return Tagged(self.tags, self.where, self.lines)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TLError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_text(path, data)


def _lines(content: str) -> list[str]:
    # only "\n" ends a line: str.splitlines() would also split at U+2028 or \x1c inside a token
    return [ln[:-1] if ln.endswith("\r") else ln for ln in content.split("\n")]


def _fields(line: str) -> list[str]:
    line = line.rstrip(" \t")
    if "\t" in line:
        return [f.strip(" ") for f in line.split("\t")]
    return [f for f in line.split(" ") if f]


def read_conll(path: Path, tags: bool = True) -> list[Sentence]:
    """Sentences of a CoNLL-style file. ``tags=False`` (predict) also accepts one-column files:
    the last column is then the token's tag only when there are two or more columns."""
    content = _read_text(path)
    out: list[Sentence] = []
    cur = Sentence([], [], str(path), [])
    ncols: tuple[int, int] | None = None  # (columns, first line with that many)
    for no, line in enumerate(_lines(content), 1):
        if not line.strip():
            if cur.tokens:
                out.append(cur)
                cur = Sentence([], [], str(path), [])
            continue
        f = _fields(line)
        if f[0] == DOCSTART:
            continue
        if any(not x for x in f):
            raise TLError(f"{path}: line {no}: an empty column (two tabs in a row?)")
        if tags and len(f) < 2:
            raise TLError(
                f"{path}: line {no}: one column ({f[0][:40]!r}); expected the token and its "
                "tag (the last column), tab or space separated"
            )
        if ncols is None:
            ncols = (len(f), no)
        elif len(f) != ncols[0]:
            raise TLError(
                f"{path}: line {no}: {len(f)} columns, but line {ncols[1]} has {ncols[0]}; every "
                "token line needs the same columns"
            )
        if tags:
            tag = f[-1]
            if not schemes.is_tag(tag):
                raise TLError(_bad_tag(path, no, tag))
            cur.tags.append(tag)
        cur.tokens.append(f[0])
        cur.lines.append(no)
    if cur.tokens:
        out.append(cur)
    if not out:
        raise TLError(f"{path}: no tokens (an empty file?)")
    return out


def _bad_tag(path: Path | str, line: int, tag: Any) -> str:
    return (
        f"{path}: line {line}: tag {str(tag)[:40]!r} is not O or PREFIX-TYPE (B-PER, I-PER, "
        "E-PER, S-PER ...)"
    )


def read_jsonl(path: Path, tags: bool = True) -> list[Sentence]:
    """Sentences of a JSONL file: ``{"tokens": [...], "tags": [...]}`` per line."""
    content = _read_text(path)
    out: list[Sentence] = []
    for no, raw in enumerate(_lines(content), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TLError(f"{path}: line {no}: not JSON ({e.msg})") from None
        want = ("tokens", "tags") if tags else ("tokens",)
        if not isinstance(row, dict) or any(k not in row for k in want):
            keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
            raise TLError(
                f'{path}: line {no}: expected {{"tokens": [...], "tags": [...]}} (got {keys})'
            )
        toks = row["tokens"]
        if not isinstance(toks, list) or not all(isinstance(t, str) and t.strip() for t in toks):
            raise TLError(f'{path}: line {no}: "tokens" must be a list of non-empty strings')
        if not toks:
            continue
        tg: list[str] = []
        if tags:
            tg = row["tags"]
            if not isinstance(tg, list) or len(tg) != len(toks):
                n = len(tg) if isinstance(tg, list) else type(tg).__name__
                raise TLError(f"{path}: line {no}: {len(toks)} tokens but {n} tags")
            for t in tg:
                if not isinstance(t, str) or not schemes.is_tag(t):
                    raise TLError(_bad_tag(path, no, t))
        out.append(Sentence([t.strip() for t in toks], list(tg), str(path), [no] * len(toks)))
    if not out:
        raise TLError(f"{path}: no sentences (an empty file?)")
    return out


def read_file(path: Path, tags: bool = True) -> list[Sentence]:
    ext = path.suffix.lower()
    if ext in JSONL_EXTS:
        return read_jsonl(path, tags)
    if ext in CONLL_EXTS:
        return read_conll(path, tags)
    raise TLError(f"{path}: not a NER file ({', '.join(NER_EXTS)})")


# --------------------------------------------------------------------------- splits


@dataclass
class NerData:
    """Sentences per split with tags in the internal scheme, and what was read.

    ``source_scheme`` is the scheme of the files (predictions are written back in it);
    ``types`` the entity types of train; ``labels`` the internal tag list (the head's outputs).
    """

    splits: dict[str, list[Sentence]]
    source_scheme: str
    scheme_report: SchemeReport
    types: list[str]
    labels: list[str]
    layout: str
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return (
            f"ner: {len(self.types)} entity types, {sizes} sentences ({self.layout}); tags read "
            f"as {self.scheme_report.describe()}"
        )


def labels_for(types: Sequence[str]) -> list[str]:
    """The internal (BIO) tag list: ``O`` then ``B-``/``I-`` of each type, sorted."""
    return ["O", *(f"{p}-{t}" for t in sorted(types) for p in ("B", "I"))]


def find_split_files(root: Path) -> dict[str, Path]:
    """``train.*`` (+ ``dev.*``/``val.*``, + ``test.*``) of a directory, one format."""
    found = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and p.suffix.lower() in NER_EXTS and p.stem.lower() in SPLIT_STEMS
    )
    files: dict[str, Path] = {}
    for p in found:
        split = SPLIT_STEMS[p.stem.lower()]
        if split in files:
            raise TLError(f"{root}: two {split} files ({files[split].name}, {p.name}); keep one")
        files[split] = p
    if not files:
        raise TLError(
            f"{root}: no train file (expected train.conll/.txt/.bio/.iob/.jsonl, with dev.* or "
            "val.* and test.*)"
        )
    if "train" not in files:
        raise TLError(f"{root}: has {', '.join(p.name for p in found)} but no train file")
    return files


SPLIT_STEMS = {"train": "train", "dev": "val", "val": "val", "valid": "val", "test": "test"}


def carve(
    sentences: list[Sentence], fraction: float, seed: int, what: str
) -> tuple[list[Sentence], list[Sentence]]:
    """(kept, held out): a seeded split by sentence; both sides keep at least one sentence."""
    try:
        ok = 0.0 < float(fraction) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TLError(f"dataset.{what}_fraction={fraction} must be between 0 and 1 (exclusive)")
    if len(sentences) < 2:
        raise TLError(
            f"{sentences[0].where if sentences else 'dataset'}: {len(sentences)} sentence(s); "
            f"carving a {what} split needs at least 2 (give a {what} file)"
        )
    idx = list(range(len(sentences)))
    random.Random(seed).shuffle(idx)
    n = min(len(idx) - 1, max(1, round(len(idx) * float(fraction))))
    held = set(idx[:n])
    return (
        [s for i, s in enumerate(sentences) if i not in held],
        [s for i, s in enumerate(sentences) if i in held],
    )


def load(
    root: str | os.PathLike[str] | None,
    tag_scheme: str = "auto",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    carve_splits: bool = True,
) -> NerData:
    """Read ``dataset.root``: detect (or check) the tag scheme on train, convert every split to the
    internal scheme, and note the test/val entity types train never saw (scored as errors)."""
    if not root:
        raise TLError(
            "dataset.root is not set: pass a CoNLL/JSONL file or a directory with train.conll"
        )
    path = Path(os.path.expanduser(str(root)))
    if not path.exists():
        raise TLError(f"dataset.root={path} does not exist")
    raw: dict[str, list[Sentence]] = {}
    if path.is_file():
        raw["train"] = read_file(path)
        ref = path.name
        layout = "single file, val + test carved" if carve_splits else "single file"
    else:
        files = find_split_files(path)
        for split in ("train", "val", "test"):
            if split in files:
                raw[split] = read_file(files[split])
        ref = files["train"].name
        layout = " + ".join(files[s].name for s in ("train", "val", "test") if s in files)
    train_file = str(raw["train"][0].where)

    forced = schemes.scheme_name(tag_scheme)
    tagged = [s.tagged() for s in raw["train"]]
    if forced is None:
        report = schemes.detect(tagged, train_file)
    else:
        report = schemes.check_scheme(tagged, forced, "set", f"dataset.tag_scheme={tag_scheme}")
        if not any(t != "O" for s in raw["train"] for t in s.tags):
            raise TLError(f"{train_file}: no entity tags (every tag is O); NER needs entities")
    if report.how == "detected" and report.scheme == "IO":
        # IO and IOB1 write the same tags until two entities of one type touch: a train file
        # without such a pair reads as IO, and a dev/test file's B- between them says IOB1
        if any(t.startswith("B-") for k in ("val", "test") for s in raw.get(k, []) for t in s.tags):
            report = schemes.check_scheme(tagged, "IOB1", "detected", train_file)
            report.note = "IO in train; B- between adjacent entities in the other files"
    warnings: list[str] = []
    if report.invalid:
        warnings.append(
            f"{report.invalid} sentence(s) of {ref} are not valid {report.scheme} (first at "
            f"{report.first_invalid}); their spans are read as conlleval does"
        )
    for split in ("val", "test"):
        if split in raw:
            r = schemes.check_scheme(
                [s.tagged() for s in raw[split]],
                report.scheme,
                report.how,
                f"{ref} reads as {report.scheme}",
            )
            if r.invalid:
                warnings.append(
                    f"{r.invalid} {split} sentence(s) are not valid {r.scheme} (first at "
                    f"{r.first_invalid}); read as conlleval does"
                )

    if carve_splits and path.is_file():
        raw["train"], raw["test"] = carve(raw["train"], test_fraction, seed, "test")
    if carve_splits and "val" not in raw:
        raw["train"], raw["val"] = carve(raw["train"], val_fraction, seed, "val")
        if not path.is_file():
            layout += ", val carved"

    conv = {
        k: [
            Sentence(s.tokens, schemes.convert(s.tags, schemes.INTERNAL), s.where, s.lines)
            for s in v
        ]
        for k, v in raw.items()
    }
    types = sorted({t for s in conv["train"] for _, _, t in schemes.decode(s.tags)})
    if not types:
        raise TLError(f"{train_file}: the train split holds no entities")
    for split in ("val", "test"):
        unseen = Counter(
            t for s in conv.get(split, []) for _, _, t in schemes.decode(s.tags) if t not in types
        )
        if unseen:
            names = ", ".join(f"{t} ({n})" for t, n in sorted(unseen.items()))
            warnings.append(
                f"{split} has entity type(s) train never shows: {names}; they are scored as "
                "missed entities"
            )
    conv.setdefault("val", [])  # not carved (a file scored whole): an empty val split
    splits = {k: conv[k] for k in ("train", "val", "test") if k in conv}
    return NerData(splits, report.scheme, report, types, labels_for(types), layout, warnings)


# --------------------------------------------------------------------------- predict inputs

#: words of a plain text line: URLs, @mentions/#hashtags, words with inner ' - . &, numbers,
#: and any other non-space character on its own (punctuation is its own token, as in CoNLL)
_WORD = re.compile(r"(?:https?://|www\.)\S+|[@#]?\w+(?:['’\-.&]\w+)*|[^\w\s]")


def split_words(text: str) -> list[tuple[str, int, int]]:
    """``(word, start, end)`` character offsets of a plain text line's words."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


@dataclass
class PredictInput:
    """One input line: its text, its words and their character offsets into the text."""

    text: str
    words: list[str]
    offsets: list[tuple[int, int]]
    gold: list[str] = field(default_factory=list)  # tags when the input file had them


def from_tokens(tokens: Sequence[str], gold: Sequence[str] = ()) -> PredictInput:
    """A pre-tokenized sentence: the text is its tokens joined by single spaces."""
    offsets, pos = [], 0
    for t in tokens:
        offsets.append((pos, pos + len(t)))
        pos += len(t) + 1
    return PredictInput(" ".join(tokens), list(tokens), offsets, list(gold))


def from_text(text: str) -> PredictInput:
    words = split_words(text)
    return PredictInput(text, [w for w, _, _ in words], [(s, e) for _, s, e in words])


def read_predict_inputs(path: Path) -> tuple[list[PredictInput], int]:
    """(inputs, skipped empty lines) of ``tl predict inputs=FILE``: plain text lines (``.txt``
    without tab-separated columns), or a CoNLL/JSONL file (its tags, if any, kept as gold)."""
    ext = path.suffix.lower()
    if ext in JSONL_EXTS:
        return [from_tokens(s.tokens, _gold_if_tags(s)) for s in _jsonl_any(path)], 0
    content = _read_text(path)
    lines = _lines(content)
    if ext == ".txt" and not _looks_conll(lines):
        texts = [ln for ln in lines if ln.strip()]
        skipped = len([ln for ln in lines[:-1] if not ln.strip()]) if lines else 0
        return [from_text(t) for t in texts], skipped
    if ext not in CONLL_EXTS:
        raise TLError(f"inputs={path}: not a text, CoNLL or JSONL file ({', '.join(NER_EXTS)})")
    sents = read_conll(path, tags=False)
    ncol = len(_fields(next(ln for ln in lines if ln.strip() and _fields(ln)[0] != DOCSTART)))
    if ncol >= 2:
        tagged = read_conll(path, tags=True)
        return [from_tokens(s.tokens, s.tags) for s in tagged], 0
    return [from_tokens(s.tokens) for s in sents], 0


def read_unlabeled(root: str | os.PathLike[str]) -> list[Sentence]:
    """Sentences without tags (``tl distill dataset.unlabeled_root=``): a file or every NER file
    under a directory, read as ``tl predict`` reads its inputs (plain text lines split into
    words, or CoNLL/JSONL tokens; any tags in them are ignored)."""
    p = Path(os.path.expanduser(str(root)))
    if not p.exists():
        raise TLError(f"dataset.unlabeled_root={root} does not exist")
    files = (
        sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in NER_EXTS)
        if p.is_dir()
        else [p]
    )
    out = []
    for f in files:
        got, _ = read_predict_inputs(f)
        out.extend(Sentence(list(inp.words), [], str(f)) for inp in got if inp.words)
    if not out:
        raise TLError(
            f"dataset.unlabeled_root={root}: no sentences ({', '.join(NER_EXTS)} files: text "
            "lines, CoNLL or JSONL)"
        )
    return out


def _gold_if_tags(s: Sentence) -> list[str]:
    return s.tags


def _jsonl_any(path: Path) -> list[Sentence]:
    content = _read_text(path)
    has_tags = any('"tags"' in ln for ln in _lines(content)[:50])
    return read_jsonl(path, tags=has_tags)


def _looks_conll(lines: list[str]) -> bool:
    """A .txt file whose non-blank lines all have the same 2+ columns ending in a tag."""
    rows = [_fields(ln) for ln in lines if ln.strip()]
    if not rows:
        return False
    n = len(rows[0])
    return n >= 2 and all(len(r) == n and schemes.is_tag(r[-1]) for r in rows)


def write_conll(
    path: Path, inputs: Sequence[PredictInput], predicted: Sequence[Sequence[str]]
) -> None:
    """``token<TAB>predicted`` per line (``token<TAB>gold<TAB>predicted`` when the input had
    tags, the layout conlleval scores), a blank line between sentences."""
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for inp, pred in zip(inputs, predicted, strict=True):
            for i, (w, p) in enumerate(zip(inp.words, pred, strict=True)):
                cols = [w, inp.gold[i], p] if inp.gold else [w, p]
                fh.write("\t".join(cols) + "\n")
            fh.write("\n")
