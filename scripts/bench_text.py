#!/usr/bin/env python
"""Text: MiniLM feature extraction and fine-tuning vs two scikit-learn references, one split.

    python scripts/bench_text.py [--root ../shared/data/sentiment-amazon/amazon_cells.csv]

Runs the real ``tl train modality=text`` (feature extraction, the default) and ``tl finetune
modality=text`` with default settings, each in a subprocess. On the same train/test split (tl's own
carve of the file: ``TextDataModule`` with the default seed and fractions) it fits two references
on the train split: TF-IDF (word 1-2-grams) + logistic regression, and logistic regression on
frozen MiniLM mean-pooled embeddings; C of both by 5-fold CV. Prints a table, writes
build/bench/text/results.json and the "text" section of docs/benchmarks.md.
Needs scikit-learn (a dev dependency).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _bench_util import (
    ROOT,
    command_line,
    machine,
    md_table,
    run_tl,
    save_json,
    text_table,
    write_section,
)

DEFAULT_TEXT = (ROOT.parent / "shared" / "data" / "sentiment-amazon" / "amazon_cells.csv").resolve()
CS = [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100]


def split(root: Path):
    import tl_cli.tasks.components  # noqa: F401
    from tl_cli.modalities.text.backbone import TextDataModule

    dm = TextDataModule(root=str(root)).prepare()
    get = {k: ([i.text for i, _ in v], np.array([y for _, y in v])) for k, v in dm.splits.items()}
    return get["train"], get["test"], len(dm.splits["val"])


def lr_cv(x_train, y_train, x_test, y_test) -> tuple[float, float, float]:
    """(test acc, chosen C, fit seconds) of a logistic regression with C by 5-fold CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    t0 = time.perf_counter()
    gs = GridSearchCV(LogisticRegression(max_iter=5000), {"C": CS}, cv=5, n_jobs=1)
    gs.fit(x_train, y_train)
    fit = time.perf_counter() - t0
    return float((gs.predict(x_test) == y_test).mean()), float(gs.best_params_["C"]), fit


def minilm_embeddings(texts: list[str]) -> np.ndarray:
    import torch

    from tl_cli.modalities.backbones import build_backbone
    from tl_cli.modalities.text.backbone import encode, tokenizer_for

    b = build_backbone({"name": "minilm", "source": "minilm"}).eval()
    tok = tokenizer_for(b.preprocessing)
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            out.append(b(encode(tok, texts[i : i + 32], b.preprocessing)).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", default=str(DEFAULT_TEXT), help=".csv/.tsv/.jsonl with text,label")
    ap.add_argument("--out", default=str(ROOT / "build" / "bench" / "text"))
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = ap.parse_args()
    out, root = Path(args.out), Path(args.root).resolve()

    (xtr, ytr), (xte, yte), n_val = split(root)
    rows, runs = [], []
    from sklearn.feature_extraction.text import TfidfVectorizer

    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    a_tr, a_te = vec.fit_transform(xtr), vec.transform(xte)
    acc, c, fit = lr_cv(a_tr, ytr, a_te, yte)
    rows.append(
        [
            "TF-IDF 1-2-grams + logistic regression",
            f"C={c:g} (5-fold CV)",
            f"{acc:.3f}",
            f"{time.perf_counter() - t0:.1f}",
        ]
    )
    print(rows[-1], flush=True)

    t0 = time.perf_counter()
    e_tr, e_te = minilm_embeddings(xtr), minilm_embeddings(xte)
    acc_probe, c, fit = lr_cv(e_tr, ytr, e_te, yte)
    rows.append(
        [
            "MiniLM mean-pooled embeddings + logistic regression",
            f"C={c:g} (5-fold CV)",
            f"{acc_probe:.3f}",
            f"{time.perf_counter() - t0:.1f}",
        ]
    )
    print(rows[-1], flush=True)

    for label, command in (
        ("tl train modality=text (feature extraction)", "train"),
        ("tl finetune modality=text", "finetune"),
    ):
        print(f"running {label} ...", flush=True)
        r = run_tl(command, ["modality=text", f"dataset.root={root}"], out / command)
        m = r["metrics"]
        assert m["test_size"] == len(yte), (m["test_size"], len(yte))
        rows.append(
            [
                label,
                f"{m['epochs']} epochs, best {m['best_epoch']}",
                f"{m['test/acc']:.3f}",
                f"{m['fit_seconds']:.0f}",
            ]
        )
        runs.append(r)
        print(rows[-1], flush=True)

    headers = ["method", "settings", "test acc", "fit s"]
    print()
    print(text_table(headers, rows))
    save_json(
        out / "results.json",
        {"command": command_line(), "machine": machine(), "rows": rows, "runs": runs},
    )
    if args.no_doc:
        return
    body = f"""## Text: MiniLM transfer on Amazon reviews (sentiment)

`{command_line()}` on {machine()}.

Data: `{root.name}` (1,000 sentences, 500 positive / 500 negative). One split for every row: tl's
own stratified, seeded carve of the file (train {len(ytr)}, val {n_val}, test {len(yte)}).
The references fit on the train split only (tl uses val only to pick the best epoch). "fit s" of
the tl rows is `fit_seconds` (feature caching or fine-tuning, without the final test); of the
references, embedding + CV + fit. Commands: {", ".join(f"`{r['cmd']}`" for r in runs)}.

{md_table(headers, rows)}
"""
    write_section("text", body)


if __name__ == "__main__":
    main()
