#!/usr/bin/env python
"""Domain adaptation on COIL-20's two pose domains: source-only vs AdaBN, DANN, self-training.

    python scripts/bench_adapt.py [--root ../shared/data/coil20-domains] [--seeds 0 1 2]
                                  [--image-size 32] [--methods none adabn dann self_training]

COIL1 -> COIL2 and COIL2 -> COIL1, each with every ``adapt`` method and 3 seeds, with ``tl
train`` defaults otherwise (efficientnet_lite0, frozen backbone, cached features, 10 epochs). The
target's labels only score it (``target/acc`` in metrics.json). Runs are in-process
(``tl_cli.commands.train.run``, the code ``tl train`` runs) so that 24 runs fit on a small machine; the
feature cache (``strategy.cache_dir``) computes each domain's backbone features once. Prints a
table (target accuracy mean +- std over seeds, fit seconds) and writes build/bench/adapt/
results.json and the "adapt" section at the end of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _bench_util import ROOT, machine, md_table, save_json, text_table, write_section

DEFAULT_ROOT = (ROOT.parent / "shared" / "data" / "coil20-domains").resolve()
OUT = ROOT / "build" / "bench" / "adapt"
PAIRS = (("coil1", "coil2"), ("coil2", "coil1"))


def run_one(root: Path, src: str, tgt: str, method: str, seed: int, size: int) -> dict:
    from omegaconf import open_dict

    from tl_cli.cli import config_dir
    from tl_cli.commands.train import run

    overrides = [
        "dataset=imagefolder",
        f"dataset.root={root / src}",
        f"dataset.target_root={root / tgt}",
        f"dataset.image_size={size}",
        "dataset.num_workers=0",
        f"adapt={method}",
        f"seed={seed}",
        f"strategy.cache_dir={OUT / 'cache'}",
        "trainer.accelerator=cpu",
        "overwrite=true",
    ]
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(OUT / "runs" / f"{src}-{tgt}-{method}-s{seed}")
    t0 = time.perf_counter()
    m = run(cfg)
    shown = (o for o in overrides if not o.startswith(HIDDEN))
    return {
        **_numbers(src, tgt, method, seed, m),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "cmd": "tl train " + " ".join(shown),
    }


# overrides that only place the bench's files or pin the machine: left out of the printed command
HIDDEN = ("strategy.cache_dir", "overwrite", "trainer.accelerator", "dataset.num_workers")


def _numbers(src: str, tgt: str, method: str, seed: int, m: dict) -> dict:
    return {
        "pair": f"{src}->{tgt}",
        "method": method,
        "seed": seed,
        "target_acc": m["target/acc"],
        "source_val_acc": m["source/val/acc"],
        "target_entropy": m["target/entropy"],
        "fit_seconds": m["fit_seconds"],
    }


def read_one(src: str, tgt: str, method: str, seed: int) -> dict:
    """A finished run's numbers from its metrics.json."""
    import json

    m = json.loads((OUT / "runs" / f"{src}-{tgt}-{method}-s{seed}" / "metrics.json").read_text())
    return {**_numbers(src, tgt, method, seed, m), "cmd": ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=["none", "adabn", "dann", "self_training"])
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument(
        "--pairs", nargs="+", default=[f"{a}:{b}" for a, b in PAIRS], help="e.g. coil2:coil1"
    )
    ap.add_argument(
        "--table-only",
        action="store_true",
        help="no runs: the table from the run dirs of earlier (e.g. parallel) invocations",
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
    root = args.root.resolve()
    results = []
    for pair in args.pairs:
        src, tgt = pair.split(":")
        for method in args.methods:
            for seed in args.seeds:
                if args.table_only:
                    r = read_one(src, tgt, method, seed)
                else:
                    r = run_one(root, src, tgt, method, seed, args.image_size)
                print(
                    f"BENCH {r['pair']} {method} seed {seed}: target/acc {r['target_acc']:.4f}",
                    flush=True,
                )
                results.append(r)
    save_json(OUT / "results.json", {"machine": machine(), "results": results})

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
    for pair_arg in args.pairs:
        src, tgt = pair_arg.split(":")
        pair = f"{src}->{tgt}"
        base = None
        for method in args.methods:
            rs = [r for r in results if r["pair"] == pair and r["method"] == method]
            accs = [r["target_acc"] for r in rs]
            mean = statistics.mean(accs)
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            if method == "none":
                base = mean
            delta = "" if base is None or method == "none" else f"{100 * (mean - base):+.1f} pts"
            rows.append(
                [
                    pair,
                    method,
                    f"{100 * mean:.1f} ± {100 * sd:.1f}",
                    delta,
                    f"{100 * statistics.mean(r['source_val_acc'] for r in rs):.1f}",
                    f"{statistics.mean(r['target_entropy'] for r in rs):.3f}",
                    f"{statistics.mean(r['fit_seconds'] for r in rs):.1f}",
                ]
            )
    # the average over both directions
    for method in args.methods:
        rs = [r for r in results if r["method"] == method]
        rows.append(
            [
                "average",
                method,
                f"{100 * statistics.mean(r['target_acc'] for r in rs):.1f}",
                "",
                "",
                "",
                "",
            ]
        )
    print(text_table(headers, rows))
    if args.no_doc:
        return
    body = f"""## Domain adaptation (COIL-20)

`scripts/bench_adapt.py`: COIL-20's two pose domains (`../shared/data/coil20-domains`, 720
images each, 20 objects), trained on one (labelled) and adapted to the other, whose labels only
score it. `tl train` defaults otherwise: efficientnet_lite0, frozen backbone, cached features,
10 epochs; images at {args.image_size} px (COIL's native size). {len(args.seeds)} seeds
({", ".join(map(str, args.seeds))}); target accuracy as mean ± sample std over seeds, in %.
`none`, `adabn` and `self_training` fit the head by L-BFGS (deterministic: the seeds agree;
`self_training` as 3 refits on source + confident target pseudo-labels); `dann` trains a
bottleneck head and discriminator for 10 epochs of AdamW steps on source + target batches.
Targets of issue 14: best method >= source-only + 5 points (missed: +3.3 on average, DANN;
source-only already scores ~94%); no method worse than source-only by > 1 point (met).

{md_table(headers, rows)}

Machine: {machine()}. Timings on a shared, heavily loaded machine (load average above 10 on 2
cores): treat them as rough.

Command (all 24 runs; here they ran as parallel invocations with `--pairs`/`--methods`,
then `--table-only` assembled this table from the run dirs):

```bash
python scripts/bench_adapt.py
```

One run of the table, e.g.:

```bash
tl train dataset=imagefolder dataset.root=../shared/data/coil20-domains/coil1 dataset.target_root=../shared/data/coil20-domains/coil2 dataset.image_size={args.image_size} adapt=dann seed=0
```
"""
    write_section("adapt", body)


if __name__ == "__main__":
    main()
