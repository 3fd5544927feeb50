"""What a detector gives back to users: rows in original pixels, COCO results, drawn copies.

``tl predict`` writes one row per box (``path,label,score,x1,y1,x2,y2``) in the pixels of the
file the user gave (EXIF orientation applied, as viewers show it), optionally COCO's results
JSON, and with ``draw=true`` an annotated copy per image.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_cli.core.errors import TLError
from tl_cli.tasks.detection.metrics import draw
from tl_cli.tasks.detection.transforms import load_image, resize_long_side, to_original

#: the columns of a prediction row
COLUMNS = ("path", "label", "score", "x1", "y1", "x2", "y2")


@torch.no_grad()
def detect_files(
    detector: Any, paths: list[Path], image_size: int, batch_size: int = 4, device: Any = "cpu"
) -> Iterator[tuple[Path, Tensor, dict[str, Tensor]]]:
    """``(path, uint8 image, detections in original pixels)`` per file, in order."""
    resize = resize_long_side(image_size)
    was = detector.training
    detector.eval()
    try:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            raw = [load_image(p) for p in chunk]
            images = [resize(r).float().div(255).to(device) for r in raw]
            dets = detector(images)
            for p, r, img, d in zip(chunk, raw, images, dets, strict=True):
                scale = (img.shape[-1] / r.shape[-1], img.shape[-2] / r.shape[-2])
                boxes = to_original(d["boxes"].cpu(), scale)
                h, w = r.shape[-2:]
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
                yield (
                    p,
                    r,
                    {"boxes": boxes, "scores": d["scores"].cpu(), "labels": d["labels"].cpu()},
                )
    finally:
        detector.train(was)


def rows(
    path: str | Path, det: dict[str, Tensor], class_names: list[str], score_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One row per box at or above ``score_threshold``, highest score first."""
    keep = det["scores"] >= score_threshold
    order = det["scores"][keep].argsort(descending=True)
    boxes = det["boxes"][keep][order].tolist()
    scores = det["scores"][keep][order].tolist()
    labels = det["labels"][keep][order].tolist()
    return [
        {
            "path": str(path),
            "label": class_names[int(c) - 1],
            "score": round(float(s), 4),
            "x1": round(b[0], 1),
            "y1": round(b[1], 1),
            "x2": round(b[2], 1),
            "y2": round(b[3], 1),
        }
        for b, s, c in zip(boxes, scores, labels, strict=True)
    ]


def coco_results(
    dets: list[dict[str, Tensor]],
    image_ids: list[int],
    class_names: list[str],
    category_ids: dict[str, int] | None = None,
    score_threshold: float = 0.0,
) -> list[dict[str, Any]]:
    """COCO's detection results format: ``{image_id, category_id, bbox: [x, y, w, h], score}``.

    ``category_ids`` maps class names to the dataset's own COCO ids (when it came as COCO);
    otherwise a class's id is its index + 1.
    """
    out = []
    for iid, d in zip(image_ids, dets, strict=True):
        keep = d["scores"] >= score_threshold
        for b, s, c in zip(
            d["boxes"][keep].tolist(),
            d["scores"][keep].tolist(),
            d["labels"][keep].tolist(),
            strict=True,
        ):
            name = class_names[int(c) - 1]
            cid = category_ids[name] if category_ids else int(c)
            out.append(
                {
                    "image_id": int(iid),
                    "category_id": int(cid),
                    "bbox": [
                        round(b[0], 2),
                        round(b[1], 2),
                        round(b[2] - b[0], 2),
                        round(b[3] - b[1], 2),
                    ],
                    "score": round(float(s), 5),
                }
            )
    return out


def save_drawn(
    image: Tensor,
    det: dict[str, Tensor],
    class_names: list[str],
    out_path: str | Path,
    score_threshold: float = 0.5,
) -> Path:
    """An annotated copy of one image; an existing file is never replaced."""
    from PIL import Image

    out_path = Path(out_path)
    if out_path.exists():
        raise TLError(f"{out_path} exists; tl does not overwrite it (pick another output folder)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    width = max(2, round(max(image.shape[-2:]) / 250))
    drawn = draw(image, det, class_names, score_threshold=score_threshold, width=width)
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out_path)
    return out_path
