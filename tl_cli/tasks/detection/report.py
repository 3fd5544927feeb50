"""The detection part of ``tl eval``: per-class AP, a PR curve, drawn test images, error analysis.

Takes the test predictions and targets in original pixels (``DetectionTask.evaluate``)
and the torchmetrics result (``make_metric(extended=True)``), writes the pictures into the run
folder and returns plain data for eval.json / report.md. Existing files are never replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tl_cli.core.errors import TLError
from tl_cli.tasks.detection import metrics as M
from tl_cli.tasks.detection.transforms import load_image

PR_PNG = "pr_curve.png"
GRID_PNG = "test_detections.png"


def per_class_table(result: dict[str, Any], class_names: list[str]) -> list[dict[str, Any]]:
    """One row per class with boxes in the split: COCO AP, AP@0.5 and recall@100."""
    curves = M.pr_curves(result, class_names)
    ap50 = M.ap50_per_class(curves)
    classes = torch.atleast_1d(result["classes"]).tolist()
    ap = torch.atleast_1d(result["map_per_class"]).tolist()
    ar = torch.atleast_1d(result["mar_100_per_class"]).tolist()
    rows = []
    for c, a, r in zip(classes, ap, ar, strict=True):
        if a < 0 or not 1 <= int(c) <= len(class_names):
            continue
        name = class_names[int(c) - 1]
        rows.append(
            {
                "class": name,
                "ap": round(a, 4),
                "ap_50": round(ap50.get(name, 0.0), 4),
                "ar_100": round(r, 4),
            }
        )
    return rows


def write_eval_artifacts(
    outputs: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]],
    samples: list[Any],
    result: dict[str, Any],
    class_names: list[str],
    out_dir: str | Path,
    score_threshold: float = 0.5,
    grid_images: int = 12,
) -> dict[str, Any]:
    """PR curve and drawn-image grid into ``out_dir``; returns the per-class table, the error
    analysis (images with the most missed / spurious boxes at ``score_threshold``) and the
    files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (PR_PNG, GRID_PNG):
        if (out_dir / name).exists():
            raise TLError(f"{out_dir / name} exists; tl does not overwrite it")
    preds = [p for _, p, _ in outputs]
    targets = [t for _, _, t in outputs]
    names = [str(samples[i].path) for i, _, _ in outputs]
    errors = M.error_analysis(preds, targets, names, score_threshold)
    curves = M.pr_curves(result, class_names)
    files = {"pr_curve": str(M.plot_pr(curves, out_dir / PR_PNG))}
    # the grid shows the worst images first (most missed + spurious), then the rest in order
    worst = [r["image"] for r in errors["most_missed"] + errors["most_spurious"]]
    order = sorted(range(len(outputs)), key=lambda k: (names[k] not in worst, k))[:grid_images]
    if order:
        drawn = [
            M.draw(load_image(names[k]), preds[k], class_names, targets[k], score_threshold)
            for k in order
        ]
        files["detections"] = str(M.grid(drawn, out_dir / GRID_PNG))
    return {
        "per_class": per_class_table(result, class_names),
        "errors": errors,
        "score_threshold": score_threshold,
        "files": files,
    }
