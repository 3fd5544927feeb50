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
    ap.add_argument("--runs", default="train,finetune,reference", help="comma list")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--head", default="fcos", help="head of the finetune/reference runs")
    ap.add_argument(
        "--heads",
        default="",
        help="comma list: frozen-backbone runs per head on one shared cache; finetune and "
        "reference then use the head with the best val mAP@0.5",
    )
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--fpn-channels", type=int, default=128)
    ap.add_argument("--head-convs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cache-views", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tl_cli.tasks.detection.fit import fit_detector
    from tl_cli.tasks.detection.formats import read_detection

    data = read_detection(args.data)
    common = {
        "data": Path(args.data).name,
        "images": {k: len(v) for k, v in data.splits.items()},
        "head": args.head,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "fpn_channels": args.fpn_channels,
        "epochs": args.epochs,
        "threads": args.threads,
    }
    jobs = []
    for run in args.runs.split(","):
        if run == "train" and args.heads:
            jobs += [("train", h) for h in args.heads.split(",")]
        else:
            jobs.append((run, None))
    cache = None
    best_val: dict[str, float] = {}
    for run, head in jobs:
        if head is None:
            head = max(best_val, key=best_val.get) if best_val else args.head
            args.head = head
        common["head"] = head
        load_before = load_avg()
        t = time.perf_counter()
        if run == "reference":
            res = reference(data, args)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                r = fit_detector(
                    args.data,
                    tmp,
                    train_backbone=run == "finetune",
                    backbone={"name": args.backbone},
                    head=head,
                    image_size=args.image_size,
                    fpn_channels=args.fpn_channels,
                    head_convs=args.head_convs,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    cache_views=args.cache_views,
                    seed=args.seed,
                    cache=cache if run == "train" else None,
                )
            if run == "train":
                cache = r["cache"]
                best_val[head] = r["best_val_map_50"] or 0.0
            skip = ("module", "data", "best_path", "classes", "cache")
            res = {k: v for k, v in r.items() if k not in skip}
        row = {
            "run": run,
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
