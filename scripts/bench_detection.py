"""Detection benchmark: `tl train` / `tl finetune task=detection` vs a hand-written reference.

The reference is the recipe of torchvision's detection tutorial (TorchVision Object Detection
Finetuning Tutorial, with its ``references/detection/engine.py``) on the same detector as tl's
(backbone, pyramid, head, image size, read from tl's configs plus the same ``--set``
overrides): every parameter trains except what torchvision's detectors freeze by default (the
stem and the stride-2/4 stages, ``trainable_backbone_layers=3``), SGD lr 0.005 momentum 0.9
weight decay 5e-4, a linear warm-up over the first epoch (factor 1/1000, as ``engine.py``),
``StepLR(step_size=3, gamma=0.1)``, batch 2, horizontal flip only, torchvision's own
``forward`` (its transform resizes), an evaluation after every epoch (the tutorial scores its
held-out images every epoch: here the val split, so that both sides pay for it) and the model
of the last epoch scored on test. tl's runs are the real ``tl`` executable (metrics.json); they
keep their ``best.ckpt`` by ``val/map_50``. All runs read the same seeded train/val/test carving
and are scored by the same COCO mAP (torchmetrics, faster_coco_eval).

One run per call, so that each fits a short turn of the shared lock; rows are appended to
``--out`` as they finish and ``--report`` renders the docs section from them:

    OMP_NUM_THREADS=1 flock /work/bench.lock timeout 900 nice -n 5 \\
        python scripts/bench_detection.py --run reference --epochs 5 --out bench_det.jsonl
    ... --run finetune / --run train / --run train --set head=retinanet --label train:retinanet
    python scripts/bench_detection.py --report bench_det.jsonl     # docs/benchmarks.md section
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "detection-raccoon"


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def tl_defaults(sets: list[str]) -> dict[str, Any]:
    """The detector tl builds by default (configs/), with the ``--set`` overrides applied."""
    over = dict(s.split("=", 1) for s in sets)
    head = over.get("head", "fcos")
    hcfg = yaml.safe_load((ROOT / "configs" / "head" / f"{head}.yaml").read_text())
    dcfg = yaml.safe_load((ROOT / "configs" / "dataset" / "detection.yaml").read_text())
    return {
        "head": head,
        "fpn_channels": int(over.get("head.fpn_channels", hcfg["fpn_channels"])),
        "head_convs": int(over.get("head.head_convs", hcfg["head_convs"])),
        "image_size": int(over.get("dataset.image_size", dcfg["image_size"])),
        "backbone": over.get("backbone", "efficientnet_lite0"),
        "split_seed": int(over.get("dataset.split_seed", dcfg["split_seed"])),
        "val_fraction": float(over.get("dataset.val_fraction", dcfg["val_fraction"])),
        "test_fraction": float(over.get("dataset.test_fraction", dcfg["test_fraction"])),
    }


def reference(data: Any, arch: dict[str, Any], epochs: int, seed: int) -> dict[str, Any]:
    """The tutorial recipe on tl's detector architecture (see the module docstring)."""
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    from tl_cli.tasks.detection import metrics as M
    from tl_cli.tasks.detection.dataset import collate
    from tl_cli.tasks.detection.model import build_detector
    from tl_cli.tasks.detection.transforms import load_image, make_target

    torch.manual_seed(seed)
    names = data.class_names
    index = {n: i + 1 for i, n in enumerate(names)}
    wrapper = build_detector(
        {"name": arch["backbone"]},
        names,
        arch["head"],
        arch["image_size"],
        arch["fpn_channels"],
        arch["head_convs"],
    )
    for p in wrapper.early_parameters():  # torchvision's trainable_backbone_layers=3
        p.requires_grad_(False)
    det = wrapper.det

    class Raw(torch.utils.data.Dataset):
        def __init__(self, samples: list[Any], train: bool) -> None:
            self.samples = samples
            self.tf = v2.RandomHorizontalFlip(0.5) if train else v2.Identity()
            self.to_float = v2.ToDtype(torch.float32, scale=True)

        def __len__(self) -> int:
            return len(self.samples)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            s = self.samples[i]
            img = load_image(s.path)
            t = make_target(s.boxes, [index[n] for n in s.names], s.ignore, *img.shape[-2:])
            img, t = self.tf(img, t)
            img = self.to_float(img)
            return img, {
                "boxes": t["boxes"].as_subclass(torch.Tensor),
                "labels": t["labels"],
                "ignore": t["ignore"],
            }

    train = DataLoader(
        Raw(data.splits["train"], True), batch_size=2, shuffle=True, collate_fn=collate
    )

    def score(split: str) -> dict[str, float]:
        loader = DataLoader(Raw(data.splits[split], False), batch_size=2, collate_fn=collate)
        det.eval()
        metric = M.make_metric()
        with torch.no_grad():
            for images, targets in loader:
                metric.update(*M.metric_inputs(det(images), targets))
        return M.summarise(metric.compute(), names, split)

    params = [p for p in det.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=0.0005)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    epoch_seconds, val_map50 = [], []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        det.train()
        te = time.perf_counter()
        warmup = None
        if epoch == 0:  # engine.train_one_epoch's warm-up
            iters = min(1000, len(train) - 1)
            warmup = torch.optim.lr_scheduler.LinearLR(
                opt, start_factor=1.0 / 1000, total_iters=iters
            )
        for images, targets in train:
            losses = det(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if warmup is not None:
                warmup.step()
        step_lr.step()
        val_map50.append(round(score("val")["val/map_50"], 4))
        epoch_seconds.append(time.perf_counter() - te)
        print(f"reference epoch {epoch}: {epoch_seconds[-1]:.0f}s val/map_50 {val_map50[-1]}")
    fit_seconds = time.perf_counter() - t0
    res = score("test")
    return {
        **{k: round(v, 4) for k, v in res.items()},
        "val_map_50_per_epoch": val_map50,
        "fit_seconds": round(fit_seconds, 1),
        "seconds_per_epoch": round(sum(epoch_seconds) / len(epoch_seconds), 1),
    }


def tl_run(
    command: str, data_root: str, epochs: int | None, seed: int, sets: list[str], work: Path
) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench_util import run_tl

    overrides = ["task=detection", f"dataset.root={data_root}", "trainer.accelerator=cpu"]
    if epochs is not None:
        overrides.append(f"trainer.max_epochs={epochs}")
    overrides += [f"seed={seed}", *sets]
    r = run_tl(command, overrides, work)
    m = r["metrics"]
    hist = [h for h in m.get("history", []) if "seconds" in h]
    return {
        "cmd": r["cmd"],
        **{
            k: round(float(m[k]), 4)
            for k in m
            if k.startswith(("test/", "val/")) and isinstance(m[k], int | float)
        },
        "val_map_50_per_epoch": [round(float(h.get("val/map_50", 0)), 4) for h in hist],
        "epochs_run": m.get("epochs"),
        "best_epoch": m.get("best_epoch"),
        "fit_seconds": round(float(m.get("fit_seconds", 0)), 1),
        "seconds_per_epoch": round(sum(h["seconds"] for h in hist) / len(hist), 1)
        if hist
        else None,
        "peak_rss_mb": r["peak_rss_mb"],
    }


def report(path: Path) -> str:
    """The docs/benchmarks.md section from the JSONL rows (the last row of each label wins)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench_util import md_table, write_section

    rows: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["label"]] = r
    ref = rows.get("reference")
    table = []
    for r in rows.values():
        ratio = (
            f"{r['fit_seconds'] / ref['fit_seconds']:.2f}x"
            if ref and r["label"] != "reference"
            else ""
        )
        table.append(
            [
                r["label"],
                r["arch"],
                r["epochs"],
                f"{r['test/map_50']:.3f}",
                f"{r['test/map']:.3f}",
                r["seconds_per_epoch"],
                r["fit_seconds"],
                ratio,
                f"{r['load_before'].split()[0]} / {r['load_after'].split()[0]}",
                r["threads"],
            ]
        )
    curves = [
        [
            r["label"],
            r.get("best_epoch") or r["epochs"],
            " ".join(f"{v:.2f}" for v in r["val_map_50_per_epoch"]),
        ]
        for r in rows.values()
    ]
    body = "\n".join(
        [
            "## Detection (raccoon, 200 photos, one class)",
            "",
            "`scripts/bench_detection.py` on `../shared/data/detection-raccoon` (carved 140 train"
            " / 30 val / 30 test images, `split_seed=0`). Times are the fit (training with the"
            " per-epoch validation, plus the map cache of a frozen backbone), on one CPU thread"
            " (`OMP_NUM_THREADS=1`) of the shared 2-core machine; `load` is the 1-minute load"
            " average when the run started and when it ended. `vs ref` is the fit time over the"
            " reference's.",
            "",
            md_table(
                [
                    "run",
                    "detector",
                    "epochs",
                    "test mAP@0.5",
                    "test mAP",
                    "s / epoch",
                    "fit s",
                    "vs ref",
                    "load start / end",
                    "threads",
                ],
                table,
                "llrrrrrrrr",
            ),
            "",
            "Validation mAP@0.5 after each epoch (tl keeps `best.ckpt` by it and tests that epoch;"
            " the reference tests its last epoch, as the tutorial does):",
            "",
            md_table(["run", "tested epoch", "val mAP@0.5 per epoch"], curves, "lrl"),
            "",
            "Commands (one locked call each, rows appended to the JSONL):",
            "",
            "```bash",
            *[r["bench_cmd"] for r in rows.values()],
            f"python scripts/bench_detection.py --report {path.name}",
            "```",
            "",
            "The tl rows ran as:",
            "",
            "```bash",
            *[r["cmd"] for r in rows.values() if "cmd" in r],
            "```",
        ]
    )
    write_section("detection", body)
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default="bench_detection.jsonl")
    ap.add_argument("--run", choices=["reference", "train", "finetune"])
    ap.add_argument("--label", default=None, help="row name (default: the run)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tl override (head=retinanet, head.fpn_channels=64, ...); the reference builds "
        "the same detector from head, head.fpn_channels, head.head_convs, dataset.image_size",
    )
    ap.add_argument("--epochs", type=int, default=None, help="default: tl's (auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench_detection"))
    ap.add_argument("--report", default=None, help="render docs/benchmarks.md from this JSONL")
    args = ap.parse_args()
    if args.report:
        print(report(Path(args.report)))
        return
    if not args.run:
        ap.error("--run or --report is required")
    torch.set_num_threads(args.threads)
    from tl_cli.tasks.detection.formats import read_detection

    arch = tl_defaults(args.set)
    data = read_detection(
        args.data, arch["val_fraction"], arch["test_fraction"], arch["split_seed"]
    )
    label = args.label or args.run
    load_before = load_avg()
    t = time.perf_counter()
    if args.run == "reference":
        if args.epochs is None:
            ap.error("--run reference needs --epochs (the tl runs' number)")
        res = reference(data, arch, args.epochs, args.seed)
    else:
        work = Path(args.work) / label.replace(":", "_").replace("/", "_")
        res = tl_run(args.run, args.data, args.epochs, args.seed, args.set, work)
    bench_cmd = " ".join(
        [
            f"OMP_NUM_THREADS={args.threads} flock /work/bench.lock timeout 900 nice -n 5",
            "python scripts/bench_detection.py",
            f"--run {args.run}",
            *(f"--set {s}" for s in args.set),
            *([f"--label {args.label}"] if args.label else []),
            *([f"--epochs {args.epochs}"] if args.epochs is not None else []),
            f"--out {Path(args.out).name}",
        ]
    )
    row = {
        "label": label,
        "run": args.run,
        "arch": f"{arch['head']} {arch['fpn_channels']}ch/{arch['head_convs']} convs, "
        f"{arch['image_size']} px",
        "data": Path(args.data).name,
        "images": {k: len(v) for k, v in data.splits.items()},
        "backbone": arch["backbone"],
        "epochs": res.get("epochs_run") or args.epochs,
        **res,
        "wall_seconds": round(time.perf_counter() - t, 1),
        "threads": args.threads,
        "load_before": load_before,
        "load_after": load_avg(),
        "bench_cmd": bench_cmd,
    }
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
