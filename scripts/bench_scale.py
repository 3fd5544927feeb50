#!/usr/bin/env python
"""Load benchmarks for issue 5: leaks over many small runs, and a feature cache bigger than RAM.

    python scripts/bench_scale.py leak  [--runs 50]
    python scripts/bench_scale.py scale [--sizes 2000,8000] [--backbone resnet50]
    python scripts/bench_scale.py scan  [--root ../shared/data/cifar10-subset]

leak   Fifty back-to-back tiny runs in ONE multirun process (``tl train -m seed=range(0,50)``,
       Hydra's sequential launcher). The script samples the process's open file descriptors and
       RSS from /proc each time a job's metrics.json appears (a job boundary), and fits a line over
       the runs after a warm-up. It fails (exit 1) if the fd count grows, or RSS grows faster than
       --max-rss-mb-per-run.
scale  Feature extraction with ``strategy.cache_dir`` (the disk feature cache; needs the lead's
       tl_cli/data/features.py support) at two dataset sizes, plus the in-memory cache for contrast.
       Reports peak RSS of the whole process tree against the size of the features: with the
       disk cache, peak RSS must stay flat while the features grow past it.
scan   Speed of the corrupt-image scan (tl_cli.data.scan) on a folder of images.

Only Linux (/proc). Results are printed and written as JSON to --out (default build/bench_scale/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TL = Path(sys.executable).with_name("tl")
sys.path.insert(0, str(ROOT))
from tests.tiny_config import TINY  # noqa: E402 - the fast tier's tiny model, shared with the tests

# --------------------------------------------------------------------------- /proc helpers


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of `pid` in MB. RssAnon leaves out file-backed pages (a memory-mapped
    feature cache), which the kernel can drop at any time."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_rss_mb(pid: int, field: str = "VmRSS") -> float:
    return sum(rss_mb(p, field) for p in tree(pid))


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class PeakSampler(threading.Thread):
    """Samples the process tree's RSS every `interval` seconds; `.peak` is the maximum (MB)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self.stop = pid, interval, 0.0, threading.Event()
        self.peak_anon = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            self.peak_anon = max(self.peak_anon, tree_rss_mb(self.pid, "RssAnon"))
            time.sleep(self.interval)


def du_mb(path: Path) -> float:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
        if path.exists()
        else 0.0
    )


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs) or 1.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def make_images(root: Path, per_class: int, classes: int = 3, size: int = 24) -> Path:
    """Synthetic colour-noise PNGs, root/train/<class>/*.png (+ a small test split); reused if present."""
    import numpy as np
    from PIL import Image

    stamp = root / f".done_{per_class}_{classes}_{size}"
    if stamp.exists():
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", max(2, per_class // 10))):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = np.array([(60 * c + 40) % 256, (120 + 50 * c) % 256, (200 - 70 * c) % 256])
            for i in range(n):
                arr = np.clip(
                    base[None, None, :] + rng.normal(0, 30, (size, size, 3)), 0, 255
                ).astype("uint8")
                Image.fromarray(arr).save(d / f"{i:06d}.png")
    stamp.touch()
    return root


# --------------------------------------------------------------------------- leak


def bench_leak(args: argparse.Namespace) -> dict:
    work = Path(args.out) / "leak"
    data = make_images(work / "data", 12)
    sweep = work / f"sweep_{int(time.time())}"
    cmd = [
        str(TL),
        "train",
        "-m",
        *TINY,
        f"dataset.root={data}",
        f"seed=range(0,{args.runs})",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "CI": "1"}
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    rows: list[dict] = []
    seen = 0
    while proc.poll() is None:
        done = sum(1 for i in range(args.runs) if (sweep / str(i) / "metrics.json").exists())
        if done > seen:  # a job just finished: sample at the boundary
            seen = done
            rows.append(
                {
                    "run": done,
                    "fds": open_fds(proc.pid),
                    "rss_mb": round(tree_rss_mb(proc.pid), 1),
                    "t": round(time.time() - t0, 1),
                }
            )
            print(
                f"  run {done:3d}/{args.runs}  open fds {rows[-1]['fds']:4d}  rss {rows[-1]['rss_mb']:7.1f} MB  {rows[-1]['t']:6.1f}s",
                flush=True,
            )
        time.sleep(0.02)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"multirun failed (rc {proc.returncode}):\n{err[-3000:]}")
    warm = [r for r in rows if r["run"] > args.warmup]
    fd_growth = warm[-1]["fds"] - warm[0]["fds"] if warm else 0
    rss_slope = (
        slope([r["run"] for r in warm], [r["rss_mb"] for r in warm]) if len(warm) > 2 else 0.0
    )
    result = {
        "runs": args.runs,
        "seconds": round(time.time() - t0, 1),
        "samples": rows,
        "fds_after_warmup": [warm[0]["fds"], warm[-1]["fds"]] if warm else None,
        "fd_growth_after_warmup": fd_growth,
        "rss_mb_after_warmup": [warm[0]["rss_mb"], warm[-1]["rss_mb"]] if warm else None,
        "rss_mb_per_run_after_warmup": round(rss_slope, 3),
        "ok": fd_growth <= args.max_fd_growth and rss_slope <= args.max_rss_mb_per_run,
    }
    print(
        f"leak: {args.runs} runs in {result['seconds']}s; after run {args.warmup}: open fds {result['fds_after_warmup']}, "
        f"RSS {result['rss_mb_after_warmup']} MB ({result['rss_mb_per_run_after_warmup']:+.3f} MB/run) -> {'OK' if result['ok'] else 'LEAK'}"
    )
    return result


# --------------------------------------------------------------------------- scale


def cache_dir_supported() -> bool:
    cfg = ROOT / "configs" / "strategy" / "feature_extraction.yaml"
    return cfg.is_file() and "cache_dir" in cfg.read_text()


def _one_scale_run(data: Path, run_dir: Path, cache: Path | None, args: argparse.Namespace) -> dict:
    cmd = [
        str(TL),
        "train",
        "backbone=timm",
        f"backbone.name={args.backbone}",
        "backbone.weights=none",
        "dataset=imagefolder",
        f"dataset.root={data}",
        f"dataset.image_size={args.image_size}",
        f"dataset.batch_size={args.batch_size}",
        "dataset.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.max_epochs=1",
        "strategy=feature_extraction",
        f"hydra.run.dir={run_dir}",
    ]
    if cache is not None:
        cmd.append(f"strategy.cache_dir={cache}")
    t0 = time.time()
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "CI": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = PeakSampler(proc.pid)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    sampler.stop.set()
    sampler.join()
    rc = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read() if proc.stderr else ""
    if rc != 0:
        raise SystemExit(f"scale run failed (rc {rc}): {' '.join(cmd)}\n{err[-3000:]}")
    return {
        "seconds": round(time.time() - t0, 1),
        "peak_rss_mb_sampled": round(sampler.peak, 1),
        "peak_rss_mb_maxrss": round(usage.ru_maxrss / 1024, 1),  # the largest single process
        # sampling can miss a short spike; ru_maxrss cannot (but sees one process only)
        "peak_rss_mb": round(max(sampler.peak, usage.ru_maxrss / 1024), 1),
        "peak_anon_mb": round(sampler.peak_anon, 1),
        "cache_dir_mb": round(du_mb(cache), 1) if cache is not None else None,
    }


def bench_scale(args: argparse.Namespace) -> dict:
    if not cache_dir_supported():
        msg = "SKIPPED: strategy.cache_dir is not implemented yet (configs/strategy/feature_extraction.yaml, tl_cli/data/features.py)"
        print(f"scale: {msg}")
        return {"skipped": msg}
    import timm

    num_features = timm.create_model(args.backbone, pretrained=False, num_classes=0).num_features
    work = Path(args.out) / "scale"
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        per_class = n // 3
        data = make_images(work / f"data_{n}", per_class)
        images = 3 * per_class + 3 * max(2, per_class // 10)
        feat_mb = images * num_features * 4 / 2**20
        for mode in ("disk", "memory"):
            if mode == "memory" and args.skip_memory:
                continue
            run_dir = work / f"run_{n}_{mode}_{int(time.time())}"
            cache = run_dir / "feature_cache" if mode == "disk" else None
            r = {
                "images": images,
                "features_mb": round(feat_mb, 1),
                "cache": mode,
                **_one_scale_run(data, run_dir, cache, args),
            }
            rows.append(r)
            print(
                f"  {images:7d} images  features {feat_mb:8.1f} MB  cache={mode:6s}  peak RSS {r['peak_rss_mb']:8.1f} MB (anon {r['peak_anon_mb']:8.1f})  on disk {r['cache_dir_mb']} MB  {r['seconds']}s",
                flush=True,
            )
    disk = [r for r in rows if r["cache"] == "disk"]
    # judged on anonymous memory: the mapped cache's file pages are reclaimable page cache
    growth = disk[-1]["peak_anon_mb"] - disk[0]["peak_anon_mb"] if len(disk) > 1 else 0.0
    feat_growth = disk[-1]["features_mb"] - disk[0]["features_mb"] if len(disk) > 1 else 0.0
    result = {
        "backbone": args.backbone,
        "num_features": num_features,
        "rows": rows,
        "disk_peak_rss_growth_mb": round(growth, 1),
        "features_growth_mb": round(feat_growth, 1),
        # bounded: RSS grows by well under the features' growth (a fixed batch/chunk buffer is fine)
        "ok": len(disk) < 2 or growth < 0.25 * feat_growth,
    }
    print(
        f"scale: disk cache peak anonymous RSS grew {growth:.1f} MB while the features grew {feat_growth:.1f} MB -> {'bounded' if result['ok'] else 'NOT bounded'}"
    )
    return result


# --------------------------------------------------------------------------- scan


def bench_scan(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    from tl_cli.data.scan import scan_images
    from tl_cli.modalities.image.data import IMG_EXTS

    files = sorted(str(p) for p in Path(args.root).rglob("*") if p.suffix.lower() in IMG_EXTS)
    if not files:
        raise SystemExit(f"no images under {args.root}")
    scan_images(files[:200])  # warm the imports
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        bad = scan_images(files)
        times.append(time.perf_counter() - t)
    best = min(times)
    result = {
        "root": str(args.root),
        "files": len(files),
        "bad": len(bad),
        "best_seconds": round(best, 3),
        "median_seconds": round(sorted(times)[len(times) // 2], 3),
        "files_per_second": round(len(files) / best),
        "us_per_file": round(best / len(files) * 1e6, 1),
    }
    print(
        f"scan: {len(files)} files in {best:.3f}s (best of {args.repeat}, warm page cache): {result['files_per_second']} files/s, {result['us_per_file']} us/file, {len(bad)} bad"
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("what", choices=["leak", "scale", "scan", "all"])
    ap.add_argument("--out", default=str(ROOT / "build" / "bench_scale"))
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="runs before the fit (allocator and import caches settle)",
    )
    ap.add_argument("--max-fd-growth", type=int, default=2)
    ap.add_argument("--max-rss-mb-per-run", type=float, default=1.0)
    ap.add_argument("--sizes", default="2000,8000")
    ap.add_argument(
        "--backbone", default="resnet50", help="a timm architecture (no weights needed)"
    )
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-memory", action="store_true", help="skip the in-memory contrast runs")
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "cifar10-subset"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {}
    for what in ["scan", "leak", "scale"] if args.what == "all" else [args.what]:
        results[what] = {"scan": bench_scan, "leak": bench_leak, "scale": bench_scale}[what](args)
        (Path(args.out) / f"{what}.json").write_text(json.dumps(results[what], indent=2) + "\n")
    failed = [w for w, r in results.items() if r.get("ok") is False]
    if failed:
        raise SystemExit(f"FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    main()
