"""Tagging schemes: parse tags, detect a file's scheme, decode spans, convert between schemes.

Span decoding is the conlleval algorithm, which ``seqeval.metrics`` implements in its default
mode: a chunk ends before a ``B``/``S``/``O`` tag, after an ``E``/``S`` tag and at a change of
type; a chunk starts at any non-``O`` tag when none is open. It reads valid BIO, IOB1, IO and BIOES
sequences alike, and reads invalid ones leniently (``O I-PER`` is a PER entity). seqeval's
``mode="strict"`` instead drops tokens that the declared scheme does not allow (``O I-PER`` is no
entity in strict IOB2); tl scores and predicts with the lenient default, as conlleval and
Hugging Face's ``run_ner`` do. BILOU tags (``L``/``U``) are read as BIOES ``E``/``S``.

Spans are ``(start, end, type)`` over word indices, ``end`` exclusive.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tl_cli.core.errors import TLError

Span = tuple[int, int, str]

#: scheme name -> the tag prefixes it uses
SCHEMES: dict[str, frozenset[str]] = {
    "BIO": frozenset("BI"),
    "IOB1": frozenset("BI"),
    "IO": frozenset("I"),
    "BIOES": frozenset("BIES"),
    "BILOU": frozenset("BILU"),
}
#: ``dataset.tag_scheme`` spellings -> scheme name
ALIASES = {
    "bio": "BIO",
    "iob2": "BIO",
    "iob1": "IOB1",
    "iob": "IOB1",
    "io": "IO",
    "bioes": "BIOES",
    "iobes": "BIOES",
    "bilou": "BILOU",
    "biluo": "BILOU",
}
#: the scheme tl trains and predicts in (fewest labels that still mark adjacent entities)
INTERNAL = "BIO"

_TAG = re.compile(r"^([BIESLU])-(\S.*)$")
#: BILOU prefixes read as their BIOES equivalents
_AS_BIOES = {"L": "E", "U": "S"}
#: an entity tag that starts an entity in less than this share of files' starts is noise
MINORITY = 0.05


def scheme_name(value: str) -> str | None:
    """``dataset.tag_scheme`` -> a scheme name, or None for ``auto``."""
    v = str(value).strip().lower()
    if v == "auto":
        return None
    if v not in ALIASES:
        raise TLError(
            f"dataset.tag_scheme={value!r} must be auto, bio (iob2), iob1, io, bioes (iobes) or "
            "bilou"
        )
    return ALIASES[v]


def split_tag(tag: str) -> tuple[str, str | None]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", None)``; anything else raises
    ValueError (readers turn it into a line naming the file)."""
    if tag == "O":
        return "O", None
    m = _TAG.match(tag)
    if not m:
        raise ValueError(tag)
    return m.group(1), m.group(2)


def is_tag(tag: str) -> bool:
    try:
        split_tag(tag)
    except ValueError:
        return False
    return True


def decode(tags: Sequence[str]) -> list[Span]:
    """Entity spans of a tag sequence, by seqeval's default (conlleval) rules."""
    out: list[Span] = []
    start: int | None = None
    cur: str | None = None
    prev = "O"
    for i, tag in enumerate([*tags, "O"]):
        p, typ = split_tag(tag)
        p = _AS_BIOES.get(p, p)
        if start is not None and (prev in "ES" or p in "BSO" or typ != cur):
            out.append((start, i, cur))  # type: ignore[arg-type]
            start = None
        if p != "O" and start is None:
            start, cur = i, typ
        prev = p
    return out


def encode(spans: Sequence[Span], n: int, scheme: str) -> list[str]:
    """Tags of ``n`` words holding ``spans`` (sorted, non-overlapping) in ``scheme``.

    IO cannot mark where two adjacent entities of one type meet: they become one.
    """
    tags = ["O"] * n
    prev_end, prev_type = -1, None
    for s, e, t in spans:
        if scheme == "BIO":
            tags[s:e] = [f"B-{t}"] + [f"I-{t}"] * (e - s - 1)
        elif scheme == "IOB1":
            first = "B" if (prev_end == s and prev_type == t) else "I"
            tags[s:e] = [f"{first}-{t}"] + [f"I-{t}"] * (e - s - 1)
        elif scheme == "IO":
            tags[s:e] = [f"I-{t}"] * (e - s)
        elif scheme in ("BIOES", "BILOU"):
            single, last = ("S", "E") if scheme == "BIOES" else ("U", "L")
            if e - s == 1:
                tags[s] = f"{single}-{t}"
            else:
                tags[s:e] = [f"B-{t}"] + [f"I-{t}"] * (e - s - 2) + [f"{last}-{t}"]
        else:
            raise ValueError(scheme)
        prev_end, prev_type = e, t
    return tags


def convert(tags: Sequence[str], scheme: str) -> list[str]:
    """``tags`` (any scheme) re-encoded in ``scheme``, through their spans."""
    return encode(decode(tags), len(tags), scheme)


def canonical(tags: Sequence[str], scheme: str) -> bool:
    """True when ``tags`` are exactly how ``scheme`` writes their spans (a valid sequence)."""
    return convert(tags, scheme) == list(tags)


# --------------------------------------------------------------------------- detection


@dataclass
class Tagged:
    """One sentence's tags and where each came from (for messages)."""

    tags: list[str]
    where: str  # the file
    lines: list[int]  # the line of each tag


@dataclass
class SchemeReport:
    """What detection found: the scheme, how it was decided, and the invalid sequences."""

    scheme: str
    how: str  # "detected" or "set"
    invalid: int = 0  # sentences whose tags the scheme would write differently
    first_invalid: str = ""  # "file: line N" of the first
    note: str = ""  # why an ambiguous file was read one way

    def describe(self) -> str:
        s = f"{self.scheme} ({self.how})"
        return s + (f"; {self.note}" if self.note else "")


def _at(t: Tagged, i: int) -> str:
    return f"{t.where}: line {t.lines[i]}"


def _starts(sentences: Sequence[Tagged]) -> tuple[list[str], list[str], int]:
    """Where entities start with ``B-`` and with ``I-`` (after O or another type); all starts."""
    b_starts: list[str] = []
    i_starts: list[str] = []
    n = 0
    for t in sentences:
        prev_type = None
        for i, tag in enumerate(t.tags):
            p, typ = split_tag(tag)
            if p != "O" and typ != prev_type:
                n += 1
                (b_starts if p == "B" else i_starts).append(_at(t, i))
            prev_type = typ
    return b_starts, i_starts, n


def detect(sentences: Sequence[Tagged], what: str) -> SchemeReport:
    """The scheme of ``sentences`` (one training file): BIOES/BILOU by their E/S or L/U tags,
    IO when there is no ``B-`` at all, and BIO or IOB1 by how entities start (IOB1 starts them
    with ``I-`` and keeps ``B-`` for a second entity right after one of the same type)."""
    first: dict[str, str] = {}
    for t in sentences:
        for i, tag in enumerate(t.tags):
            p, _ = split_tag(tag)
            first.setdefault(p, _at(t, i))
    used = set(first) - {"O"}
    if not used:
        raise TLError(f"{what}: no entity tags (every tag is O); NER needs tagged entities")
    es, lu = used & set("ES"), used & set("LU")
    if es and lu:
        a, b = sorted(es)[0], sorted(lu)[0]
        raise TLError(
            f"{what}: mixed tag schemes: {a}- tags (BIOES, {first[a]}) and {b}- tags (BILOU, "
            f"{first[b]}); use one, or set dataset.tag_scheme"
        )
    if es or lu:
        scheme = "BIOES" if es else "BILOU"
        return _validity(sentences, SchemeReport(scheme, "detected"))
    if "B" not in used:
        return _validity(sentences, SchemeReport("IO", "detected"))
    b_starts, i_starts, n = _starts(sentences)
    if not i_starts:
        return _validity(sentences, SchemeReport("BIO", "detected"))
    if not b_starts:
        return _validity(sentences, SchemeReport("IOB1", "detected"))
    if len(i_starts) <= MINORITY * n:
        note = (
            f"{len(i_starts)} of {n} entities start with I- (first at {i_starts[0]}); read as "
            "entity starts, as conlleval does"
        )
        return _validity(sentences, SchemeReport("BIO", "detected", note=note))
    if len(b_starts) <= MINORITY * n:
        note = (
            f"{len(b_starts)} of {n} entities start with B- after O or another type (first at "
            f"{b_starts[0]}); read as entity starts"
        )
        return _validity(sentences, SchemeReport("IOB1", "detected", note=note))
    raise TLError(
        f"{what}: mixed BIO and IOB1 tags: {len(b_starts)} entities start with B- (first at "
        f"{b_starts[0]}) and {len(i_starts)} with I- (first at {i_starts[0]}); fix the file or "
        "set dataset.tag_scheme=bio or iob1"
    )


def check_scheme(sentences: Sequence[Tagged], scheme: str, how: str, ref: str) -> SchemeReport:
    """Tags foreign to ``scheme`` (E- in a BIO file) are an error naming the line; sequences the
    scheme would write differently are counted (read leniently, as conlleval does)."""
    allowed = SCHEMES[scheme]
    for t in sentences:
        for i, tag in enumerate(t.tags):
            p, _ = split_tag(tag)
            if p != "O" and p not in allowed:
                raise TLError(
                    f"{_at(t, i)}: tag {tag!r} is not a {scheme} tag ({ref}); the tag scheme "
                    "must be the same in every file"
                )
    return _validity(sentences, SchemeReport(scheme, how))


def _validity(sentences: Sequence[Tagged], report: SchemeReport) -> SchemeReport:
    for t in sentences:
        if not canonical(t.tags, report.scheme):
            report.invalid += 1
            if not report.first_invalid:
                good = convert(t.tags, report.scheme)
                i = next(k for k, (a, b) in enumerate(zip(t.tags, good, strict=True)) if a != b)
                report.first_invalid = _at(t, i)
    return report
