#!/usr/bin/env python
"""Domain adaptation on real domain pairs: source-only vs AdaBN, DANN, self-training and DSN.

    python scripts/bench_adapt.py --suite coil|text|speech [--seeds 0 1 2] [--methods ...]
                                  [--pairs A:B ...] [--reference] [--table-only] [--no-doc]

Suites (every run: ``tl train`` defaults for the modality, frozen backbone, cached features; the
target's labels only score it, ``target/acc`` in metrics.json):

* ``coil``: COIL-20's two pose domains (``coil1 <-> coil2``), efficientnet_lite0 at 32 px.
* ``text``: product reviews -> movie reviews (``sentiment-amazon`` -> ``sentiment-movies``),
  MiniLM. The source CSV is carved as usual (val, test); the whole movie set is the target.
* ``speech``: spoken digits (labels: the digit folders), trained on two speakers and adapted to
  the third (``george+jackson:lucas`` ...), the bundled speech embedding model.
* ``speaker``: speaker identification on unseen words, no adaptation: the three speakers are the
  labels (``dataset.label_from=regex``), ``train/`` holds the digits 0-6 and ``test/`` the digits
  7-9 (``test/acc``); val is carved from train by whole words (``dataset.group_regex``). Compare
  ``--extra backbone.features=words|voice|both``. Its ``--reference`` rows are hand-written
  scikit-learn logistic regressions (standardised, C=1, on all of train) on features computed with
  onnxruntime from openWakeWord's ONNX files, independent of tl's torch port: ``log-mel probe``
  (the mean and std of each mel band over the clip's frames) and ``keyword-embedding probe``
  (the mean of the speech embedding model's windows, openWakeWord's plain recipe).

``--reference`` adds the in-domain ceiling: tl's L-BFGS probe trained on the *target's* labels,
scored by 5-fold stratified cross-validation on the target (the same frozen features, one fold
shuffle per seed), so the table shows how much of the gap each method closes.

Runs are in-process (``tl_cli.commands.train.run``, what ``tl train`` runs); the feature cache
(``strategy.cache_dir``) computes each domain's features once. Every finished run appends one JSON
line to build/bench/adapt/<suite>.jsonl (nothing is lost when a long invocation is cut);
``--table-only`` builds the table from those lines, and the suite's section of docs/benchmarks.md
is rewritten unless ``--no-doc``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _bench_util import ROOT, machine, md_table, text_table, write_section

DATA = (ROOT.parent / "shared" / "data").resolve()
OUT = ROOT / "build" / "bench" / "adapt"
METHODS = ("none", "adabn", "dann", "self_training", "dsn")
SPEAKERS = ("george", "jackson", "lucas")

SUITES: dict[str, dict[str, Any]] = {
    "coil": {
        "title": "Domain adaptation (COIL-20)",
        "pairs": ("coil1:coil2", "coil2:coil1"),
        "overrides": ["dataset=imagefolder", "dataset.image_size=32", "dataset.num_workers=0"],
    },
    "text": {
        "title": "Domain adaptation, text (product reviews -> movie reviews)",
        "pairs": ("amazon:movies",),
        "overrides": ["modality=text"],
    },
    "speech": {
        "title": "Domain adaptation, speech (spoken digits, a new speaker)",
        "pairs": ("george+jackson:lucas", "george+lucas:jackson", "jackson+lucas:george"),
        "overrides": ["modality=audio", "dataset.num_workers=0"],
    },
    "speaker": {
        "title": "Speaker identification on unseen words (spoken digits)",
        "pairs": ("digits0-6:digits7-9",),
        "overrides": [
            "modality=audio",
            "dataset.num_workers=0",
            "dataset.label_from=regex",
            "dataset.label_regex='^\\d+_([a-z]+)_'",
            "dataset.group_regex='^(\\d+)_'",
        ],
        # one root with train/ and test/ (scored as test/acc), not a source and a target
        "split": True,
    },
}
#: rows that are not tl runs (the ceiling; the speaker suite's hand-written probes)
REFERENCES = ("in-domain reference", "log-mel probe", "keyword-embedding probe")
# overrides that only place the bench's files or pin the machine: left out of the printed command
HIDDEN = ("strategy.cache_dir", "overwrite", "trainer.accelerator", "dataset.num_workers")


# --------------------------------------------------------------------------- domains


def speaker_folder(speakers: list[str]) -> Path:
    """Digit folders holding only ``speakers``' recordings (symlinks into the shared set)."""
    src = DATA / "spoken-digits-3speakers"
    out = OUT / "data" / "+".join(speakers)
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        (tmp / d.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(d.glob("*.wav")):
            if f.name.split("_")[1] in speakers:
                (tmp / d.name / f.name).symlink_to(f)
    tmp.rename(out)
    return out


def word_split(train: str, test: str) -> Path:
    """``train/<digit>/`` with the digits of ``train`` and ``test/<digit>/`` with those of ``test``
    (symlinks into the shared set, every speaker)."""
    src = DATA / "spoken-digits-3speakers"
    out = OUT / "data" / f"words{train}-{test}"
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    for split, digits in (("train", train), ("test", test)):
        for digit in digits:
            (tmp / split / digit).mkdir(parents=True, exist_ok=True)
            for f in sorted((src / digit).glob("*.wav")):
                (tmp / split / digit / f.name).symlink_to(f)
    tmp.rename(out)
    return out


def digits(name: str) -> str:
    """``digits0-6`` -> ``0123456``."""
    lo, hi = name.removeprefix("digits").split("-")
    return "".join(str(d) for d in range(int(lo), int(hi) + 1))


def domain(suite: str, name: str) -> Path:
    if suite == "coil":
        return DATA / "coil20-domains" / name
    if suite == "text":
        return {
            "amazon": DATA / "sentiment-amazon" / "amazon_cells.csv",
            "movies": DATA / "sentiment-movies" / "rt_snippets.csv",
        }[name]
    return speaker_folder(name.split("+"))


def config(suite: str, src: str, tgt: str, method: str, seed: int, extra: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from tl_cli.cli import config_dir

    if SUITES[suite].get("split"):
        data = [f"dataset.root={word_split(digits(src), digits(tgt))}"]
    else:
        data = [f"dataset.root={domain(suite, src)}", f"dataset.target_root={domain(suite, tgt)}"]
    overrides = [
        *SUITES[suite]["overrides"],
        *data,
        f"adapt={method}",
        *extra,
        f"seed={seed}",
        f"strategy.cache_dir={OUT / 'cache'}",
        "trainer.accelerator=cpu",
        "overwrite=true",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(OUT / "runs" / suite / f"{src}-{tgt}-{method}{tag(extra)}-s{seed}")
    return cfg, overrides


def tag(extra: list[str]) -> str:
    return "".join("," + e.split(".", 1)[-1] for e in extra)


# --------------------------------------------------------------------------- runs


def run_one(suite: str, src: str, tgt: str, method: str, seed: int, extra: list[str]) -> dict:
    from tl_cli.commands.train import run

    cfg, overrides = config(suite, src, tgt, method, seed, extra)
    t0 = time.perf_counter()
    m = run(cfg)
    shown = (o for o in overrides if not o.startswith(HIDDEN))
    split = SUITES[suite].get("split")  # scored on test/, not on a target
    return {
        "suite": suite,
        "pair": f"{src}->{tgt}",
        "method": method + tag(extra),
        "seed": seed,
        "target_acc": m["test/acc" if split else "target/acc"],
        "source_val_acc": m["val/acc" if split else "source/val/acc"],
        "target_entropy": None if split else m["target/entropy"],
        "fit_seconds": m["fit_seconds"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "cmd": "tl train " + " ".join(shown),
    }


def speaker_probes(src: str, tgt: str) -> list[dict]:
    """Hand-written speaker-ID probes (the issue's): scikit-learn logistic regression on
    onnxruntime features of train (all of it) scored on test; deterministic, so one row each."""
    import numpy as np
    import onnxruntime as ort
    from bench_audio import ort_embed
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tl_cli.modalities.audio.backbone import MIN_SAMPLES, model_dir
    from tl_cli.modalities.audio.data import load_audio

    root = word_split(digits(src), digits(tgt))
    files = {s: sorted((root / s).rglob("*.wav")) for s in ("train", "test")}
    labels = {s: [f.name.split("_")[1] for f in fs] for s, fs in files.items()}
    mel = ort.InferenceSession(str(model_dir() / "melspectrogram.onnx"))

    def mel_stats(paths: list[Path]) -> np.ndarray:
        out = []
        for p in paths:
            x = load_audio(p, 16000)
            if len(x) < MIN_SAMPLES:  # as in ort_embed: centre-pad a short clip to one window
                room = MIN_SAMPLES - len(x)
                x = np.pad(x, (room // 2, room - room // 2))
            x16 = np.clip(np.round(x * 32768), -32768, 32767).astype(np.float32)
            spec = mel.run(None, {"input": x16[None]})[0].squeeze() / 10 + 2  # (frames, 32)
            out.append(np.concatenate([spec.mean(0), spec.std(0)]))
        return np.stack(out)

    rows = []
    for name, feats in (
        ("log-mel probe", mel_stats),
        ("keyword-embedding probe", lambda ps: ort_embed(ps)[0]),
    ):
        t0 = time.perf_counter()
        xtr, xte = feats(files["train"]), feats(files["test"])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        clf.fit(xtr, labels["train"])
        acc = float(np.mean(clf.predict(xte) == np.array(labels["test"])))
        rows.append(
            {
                "suite": "speaker",
                "pair": f"{src}->{tgt}",
                "method": name,
                "seed": 0,
                "target_acc": acc,
                "source_val_acc": None,
                "target_entropy": None,
                "fit_seconds": round(time.perf_counter() - t0, 1),
                "cmd": "",
            }
        )
    return rows


def reference(suite: str, src: str, tgt: str, seeds: list[int], extra: list[str]) -> list[dict]:
    """The in-domain ceiling: the L-BFGS probe on the target's own labels, 5-fold CV on the
    target's cached features (the same backbone, preprocessing and head as the `none` runs)."""
    import numpy as np
    import pytorch_lightning as pl
    import torch

    from tl_cli.data.features import FeatureDataModule
    from tl_cli.run.training import build
    from tl_cli.transfer.probe import fit_probe

    # the runs' backbone and data options (not their adaptation options)
    cfg, _ = config(suite, src, tgt, "none", 0, [e for e in extra if not e.startswith("adapt.")])
    module, dm = build(cfg)
    data = FeatureDataModule(module.backbone, dm, cache_dir=str(OUT / "cache"))
    data.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    data.setup("fit")
    x = np.asarray(data.splits["target"][0].feats, dtype=np.float32)
    y = np.asarray([lab for _, lab in dm.splits["target"]])
    # the head `tl train` fits for this modality: its feature normalisation (head.norm, e.g. l2
    # for images since issue 24) and strategy.head_scale, so the ceiling uses the baseline's head
    xh = module.head_input(x)
    scale = getattr(module.strategy, "head_scale", "dim")
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        fold = np.empty(len(y), dtype=int)
        for c in np.unique(y):  # stratified folds
            idx = rng.permutation(np.flatnonzero(y == c))
            fold[idx] = np.arange(len(idx)) % 5
        correct = 0
        for k in range(5):
            tr, te = fold != k, fold == k
            fit = fit_probe(xh[tr], y[tr], dm.num_classes, scale=scale)
            logits = torch.as_tensor(xh[te]) @ fit.weight.T.float() + fit.bias.float()
            correct += int((logits.argmax(1).numpy() == y[te]).sum())
        rows.append(
            {
                "suite": suite,
                "pair": f"{src}->{tgt}",
                "method": "in-domain reference",
                "seed": seed,
                "target_acc": correct / len(y),
                "source_val_acc": None,
                "target_entropy": None,
                "fit_seconds": None,
                "cmd": "",
            }
        )
    return rows


# --------------------------------------------------------------------------- the table


def _mean(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return statistics.mean(v) if v else None


def table(results: list[dict], pairs: list[str], methods: list[str]) -> tuple[list, list]:
    headers = [
        "pair",
        "adapt",
        "target acc (mean ± std)",
        "vs none",
        "source val acc",
        "target entropy",
        "fit s (mean)",
    ]
    rows = []
    order = [*methods, *REFERENCES]
    for pair_arg in pairs:
        pair = pair_arg.replace(":", "->")
        base = None
        for method in order:
            rs = [r for r in results if r["pair"] == pair and r["method"] == method]
            if not rs:
                continue
            accs = [r["target_acc"] for r in rs]
            mean = statistics.mean(accs)
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            if method == "none":
                base = mean
            delta = "" if base is None or method == "none" else f"{100 * (mean - base):+.1f} pts"
            sv, te, fs = (
                _mean([r[k] for r in rs])
                for k in ("source_val_acc", "target_entropy", "fit_seconds")
            )
            rows.append(
                [
                    pair,
                    method,
                    f"{100 * mean:.1f} ± {100 * sd:.1f} (n={len(accs)})",
                    delta,
                    "" if sv is None else f"{100 * sv:.1f}",
                    "" if te is None else f"{te:.3f}",
                    "" if fs is None else f"{fs:.1f}",
                ]
            )
    if len(pairs) > 1:
        for method in order:
            rs = [r for r in results if r["method"] == method]
            if rs:
                rows.append(
                    ["average", method, f"{100 * statistics.mean(r['target_acc'] for r in rs):.1f}"]
                    + [""] * 4
                )
    return headers, rows


def read_lines(path: Path, suite: str) -> list[dict]:
    if not path.exists():
        return []
    out: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("suite", suite) == suite:  # one file may hold every suite's lines
                out[(r["pair"], r["method"], r["seed"])] = r  # the latest run of a row counts
    return list(out.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="coil")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--methods", nargs="+", default=None, help="default: all (speaker: none, no target)"
    )
    ap.add_argument("--pairs", nargs="+", default=None, help="e.g. coil2:coil1 (default: all)")
    ap.add_argument(
        "--extra",
        nargs="*",
        default=[],
        help="more tl overrides for every run (a variant: its rows are tagged with them)",
    )
    ap.add_argument("--reference", action="store_true", help="the in-domain ceiling too")
    ap.add_argument(
        "--table-only", action="store_true", help="no runs: the table from the JSON lines"
    )
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument(
        "--lines",
        type=Path,
        default=None,
        help="the JSON lines file to append to and read (default: build/bench/adapt/SUITE.jsonl)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: tiny head-sized ops on a shared machine run far faster)",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    suite = SUITES[args.suite]
    pairs = args.pairs or list(suite["pairs"])
    args.methods = args.methods or (["none"] if suite.get("split") else list(METHODS))
    lines = args.lines or OUT / f"{args.suite}.jsonl"
    lines.parent.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for pair in pairs:
            src, tgt = pair.split(":")
            todo: list[dict] = []
            if args.reference and suite.get("split"):
                todo += speaker_probes(src, tgt)
            elif args.reference:
                todo += reference(args.suite, src, tgt, args.seeds, list(args.extra))
            for r in todo:
                with open(lines, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
                print(f"BENCH {r['pair']} {r['method']} seed {r['seed']}: {r['target_acc']:.4f}")
            for method in args.methods:
                for seed in args.seeds:
                    r = run_one(args.suite, src, tgt, method, seed, list(args.extra))
                    r["machine_load"] = Path("/proc/loadavg").read_text().split()[:3]
                    with open(lines, "a") as fh:
                        fh.write(json.dumps(r) + "\n")
                    print(
                        f"BENCH {r['pair']} {r['method']} seed {seed}: target/acc "
                        f"{r['target_acc']:.4f}",
                        flush=True,
                    )
    results = read_lines(lines, args.suite)
    methods = list(dict.fromkeys([*args.methods, *(r["method"] for r in results)]))
    methods = [m for m in methods if m not in REFERENCES]
    headers, rows = table(results, pairs, methods)
    print(text_table(headers, rows))
    if args.no_doc:
        return
    loads = [float(r["machine_load"][0]) for r in results if r.get("machine_load")]
    load = f"1-minute load {min(loads):.1f}-{max(loads):.1f}" if loads else "load not recorded"
    if suite.get("split"):
        what = """speaker identification on unseen words: the
speakers are the labels, `train/` holds the digits 0-6 (val carved by whole words) and `test/` the
digits 7-9 (test accuracy, in %). `tl train` defaults for audio otherwise: frozen backbone, cached
features, L-BFGS head (deterministic: one seed). `log-mel probe` and `keyword-embedding probe`:
hand-written scikit-learn logistic regressions (standardised, C=1) on onnxruntime features of the
same clips. See docs/audio.md, "Speaker identification"."""
        command = f"python scripts/bench_adapt.py --suite {args.suite} --reference --extra backbone.features=voice"
    else:
        what = """trained on the labelled source, adapted to the
target, whose labels only score it (target accuracy over the whole target, mean ± sample std over
seeds, in %). `tl train` defaults for the modality otherwise: frozen backbone, cached features.
`in-domain reference`: tl's L-BFGS probe trained on the target's own labels (5-fold CV on the
target, the same features): the ceiling. See docs/adaptation.md for what each method does."""
        command = f"python scripts/bench_adapt.py --suite {args.suite} --reference"
    body = f"""## {suite["title"]}

`scripts/bench_adapt.py --suite {args.suite}`: {what}

{md_table(headers, rows)}

Machine: {machine()}, `OMP_NUM_THREADS=1`, shared with other jobs ({load} while
these rows ran): timings are rough. Commands of each row: the `cmd` field of the JSON lines.

```bash
{command}
```
"""
    write_section("adapt" if args.suite == "coil" else f"adapt-{args.suite}", body)


if __name__ == "__main__":
    main()
