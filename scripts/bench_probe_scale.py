#!/usr/bin/env python
"""How tl's L-BFGS head scales the features, in domain and across domains (issue 24, point 5).

    python scripts/bench_probe_scale.py [--size 224] [--pairs coil1>coil2,coil2>coil1] [--rows ...]

``tl_cli.transfer.probe.fit_probe`` standardises the features for its fit. ``scale=dim`` (the
default) divides each feature by its own standard deviation on the train split; ``scale=global``
by one scale for all. Under a domain shift a feature that is nearly constant on the source gets
a huge weight after per-feature standardisation and then swings the target's logits. This
script fits both on the same features and scores them (and both again on L2-normalised
features: feature normalisation, issue 24 point 4), beside two scikit-learn references
(``LogisticRegressionCV(Cs=10, cv=5)`` with and without ``StandardScaler``). With ``--tta`` the
scored images are also read mirrored and each probe is scored again on the mean of the two
feature vectors (flip test-time augmentation: for a linear head, the mean of the two logits):

* pairs ``SRC>TGT``: fit on every image of the source domain, score every image of the target
  (what ``tl train ... dataset.target_root=TGT adapt=none`` reports as target accuracy);
* rows: the data sets of ``scripts/bench_defaults.py`` (its train split, scored on its test
  split), read from its feature caches (run it first: ``build/bench/defaults/cache/ROW``).

Features: the bundled efficientnet_lite0, eval transform, ``--size`` px (COIL is 32 px native:
``scripts/bench_adapt.py`` runs it at 32). Writes build/bench/probe_scale/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from _bench_util import ROOT, machine, save_json

SHARED = (ROOT.parent / "shared" / "data").resolve()
OUT = ROOT / "build" / "bench" / "probe_scale"
DOMAINS = {
    "coil1": SHARED / "coil20-domains" / "coil1",
    "coil2": SHARED / "coil20-domains" / "coil2",
}


def domain_features(name: str, size: int, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features of every image of a domain folder (cached in OUT/NAME-SIZE.npz)."""
    return folder_features(name, DOMAINS[name], "train", size, flip)


def folder_features(
    name: str, root: Path, split: str, size: int, flip: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Features of a split of an image folder, eval transform, mirrored with ``flip`` (cached in
    OUT/NAME-SIZE[-flip].npz)."""
    f = OUT / f"{name}-{size}{'-flip' if flip else ''}.npz"
    if f.exists():
        z = np.load(f)
        return z["x"], z["y"]
    import torch

    import tl_cli.modalities.image.data  # noqa: F401  (registers imagefolder)
    from tl_cli.data.base import DATASETS, ItemDataset
    from tl_cli.data.features import extract
    from tl_cli.modalities.backbones import build_backbone

    bb = build_backbone({"name": "efficientnet_lite0"}).eval()
    dm = DATASETS.build(
        {
            "name": "imagefolder",
            "root": str(root),
            "num_workers": 0,
            "batch_size": 64,
            "image_size": size,
        }
    )
    dm.carve = False
    dm.prepare()
    dm.set_preprocessing(bb.effective_preprocessing(dm.preprocessing_overrides()))
    t0 = time.perf_counter()
    ds = dm.dataset(split, train_aug=False)
    if flip:
        tf = ds.transform
        ds = ItemDataset(ds.items, ds.loader, lambda img: torch.flip(tf(img), dims=[-1]))
    with torch.inference_mode():
        x, y = extract(bb, ds, dm, torch.device("cpu"), name)
    print(
        f"[{name}{' flipped' if flip else ''}] {len(y)} images at {size} px in "
        f"{time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(f, x=x, y=y)
    return x, y


def row_features(
    row: str, tta: bool = False, defaults: Path = ROOT / "build" / "bench" / "defaults"
) -> tuple[np.ndarray | None, ...]:
    """The row's cached train and test features under ``defaults`` (bench_defaults.py --out), and
    with ``tta`` its test images read again, plain and mirrored, at 224 px (the plain ones are
    checked against the cache)."""
    cache = defaults / "cache" / row

    def one(split: str) -> tuple[np.ndarray, np.ndarray]:
        (f,) = sorted(cache.glob(f"{split}-*.features.npy"))
        return np.load(f), np.load(str(f).replace(".features.npy", ".labels.npy"))

    x, y, xt, yt = (*one("train"), *one("test"))
    if not tta:
        return x, y, xt, yt, None
    root = defaults / "data" / row
    xp, yp = folder_features(f"{row}-test", root, "test", 224)
    if not (np.array_equal(yp, yt) and np.allclose(xp, xt, atol=1e-3)):
        raise SystemExit(f"{row}: the test images read again differ from tl's cached features")
    xf, _ = folder_features(f"{row}-test", root, "test", 224, flip=True)
    return x, y, xt, yt, xf


def score(
    x: np.ndarray,
    y: np.ndarray,
    xt: np.ndarray,
    yt: np.ndarray,
    xt_flip: np.ndarray | None = None,
) -> dict:
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from tl_cli.transfer.probe import fit_probe

    k = int(max(y.max(), yt.max())) + 1
    out: dict = {"n_train": len(y), "n_eval": len(yt)}

    def l2(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-6)

    for name, scale, f in (
        ("tl_dim", "dim", None),
        ("tl_global", "global", None),
        ("tl_l2_dim", "dim", l2),  # each image's feature vector L2-normalised first
        ("tl_l2_global", "global", l2),
    ):
        xa, xb = (x, xt) if f is None else (f(x), f(xt))
        fit = fit_probe(xa, y, k, scale=scale)
        pred = (torch.as_tensor(xb) @ fit.weight.T + fit.bias).argmax(1).numpy()
        out[name] = {
            "acc": round(float((pred == yt).mean()), 4),
            "C": fit.C,
            "train_acc": round(fit.train_acc, 4),
            "max_abs_w": round(float(fit.weight.abs().max()), 3),
        }
        if xt_flip is not None:  # flip TTA: the mean of the plain and the mirrored features
            xm = (xt + xt_flip) / 2 if f is None else (f(xt) + f(xt_flip)) / 2
            pred = (torch.as_tensor(xm) @ fit.weight.T + fit.bias).argmax(1).numpy()
            out[name]["acc_flip_tta"] = round(float((pred == yt).mean()), 4)
    cv = int(min(5, np.bincount(y)[np.bincount(y) > 0].min()))
    for name, steps in (("sk_std", [StandardScaler()]), ("sk_raw", [])):
        clf = make_pipeline(*steps, LogisticRegressionCV(Cs=10, cv=cv, max_iter=5000))
        with threadpool_limits(1):
            clf.fit(x, y)
        out[name] = {
            "acc": round(float((clf.predict(xt) == yt).mean()), 4),
            "C": float(clf[-1].C_[0]),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--pairs", default="coil1>coil2,coil2>coil1")
    ap.add_argument("--rows", default="")
    ap.add_argument("--tta", action="store_true", help="also score flip test-time augmentation")
    ap.add_argument(
        "--defaults-out",
        default=str(ROOT / "build" / "bench" / "defaults"),
        help="bench_defaults.py --out whose feature caches --rows reads",
    )
    args = ap.parse_args()
    res_file = OUT / "results.json"
    res = json.loads(res_file.read_text()) if res_file.exists() else {}
    res["machine"], res["load"] = machine(), os.getloadavg()[0]
    for pair in filter(None, args.pairs.split(",")):
        src, tgt = pair.split(">")
        x, y = domain_features(src, args.size)
        xt, yt = domain_features(tgt, args.size)
        xf = domain_features(tgt, args.size, flip=True)[0] if args.tta else None
        key = f"{pair} @{args.size}"
        res.setdefault("pairs", {})[key] = score(x, y, xt, yt, xf)
        print(key, json.dumps(res["pairs"][key]), flush=True)
        save_json(res_file, res)
    for row in filter(None, args.rows.split(",")):
        tag = row if Path(args.defaults_out).name == "defaults" else f"{row} ({args.defaults_out})"
        res.setdefault("rows", {})[tag] = score(
            *row_features(row, args.tta, Path(args.defaults_out))
        )
        print(tag, json.dumps(res["rows"][tag]), flush=True)
        save_json(res_file, res)


if __name__ == "__main__":
    main()
