"""Entity-level scores (seqeval, default conlleval mode), a type confusion matrix, error analysis.

``score`` returns the names CI gates and reports use: ``f1``, ``precision``, ``recall`` (micro,
exact span and type), ``macro_f1`` (mean F1 over the entity types in gold or predictions),
``token_acc`` (tag accuracy over words) and ``per_type`` (precision, recall, f1, support).

The confusion matrix pairs spans with the SAME boundaries: its diagonal is the true positives
behind ``f1``; a gold span with no predicted span at its boundaries is *missed* (column ``O``),
a predicted span with no gold span at its boundaries is *spurious* (row ``O``). ``error_kinds``
says why spans fail (wrong type, wrong boundaries, both, missed, spurious), the categories of
MUC-style error analysis.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tl_cli.tasks.ner.schemes import Span, decode

#: the row/column of "no entity" in the confusion matrix
NONE = "O"


def score(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, Any]:
    """seqeval's default-mode P/R/F1 (micro and per type), macro F1 and token accuracy."""
    from seqeval.metrics import accuracy_score
    from seqeval.metrics.sequence_labeling import precision_recall_fscore_support

    g, p = [list(s) for s in gold], [list(s) for s in pred]
    if len(g) != len(p) or any(len(a) != len(b) for a, b in zip(g, p, strict=True)):
        raise ValueError("gold and predicted tags differ in length")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns on types with no predictions
        mp, mr, mf, _ = precision_recall_fscore_support(g, p, average="micro", zero_division=0)
        _, _, macro, _ = precision_recall_fscore_support(g, p, average="macro", zero_division=0)
        tp, tr, tf, ts = precision_recall_fscore_support(g, p, average=None, zero_division=0)
    types = sorted(
        {t for s in g for _, _, t in decode(s)} | {t for s in p for _, _, t in decode(s)}
    )
    per_type = {
        t: {
            "precision": float(tp[i]),
            "recall": float(tr[i]),
            "f1": float(tf[i]),
            "support": int(ts[i]),
        }
        for i, t in enumerate(types)
    }
    n_words = sum(len(s) for s in g)
    return {
        "f1": float(mf),
        "precision": float(mp),
        "recall": float(mr),
        "macro_f1": float(macro) if types else 0.0,
        "token_acc": float(accuracy_score(g, p)) if n_words else 0.0,
        "per_type": per_type,
    }


def flat(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{"test/f1": ..., "test/per_type/PER/f1": ...}`` for metrics.json / eval.json."""
    out = {f"{prefix}/{k}": v for k, v in metrics.items() if k != "per_type"}
    for t, row in metrics.get("per_type", {}).items():
        for k, v in row.items():
            out[f"{prefix}/per_type/{t}/{k}"] = v
    return out


def confusion(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], types: Sequence[str]
) -> tuple[list[str], list[list[int]]]:
    """(names, counts): rows gold type, columns predicted type, ``O`` = no span there."""
    names = [*sorted(set(types) | _all_types(gold) | _all_types(pred)), NONE]
    at = {n: i for i, n in enumerate(names)}
    m = [[0] * len(names) for _ in names]
    for g, p in zip(gold, pred, strict=True):
        gs = {(s, e): t for s, e, t in decode(g)}
        ps = {(s, e): t for s, e, t in decode(p)}
        for b, t in gs.items():
            m[at[t]][at[ps.get(b, NONE)]] += 1
        for b, t in ps.items():
            if b not in gs:
                m[at[NONE]][at[t]] += 1
    return names, m


def _all_types(tags: Sequence[Sequence[str]]) -> set[str]:
    return {t for s in tags for _, _, t in decode(s)}


def _overlap(a: Span, b: Span) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def error_kinds(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, int]:
    """Counts of correct spans and of each kind of error.

    A gold span is ``correct`` (same boundaries and type), ``wrong_type`` (same boundaries),
    ``wrong_boundaries`` (overlapped by a predicted span of its type), ``wrong_both``
    (overlapped by one of another type) or ``missed``; a predicted span overlapping no gold span
    is ``spurious``.
    """
    c: Counter[str] = Counter()
    for g, p in zip(gold, pred, strict=True):
        gs, ps = decode(g), decode(p)
        pset = set(ps)
        pbounds = {(s, e): t for s, e, t in ps}
        for sp in gs:
            if sp in pset:
                c["correct"] += 1
            elif (sp[0], sp[1]) in pbounds:
                c["wrong_type"] += 1
            elif any(_overlap(sp, q) and q[2] == sp[2] for q in ps):
                c["wrong_boundaries"] += 1
            elif any(_overlap(sp, q) for q in ps):
                c["wrong_both"] += 1
            else:
                c["missed"] += 1
        c["spurious"] += sum(1 for q in ps if not any(_overlap(q, sp) for sp in gs))
    return {
        k: int(c[k])
        for k in ("correct", "wrong_type", "wrong_boundaries", "wrong_both", "missed", "spurious")
    }


def _span_rows(words: Sequence[str], spans: Sequence[Span]) -> list[dict[str, Any]]:
    return [{"text": " ".join(words[s:e]), "type": t, "start": s, "end": e} for s, e, t in spans]


def error_rows(
    words: Sequence[Sequence[str]],
    gold: Sequence[Sequence[str]],
    pred: Sequence[Sequence[str]],
    limit: int = 50,
) -> list[dict[str, Any]]:
    """The ``limit`` sentences with the most wrong spans (gold or predicted spans that are not
    exactly right), gold and predicted side by side; ``start``/``end`` are word indices."""
    rows = []
    for i, (w, g, p) in enumerate(zip(words, gold, pred, strict=True)):
        gs, ps = decode(g), decode(p)
        missed = [s for s in gs if s not in set(ps)]
        spurious = [s for s in ps if s not in set(gs)]
        wrong = len(missed) + len(spurious)
        if wrong:
            rows.append(
                {
                    "sentence": i,
                    "wrong": wrong,
                    "text": " ".join(w),
                    "gold": _span_rows(w, gs),
                    "predicted": _span_rows(w, ps),
                    "missed": _span_rows(w, missed),
                    "spurious": _span_rows(w, spurious),
                }
            )
    rows.sort(key=lambda r: (-r["wrong"], r["sentence"]))
    return rows[:limit]
