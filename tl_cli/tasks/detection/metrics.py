"""Detection scores (COCO mAP by torchmetrics) and the error analysis behind them.

``MeanAveragePrecision`` (backend ``faster_coco_eval`` when installed, else ``pycocotools``)
gives ``map`` (AP averaged over IoU 0.5:0.95), ``map_50``, ``map_75``, ``mar_100`` and per-class
AP. Ignored boxes (VOC ``difficult``, COCO ``iscrowd``) go in as COCO crowd regions: a
detection on one is neither a hit nor a false positive, and missing one costs nothing, which
is how VOC scores ``difficult`` objects (COCO matches crowd regions by the detection's
overlap with them rather than IoU; for VOC's difficult boxes the two agree on what counts).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

#: metric keys reported per split (``test/map``, ``val/map_50``, ...)
KEYS = ("map", "map_50", "map_75", "mar_100")
#: best.ckpt follows this (max)
MONITOR = ("val/map_50", "max")


def backend() -> str:
    for name, module in (("faster_coco_eval", "faster_coco_eval"), ("pycocotools", "pycocotools")):
        if importlib.util.find_spec(module) is not None:
            return name
    from tl_cli.core.errors import TLError

    raise TLError("task=detection needs a COCO evaluator: pip install faster-coco-eval")


def make_metric(extended: bool = False):
    """torchmetrics' COCO mAP; ``extended`` keeps the precision arrays (PR curves)."""
    import logging

    from torchmetrics.detection import MeanAveragePrecision

    # faster_coco_eval prints its whole summary table at INFO on every compute()
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)

    return MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        class_metrics=True,
        backend=backend(),
        extended_summary=extended,
    )


def metric_inputs(
    preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """Plain tensors on the CPU; ``ignore`` becomes COCO's ``iscrowd``."""
    p = [
        {
            k: d[k].detach().float().cpu() if k != "labels" else d[k].cpu()
            for k in ("boxes", "scores", "labels")
        }
        for d in preds
    ]
    t = []
    for d in targets:
        ign = d.get("ignore")
        if ign is None:
            ign = torch.zeros(len(d["labels"]), dtype=torch.bool)
        t.append(
            {
                "boxes": d["boxes"].detach().float().cpu(),
                "labels": d["labels"].cpu(),
                "iscrowd": ign.to(torch.int64).cpu(),
            }
        )
    return p, t


def summarise(result: dict[str, Any], class_names: list[str], prefix: str) -> dict[str, float]:
    """Flat metrics: ``{prefix}/map`` ... and ``{prefix}/ap/<class>`` (COCO AP per class;
    classes with no box in the split are left out, as COCO does)."""
    out = {f"{prefix}/{k}": float(result[k]) for k in KEYS}
    classes = result.get("classes")
    per = result.get("map_per_class")
    if classes is not None and per is not None:
        classes = torch.atleast_1d(classes).tolist()
        per = torch.atleast_1d(per).tolist()
        for c, ap in zip(classes, per, strict=True):
            if ap >= 0 and 1 <= int(c) <= len(class_names):
                out[f"{prefix}/ap/{class_names[int(c) - 1]}"] = float(ap)
    return out


def pr_curves(result: dict[str, Any], class_names: list[str]) -> dict[str, np.ndarray]:
    """Precision at 101 recall points, IoU 0.5, all areas, 100 detections, per class (needs
    ``make_metric(extended=True)``). Points beyond the class's top recall are NaN."""
    prec = result["precision"]  # (T, R, K, A, M)
    classes = torch.atleast_1d(result["classes"]).tolist()
    out = {}
    for k, c in enumerate(classes):
        if not 1 <= int(c) <= len(class_names):
            continue
        p = prec[0, :, k, 0, -1].numpy().astype(float)
        if (p < 0).all():
            continue
        p[p < 0] = np.nan
        out[class_names[int(c) - 1]] = p
    return out


def ap50_per_class(curves: dict[str, np.ndarray]) -> dict[str, float]:
    """AP@0.5 per class: the mean of the 101-point interpolated precision (COCO's way)."""
    return {k: float(np.nan_to_num(v, nan=0.0).mean()) for k, v in curves.items()}


def plot_pr(curves: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """One precision-recall curve per class (IoU 0.5) in a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, p in sorted(curves.items()):
        ap = np.nan_to_num(p, nan=0.0).mean()
        ax.plot(recall, p, label=f"{name} (AP50 {ap:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "precision-recall at IoU 0.5")
    if curves:
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def match_counts(
    pred: dict[str, Tensor],
    target: dict[str, Tensor],
    score_threshold: float = 0.5,
    iou: float = 0.5,
) -> tuple[int, int, int]:
    """(hits, missed, spurious) for one image: predictions at or above ``score_threshold``
    matched greedily by score to same-class boxes at IoU >= ``iou`` (COCO's rule); one on an
    ignored box counts as neither; an ignored box never counts as missed."""
    keep = pred["scores"] >= score_threshold
    boxes, labels = pred["boxes"][keep], pred["labels"][keep]
    order = pred["scores"][keep].argsort(descending=True)
    boxes, labels = boxes[order], labels[order]
    gt, gl = target["boxes"], target["labels"]
    ign = target.get("ignore", torch.zeros(len(gl), dtype=torch.bool))
    if len(boxes) == 0 or len(gt) == 0:
        return 0, int((~ign).sum()), len(boxes)
    ious = box_iou(boxes.float(), gt.float())
    ious[labels[:, None] != gl[None, :]] = -1.0
    taken = torch.zeros(len(gt), dtype=torch.bool)
    hits = spurious = 0
    for i in range(len(boxes)):  # greedy by score: each detection depends on earlier ones
        cand = ious[i].clone()
        cand[taken] = -1.0
        j = int(cand.argmax())
        if cand[j] >= iou:
            taken[j] = True
            hits += int(not ign[j])
        elif ((ious[i] >= iou) & ign).any():
            continue  # on an ignored box
        else:
            spurious += 1
    missed = int((~taken & ~ign).sum())
    return hits, missed, spurious


def error_analysis(
    preds: list[dict[str, Tensor]],
    targets: list[dict[str, Tensor]],
    names: list[str],
    score_threshold: float = 0.5,
    top: int = 5,
) -> dict[str, list[dict[str, Any]]]:
    """The images with the most missed and the most spurious boxes (at ``score_threshold``)."""
    rows = []
    for name, p, t in zip(names, preds, targets, strict=True):
        hits, missed, spurious = match_counts(p, t, score_threshold)
        rows.append(
            {
                "image": name,
                "boxes": int(len(t["labels"])),
                "hits": hits,
                "missed": missed,
                "spurious": spurious,
            }
        )
    most_missed = sorted((r for r in rows if r["missed"]), key=lambda r: (-r["missed"], r["image"]))
    most_spurious = sorted(
        (r for r in rows if r["spurious"]), key=lambda r: (-r["spurious"], r["image"])
    )
    return {"most_missed": most_missed[:top], "most_spurious": most_spurious[:top]}


def draw(
    image: Tensor,
    pred: dict[str, Tensor] | None,
    class_names: list[str],
    target: dict[str, Tensor] | None = None,
    score_threshold: float = 0.5,
    width: int = 3,
) -> Tensor:
    """uint8 image with ground truth (green) and predictions (red, ``name score``) drawn."""
    from torchvision.utils import draw_bounding_boxes

    out = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).to(torch.uint8)
    if target is not None and len(target["boxes"]):
        out = draw_bounding_boxes(out, target["boxes"].float(), colors="lime", width=width)
    if pred is not None:
        keep = pred["scores"] >= score_threshold
        if keep.any():
            labels = [
                f"{class_names[int(c) - 1] if 1 <= int(c) <= len(class_names) else int(c)} {float(s):.2f}"
                for c, s in zip(pred["labels"][keep], pred["scores"][keep], strict=True)
            ]
            out = draw_bounding_boxes(
                out, pred["boxes"][keep].float(), labels=labels, colors="red", width=width
            )
    return out


def grid(images: list[Tensor], path: str | Path, size: int = 320, nrow: int = 4) -> Path:
    """Drawn images, each fitted in a ``size`` square, as one PNG."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import make_grid

    tiles = []
    for img in images:
        h, w = img.shape[-2:]
        s = size / max(h, w)
        img = F.resize(img, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)
        tile = torch.full((3, size, size), 255, dtype=torch.uint8)
        tile[:, : img.shape[-2], : img.shape[-1]] = img
        tiles.append(tile)
    g = make_grid(tiles, nrow=min(nrow, len(tiles)), padding=4, pad_value=255)
    path = Path(path)
    Image.fromarray(g.permute(1, 2, 0).numpy()).save(path)
    return path
