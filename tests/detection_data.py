"""Tiny generated detection sets: coloured rectangles on a noisy background, in VOC, COCO or YOLO.

The classes differ by colour (red squares, blue bars), so a detector learns them in a few
epochs; boxes are known exactly, so readers and transforms can be checked against them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = {"red": (220, 40, 40), "blue": (40, 60, 220)}


def make_images(
    root: Path, n: int, size: tuple[int, int] = (96, 72), seed: int = 0, max_objects: int = 2
):
    """Write ``n`` images to ``root``; return ``[(path, [(name, x1, y1, x2, y2), ...])]`` (0-based
    pixel edges: a box covers columns x1..x2-1)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    w, h = size
    out = []
    names = list(SHAPES)
    for i in range(n):
        arr = np.clip(rng.normal(128, 25, (h, w, 3)), 0, 255)
        objs = []
        for k in range(1 + int(rng.integers(0, max_objects))):
            name = names[(i + k) % len(names)]
            bw = int(rng.integers(w // 5, w // 2))
            bh = int(rng.integers(h // 5, h // 2))
            x1 = int(rng.integers(0, w - bw))
            y1 = int(rng.integers(0, h - bh))
            arr[y1 : y1 + bh, x1 : x1 + bw] = SHAPES[name]
            objs.append((name, x1, y1, x1 + bw, y1 + bh))
        p = root / f"img_{i:03d}.png"
        Image.fromarray(arr.astype("uint8")).save(p)
        out.append((p, objs))
    return out


def write_voc(folder: Path, n: int, seed: int = 0, size=(96, 72), difficult: bool = False):
    items = make_images(folder / "images", n, size, seed)
    ann = folder / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    for p, objs in items:
        parts = [
            f"<annotation><filename>{p.name}</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size>"
        ]
        for j, (name, x1, y1, x2, y2) in enumerate(objs):
            d = int(difficult and j == 1)
            # VOC: 1-based pixel indices, xmax inclusive
            parts.append(
                f"<object><name>{name}</name><difficult>{d}</difficult><bndbox><xmin>{x1 + 1}</xmin>"
                f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            )
        parts.append("</annotation>")
        (ann / f"{p.stem}.xml").write_text("".join(parts))
    return items


def write_coco(
    folder: Path, n: int, seed: int = 0, size=(96, 72), file="_annotations.coco.json", cat_ids=None
):
    items = make_images(folder, n, size, seed)
    cat_ids = cat_ids or {name: i + 1 for i, name in enumerate(SHAPES)}
    images, anns = [], []
    for i, (p, objs) in enumerate(items):
        images.append({"id": i + 10, "file_name": p.name, "width": size[0], "height": size[1]})
        for name, x1, y1, x2, y2 in objs:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 10,
                    "category_id": cat_ids[name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    cats = [{"id": cid, "name": name, "supercategory": "shapes"} for name, cid in cat_ids.items()]
    (folder / file).write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    return items


def write_yolo(folder: Path, n: int, seed: int = 0, size=(96, 72), names_file: str = "data.yaml"):
    items = make_images(folder / "images", n, size, seed)
    lbl = folder / "labels"
    lbl.mkdir(parents=True, exist_ok=True)
    names = list(SHAPES)
    w, h = size
    for p, objs in items:
        lines = [
            f"{names.index(name)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
            f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
            for name, x1, y1, x2, y2 in objs
        ]
        (lbl / f"{p.stem}.txt").write_text("\n".join(lines) + "\n")
    if names_file == "data.yaml":
        (folder / "data.yaml").write_text("names: [" + ", ".join(names) + "]\n")
    else:
        (folder / "classes.txt").write_text("\n".join(names) + "\n")
    return items
