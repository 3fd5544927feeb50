"""Running a tagger over sentences, and what ``tl eval`` reports for NER.

``tag_words`` turns sentences (lists of words) into one tag and probability per word, through the
same windows as training (``tl_cli.tasks.ner.align``); ``evaluation`` scores tags against gold
(seqeval, the confusion matrix, error kinds, the worst sentences); ``report_lines`` renders it as
report.md sections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tl_cli.tasks.ner import metrics
from tl_cli.tasks.ner.align import (
    Aligner,
    TokenCollate,
    TokenDataset,
    gather_words,
    merge,
    split_by_sentence,
    word_offsets,
)
from tl_cli.tasks.ner.model import word_tags


@torch.no_grad()
def word_logits(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    ds: TokenDataset,
    collate: TokenCollate,
    total: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    advance: Callable[[], None] | None = None,
) -> torch.Tensor:
    """``(total words, tags)`` logits, each word from the window that scores it."""
    idx, rows = [], []
    order = sorted(range(len(ds)), key=lambda i: len(ds.windows[i].ids))  # little padding
    for b in range(0, len(order), batch_size):
        x, y = collate([ds[i] for i in order[b : b + batch_size]])
        x = {k: v.to(device) for k, v in x.items()}
        k, v = gather_words(forward(x).float().cpu(), y["word_index"])
        idx.append(k)
        rows.append(v)
        if advance is not None:
            advance()
    if not idx:
        return torch.zeros(0, 0)
    return merge(idx, rows, total)


def tag_words(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    aligner: Aligner,
    pad_id: int,
    sentences: Sequence[Sequence[str]],
    labels: Sequence[str],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[list[list[str]], list[list[float]]]:
    """(tags, probabilities) per word of each sentence, in the internal scheme."""
    wins, _ = aligner.windows(sentences)
    ds = TokenDataset(wins, None, word_offsets(sentences))
    total = sum(len(s) for s in sentences)
    if total == 0:
        return [[] for _ in sentences], [[] for _ in sentences]
    logits = word_logits(forward, ds, TokenCollate(pad_id), total, batch_size, device)
    tags, probs = word_tags(logits, labels)
    lengths = [len(s) for s in sentences]
    return split_by_sentence(tags, lengths), split_by_sentence(probs, lengths)


def evaluation(
    words: Sequence[Sequence[str]],
    gold: Sequence[Sequence[str]],
    pred: Sequence[Sequence[str]],
    types: Sequence[str],
    error_limit: int = 50,
) -> dict[str, Any]:
    """Scores, confusion matrix, error kinds and the worst sentences of one split."""
    names, matrix = metrics.confusion(gold, pred, types)
    return {
        "metrics": metrics.score(gold, pred),
        "confusion": {"names": names, "matrix": matrix},
        "error_kinds": metrics.error_kinds(gold, pred),
        "errors": metrics.error_rows(words, gold, pred, error_limit),
    }


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def report_lines(ev: dict[str, Any], scheme: str) -> list[str]:
    """report.md sections: per-type table, confusion matrix, error kinds."""
    m = ev["metrics"]
    out = [
        "## Entities",
        "",
        f"Entity-level scores (exact span and type; seqeval's default mode, the conlleval "
        f"definition), tags read as {scheme}.",
        "",
        _row(["type", "precision", "recall", "F1", "support"]),
        _row(["---"] * 5),
    ]
    for t, r in m["per_type"].items():
        out.append(
            _row([t, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]])
        )
    total = sum(r["support"] for r in m["per_type"].values())
    out.append(
        _row(["**micro**", f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", total])
    )
    out.append(_row(["**macro F1**", "", "", f"{m['macro_f1']:.3f}", ""]))
    names, matrix = ev["confusion"]["names"], ev["confusion"]["matrix"]
    out += [
        "",
        "## Confusion between entity types",
        "",
        "Rows: gold; columns: predicted; spans paired by identical boundaries. Column O: gold "
        "entities missed; row O: spurious predictions.",
        "",
        _row(["gold \\ predicted", *names]),
        _row(["---"] * (len(names) + 1)),
    ]
    for n, r in zip(names, matrix, strict=True):
        out.append(_row([n, *r]))
    k = ev["error_kinds"]
    out += [
        "",
        "## Errors by kind",
        "",
        _row(["correct", "wrong type", "wrong boundaries", "wrong both", "missed", "spurious"]),
        _row(["---"] * 6),
        _row([k[c] for c in k]),
        "",
        f"The {len(ev['errors'])} sentences with the most wrong spans are in errors.jsonl.",
    ]
    return out
