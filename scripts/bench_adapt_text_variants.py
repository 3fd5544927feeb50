#!/usr/bin/env python
"""Issue 28, text pair: transductive ideas on the frozen MiniLM features, measured before building.

    python scripts/bench_adapt_text_variants.py [--seeds 0 1 2] [--simcse]

Product reviews (``sentiment-amazon``, 800 of the 1000 sentences per seed, as tl's source train
part) -> movie snippets (``sentiment-movies``, all 2000, labels only to score). Every row is a
scikit-learn logistic regression (C by 5-fold CV on the source) on tl's own MiniLM features
(``build_minilm``: mean-pooled last hidden state), fed what each idea changes:

* ``l2`` (the source-only reference), ``center`` (each domain's mean removed, then L2: the
  feature-level AdaBN), ``domain_std`` (each domain standardised with its own statistics),
  ``coral`` (CORAL, Sun et al. 2016: source whitened and recoloured with the target covariance),
* ``cbst`` (class-balanced self-training, Zou et al. 2018: the top 20/40/60 % most confident target
  predictions of each class join the source in three refits),
* ``shot_centroid`` (SHOT's pseudo-labels, Liang et al. 2020: prediction-weighted target class
  centroids, nearest centroid by cosine, three rounds), ``spread10`` (label spreading on a 10-NN
  graph of source + target), ``knn_smooth10`` (each target prediction averaged with its 10 nearest
  target neighbours'),
* ``zeroshot`` (no source: cosine to the embeddings of "a negative review" / "a positive review"),
* ``--simcse``: unsupervised SimCSE (Gao et al. 2021: dropout noise as positives) for one epoch on
  the *target's* sentences (lr 3e-5, batch 64, temperature 0.05) before the source probe.

The in-domain ceiling is the same probe trained on the target's labels (5-fold CV on the target).
Figures and the command that produced them: docs/adaptation.md, "Text: what else was tried".
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = (ROOT.parent / "shared" / "data").resolve()


def read(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], np.array([int(r["label"] == "positive") for r in rows])


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--simcse", action="store_true", help="also one epoch of SimCSE on the target")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from scipy.linalg import inv, sqrtm
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import cross_val_score
    from sklearn.semi_supervised import LabelSpreading

    from tl_cli.modalities.text.backbone import build_minilm

    src_t, src_y = read(DATA / "sentiment-amazon" / "amazon_cells.csv")
    tgt_t, yt = read(DATA / "sentiment-movies" / "rt_snippets.csv")

    def probe() -> LogisticRegressionCV:
        return LogisticRegressionCV(Cs=10, cv=5, max_iter=3000)

    def embedder():
        bb = build_minilm()
        tok = bb.tokenizer
        tok.enable_padding(pad_id=int(bb.preprocessing.get("pad_id", 0)))
        tok.enable_truncation(int(bb.preprocessing.get("max_length", 128)))

        def batch(texts: list[str]) -> dict[str, torch.Tensor]:
            e = tok.encode_batch(texts)
            return {
                "input_ids": torch.tensor([x.ids for x in e]),
                "attention_mask": torch.tensor([x.attention_mask for x in e]),
            }

        def emb(texts: list[str]) -> np.ndarray:
            bb.eval()
            with torch.no_grad():
                return np.concatenate(
                    [bb(batch(texts[i : i + 128])).numpy() for i in range(0, len(texts), 128)]
                )

        return bb, batch, emb

    bb, batch, emb = embedder()
    xs_all, xt = emb(src_t), emb(tgt_t)
    results: dict[str, list[float]] = {}

    def add(name: str, acc: float) -> None:
        results.setdefault(name, []).append(float(acc))

    for seed in args.seeds:
        idx = np.random.RandomState(seed).permutation(len(src_t))[:800]
        s, ys, t = l2(xs_all[idx]), src_y[idx], l2(xt)
        clf = probe().fit(s, ys)
        p = clf.predict_proba(t)
        add("l2 (source only)", (p.argmax(1) == yt).mean())
        sc, tc = l2(s - s.mean(0)), l2(t - t.mean(0))
        add("center", (probe().fit(sc, ys).predict(tc) == yt).mean())
        zs = (s - s.mean(0)) / (s.std(0) + 1e-6)
        zt = (t - t.mean(0)) / (t.std(0) + 1e-6)
        add("domain_std", (probe().fit(zs, ys).predict(zt) == yt).mean())
        eye = 1e-2 * np.eye(s.shape[1])
        w = np.real(
            inv(sqrtm(np.cov(s, rowvar=False) + eye)) @ sqrtm(np.cov(t, rowvar=False) + eye)
        )
        add("coral", (probe().fit((s - s.mean(0)) @ w + t.mean(0), ys).predict(t) == yt).mean())
        q = p.copy()
        for frac in (0.2, 0.4, 0.6):
            lab, sel = q.argmax(1), np.zeros(len(t), bool)
            for k in (0, 1):
                ik = np.where(lab == k)[0]
                sel[ik[np.argsort(-q[ik, k])][: int(frac * len(ik))]] = True
            q = probe().fit(np.vstack([s, t[sel]]), np.r_[ys, lab[sel]]).predict_proba(t)
        add("cbst", (q.argmax(1) == yt).mean())
        q = p.copy()
        for _ in range(3):
            cent = l2((q.T @ t) / q.sum(0)[:, None])
            q = np.eye(2)[(t @ cent.T).argmax(1)]
        add("shot_centroid", (q.argmax(1) == yt).mean())
        ls = LabelSpreading(kernel="knn", n_neighbors=10, alpha=0.8, max_iter=100)
        ls.fit(np.vstack([s, t]), np.r_[ys, -np.ones(len(t), int)])
        add("spread10", (ls.transduction_[len(s) :] == yt).mean())
        sim = t @ t.T
        np.fill_diagonal(sim, -1)
        nn = np.argsort(-sim, 1)[:, :10]
        add("knn_smooth10", ((0.5 * p + 0.5 * p[nn].mean(1)).argmax(1) == yt).mean())
        add(
            "zeroshot",
            ((t @ l2(emb(["a negative review", "a positive review"])).T).argmax(1) == yt).mean(),
        )
        folds = cross_val_score(probe(), t, yt, cv=5)
        add("in-domain ceiling", folds.mean())
        print(seed, {k: round(v[-1], 4) for k, v in results.items()}, flush=True)

    if args.simcse:
        import torch.nn.functional as F

        for seed in args.seeds:
            torch.manual_seed(seed)
            bb, batch, emb = embedder()
            opt = torch.optim.AdamW(bb.parameters(), lr=3e-5)
            bb.train()
            t0 = time.time()
            perm = np.random.RandomState(seed).permutation(len(tgt_t))
            for i in range(0, len(perm) - 63, 64):
                b = batch([tgt_t[j] for j in perm[i : i + 64]])
                z1, z2 = F.normalize(bb(b), dim=1), F.normalize(bb(b), dim=1)
                loss = F.cross_entropy(z1 @ z2.T / 0.05, torch.arange(len(z1)))
                opt.zero_grad()
                loss.backward()
                opt.step()
            idx = np.random.RandomState(seed).permutation(len(src_t))[:800]
            s, t = l2(emb([src_t[i] for i in idx])), l2(emb(tgt_t))
            add("simcse (1 epoch on target)", (probe().fit(s, src_y[idx]).predict(t) == yt).mean())
            print(
                seed,
                "simcse",
                round(results["simcse (1 epoch on target)"][-1], 4),
                f"{time.time() - t0:.0f} s",
                flush=True,
            )

    load = Path("/proc/loadavg").read_text().split()[:3]
    summary = {
        k: (round(100 * np.mean(v), 1), round(100 * np.std(v), 1)) for k, v in results.items()
    }
    print(json.dumps({"seeds": args.seeds, "load": load, "target_acc_mean_std": summary}))


if __name__ == "__main__":
    main()
