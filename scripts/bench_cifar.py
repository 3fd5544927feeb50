#!/usr/bin/env python
"""Feature extraction vs fine-tuning of efficientnet_lite0 on the CIFAR-10 subset.

    python scripts/bench_cifar.py [--root ../shared/data/cifar10-subset] [--image-size 128]
                                  [--fe-epochs 3,20] [--ft-epochs 3]

Runs the real ``tl train`` (strategy=feature_extraction, the default, features cached) once per
``--fe-epochs`` value and ``tl finetune`` once, each in a subprocess, on the same data, image
size and batch size. For each it reports val/test accuracy, test macro-F1, fit time
(metrics.json ``fit_seconds``: feature caching + training, without the final test), the wall time
of the whole command, and the peak RSS of the tl process. Prints a table, writes
build/bench/cifar/results.json and the "cifar" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _bench_util import (
    DEFAULT_DATA,
    ROOT,
    command_line,
    machine,
    md_table,
    rel,
    run_tl,
    save_json,
    text_table,
    write_section,
)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", default=str(DEFAULT_DATA), help="ImageFolder root (train/, test/)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--fe-epochs", default="3,20", help="comma list: one feature-extraction run per value"
    )
    ap.add_argument("--ft-epochs", type=int, default=3, help="epochs of the tl finetune run")
    ap.add_argument("--out", default=str(ROOT / "build" / "bench" / "cifar"))
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = ap.parse_args()

    out = Path(args.out)
    root = Path(args.root).resolve()
    common = [
        "dataset=imagefolder",
        f"dataset.root={root}",
        f"dataset.image_size={args.image_size}",
        f"dataset.batch_size={args.batch_size}",
    ]
    runs = [
        (
            f"feature extraction ({e} ep)",
            "train",
            [*common, "strategy=feature_extraction", f"trainer.max_epochs={e}"],
            f"fe_{e}",
        )
        for e in (int(x) for x in args.fe_epochs.split(",") if x.strip())
    ]
    runs.append(
        (
            f"finetune ({args.ft_epochs} ep)",
            "finetune",
            [*common, f"trainer.max_epochs={args.ft_epochs}"],
            f"ft_{args.ft_epochs}",
        )
    )

    results = []
    for label, command, overrides, key in runs:
        print(f"running {label} ...", flush=True)
        r = run_tl(command, overrides, out / key)
        r["label"] = label
        m = r["metrics"]
        print(
            f"  test/acc {m['test/acc']:.4f}  fit {m['fit_seconds']:.0f}s  wall {r['wall_seconds']:.0f}s  "
            f"peak RSS {r['peak_rss_mb']} MB",
            flush=True,
        )
        results.append(r)

    headers = [
        "method",
        "epochs",
        "val acc",
        "test acc",
        "test macro-F1",
        "fit s",
        "s/epoch",
        "wall s",
        "peak RSS MB",
        "tree RSS MB",
    ]
    rows = []
    for r in results:
        m = r["metrics"]
        epoch_s = [h["seconds"] for h in m["history"] if "seconds" in h]
        rows.append(
            [
                r["label"],
                m["epochs"],
                f"{m['val/acc']:.3f}",
                f"{m['test/acc']:.3f}",
                f"{m['test/macro_f1']:.3f}",
                f"{m['fit_seconds']:.0f}",
                f"{sorted(epoch_s)[len(epoch_s) // 2]:.1f}" if epoch_s else "",
                f"{r['wall_seconds']:.0f}",
                r["peak_rss_mb"],
                r["tree_rss_mb"],
            ]
        )
    print()
    print(text_table(headers, rows))
    m0 = results[0]["metrics"]
    save_json(
        out / "results.json",
        {"command": command_line(), "machine": machine(), "args": vars(args), "runs": results},
    )
    if args.no_doc:
        return

    cmds = "\n".join(r["cmd"] for r in results)
    body = f"""## Feature extraction vs fine-tuning on CIFAR-10 (subset)

```bash
{command_line()}
```

efficientnet_lite0 (ImageNet weights, bundled), linear head, AdamW lr 1e-3 (backbone x0.1 when it
trains), cosine schedule, label smoothing 0.1, batch {args.batch_size}, {args.image_size} px (the
32x32 CIFAR images are upscaled), light augmentation for the trained backbone. Data:
`{rel(root)}`, {m0["train_size"]} train / {m0["val_size"]} val (10% of train, per class) /
{m0["test_size"]} test images, 10 classes. Machine: {machine()}.

The script ran these `tl` commands (plus `hydra.run.dir=... overwrite=true`):

```bash
{cmds}
```

{md_table(headers, rows, "lrrrrrrrrr")}

- *fit s*: metrics.json `fit_seconds`, from the start of the fit (feature caching included) to the
  end of the last epoch; the final test pass is not in it. *s/epoch*: median epoch time
  (training + validation) from metrics.json `history`. *wall s*: the whole command, Python start-up,
  data scan, test and report included.
- *peak RSS MB*: `ru_maxrss` of the `tl` process (`os.wait4`), the largest single process.
  *tree RSS MB*: the largest sum of RSS over `tl` and its data-loader worker, sampled every 0.2 s
  (pages shared with the forked worker are counted twice, so it is an upper bound).
- Timings are from a shared 2-core machine with other jobs running, one run each: +/- 20-30%.
"""
    body += "\n" + reading(results) + "\n"
    write_section("cifar", body)
    print(f"\nwrote the 'cifar' section of {rel(ROOT / 'docs' / 'benchmarks.md')}")


def reading(results: list[dict]) -> str:
    """A short reading of the numbers, generated so that it never disagrees with the table."""
    fe = [r for r in results if r["metrics"]["strategy"] == "feature_extraction"]
    ft = [r for r in results if r["metrics"]["strategy"] == "finetune"]
    if not fe or not ft:
        return ""
    best_fe = max(fe, key=lambda r: r["metrics"]["test/acc"])
    f = ft[0]
    d = f["metrics"]["test/acc"] - best_fe["metrics"]["test/acc"]
    cost = f["metrics"]["fit_seconds"] / max(best_fe["metrics"]["fit_seconds"], 1e-9)
    se = (
        best_fe["metrics"]["test/acc"]
        * (1 - best_fe["metrics"]["test/acc"])
        / best_fe["metrics"]["test_size"]
    ) ** 0.5
    if abs(d) < 2 * se:
        verdict = (
            f"Fine-tuning ({f['label']}) and the best feature-extraction run ({best_fe['label']}) "
            f"tie: {f['metrics']['test/acc']:.3f} vs {best_fe['metrics']['test/acc']:.3f} test "
            f"accuracy, a {d * 100:+.1f}-point gap inside the test set's own noise (one standard "
            f"error is {se * 100:.1f} points on {best_fe['metrics']['test_size']} images)"
        )
    else:
        verdict = (
            f"Fine-tuning ({f['label']}) {'beats' if d > 0 else 'trails'} the best "
            f"feature-extraction run ({best_fe['label']}) by {abs(d) * 100:.1f} points of test "
            f"accuracy ({f['metrics']['test/acc']:.3f} vs {best_fe['metrics']['test/acc']:.3f}; one "
            f"standard error is {se * 100:.1f} points on {best_fe['metrics']['test_size']} images)"
        )
    hist = f["metrics"]["history"]
    still = len(hist) > 1 and hist[-1]["val/acc"] >= max(h["val/acc"] for h in hist)
    tail = ""
    if still:
        tail = (
            " Fine-tuning was still improving when it stopped (val acc by epoch: "
            + ", ".join(f"{h['val/acc']:.3f}" for h in hist)
            + "), so a longer budget would likely raise it further."
        )
    return (
        f"**Reading.** {verdict}. Fine-tuning costs {cost:.1f}x the fit time and "
        f"{f['peak_rss_mb'] / best_fe['peak_rss_mb']:.1f}x the peak memory (activations and "
        "gradients of the whole backbone). Feature extraction pays one forward pass over the images "
        "to cache features, then trains only the head on cached tensors, so more epochs are nearly "
        "free (compare its rows' fit times); fine-tuning pays a forward and a backward pass through "
        "the whole backbone every epoch." + tail
    )


if __name__ == "__main__":
    main()
