#!/usr/bin/env python
"""Learning curve: test accuracy vs labelled images per class, transfer vs from scratch.

    python scripts/bench_learning_curve.py [--root ../shared/data/cifar10-subset]
        [--sizes 5,10,25,50,100,all] [--image-size 64]
        [--epochs 5:40,10:30,25:20,50:12,100:8,all:3]

For each size N (images per class) it builds a class-balanced subset (the first N files of each
class folder, sorted by name, symlinked into build/bench/learning_curve/data/nN/train/<class>/;
test/ links to the full test split, so every cell is scored on the same images) and runs four
methods with the same budget (epochs, image size, batch size, optimizer, schedule, seed):

  scratch             tl finetune backbone.weights=none strategy.backbone_lr_mult=1.0
                      (same architecture, random init; the whole net at optimizer.lr)
  feature_extraction  tl train strategy=feature_extraction (features cached)
  finetune            tl finetune (backbone at optimizer.lr x 0.1)
  lp_ft               tl train strategy=lp_ft strategy.probe_epochs=max(1, epochs // 4)

tl carves the validation split from train: 10% of each class, at least 1 (5 per class -> 4 train
+ 1 val). Each cell's result is kept in build/bench/learning_curve/cells/ and reused by a later
run with the same settings (--force reruns). Writes docs/learning_curve.png (accuracy and fit
time vs images per class, log x axis), build/bench/learning_curve/results.json and the
"learning_curve" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
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

METHODS = {
    # name: (tl command, extra overrides)
    "scratch": ("finetune", ["backbone.weights=none", "strategy.backbone_lr_mult=1.0"]),
    "feature_extraction": ("train", ["strategy=feature_extraction"]),
    "finetune": ("finetune", []),
    "lp_ft": ("train", ["strategy=lp_ft"]),
}
LABELS = {
    "scratch": "from scratch (random init)",
    "feature_extraction": "feature extraction (frozen)",
    "finetune": "finetune",
    "lp_ft": "LP-FT",
}
STYLE = {
    "scratch": dict(color="tab:gray", marker="x", linestyle="--"),
    "feature_extraction": dict(color="tab:blue", marker="o"),
    "finetune": dict(color="tab:orange", marker="s"),
    "lp_ft": dict(color="tab:green", marker="^"),
}
IMG_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def class_files(split_dir: Path) -> dict[str, list[Path]]:
    return {
        d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMG_EXTS)
        for d in sorted(split_dir.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }


def make_subset(root: Path, per_class: int, dest: Path) -> Path:
    """root/train: first `per_class` files per class (by name), symlinked; root/test: linked."""
    files = class_files(root / "train")
    short = {c: len(f) for c, f in files.items() if len(f) < per_class}
    if short:
        raise SystemExit(f"{root}/train: classes with fewer than {per_class} images: {short}")
    for c, fs in files.items():
        d = dest / "train" / c
        d.mkdir(parents=True, exist_ok=True)
        want = {f.name for f in fs[:per_class]}
        for old in d.iterdir():
            if old.name not in want:
                old.unlink()
        for f in fs[:per_class]:
            link = d / f.name
            if not link.exists():
                os.symlink(f.resolve(), link)
    test = dest / "test"
    if not test.exists():
        os.symlink((root / "test").resolve(), test, target_is_directory=True)
    return dest


def add_last(cell: dict, run_dir: Path, cell_file: Path) -> dict:
    """Score the run's last-epoch checkpoint on the test split too (``tl eval``), once.

    tl tests the checkpoint with the best val/acc. With 1-2 validation images per class that
    choice is mostly noise, so the last epoch's test accuracy is recorded beside it.
    """
    if "test/acc_last" not in cell:
        r = run_tl(
            "eval",
            [f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}", "split=test"],
            run_dir.with_name(run_dir.name + "_eval_last"),
            result="eval.json",
        )
        cell["test/acc_last"] = r["metrics"]["acc"]
        cell["eval_last_cmd"] = r["cmd"]
        save_json(cell_file, cell)
    print(f"last-epoch test/acc {cell['test/acc_last']:.3f}", flush=True)
    return cell


def bn_switch_check(run_dir: Path, data: Path, image_size: int, batch_size: int) -> dict:
    """Train-set accuracy/loss of a trained probe (feature extraction's last.ckpt) with the
    backbone's BatchNorm in eval mode (as trained) and in train mode (batch statistics, running
    stats left untouched): what LP-FT's head sees the moment the backbone joins."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from tl_cli.modalities.image.data import ImageFolderDataModule
    from tl_cli.tasks.loading import load_module

    module, _ = load_module(run_dir / "checkpoints" / "last.ckpt")
    dm = ImageFolderDataModule(
        root=str(data), image_size=image_size, batch_size=batch_size, num_workers=1
    )
    dm.prepare()
    dm.set_preprocessing(module.preprocessing)
    res = {}
    for mode in ("eval", "batch_stats"):
        module.eval()
        if mode == "batch_stats":
            for b in module.backbone.modules():
                if isinstance(b, nn.modules.batchnorm._BatchNorm):
                    b.train()
                    b.momentum = 0.0  # use batch statistics, leave the running ones alone
        correct = n = 0
        loss = 0.0
        with torch.no_grad():
            loader = dm.make_loader(dm.dataset("train", train_aug=False), shuffle=True)
            for x, y in loader:
                o = module(x)
                correct += (o.argmax(1) == y).sum().item()
                loss += F.cross_entropy(o, y, reduction="sum").item()
                n += len(y)
        res[mode] = {"acc": round(correct / n, 3), "loss": round(loss / n, 3)}
    return res


def parse_epochs(spec: str, sizes: list[str]) -> dict[str, int]:
    """'5:30,10:20,all:3' -> {'5': 30, ...}; a bare number applies to every size."""
    if ":" not in spec:
        return {s: int(spec) for s in sizes}
    table = dict(kv.split(":") for kv in spec.split(","))
    missing = [s for s in sizes if s not in table]
    if missing:
        raise SystemExit(f"--epochs has no entry for size(s) {missing}")
    return {s: int(table[s]) for s in sizes}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", default=str(DEFAULT_DATA))
    ap.add_argument("--sizes", default="5,10,25,50,100,all")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--epochs",
        default="5:40,10:30,25:20,50:12,100:8,all:3",
        help="SIZE:EPOCHS list (the same for every method of a size), or one number",
    )
    ap.add_argument("--out", default=str(ROOT / "build" / "bench" / "learning_curve"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "learning_curve.png"))
    ap.add_argument("--force", action="store_true", help="rerun cells that have a result")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    root = Path(args.root).resolve()
    out = Path(args.out)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    epochs = parse_epochs(args.epochs, sizes)

    cells: dict[tuple[str, str], dict] = {}
    t_all = time.perf_counter()
    for size in sizes:
        data = root if size == "all" else make_subset(root, int(size), out / "data" / f"n{size}")
        ep = epochs[size]
        for method in methods:
            command, extra = METHODS[method]
            overrides = [
                "dataset=imagefolder",
                f"dataset.root={data.resolve() if size != 'all' else root}",
                f"dataset.image_size={args.image_size}",
                f"dataset.batch_size={args.batch_size}",
                f"trainer.max_epochs={ep}",
                *extra,
            ]
            if method == "lp_ft":
                overrides.append(f"strategy.probe_epochs={max(1, ep // 4)}")
            key = f"n{size}_{method}"
            cell_file = out / "cells" / f"{key}.json"
            if cell_file.exists() and not args.force:
                r = json.loads(cell_file.read_text())
                if r.get("overrides") == overrides:
                    print(f"{key}: reusing {rel(cell_file)}", flush=True)
                    cells[(size, method)] = add_last(r, out / "runs" / key, cell_file)
                    continue
            print(f"{key}: {ep} epochs ...", end=" ", flush=True)
            r = run_tl(command, overrides, out / "runs" / key)
            m = r["metrics"]
            r = {
                "size": size,
                "method": method,
                "overrides": overrides,
                "cmd": r["cmd"],
                "wall_seconds": r["wall_seconds"],
                "peak_rss_mb": r["peak_rss_mb"],
                **{
                    k: m[k]
                    for k in (
                        "test/acc",
                        "test/macro_f1",
                        "val/acc",
                        "fit_seconds",
                        "epochs",
                        "best_epoch",
                        "train_size",
                        "val_size",
                        "test_size",
                    )
                },
            }
            save_json(cell_file, r)
            print(
                f"test/acc {r['test/acc']:.3f}  fit {r['fit_seconds']:.0f}s  wall {r['wall_seconds']:.0f}s",
                end="  ",
                flush=True,
            )
            cells[(size, method)] = add_last(r, out / "runs" / key, cell_file)
    total = time.perf_counter() - t_all

    bn_checks = {}
    numeric = [s for s in sizes if s != "all"]
    if "feature_extraction" in methods and "lp_ft" in methods and numeric:
        for s in dict.fromkeys([numeric[0], numeric[-1]]):
            bn_checks[s] = bn_switch_check(
                out / "runs" / f"n{s}_feature_extraction",
                out / "data" / f"n{s}",
                args.image_size,
                args.batch_size,
            )
            print(f"BatchNorm switch check, {s} per class: {bn_checks[s]}", flush=True)

    # ---- table
    def per_class(size: str) -> float:
        r = next(cells[(size, m)] for m in methods)
        return (r["train_size"] + r["val_size"]) / 10 if size == "all" else float(size)

    headers = ["images/class", "train+val", "epochs"]
    headers += [f"{LABELS[m]} acc (best-val / last)" for m in methods]
    headers += [f"{LABELS[m]} fit s" for m in methods]
    rows = []
    for size in sizes:
        first = cells[(size, methods[0])]
        label = f"all (~{per_class(size):.0f})" if size == "all" else size
        rows.append(
            [
                label,
                f"{first['train_size']}+{first['val_size']}",
                epochs[size],
                *[
                    f"{cells[(size, m)]['test/acc']:.3f} / {cells[(size, m)]['test/acc_last']:.3f}"
                    for m in methods
                ],
                *[f"{cells[(size, m)]['fit_seconds']:.0f}" for m in methods],
            ]
        )
    print()
    print(text_table(headers, rows))
    print(f"\n{len(cells)} cells, {total / 60:.1f} min this invocation")

    # ---- plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [per_class(s) for s in sizes]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for m in methods:
        ax1.plot(xs, [cells[(s, m)]["test/acc"] for s in sizes], label=LABELS[m], **STYLE[m])
        ax1.plot(
            xs,
            [cells[(s, m)]["test/acc_last"] for s in sizes],
            color=STYLE[m]["color"],
            linestyle=":",
            linewidth=1,
            marker=STYLE[m]["marker"],
            markersize=3,
            alpha=0.7,
        )
        ax2.plot(xs, [cells[(s, m)]["fit_seconds"] for s in sizes], label=LABELS[m], **STYLE[m])
    ax1.plot(
        [], [], color="black", linestyle=":", linewidth=1, label="dotted: last-epoch checkpoint"
    )
    ax1.axhline(0.1, color="black", linewidth=0.8, linestyle="-.", label="chance (10 classes)")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels(
            [f"all\n({x:.0f})" if s == "all" else s for s, x in zip(sizes, xs, strict=True)]
        )
        ax.minorticks_off()
        ax.set_xlabel("labelled images per class (log scale; 10% of them are held out for val)")
        ax.grid(True, which="major", alpha=0.3)
    ax1.set_ylabel(f"test accuracy ({cells[(sizes[0], methods[0])]['test_size']} test images)")
    ax1.set_ylim(0, 1)
    ax1.set_title("Test accuracy vs labelled data (solid: best-val checkpoint)")
    ax1.legend(loc="upper left", fontsize=9)
    ax2.set_yscale("log")
    ax2.set_ylabel("fit time, seconds (log scale)")
    ax2.set_title("Fit time (2-core CPU, shared; noisy)")
    ax2.legend(loc="upper left", fontsize=9)
    fig.suptitle(
        f"CIFAR-10 subset, efficientnet_lite0, {args.image_size} px, same epochs per size for every method",
        fontsize=11,
    )
    fig.tight_layout()
    plot = Path(args.plot)
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)
    print(f"wrote {rel(plot)}")

    save_json(
        out / "results.json",
        {
            "command": command_line(),
            "machine": machine(),
            "args": vars(args),
            "cells": [cells[(s, m)] for s in sizes for m in methods],
            "bn_switch_check": bn_checks,
        },
    )
    if args.no_doc:
        return

    # one size's commands, as the script ran them
    ex = sizes[0]
    cmds = "\n".join(cells[(ex, m)]["cmd"] for m in methods)
    acc_rows = [[r[0], r[1], r[2], *r[3 : 3 + len(methods)]] for r in rows]  # accuracy table
    time_rows = [[r[0], r[1], r[2], *r[3 + len(methods) :]] for r in rows]
    base = ["images/class", "train+val", "epochs"]
    body = f"""## Learning curve: accuracy vs labelled images per class

```bash
{command_line()}
```

![learning curve]({rel(plot).removeprefix("docs/")})

Each size N is a class-balanced subset of `{rel(root)}/train`: the first N files of each class
folder, by name (for "all", the whole train split, ~{per_class("all") if "all" in sizes else 0:.0f}
per class on average). Every cell is scored on the full test split
({cells[(sizes[0], methods[0])]["test_size"]} images). tl carves validation from train: 10% of
each class, at least 1, so **N = 5 means 4 training + 1 validation image per class**, N = 10 means
9 + 1, N = 25 means 23 + 2 (the "train+val" column). The validation images pick the checkpoint that
is tested.

Same budget for every method of a size: {args.image_size} px (CIFAR's 32x32 upscaled), batch
{args.batch_size}, the epochs in the table (more epochs for the small sizes so that each gets a
reasonable number of steps; fewer for "all" to fit the time box), AdamW lr 1e-3, cosine schedule
with 1 warm-up epoch, label smoothing 0.1, linear head, seed 42, one run per cell. Methods:

- **from scratch**: the same efficientnet_lite0 architecture with random init
  (`backbone.weights=none`), every layer at lr 1e-3 (`strategy.backbone_lr_mult=1.0`: the 0.1
  backbone multiplier only makes sense for pretrained weights).
- **feature extraction**: frozen ImageNet backbone, features cached once (no augmentation, as the
  cache uses eval transforms), linear head trained.
- **finetune**: everything trains from epoch 0, backbone at lr x 0.1, light augmentation.
- **LP-FT**: head alone for `probe_epochs = max(1, epochs // 4)` epochs, then everything at
  lr x 0.1.

The {ex}-per-class commands (the other sizes differ in `dataset.root` and `trainer.max_epochs`;
each also got `hydra.run.dir=... overwrite=true`):

```bash
{cmds}
```

Test accuracy, **best-val / last**: *best-val* is what tl reports (metrics.json `test/acc`: the
checkpoint with the best val/acc, the earliest on ties); *last* is the last epoch's checkpoint,
scored by the script with `tl eval` (for example
`{cells[(ex, methods[0])]["eval_last_cmd"]}`). With 1 or 2 validation images per class the best-val choice is mostly
noise, so both are shown; the plot draws *last* dotted.

{md_table([*base, *[LABELS[m] for m in methods]], acc_rows, "lrr" + "r" * len(methods))}

Fit time, seconds (metrics.json `fit_seconds`: feature caching and training, without the test
pass; a shared 2-core CPU, one run each, so +/- 20-30%):

{md_table([*base, *[LABELS[m] for m in methods]], time_rows, "lrr" + "r" * len(methods))}

Machine: {machine()}. The {len(cells)} `tl` runs took
{sum(c["wall_seconds"] for c in cells.values()) / 60:.0f} min of wall time in all (the script reuses
the cells of an earlier run with the same settings; the last-epoch `tl eval` runs add ~15 s each).
"""
    body += "\n" + reading(cells, sizes, methods, out, bn_checks) + "\n"
    write_section("learning_curve", body)
    print(f"wrote the 'learning_curve' section of {rel(ROOT / 'docs' / 'benchmarks.md')}")


def reading(cells: dict, sizes: list[str], methods: list[str], out: Path, bn_checks: dict) -> str:
    """Facts read off the table (generated, so that the text never disagrees with the numbers)."""

    def acc(s: str, m: str) -> float:
        return cells[(s, m)]["test/acc"]

    def last(s: str, m: str) -> float:
        return cells[(s, m)]["test/acc_last"]

    def name(s: str) -> str:
        if s != "all":
            return s
        r = cells[(s, methods[0])]
        return f"all (~{(r['train_size'] + r['val_size']) / 10:.0f})"

    lines = ["**Reading** (one seed per cell: differences of 2-3 points are within the noise)."]
    if "scratch" in methods:
        transfer = [m for m in methods if m != "scratch"]
        for s in (sizes[0], sizes[-1]):
            best = max(transfer, key=lambda m: acc(s, m))
            lines.append(
                f"- {name(s)} per class: the best transfer method ({LABELS[best]}) reaches "
                f"{acc(s, best):.3f}; from scratch {acc(s, 'scratch'):.3f} (chance is 0.100)."
            )
        # smallest size where the best transfer beats scratch at the largest size
        big = sizes[-1]
        for s in sizes:
            best = max(transfer, key=lambda m: acc(s, m))
            if acc(s, best) >= acc(big, "scratch"):
                lines.append(
                    f"- With {name(s)} images per class, {LABELS[best]} ({acc(s, best):.3f}) already "
                    f"matches or beats training from scratch on {name(big)} per class "
                    f"({acc(big, 'scratch'):.3f}), in "
                    f"{cells[(s, best)]['fit_seconds'] / cells[(big, 'scratch')]['fit_seconds']:.2f}x "
                    f"the fit time. From scratch never passes "
                    f"{max(acc(z, 'scratch') for z in sizes):.3f}: with this budget (the same "
                    "epochs as the transfer methods) it is far from converged, which is the point: "
                    "the pretrained backbone is what makes a small budget work."
                )
                break
    if "feature_extraction" in methods and "finetune" in methods:
        wins = [s for s in sizes if acc(s, "finetune") > acc(s, "feature_extraction")]
        wins_l = [s for s in sizes if last(s, "finetune") > last(s, "feature_extraction")]
        lines.append(
            f"- Finetune beats feature extraction at: {', '.join(wins) or 'no size'} (best-val "
            f"checkpoints), {', '.join(wins_l) or 'no size'} (last-epoch checkpoints). At "
            f"{cells[(sizes[0], 'finetune')]['overrides'][2].split('=')[1]} px, within this "
            "budget, the frozen ImageNet features are hard to beat on CPU."
        )
        fe_t = [cells[(s, "feature_extraction")]["fit_seconds"] for s in sizes]
        ft_t = [cells[(s, "finetune")]["fit_seconds"] for s in sizes]
        lines.append(
            f"- Time: feature extraction fits in {min(fe_t):.0f}-{max(fe_t):.0f} s across sizes "
            f"(one forward pass to cache, then head-only epochs); finetune takes "
            f"{min(ft_t):.0f}-{max(ft_t):.0f} s."
        )
    # checkpoint selection on a tiny val split
    gaps = sorted(
        ((abs(last(s, m) - acc(s, m)), s, m) for s in sizes for m in methods), reverse=True
    )
    g, s, m = gaps[0]
    if g > 0.05:
        lines.append(
            f"- Checkpoint selection is the largest source of noise at the small sizes: the biggest "
            f"gap between the best-val and the last-epoch checkpoint is {LABELS[m]} at {s} per "
            f"class ({acc(s, m):.3f} vs {last(s, m):.3f}), with "
            f"{cells[(s, m)]['val_size']} validation images picking the checkpoint. For a "
            f"fair reading of the small sizes, look at both numbers."
        )
    if "lp_ft" in methods:
        jumps, probe_best = [], 0
        for s in sizes:
            f = out / "runs" / f"n{s}_lp_ft" / "metrics.json"
            if not f.exists():
                continue
            m = json.loads(f.read_text())
            probe = next(
                int(o.split("=")[1])
                for o in cells[(s, "lp_ft")]["overrides"]
                if o.startswith("strategy.probe_epochs=")
            )
            h = m["history"]
            if len(h) > probe:
                jumps.append((s, h[probe - 1]["train/loss"], h[probe]["train/loss"]))
            probe_best += m["best_epoch"] <= probe
        if jumps:
            lines.append(
                "- LP-FT: when the backbone joins, the training loss jumps (last probe epoch -> first "
                "fine-tuning epoch, per size: "
                + ", ".join(f"{name(z)}: {x:.2f} -> {y:.2f}" for z, x, y in jumps)
                + f"), and in {probe_best} of {len(sizes)} sizes the best-val checkpoint is still "
                "from the probe phase. The cause: the backbone's BatchNorm layers switch from their "
                "ImageNet running statistics (eval mode while frozen) to batch statistics of "
                "upscaled CIFAR images, which moves every feature the probe was trained on."
                + "".join(
                    f" Measured on feature extraction's trained probe at {k} per class: train-set "
                    f"accuracy {v['eval']['acc']:.3f} (loss {v['eval']['loss']:.2f}) with BatchNorm "
                    f"in eval mode, {v['batch_stats']['acc']:.3f} (loss "
                    f"{v['batch_stats']['loss']:.2f}) with batch statistics and nothing else changed."
                    for k, v in bn_checks.items()
                )
                + " So LP-FT lands close to feature extraction here rather than above it, and "
                "finetune (BatchNorm in train mode from the first step) starts from the same shift."
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
