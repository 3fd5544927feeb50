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
import sys
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


#: fonts for the printed digits (DejaVu ships with the OS, STIX and Computer Modern with
#: matplotlib): the target domain of the digits pair
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)
FONT_SEED = 0
#: Computer Modern's symbol faces map the digit codes to other glyphs (|, \infty, \ni)
SYMBOL_FACES = ("cmex10", "cmsy10")


def digit_domains() -> dict[str, Path]:
    """A digits pair built offline (issue 24 point 5: "train on one digit style, score on
    another at 64 px"): ``hand``, scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels,
    upsampled bilinearly to 64 px), and ``font``, the ten digits printed in every TrueType font
    on the machine (DejaVu, and matplotlib's STIX and Computer Modern), 4 random placements
    each (scale 0.55-0.85 of the frame, shift up to 8%, rotation up to 8 degrees). Both are white
    on black, grey, saved as 64 px PNG; tl reads them as RGB like any grey image."""
    import random

    import matplotlib
    from PIL import Image, ImageDraw, ImageFont
    from sklearn.datasets import load_digits

    root = OUT / "digits"
    hand, font = root / "hand", root / "font"
    if not (hand / "9").is_dir():
        d = load_digits()
        for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
            (hand / str(label)).mkdir(parents=True, exist_ok=True)
            a = (img / 16.0 * 255).round().astype(np.uint8)
            Image.fromarray(a, "L").resize((64, 64), Image.BILINEAR).save(
                hand / str(label) / f"{i:04d}.png"
            )
    if not (font / "9").is_dir():
        dirs = [*FONT_DIRS, str(Path(matplotlib.get_data_path()) / "fonts" / "ttf")]
        files = sorted({p.name: p for d in dirs for p in Path(d).glob("*.ttf")}.values())
        files = [f for f in files if f.stem not in SYMBOL_FACES]
        rng = random.Random(FONT_SEED)
        kept = 0
        for f in files:
            glyphs = []
            for digit in "0123456789":
                try:
                    ft = ImageFont.truetype(str(f), 96)
                except OSError:
                    break
                canvas = Image.new("L", (160, 160), 0)
                ImageDraw.Draw(canvas).text((80, 80), digit, fill=255, font=ft, anchor="mm")
                glyphs.append(canvas.crop(canvas.getbbox()))
            if len(glyphs) < 10 or len({g.tobytes() for g in glyphs}) < 10:
                continue  # a face without ten distinct digit glyphs
            kept += 1
            for digit, g in enumerate(glyphs):
                (font / str(digit)).mkdir(parents=True, exist_ok=True)
                for k in range(4):
                    s = 64 * rng.uniform(0.55, 0.85) / max(g.size)
                    gl = g.resize((max(1, round(g.width * s)), max(1, round(g.height * s))))
                    gl = gl.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, expand=True)
                    img = Image.new("L", (64, 64), 0)
                    dx, dy = (round(rng.uniform(-0.08, 0.08) * 64) for _ in range(2))
                    img.paste(gl, ((64 - gl.width) // 2 + dx, (64 - gl.height) // 2 + dy))
                    img.save(font / str(digit) / f"{f.stem}-{k}.png")
        print(f"[digits] printed digits from {kept} fonts", flush=True)
    domains = {"hand": hand, "font": font}
    # font8: the printed digits through the handwritten set's own capture (8x8, 17 grey levels,
    # upsampled the same way): the style differs, the resolution does not
    domains["font8"] = root / "font8"
    # font A -> font B: sans-serif faces vs serif faces (both printed, both 64 px)
    domains["sans"], domains["serif"] = root / "sans", root / "serif"
    for name, keep in (
        ("font8", lambda stem: True),
        ("sans", lambda stem: stem.startswith(("DejaVuSans", "cmss"))),
        ("serif", lambda stem: stem.startswith(("DejaVuSerif", "STIX", "cmr", "cmb", "cmti"))),
    ):
        if (domains[name] / "9").is_dir():
            continue
        for f in sorted(font.rglob("*.png")):
            if not keep(f.stem.rsplit("-", 1)[0]):
                continue
            dst = domains[name] / f.parent.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if name == "font8":  # size-normalised like the handwritten set: the glyph's box
                g = Image.open(f)  # fills the frame's height, then 8x8 by area averaging
                g = g.crop(g.getbbox())
                k = 60 / max(g.height, g.width * 60 / 56)
                g = g.resize((max(1, round(g.width * k)), max(1, round(g.height * k))))
                big = Image.new("L", (64, 64), 0)
                big.paste(g, ((64 - g.width) // 2, (64 - g.height) // 2))
                a = np.asarray(big.resize((8, 8), Image.BOX), dtype=np.float64)
                a = (np.round(a / 255 * 16) / 16 * 255).astype(np.uint8)
                Image.fromarray(a, "L").resize((64, 64), Image.BILINEAR).save(dst)
            else:
                dst.symlink_to(f)
    return domains


def domain_features(
    name: str, size: int, flip: bool = False, crop_pct: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Features of every image of a domain folder (cached in OUT/NAME-SIZE.npz)."""
    roots = DOMAINS if name in DOMAINS else digit_domains()
    return folder_features(name, roots[name], "train", size, flip, crop_pct=crop_pct)


def folder_features(
    name: str,
    root: Path,
    split: str,
    size: int,
    flip: bool = False,
    limit: int | None = None,
    crop_pct: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of a split of an image folder, eval transform, mirrored with ``flip``, the first
    ``limit`` images only if given, the backbone's centre crop replaced by ``crop_pct`` (1.0: the
    whole image) if given (cached in OUT/NAME-SIZE[-flip][-LIMIT][-cropP].npz)."""
    tag = f"{'-flip' if flip else ''}{f'-{limit}' if limit else ''}"
    tag += f"-crop{crop_pct:g}" if crop_pct else ""
    f = OUT / f"{name}-{size}{tag}.npz"
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
    prep = bb.effective_preprocessing(dm.preprocessing_overrides())
    if crop_pct:
        prep = {**prep, "crop_pct": crop_pct}
    dm.set_preprocessing(prep)
    t0 = time.perf_counter()
    ds = dm.dataset(split, train_aug=False)
    items = ds.items[:limit] if limit else ds.items
    tf = ds.transform
    ds = ItemDataset(items, ds.loader, (lambda img: torch.flip(tf(img), dims=[-1])) if flip else tf)
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


def test_tag(root: Path) -> str:
    """A name for a row's test images that rows sharing them share (the CIFAR slices all test
    on the whole CIFAR test split): a digest of the files' resolved paths."""
    import hashlib

    files = sorted(str(p.resolve()) for p in (root / "test").rglob("*") if p.is_file())
    return "test-" + hashlib.sha256("\n".join(files).encode()).hexdigest()[:12]


def row_features(
    row: str, tta: bool = False, defaults: Path = ROOT / "build" / "bench" / "defaults"
) -> tuple[np.ndarray | None, ...]:
    """The row's cached train and test features under ``defaults`` (bench_defaults.py --out), and
    with ``tta`` its test images read again mirrored at 224 px (the first 64 also plain, checked
    against tl's cache: the same images, order and preprocessing)."""
    cache = defaults / "cache" / row

    def one(split: str) -> tuple[np.ndarray, np.ndarray]:
        (f,) = sorted(cache.glob(f"{split}-*.features.npy"))
        return np.load(f), np.load(str(f).replace(".features.npy", ".labels.npy"))

    x, y, xt, yt = (*one("train"), *one("test"))
    if not tta:
        return x, y, xt, yt, None
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_defaults import build_row

    root = build_row(row, defaults / "data")
    tag = test_tag(root)
    xp, yp = folder_features(tag, root, "test", 224, limit=64)
    if not (np.array_equal(yp, yt[:64]) and np.allclose(xp, xt[:64], atol=1e-3)):
        raise SystemExit(f"{row}: the test images read again differ from tl's cached features")
    xf, yf = folder_features(tag, root, "test", 224, flip=True)
    if not np.array_equal(yf, yt):
        raise SystemExit(f"{row}: the mirrored test images are not tl's test split")
    return x, y, xt, yt, xf


def oracle_c(x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> dict:
    """Target accuracy at every C of the grid (no CV) for tl's old head (``dim``) and the new
    one (L2 + ``global``): what choosing C on the source's folds costs under a shift. The best of
    these needs target labels, so it is a bound, not a method."""
    import torch

    from tl_cli.transfer.probe import C_GRID, fit_probe

    def l2(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-6)

    k = int(max(y.max(), yt.max())) + 1
    out = {}
    for name, scale, f in (("tl_dim", "dim", None), ("tl_l2_global", "global", l2)):
        xa, xb = (x, xt) if f is None else (f(x), f(xt))
        accs = {}
        for c in C_GRID:
            fit = fit_probe(xa, y, k, grid=(c,), scale=scale)
            pred = (torch.as_tensor(xb) @ fit.weight.T + fit.bias).argmax(1).numpy()
            accs[f"{c:.3g}"] = round(float((pred == yt).mean()), 4)
        out[name] = accs
    return out


def score(
    x: np.ndarray,
    y: np.ndarray,
    xt: np.ndarray,
    yt: np.ndarray,
    xt_flip: np.ndarray | None = None,
    sklearn: tuple[str, ...] = ("sk_std", "sk_raw"),
    variants: tuple[str, ...] = ("tl_dim", "tl_global", "tl_l2_dim", "tl_l2_global"),
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
        if name not in variants:
            continue
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
        if name not in sklearn:
            continue
        clf = make_pipeline(*steps, LogisticRegressionCV(Cs=10, cv=cv, max_iter=5000))
        with threadpool_limits(1):
            clf.fit(x, y)
        out[name] = {
            "acc": round(float((clf.predict(xt) == yt).mean()), 4),
            "C": float(clf[-1].C_[0]),
        }
    return out


#: the table's columns: (heading, result key, flip TTA)
VARIANTS = (
    ("`dim` (tl's head before)", "tl_dim", False),
    ("`global`", "tl_global", False),
    ("L2 + `dim`", "tl_l2_dim", False),
    ("L2 + `global`", "tl_l2_global", False),
    ("`dim` + flip TTA", "tl_dim", True),
    ("`global` + flip TTA", "tl_global", True),
    ("L2 + `dim` + flip TTA", "tl_l2_dim", True),
    ("L2 + `global` + flip TTA", "tl_l2_global", True),
    ("scikit-learn, raw features", "sk_raw", False),
)


CLI_RUNS = ROOT / "build" / "bench" / "fe_cli"


def cli_acc(row: str, which: str, drow: dict) -> float | None:
    """test/acc of the real ``tl train`` with the defaults ``before`` issue 24's head change or
    ``now``: bench_defaults' own run of the row (its metrics say which head it fitted), else the
    run on the row's cached features by build/bench/fe_cli.sh (today's defaults)."""
    train = drow.get("train") or {}
    norm = ((train.get("defaults") or {}).get("head_fit") or {}).get("norm")
    if train and (norm == "l2") == (which == "now"):
        return train.get("test/acc")
    f = CLI_RUNS / f"{row}_new" / "metrics.json"
    return json.loads(f.read_text())["test/acc"] if which == "now" and f.exists() else None


def table(res: dict, defaults: Path, rows: list[str]) -> str:
    """Markdown: one line per bench_defaults row (test accuracy), the mean over the rows, and each
    variant's mean difference to the probe (scikit-learn StandardScaler + LogisticRegressionCV,
    bench_defaults' probe) and its worst row; the real ``tl train`` before and now beside them,
    and ``cache_views=4`` (bench_defaults ``--fe-variant-rows``, at today's defaults)."""
    from _bench_util import md_table

    dres = defaults / "results.json"
    drows = json.loads(dres.read_text())["rows"] if dres.exists() else {}
    names = rows or [r for r in res.get("rows", {}) if "(" not in r]
    heads = [
        "data set",
        "probe",
        "tl train before",
        "tl train now",
        *(h for h, _, _ in VARIANTS),
        "cache_views=4",
    ]
    out, cols = [], {h: [] for h in heads[1:]}
    for name in names:
        r = res["rows"].get(name)
        d = drows.get(name, {})
        if r is None and "probe" not in d:
            continue
        r = r or {"sk_std": {"acc": round(d["probe"]["test/acc"], 4)}}  # not scored here yet
        vals = {
            "probe": r["sk_std"]["acc"],
            "tl train before": cli_acc(name, "before", d),
            "tl train now": cli_acc(name, "now", d),
            "cache_views=4": (
                ((d.get("fe_variant_seeds") or {}).get("cache_views=4") or {}).get("0") or {}
            ).get("test/acc"),
        }
        for h, key, tta in VARIANTS:
            v = r.get(key) or {}
            vals[h] = v.get("acc_flip_tta") if tta else v.get("acc")
        for h in heads[1:]:
            cols[h].append(None if vals[h] is None else vals[h] - vals["probe"])
        out.append([name, *("-" if vals[h] is None else f"{vals[h]:.3f}" for h in heads[1:])])

    def mean(h: str) -> str:
        v = [x for x in cols[h] if x is not None]
        return f"{100 * sum(v) / len(v):+.1f} ({len(v)})" if v else "-"

    def worst(h: str) -> str:
        v = [x for x in cols[h] if x is not None]
        return f"{100 * min(v):+.1f}" if v else "-"

    out.append(["**mean vs probe, points (rows)**", *(mean(h) for h in heads[1:])])
    out.append(["worst row vs probe, points", *(worst(h) for h in heads[1:])])
    return md_table(heads, out)


def pairs_table(res: dict) -> str:
    """Markdown: source-only accuracy on the target domain of every scored pair (all variants)."""
    from _bench_util import md_table

    heads = ["pair (source > target, size)", "train / target images", "probe (StandardScaler)"]
    heads += [h for h, _, _ in VARIANTS]
    out = []
    for key, r in res.get("pairs", {}).items():
        cells = [key, f"{r['n_train']} / {r['n_eval']}", f"{r['sk_std']['acc']:.3f}"]
        for _, k, tta in VARIANTS:
            v = r[k].get("acc_flip_tta") if tta else r[k]["acc"]
            cells.append("-" if v is None else f"{v:.3f}")
        out.append(cells)
    return md_table(heads, out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--pairs", default="coil1>coil2,coil2>coil1")
    ap.add_argument("--rows", default="")
    ap.add_argument("--tta", action="store_true", help="also score flip test-time augmentation")
    ap.add_argument(
        "--reuse-probe",
        action="store_true",
        help="rows: take the StandardScaler probe from bench_defaults' results (the same fit on "
        "the same features) and skip the raw-feature one (saves minutes on large rows)",
    )
    ap.add_argument(
        "--tl-variants",
        default="tl_dim,tl_global,tl_l2_dim,tl_l2_global",
        help="rows: which of tl's heads to fit (each a 5-fold CV over the C grid)",
    )
    ap.add_argument(
        "--oracle-c",
        action="store_true",
        help="pairs: also score the target at every C of the grid (a bound: it needs its labels)",
    )
    ap.add_argument(
        "--crop-pct",
        type=float,
        default=None,
        help="pairs: replace the backbone's centre-crop fraction (1.0: resize the whole image)",
    )
    ap.add_argument(
        "--table",
        action="store_true",
        help="print the markdown table of every scored row (and tl train / cache_views=4 from "
        "bench_defaults' results), then stop",
    )
    ap.add_argument(
        "--defaults-out",
        default=str(ROOT / "build" / "bench" / "defaults"),
        help="bench_defaults.py --out whose feature caches --rows reads",
    )
    args = ap.parse_args()
    res_file = OUT / "results.json"
    res = json.loads(res_file.read_text()) if res_file.exists() else {}
    if args.table:
        print(table(res, Path(args.defaults_out), [r for r in args.rows.split(",") if r]))
        print()
        print(pairs_table(res))
        return
    res["machine"], res["load"] = machine(), os.getloadavg()[0]
    for pair in filter(None, args.pairs.split(",")):
        src, tgt = pair.split(">")
        x, y = domain_features(src, args.size, crop_pct=args.crop_pct)
        xt, yt = domain_features(tgt, args.size, crop_pct=args.crop_pct)
        xf = domain_features(tgt, args.size, True, args.crop_pct)[0] if args.tta else None
        key = f"{pair} @{args.size}" + (f" crop_pct={args.crop_pct:g}" if args.crop_pct else "")
        res.setdefault("pairs", {})[key] = score(x, y, xt, yt, xf)
        if args.oracle_c:
            res["pairs"][key]["oracle_c"] = oracle_c(x, y, xt, yt)
        res["pairs"][key]["load"] = os.getloadavg()[0]
        print(key, json.dumps(res["pairs"][key]), flush=True)
        save_json(res_file, res)
    for row in filter(None, args.rows.split(",")):
        tag = row if Path(args.defaults_out).name == "defaults" else f"{row} ({args.defaults_out})"
        probe = None
        if args.reuse_probe:  # bench_defaults' probe: the same pipeline on the same features
            dres = Path(args.defaults_out) / "results.json"
            probe = json.loads(dres.read_text())["rows"][row]["probe"]
        res.setdefault("rows", {})[tag] = score(
            *row_features(row, args.tta, Path(args.defaults_out)),
            sklearn=("sk_std", "sk_raw") if probe is None else (),
            variants=tuple(args.tl_variants.split(",")),
        )
        if probe is not None:
            res["rows"][tag]["sk_std"] = {"acc": round(probe["test/acc"], 4), "C": probe["C"]}
        res["rows"][tag]["load"] = os.getloadavg()[0]
        print(tag, json.dumps(res["rows"][tag]), flush=True)
        save_json(res_file, res)


if __name__ == "__main__":
    main()
