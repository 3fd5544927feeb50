"""Detection benchmark: tl's frozen-backbone training and fine-tuning vs a hand-written reference.

The reference is torchvision's detection tutorial recipe (TorchVision Object Detection
Finetuning Tutorial): the same detector (backbone, pyramid, head, image size), every parameter
training, SGD lr 0.005 momentum 0.9 weight decay 5e-4, batch 2, horizontal flip only,
torchvision's own ``forward`` (its transform resizes), a plain loop for the same number of
epochs, scored after the last epoch. tl's runs use ``fit_detector`` with its defaults. All
runs read the same seeded train/val/test carving and are scored by the same COCO mAP.

Heavy: run under the shared lock, e.g.
    flock /work/heavy.lock nice -n 10 python scripts/bench_detection.py --out bench_det.jsonl
Results are appended to ``--out`` (one JSON line per run) as they finish.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "detection-raccoon"


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def reference(data, args) -> dict:
    """The tutorial recipe on tl's detector architecture (see the module docstring)."""
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    from tl_cli.tasks.detection import metrics as M
    from tl_cli.tasks.detection.dataset import collate
    from tl_cli.tasks.detection.model import build_detector
    from tl_cli.tasks.detection.transforms import load_image, make_target

    torch.manual_seed(args.seed)
    names = data.class_names
    index = {n: i + 1 for i, n in enumerate(names)}
    det = build_detector(
        {"name": args.backbone},
        names,
        args.head,
        args.image_size,
        args.fpn_channels,
        args.head_convs,
    ).det

    class Raw(torch.utils.data.Dataset):
        def __init__(self, samples, train):
            self.samples = samples
            self.tf = v2.RandomHorizontalFlip(0.5) if train else v2.Identity()
            self.to_float = v2.ToDtype(torch.float32, scale=True)

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, i):
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
    test = DataLoader(Raw(data.splits["test"], False), batch_size=2, collate_fn=collate)
    params = [p for p in det.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=0.0005)
    epoch_seconds = []
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        det.train()
        te = time.perf_counter()
        for images, targets in train:
            losses = det(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch_seconds.append(time.perf_counter() - te)
    fit_seconds = time.perf_counter() - t0
    det.eval()
    metric = M.make_metric()
    with torch.no_grad():
        for images, targets in test:
            metric.update(*M.metric_inputs(det(images), targets))
    res = M.summarise(metric.compute(), names, "test")
    return {
        **{k: round(v, 4) for k, v in res.items()},
        "fit_seconds": round(fit_seconds, 1),
        "train_seconds_per_epoch": round(sum(epoch_seconds) / len(epoch_seconds), 2),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default="bench_detection.jsonl")
    ap.add_argument(
        "--runs",
        default="finetune,reference,train",
        help="comma list of finetune, reference, train, train:HEAD (a frozen run with another head)",
    )
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--head", default="fcos")
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--fpn-channels", type=int, default=128)
    ap.add_argument("--head-convs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench_detection"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench_util import run_tl

    from tl_cli.tasks.detection.formats import read_detection

    data = read_detection(args.data)
    common = {
        "data": Path(args.data).name,
        "images": {k: len(v) for k, v in data.splits.items()},
        "backbone": args.backbone,
        "image_size": args.image_size,
        "epochs": args.epochs,
    }
    for run in args.runs.split(","):
        load_before = load_avg()
        t = time.perf_counter()
        head = run.split(":")[1] if ":" in run else args.head
        if run == "reference":
            args.head = head
            res = reference(data, args)
        else:
            command = "finetune" if run == "finetune" else "train"
            overrides = [
                "task=detection",
                f"dataset.root={args.data}",
                f"dataset.image_size={args.image_size}",
                f"backbone={args.backbone}",
                f"head={head}",
                f"head.fpn_channels={args.fpn_channels}",
                f"head.head_convs={args.head_convs}",
                f"trainer.max_epochs={args.epochs}",
                "trainer.accelerator=cpu",
                f"seed={args.seed}",
            ]
            r = run_tl(command, overrides, Path(args.work) / run.replace(":", "_"))
            m = r["metrics"]
            hist = [h for h in m.get("history", []) if "seconds" in h]
            res = {
                "cmd": r["cmd"],
                **{
                    k: round(float(m[k]), 4)
                    for k in m
                    if k.startswith(("test/", "val/")) and isinstance(m[k], int | float)
                },
                "fit_seconds": round(float(m.get("fit_seconds", 0)), 1),
                "train_seconds_per_epoch": round(
                    sum(h["seconds"] for h in hist) / len(hist), 1
                )
                if hist
                else None,
                "peak_rss_mb": r["peak_rss_mb"],
            }
        row = {
            "run": run,
            "head": head,
            **common,
            **res,
            "wall_seconds": round(time.perf_counter() - t, 1),
            "load_before": load_before,
            "load_after": load_avg(),
        }
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
