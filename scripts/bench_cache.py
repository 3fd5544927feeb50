#!/usr/bin/env python
"""What feature caching buys: a 20-epoch feature-extraction run vs one bare forward pass.

    python scripts/bench_cache.py [--root ../shared/data/cifar10-subset] [--image-size 128]
                                  [--epochs 20] [--uncached-epochs 2]
    python scripts/bench_cache.py --per-class 40 --image-size 224 --out build/bench/cache_small
        # the small-set case (400 images at 224 px): its own "cache_small" doc section

Target: a ``--epochs``-epoch ``tl train strategy=feature_extraction`` run (features cached, the
default) costs at most 1.2x one bare forward pass of the same backbone over the same images.

(a) bare forward: efficientnet_lite0 in eval mode under torch.inference_mode, in this process,
    over every image tl touches (train + val + test), with tl's own data module, eval transforms
    and loader (ImageFolderDataModule + set_preprocessing + dataset(split, train_aug=False) +
    make_loader), same image size, batch size and worker count. Measured before and after (b),
    to bracket the noise of a shared machine; the ratio uses their mean.
(b) ``tl train strategy=feature_extraction trainer.max_epochs=20`` in a subprocess: metrics.json
    ``fit_seconds`` (caching + 20 epochs), fit + test (the caching lines and the epochs of the
    log), and the wall time of the whole command.
(c) the same with ``strategy.cache_features=false`` for ``--uncached-epochs`` epochs: every epoch
    runs the frozen backbone over the train and val images again. Its median epoch time x 20 is
    what a 20-epoch run without the cache pays.

Prints a table, writes build/bench/cache/results.json and the "cache" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
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

TARGET = 1.2


def make_slice(src: Path, per_class: int, dst: Path) -> Path:
    """A class-balanced slice of src/train (first files by name), as symlinks: dst/<class>/*."""
    for cls in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        out = dst / cls.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.glob("*.png"))[:per_class]:
            if not (out / f.name).exists():
                (out / f.name).symlink_to(f)
    return dst


def bare_forward(root: Path, image_size: int, batch_size: int, num_workers: int | None) -> dict:
    """Seconds for one eval-mode forward pass over train + val + test, tl's loaders, no tl run."""
    import torch

    from tl_cli.modalities.image.backbones import create_backbone
    from tl_cli.modalities.image.data import ImageFolderDataModule

    dm = ImageFolderDataModule(
        root=str(root),
        image_size=image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        val_fraction=0.1,
        split_seed=0,
    )
    dm.prepare()
    backbone = create_backbone("efficientnet_lite0").eval()
    dm.set_preprocessing(backbone.preprocessing)
    per_split, n = {}, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for split in dm.splits:
            ts = time.perf_counter()
            loader = dm.make_loader(dm.dataset(split, train_aug=False), shuffle=False)
            for x, _ in loader:
                backbone(x)
                n += len(x)
            per_split[split] = round(time.perf_counter() - ts, 1)
            del loader  # stop its persistent worker, as tl's caching loop does
    seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 1),
        "images": n,
        "images_per_second": round(n / seconds, 1),
        "per_split": per_split,
        "num_workers": dm.num_workers,
        "threads": torch.get_num_threads(),
    }


def bare_process(root: Path, image_size: int, batch_size: int, num_workers: int) -> dict:
    """The bare forward pass as a program of its own (``--bare-process``): torch, timm (through
    tl_cli.modalities.backbones, which imports neither Lightning nor Hydra), PIL and torchvision's
    transforms; tl's eval transform (resize to size/crop_pct, centre crop, normalise) rebuilt
    here so that no tl data module (and so no Lightning) is imported. Every image under root."""
    import math

    import torch
    from PIL import Image
    from torchvision import transforms as T

    from tl_cli.modalities.image.backbones import create_backbone

    backbone = create_backbone("efficientnet_lite0").eval()
    prep = backbone.preprocessing
    tf = T.Compose(
        [
            T.Resize(int(math.floor(image_size / float(prep.get("crop_pct", 0.875))))),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(prep["mean"], prep["std"]),
        ]
    )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> torch.Tensor:
            with Image.open(files[i]) as im:
                return tf(im.convert("RGB"))

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size, num_workers=num_workers)
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for x in loader:
            backbone(x)
            n += len(x)
    return {"seconds": round(time.perf_counter() - t0, 1), "images": n}


def whole_process_pairs(args: argparse.Namespace, root: Path, common: list[str], out: Path) -> dict:
    """(d) The whole ``tl train`` process against the bare forward pass as a whole process, in
    turn (bare, tl, bare, tl, ...), ``--whole-runs`` pairs; the ratio pair by pair, its median."""
    import os
    import statistics
    import subprocess
    import sys

    workers = (
        args.num_workers if args.num_workers is not None else max(1, (os.cpu_count() or 2) - 1)
    )
    bare_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--bare-process",
        f"--root={root}",
        f"--image-size={args.image_size}",
        f"--batch-size={args.batch_size}",
        f"--num-workers={workers}",
    ]
    pairs = []
    for i in range(args.whole_runs):
        t0 = time.perf_counter()
        subprocess.run(bare_cmd, check=True, capture_output=True, text=True)
        bare_wall = time.perf_counter() - t0
        r = run_tl("train", [*common, f"trainer.max_epochs={args.epochs}"], out / f"whole_{i}")
        pairs.append(
            {
                "bare_wall": round(bare_wall, 2),
                "tl_wall": r["wall_seconds"],
                "ratio": round(r["wall_seconds"] / bare_wall, 3),
            }
        )
        print(f"    pair {i + 1}: {pairs[-1]}", flush=True)
    return {
        "pairs": pairs,
        "bare_command": " ".join(["python", "scripts/bench_cache.py", *bare_cmd[3:]]),
        "median_ratio": round(statistics.median(p["ratio"] for p in pairs), 3),
        "median_bare": round(statistics.median(p["bare_wall"] for p in pairs), 1),
        "median_tl": round(statistics.median(p["tl_wall"] for p in pairs), 1),
    }


CACHE_LINE = re.compile(r"caching (\w+) features: (\d+) batches in ([\d.]+)s")


def caching_seconds(log: Path) -> float | None:
    """Sum of tl's 'caching <split> features: N batches in Xs' log lines (None if absent)."""
    hits = CACHE_LINE.findall(log.read_text()) if log.exists() else []
    return round(sum(float(s) for _, _, s in hits), 1) if hits else None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", default=str(DEFAULT_DATA))
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="loader workers for both (default: tl's default, one per spare core)",
    )
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument(
        "--per-class",
        type=int,
        default=0,
        help="N > 0: the small-set case, a class-balanced slice of N train images per class "
        "(e.g. 40 x 10 classes = 400 images; with --image-size 224)",
    )
    ap.add_argument("--uncached-epochs", type=int, default=2)
    ap.add_argument(
        "--whole-runs",
        type=int,
        default=3,
        help="(d): pairs of whole processes, the bare forward program vs tl train (0: skip)",
    )
    ap.add_argument("--bare-process", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "build" / "bench" / "cache"))
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rewrite the table and the doc section from --out/results.json",
    )
    args = ap.parse_args()

    if args.bare_process:  # (d)'s bare program: print its result and exit
        print(
            json.dumps(
                bare_process(
                    Path(args.root), args.image_size, args.batch_size, args.num_workers or 0
                )
            )
        )
        return
    out = Path(args.out)
    if args.render_only:
        r = json.loads((out / "results.json").read_text())
        saved = argparse.Namespace(**{**r["args"], "no_doc": args.no_doc})
        report(
            saved,
            out,
            Path(saved.root).resolve(),
            *r["bare"],
            r["cached"],
            r["uncached"],
            r["command"],
            record=False,
            whole=r.get("whole"),
        )
        return
    root = Path(args.root).resolve()
    if args.per_class:
        root = make_slice(root, args.per_class, out / "data" / f"n{args.per_class}")
    common = [
        "dataset=imagefolder",
        f"dataset.root={root}",
        f"dataset.image_size={args.image_size}",
        f"dataset.batch_size={args.batch_size}",
        "strategy=feature_extraction",
    ]
    if args.num_workers is not None:
        common.append(f"dataset.num_workers={args.num_workers}")

    print("(a) bare forward pass ...", flush=True)
    bare1 = bare_forward(root, args.image_size, args.batch_size, args.num_workers)
    print(f"    {bare1}", flush=True)

    print(f"(b) tl train, cached features, {args.epochs} epochs ...", flush=True)
    cached = run_tl(
        "train", [*common, f"trainer.max_epochs={args.epochs}"], out / f"cached_{args.epochs}"
    )
    cm = cached["metrics"]
    cached["caching_seconds"] = caching_seconds(out / f"cached_{args.epochs}.log")
    print(
        f"    fit {cm['fit_seconds']}s, wall {cached['wall_seconds']}s, caching {cached['caching_seconds']}s",
        flush=True,
    )

    print("(a') bare forward pass again ...", flush=True)
    bare2 = bare_forward(root, args.image_size, args.batch_size, args.num_workers)
    print(f"    {bare2}", flush=True)

    print(f"(c) tl train, cache_features=false, {args.uncached_epochs} epochs ...", flush=True)
    unc = run_tl(
        "train",
        [*common, "strategy.cache_features=false", f"trainer.max_epochs={args.uncached_epochs}"],
        out / f"uncached_{args.uncached_epochs}",
    )
    um = unc["metrics"]
    print(f"    fit {um['fit_seconds']}s, wall {unc['wall_seconds']}s", flush=True)
    whole = None
    if args.whole_runs:
        print(
            f"(d) whole processes: bare program vs tl train, {args.whole_runs} pairs ...",
            flush=True,
        )
        whole = whole_process_pairs(args, root, common, out)
    report(args, out, root, bare1, bare2, cached, unc, command_line(), record=True, whole=whole)


def report(
    args: argparse.Namespace,
    out: Path,
    root: Path,
    bare1: dict,
    bare2: dict,
    cached: dict,
    unc: dict,
    cmd_line: str,
    record: bool,
    whole: dict | None = None,
) -> None:
    """Table, results.json + history.json (when `record`), and the doc section."""
    cm, um = cached["metrics"], unc["metrics"]
    bare = (bare1["seconds"] + bare2["seconds"]) / 2
    n_img = bare1["images"]
    c_epochs = [h["seconds"] for h in cm["history"]]
    head_s = sum(c_epochs)
    u_epochs = [h["seconds"] for h in um["history"]]
    # the first epoch carries one-off costs (loader start, warm-up); later epochs are the rate
    u_epoch = sum(u_epochs[1:]) / len(u_epochs[1:]) if len(u_epochs) > 1 else u_epochs[0]
    u_est = u_epochs[0] + u_epoch * (args.epochs - 1)
    caching = cached["caching_seconds"]
    ratio_fit = cm["fit_seconds"] / bare
    ratio_wall = cached["wall_seconds"] / bare
    verdict = "met" if ratio_fit <= TARGET else "MISSED"

    headers = ["measurement", "seconds", "x bare forward"]
    rows = [
        [
            f"(a) bare forward, {n_img} images (run 1 / run 2, mean)",
            f"{bare1['seconds']:.1f} / {bare2['seconds']:.1f}, {bare:.1f}",
            "1.00",
        ],
        [
            f"(b) cached, {args.epochs} epochs: fit_seconds",
            f"{cm['fit_seconds']:.1f}",
            f"**{ratio_fit:.2f}**",
        ],
        [
            "  of which caching features (train+val+test)",
            f"{cached['caching_seconds']}" if cached["caching_seconds"] is not None else "n/a",
            f"{cached['caching_seconds'] / bare:.2f}" if cached["caching_seconds"] else "",
        ],
        [
            f"  of which {args.epochs} head epochs (train + val)",
            f"{head_s:.1f}",
            f"{head_s / bare:.2f}",
        ],
        [
            "(b) fit_seconds / tl's own caching pass (noise check)",
            f"{cm['fit_seconds']:.1f} / {caching}" if caching else "n/a",
            f"{cm['fit_seconds'] / caching:.2f} x caching" if caching else "",
        ],
        [
            "(b) cached: wall time of the whole command",
            f"{cached['wall_seconds']:.1f}",
            f"{ratio_wall:.2f}",
        ],
        [
            "(c) uncached: one epoch ("
            + ", ".join(f"{x:.1f}" for x in u_epochs)
            + " s; rate: "
            + ("mean after the first)" if len(u_epochs) > 1 else "the only one)"),
            f"{u_epoch:.1f}",
            f"{u_epoch / bare:.2f}",
        ],
        [
            f"(c) uncached: {args.epochs} epochs, estimated (first + {args.epochs - 1} x rate)",
            f"{u_est:.0f}",
            f"{u_est / bare:.1f}",
        ],
        [
            f"(c) uncached: {args.uncached_epochs}-epoch run, fit_seconds (measured)",
            f"{um['fit_seconds']:.1f}",
            f"{um['fit_seconds'] / bare:.2f}",
        ],
    ]
    print()
    print(text_table(headers, [[str(c).replace("**", "") for c in r] for r in rows]))
    print(
        f"\nratio (b)/(a) = {ratio_fit:.2f} (fit_seconds), {ratio_wall:.2f} (wall): target <= {TARGET}: {verdict}"
    )
    print(f"without the cache, {args.epochs} epochs ~ {u_est / bare:.1f}x the bare forward pass")
    results = {
        "command": cmd_line,
        "machine": machine(),
        "args": vars(args),
        "bare": [bare1, bare2],
        "cached": cached,
        "uncached": unc,
        "ratio_fit": round(ratio_fit, 3),
        "ratio_wall": round(ratio_wall, 3),
        "uncached_epoch_seconds": u_epochs,
        "uncached_estimate_seconds": round(u_est, 1),
        "uncached_estimate_ratio": round(u_est / bare, 2),
        "whole": whole,
    }
    # every run of this script is kept, so the doc can show the spread between runs
    hist_file = out / "history.json"
    history = json.loads(hist_file.read_text()) if hist_file.exists() else []
    if record:
        save_json(out / "results.json", results)
        history.append(
            {
                "when": time.strftime("%Y-%m-%d %H:%M"),
                "image_size": args.image_size,
                "epochs": args.epochs,
                "bare_seconds": round(bare, 1),
                "fit_seconds": cm["fit_seconds"],
                "caching_seconds": caching,
                "ratio_fit": round(ratio_fit, 2),
                "ratio_wall": round(ratio_wall, 2),
                "uncached_estimate_ratio": round(u_est / bare, 1),
            }
        )
        save_json(hist_file, history)
    same = [h for h in history if (h["image_size"], h["epochs"]) == (args.image_size, args.epochs)]
    if args.no_doc:
        return

    alt = cm["fit_seconds"] / caching if caching else float("nan")
    both = "both readings are within" if max(ratio_fit, alt) <= TARGET else "the readings differ on"
    others = cm["fit_seconds"] - (cached["caching_seconds"] or 0) - head_s
    body = f"""## Feature caching: {args.epochs} epochs for about the price of one forward pass

```bash
{cmd_line}
```

Target: a {args.epochs}-epoch `tl train strategy=feature_extraction` run costs at most
{TARGET}x one bare forward pass of the same backbone over the same images. **Result: {ratio_fit:.2f}x
(fit_seconds), {verdict}**; {ratio_wall:.2f}x counting the whole command (Python start-up, scan,
test, report). Without the cache, {args.epochs} epochs would cost about **{u_est / bare:.0f}x**.

Settings: efficientnet_lite0 (ImageNet weights), {args.image_size} px, batch {args.batch_size},
{bare1["num_workers"]} loader worker(s), {bare1["threads"]} torch threads, all {n_img} images of
`{rel(root)}` (train {cm["train_size"]} + val {cm["val_size"]} + test {cm["test_size"]}).
Machine: {machine()}.

- (a) *bare forward*: `create_backbone("efficientnet_lite0")` in eval mode under
  `torch.inference_mode()`, in the benchmark process, over train + val + test with tl's own data
  module, eval transforms and loader (`ImageFolderDataModule`, `set_preprocessing`,
  `dataset(split, train_aug=False)`, `make_loader`): decoding and resizing included, as in tl.
  Measured before and after (b); the ratio uses the mean.
- (b) `{cached["cmd"]}`
- (c) `{unc["cmd"]}`: every epoch runs the backbone again. The first epoch carries one-off
  costs (loader start-up, allocator warm-up), so a {args.epochs}-epoch run is estimated as the first
  epoch + {args.epochs - 1} x the mean of the later ones (epoch times: training + validation, from
  metrics.json `history`).

{md_table(headers, rows, "lrr")}

**Reading.** With the cache, the run is one forward pass over every image (the caching lines of
the log: {cached["caching_seconds"]} s, {((cached["caching_seconds"] or 0) / bare):.2f}x the bare
pass) plus {args.epochs} epochs of a linear head on 1280-d tensors ({head_s:.1f} s in all,
{head_s / args.epochs:.2f} s per epoch, mostly Lightning's per-epoch overhead: loops, validation,
checkpointing), plus {others:.1f} s of other fit overhead (trainer set-up, moving the backbone).
The caching pass dominates. tl's own caching pass is the same work as the bare pass; the two
measured {caching} s and {bare:.1f} s here, and taking tl's pass as the reference instead gives
{alt:.2f}x: {both} the target, and their gap is the measurement noise of this
machine. Without the cache every epoch runs the frozen backbone over the train
and val images again ({u_epoch:.1f} s per epoch after the first, {u_epoch / bare:.2f}x the bare
pass: the test images are not in it, and a frozen backbone runs in eval mode, forward only), so
{args.epochs} epochs cost about {u_est / bare:.0f}x. Timings are from a
shared 2-core machine, one run each (the two bare passes show the spread: {bare1["seconds"]:.1f} s
and {bare2["seconds"]:.1f} s).
"""
    if whole:
        ok = "met" if whole["median_ratio"] <= TARGET else "missed"
        body += f"""
**(d) Whole process against whole process** ({len(whole["pairs"])} pairs, run in turn, bare first):
the bare forward pass as a program of its own (`{whole["bare_command"]}`: torch, timm, PIL and
torchvision's transforms, the same eval transform, loader workers and images, no Lightning, Hydra
or report) against the whole `tl train ... trainer.max_epochs={args.epochs}` command (start-up,
scan, caching, L-BFGS head, {args.epochs} epochs, checkpoints, reports). Median wall: bare
{whole["median_bare"]} s, tl {whole["median_tl"]} s; **ratio, pair by pair, median
{whole["median_ratio"]:.2f}x: target {TARGET}x {ok}** (pairs: {
            ", ".join(f"{p['tl_wall']:.1f}/{p['bare_wall']:.1f}" for p in whole["pairs"])
        } s).
"""
    if len(same) > 1:
        body += (
            "\nEvery run of this script with these settings (build/bench/cache/history.json; the "
            "table above is the last one), to show the run-to-run spread on this machine:\n\n"
            + md_table(
                [
                    "when",
                    "bare forward s",
                    "fit_seconds",
                    "of which caching s",
                    "ratio (fit)",
                    "ratio (wall)",
                    f"uncached {args.epochs} ep, est.",
                ],
                [
                    [
                        h["when"],
                        h["bare_seconds"],
                        h["fit_seconds"],
                        h["caching_seconds"],
                        f"{h['ratio_fit']:.2f}",
                        f"{h['ratio_wall']:.2f}",
                        f"{h['uncached_estimate_ratio']:.1f}x",
                    ]
                    for h in same
                ],
                "lrrrrrr",
            )
            + "\n"
        )
    section = "cache_small" if getattr(args, "per_class", 0) else "cache"
    write_section(section, body)
    print(f"wrote the '{section}' section of {rel(ROOT / 'docs' / 'benchmarks.md')}")


if __name__ == "__main__":
    main()
