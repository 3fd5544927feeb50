"""Words -> sub-tokens -> windows, and window predictions -> one prediction per word.

A word's label sits on its first sub-token; its other sub-tokens get ``-100`` (ignored by the
loss), as in Hugging Face's ``run_ner`` (``label_all_tokens=False``). A sentence longer than the
model's limit is cut into windows of whole words that overlap by about ``stride`` sub-tokens, so
no word is dropped from training or scoring; each word is scored once, from the window where it
has the most context on its shorter side. A word that alone exceeds a window keeps its first
sub-tokens (its label is on the first one). A word the tokenizer turns into nothing (a lone
control or zero-width character) becomes the unknown token, so it is still scored.

Batches are ``(x, y)``: ``x`` = ``input_ids``, ``attention_mask`` (padded per batch), what the
text backbone takes; ``y`` = ``labels`` (``-100`` where no loss is taken) and ``word_index``
(the global index of the word a position scores, ``-1`` elsewhere): predictions are put back by
``word_index``, so loaders may order windows freely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

IGNORE = -100


@dataclass
class Window:
    """Words ``[start, end)`` of sentence ``sentence``; it scores the words in ``owned``."""

    sentence: int
    start: int
    end: int
    owned: frozenset[int]
    ids: list[int]  # special tokens included
    first: list[int]  # position in ``ids`` of the first sub-token of words start..end-1


@dataclass
class AlignStats:
    sentences: int = 0
    words: int = 0
    windowed: int = 0  # sentences cut into more than one window
    windows: int = 0
    cut_words: int = 0  # words longer than a window, truncated to their first sub-tokens
    empty_words: int = 0  # words the tokenizer dropped, read as the unknown token

    def notes(self, room: int) -> list[str]:
        out = []
        if self.windowed:
            out.append(
                f"{self.windowed} sentence(s) longer than {room} sub-tokens are read in "
                f"overlapping windows ({self.windows} windows for {self.sentences} sentences)"
            )
        if self.cut_words:
            out.append(
                f"{self.cut_words} word(s) longer than a whole window ({room} sub-tokens) keep "
                "their first sub-tokens"
            )
        if self.empty_words:
            out.append(
                f"{self.empty_words} word(s) that the tokenizer drops entirely (control or "
                "zero-width characters) are read as the unknown token"
            )
        return out


def special_tokens(tok: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after one sentence."""
    enc = tok.encode(["a"], is_pretokenized=True, add_special_tokens=True)
    words = enc.word_ids
    first = next(i for i, w in enumerate(words) if w is not None)
    last = max(i for i, w in enumerate(words) if w is not None)
    return list(enc.ids[:first]), list(enc.ids[last + 1 :])


def unknown_id(tok: Any) -> int:
    for name in ("[UNK]", "<unk>", "<|endoftext|>"):
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    unk = getattr(tok.model, "unk_token", None)
    if unk and tok.token_to_id(unk) is not None:
        return int(tok.token_to_id(unk))
    return int(tok.encode(["?"], is_pretokenized=True, add_special_tokens=False).ids[0])


class Aligner:
    """Cuts sentences (lists of words) into model inputs of at most ``max_length`` ids.

    Args:
        tok: a ``tokenizers.Tokenizer`` without truncation (``tl_cli.text.get_tokenizer``).
        max_length: ids per window, special tokens included (the model's limit or less).
        stride: sub-tokens shared by consecutive windows of a long sentence.
    """

    def __init__(self, tok: Any, max_length: int, stride: int) -> None:
        self.tok = tok
        self.prefix, self.suffix = special_tokens(tok)
        self.room = int(max_length) - len(self.prefix) - len(self.suffix)
        if self.room < 2:
            raise ValueError(f"max_length={max_length} leaves no room for words")
        self.stride = max(0, min(int(stride), self.room // 2))
        self.unk = unknown_id(tok)

    def pieces(
        self, sentences: Sequence[Sequence[str]], stats: AlignStats
    ) -> list[list[list[int]]]:
        """Sub-token ids of each word of each sentence (never empty, at most ``room``)."""
        encs = self.tok.encode_batch(
            [list(s) for s in sentences], is_pretokenized=True, add_special_tokens=False
        )
        out = []
        for words, enc in zip(sentences, encs, strict=True):
            per: list[list[int]] = [[] for _ in words]
            for i, w in zip(enc.ids, enc.word_ids, strict=True):
                if w is not None:
                    per[w].append(i)
            for k, p in enumerate(per):
                if not p:
                    per[k] = [self.unk]
                    stats.empty_words += 1
                elif len(p) > self.room:
                    per[k] = p[: self.room]
                    stats.cut_words += 1
            out.append(per)
        return out

    def spans(self, counts: Sequence[int]) -> list[tuple[int, int]]:
        """Word ranges of the windows of one sentence (``counts``: sub-tokens per word)."""
        n, out, s = len(counts), [], 0
        while True:
            e, tot = s, 0
            while e < n and tot + counts[e] <= self.room:
                tot += counts[e]
                e += 1
            out.append((s, e))
            if e >= n:
                return out
            s2, ov = e, 0
            while s2 - 1 > s and ov + counts[s2 - 1] <= self.stride:
                ov += counts[s2 - 1]
                s2 -= 1
            s = s2

    @staticmethod
    def owners(counts: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[int]:
        """For each word, the window where it has the most sub-tokens on its shorter side."""
        best = [(-1, -1)] * len(counts)  # (context, window)
        for k, (s, e) in enumerate(spans):
            before = 0
            total = sum(counts[s:e])
            for w in range(s, e):
                after = total - before - counts[w]
                ctx = min(before, after)
                if ctx > best[w][0]:
                    best[w] = (ctx, k)
                before += counts[w]
        return [k for _, k in best]

    def windows(self, sentences: Sequence[Sequence[str]]) -> tuple[list[Window], AlignStats]:
        stats = AlignStats(sentences=len(sentences))
        out: list[Window] = []
        for si, per in enumerate(self.pieces(sentences, stats)):
            counts = [len(p) for p in per]
            stats.words += len(per)
            spans = self.spans(counts)
            own = self.owners(counts, spans)
            if len(spans) > 1:
                stats.windowed += 1
            for k, (s, e) in enumerate(spans):
                mine = frozenset(w for w in range(s, e) if own[w] == k)
                ids = list(self.prefix)
                first = []
                for w in range(s, e):
                    first.append(len(ids))
                    ids.extend(per[w])
                ids.extend(self.suffix)
                out.append(Window(si, s, e, mine, ids, first))
        stats.windows = len(out)
        return out, stats


class TokenDataset(Dataset):
    """Windows as ``(ids, labels, word_index)`` rows.

    Args:
        windows: from ``Aligner.windows``.
        tags: label index of each word of each sentence (None: unlabelled, predict).
        offsets: global index of each sentence's first word (``word_offsets``).
        train: label every word of a window (words in an overlap train twice, with both
            contexts); otherwise only the words the window scores carry a label.
        words, gold: the sentences and their tags as names, kept for scoring.
    """

    def __init__(
        self,
        windows: Sequence[Window],
        tags: Sequence[Sequence[int]] | None,
        offsets: Sequence[int],
        train: bool = False,
        words: Sequence[Sequence[str]] | None = None,
        gold: Sequence[Sequence[str]] | None = None,
    ) -> None:
        self.windows = list(windows)
        self.tags = tags
        self.offsets = list(offsets)
        self.train = train
        #: the sentences' words and gold tag names (what evaluation scores against)
        self.words = [list(w) for w in words] if words is not None else None
        self.gold = [list(g) for g in gold] if gold is not None else None

    def __len__(self) -> int:
        return len(self.windows)

    def lengths(self) -> list[int]:
        return [len(w.ids) for w in self.windows]

    def __getitem__(self, i: int) -> tuple[list[int], list[int], list[int]]:
        w = self.windows[i]
        n = len(w.ids)
        labels = [IGNORE] * n
        index = [-1] * n
        base = self.offsets[w.sentence]
        for k, pos in enumerate(w.first):
            word = w.start + k
            owned = word in w.owned
            if owned:
                index[pos] = base + word
            if self.tags is not None and (owned or self.train):
                labels[pos] = int(self.tags[w.sentence][word])
        return w.ids, labels, index


def word_offsets(sentences: Sequence[Sequence[Any]]) -> list[int]:
    out, n = [], 0
    for s in sentences:
        out.append(n)
        n += len(s)
    return out


class TokenCollate:
    """Pads ids (``pad_id``), the mask, labels (-100) and word indices (-1) to the batch's longest."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = int(pad_id)

    def __call__(
        self, batch: list[tuple[list[int], list[int], list[int]]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        n = max(len(b[0]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        index = torch.full((len(batch), n), -1, dtype=torch.long)
        for r, (i, y, w) in enumerate(batch):
            k = len(i)
            ids[r, :k] = torch.tensor(i)
            mask[r, :k] = 1
            labels[r, :k] = torch.tensor(y)
            index[r, :k] = torch.tensor(w)
        return {"input_ids": ids, "attention_mask": mask}, {"labels": labels, "word_index": index}


def gather_words(
    logits: torch.Tensor, word_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(global word indices, their logits) of the scored positions of a batch."""
    keep = word_index >= 0
    return word_index[keep], logits[keep]


def merge(
    indices: Sequence[torch.Tensor], rows: Sequence[torch.Tensor], total: int
) -> torch.Tensor:
    """One row per word (``total`` words) from batches of ``gather_words``; a word missing from
    them is a bug in the windows, not a data problem, so it raises."""
    idx = torch.cat(list(indices))
    val = torch.cat(list(rows))
    out = torch.full((total, val.shape[-1]), float("nan"), dtype=val.dtype)
    out[idx] = val
    seen = torch.zeros(total, dtype=torch.bool)
    seen[idx] = True
    if not bool(seen.all()) or idx.numel() != total:
        raise RuntimeError(
            f"{int((~seen).sum())} word(s) unscored, {idx.numel() - int(seen.sum())} scored twice"
        )
    return out


def split_by_sentence(values: Sequence[Any], lengths: Sequence[int]) -> list[list[Any]]:
    out, i = [], 0
    for n in lengths:
        out.append(list(values[i : i + n]))
        i += n
    return out
