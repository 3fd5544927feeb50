"""Detection label formats: Pascal VOC, COCO and YOLO, detected from the folder.

Users bring a few hundred photos labelled in LabelImg (VOC XML), CVAT or Roboflow (COCO JSON,
YOLO txt). Every reader turns its files into the same plain records (:class:`Sample`: an image
path, its size, ``xyxy`` boxes in original pixels, class names and an ``ignore`` flag for VOC
``difficult`` / COCO ``iscrowd`` objects), so the rest of the package never sees a format.

Nothing read from a label file is executed or evaluated: XML is parsed by the standard library
with any DTD refused (no entity expansion at all), YAML by ``yaml.safe_load``, JSON by ``json``.
Bad input raises :class:`~tl_cli.errors.TLError` naming the file at fault.
"""

from __future__ import annotations

import json
import random
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tl_cli.core.errors import TLError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
COCO_FILES = ("annotations.json", "_annotations.coco.json")
#: split folder names, in the order tl uses them (Roboflow writes ``valid``)
SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


@dataclass
class Sample:
    """One image and its boxes (``xyxy``, original pixels, float32)."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4)
    names: list[str]
    ignore: np.ndarray  # (N,) bool: VOC difficult / COCO iscrowd, not scored

    @property
    def num_boxes(self) -> int:
        return len(self.names)


@dataclass
class DetectionSplits:
    """What a dataset root holds once read: samples per split and the class names."""

    format: str  # voc | coco | yolo
    class_names: list[str]
    splits: dict[str, list[Sample]]
    #: boxes clipped to the image, images with no annotation (kept as background), per split
    clipped: int = 0
    backgrounds: dict[str, int] = field(default_factory=dict)
    carved: bool = False  # True when val/test were carved from one pool

    def labels(self, sample: Sample) -> np.ndarray:
        index = {n: i for i, n in enumerate(self.class_names)}
        return np.array([index[n] for n in sample.names], dtype=np.int64)


# --------------------------------------------------------------------------- helpers


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header (no full decode), or a TLError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            exif = im.getexif()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise TLError(f"{path}: not a readable image ({type(e).__name__})") from None
    if exif.get(0x0112) in (5, 6, 7, 8):  # EXIF rotation by 90/270: loaded images are turned
        w, h = h, w
    if w < 1 or h < 1:
        raise TLError(f"{path}: empty image ({w}x{h})")
    return int(w), int(h)


def _images_in(folder: Path) -> dict[str, Path]:
    """stem -> image path of the image files directly in ``folder`` (sorted, case-insensitive)."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            if p.stem in out:
                raise TLError(f"{folder}: two images named {p.stem} ({out[p.stem].name}, {p.name})")
            out[p.stem] = p
    return out


class _Boxes:
    """Checks boxes against their image: clips the ones that stick out (counted), refuses the
    ones with x2 <= x1 or y2 <= y1 and the ones that lie outside the image entirely."""

    def __init__(self) -> None:
        self.clipped = 0

    def check(self, boxes: np.ndarray, w: int, h: int, where: str) -> np.ndarray:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if not np.isfinite(boxes).all():
            raise TLError(f"{where}: a box has a non-numeric coordinate")
        bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bad.any():
            b = boxes[np.argmax(bad)].tolist()
            raise TLError(f"{where}: box {_fmt(b)} has x2 <= x1 or y2 <= y1")
        lo = np.array([0, 0, 0, 0], dtype=np.float32)
        hi = np.array([w, h, w, h], dtype=np.float32)
        clipped = np.clip(boxes, lo, hi)
        out = (clipped != boxes).any(axis=1)
        degenerate = (clipped[:, 2] - clipped[:, 0] < 1) | (clipped[:, 3] - clipped[:, 1] < 1)
        if degenerate.any():
            b = boxes[np.argmax(degenerate)].tolist()
            raise TLError(
                f"{where}: box {_fmt(b)} lies outside the {w}x{h} image (nothing left once clipped)"
            )
        self.clipped += int(out.sum())
        return clipped


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _text(node: ET.Element | None, tag: str, where: str) -> str:
    child = node.find(tag) if node is not None else None
    if child is None or child.text is None or not child.text.strip():
        raise TLError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _number(text: str, tag: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise TLError(f"{where}: <{tag}> is not a number: {text[:40]!r}") from None


def _parse_xml(path: Path) -> ET.Element:
    """Parse one VOC file. A DOCTYPE (and with it any entity declaration) is refused outright,
    so no entity is ever expanded; VOC files never carry one."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TLError(f"{path}: cannot read ({e.strerror or e})") from None
    if re.search(rb"<!DOCTYPE|<!ENTITY", data[:65536], flags=re.IGNORECASE):
        raise TLError(f"{path}: XML with a DOCTYPE/ENTITY declaration is refused (not VOC)")
    try:
        return ET.fromstring(data)
    except ET.ParseError as e:
        raise TLError(f"{path}: not valid XML ({e})") from None


# --------------------------------------------------------------------------- formats


def voc_dirs(folder: Path) -> tuple[Path, Path] | None:
    """(images dir, annotations dir) when ``folder`` looks like Pascal VOC."""
    for ann in ("annotations", "Annotations"):
        a = folder / ann
        if a.is_dir() and any(a.glob("*.xml")):
            for img in ("images", "JPEGImages"):
                if (folder / img).is_dir():
                    return folder / img, a
            return folder, a
    return None


def coco_file(folder: Path) -> Path | None:
    for name in COCO_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def yolo_dirs(folder: Path) -> tuple[Path, Path] | None:
    if (folder / "labels").is_dir() and (folder / "images").is_dir():
        return folder / "images", folder / "labels"
    return None


def detect_format(folder: Path) -> str | None:
    """voc | coco | yolo for a folder holding one split, None when none fits.

    Two formats in one folder is an error: tl would have to guess which labels are current.
    """
    found = [
        name
        for name, hit in (
            ("voc", voc_dirs(folder)),
            ("coco", coco_file(folder)),
            ("yolo", yolo_dirs(folder)),
        )
        if hit is not None
    ]
    if len(found) > 1:
        raise TLError(
            f"{folder}: mixed label formats ({' and '.join(found)}); keep one format per dataset"
        )
    return found[0] if found else None


def read_voc(folder: Path, boxes: _Boxes) -> tuple[list[Sample], int]:
    """Pascal VOC: ``annotations/*.xml`` (LabelImg, CVAT) beside ``images/``.

    VOC pixel indices are 1-based (``xmin=1`` is the first column), so ``xmin - 1`` and
    ``ymin - 1`` give 0-based ``x1, y1`` (as Detectron2 reads VOC). Returns samples and the
    count of images with no XML (background images, kept with no boxes).
    """
    img_dir, ann_dir = voc_dirs(folder)  # type: ignore[misc]
    images = _images_in(img_dir)
    used: set[str] = set()
    samples: list[Sample] = []
    for xml in sorted(ann_dir.glob("*.xml")):
        root = _parse_xml(xml)
        if root.tag != "annotation":
            raise TLError(f"{xml}: root element is <{root.tag}>, not <annotation> (Pascal VOC)")
        fname = root.findtext("filename")
        path = None
        if fname and fname.strip():
            cand = img_dir / Path(fname.strip()).name
            if cand.is_file():
                path = cand
        if path is None:
            path = images.get(xml.stem)
        if path is None:
            raise TLError(
                f"{xml}: its image {fname.strip() if fname else xml.stem} is missing from {img_dir}"
            )
        w, h = _image_size(path)
        used.add(path.stem)
        coords, names, ignore = [], [], []
        for obj in root.findall("object"):
            where = f"{xml}"
            name = _text(obj, "name", where)
            bb = obj.find("bndbox")
            if bb is None:
                raise TLError(f"{xml}: object {name!r} has no <bndbox>")
            x1, y1, x2, y2 = (
                _number(_text(bb, t, where), t, where) for t in ("xmin", "ymin", "xmax", "ymax")
            )
            coords.append([x1 - 1, y1 - 1, x2, y2])
            names.append(name)
            diff = (obj.findtext("difficult") or "0").strip()
            ignore.append(diff in ("1", "true", "True"))
        arr = boxes.check(np.array(coords, dtype=np.float32), w, h, str(xml))
        samples.append(Sample(path, w, h, arr, names, np.array(ignore, dtype=bool)))
    background = [p for s, p in images.items() if s not in used]
    for p in background:
        w, h = _image_size(p)
        samples.append(_empty(p, w, h))
    return samples, len(background)


def _empty(path: Path, w: int, h: int) -> Sample:
    return Sample(path, w, h, np.zeros((0, 4), np.float32), [], np.zeros(0, bool))


def read_coco(folder: Path, boxes: _Boxes) -> tuple[list[Sample], int, dict[int, str]]:
    """COCO JSON (``annotations.json``, or Roboflow's ``_annotations.coco.json``) with the
    images beside it or in ``images/``. ``bbox`` is ``[x, y, width, height]`` in pixels;
    ``iscrowd`` objects are kept but not scored. Returns samples, background count, id->name."""
    path = coco_file(folder)
    assert path is not None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TLError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise TLError(f"{path}: not a COCO file (no 'images' list)")
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise TLError(f"{path}: no 'categories' list")
    id2name: dict[int, str] = {}
    for c in cats:
        try:
            cid, cname = int(c["id"]), str(c["name"])
        except (KeyError, TypeError, ValueError):
            raise TLError(f"{path}: a category without an integer 'id' and a 'name'") from None
        if cid in id2name:
            raise TLError(f"{path}: category id {cid} appears twice")
        id2name[cid] = cname
    if len(set(id2name.values())) != len(id2name):
        dup = [n for n, k in Counter(id2name.values()).items() if k > 1][0]
        raise TLError(f"{path}: category name {dup!r} has two ids")
    img_dirs = [folder, folder / "images"]
    images: dict[int, tuple[Path, int, int]] = {}
    for im in data["images"]:
        try:
            iid, fname = int(im["id"]), str(im["file_name"])
        except (KeyError, TypeError, ValueError):
            raise TLError(f"{path}: an image without an integer 'id' and a 'file_name'") from None
        rel = Path(fname)
        if rel.is_absolute() or ".." in rel.parts:
            raise TLError(f"{path}: image file_name {fname!r} must be relative, inside {folder}")
        p = next((d / rel for d in img_dirs if (d / rel).is_file()), None)
        if p is None:
            raise TLError(f"{path}: image {fname} (id {iid}) is missing from {folder}")
        w, h = _image_size(p)
        images[iid] = (p, w, h)
    per: dict[int, list[tuple[list[float], str, bool]]] = {i: [] for i in images}
    for a in data.get("annotations") or []:
        try:
            iid, cid = int(a["image_id"]), int(a["category_id"])
            x, y, bw, bh = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            raise TLError(
                f"{path}: annotation {a.get('id', '?') if isinstance(a, dict) else '?'} needs "
                "image_id, category_id and bbox [x, y, w, h]"
            ) from None
        if iid not in images:
            raise TLError(f"{path}: annotation {a.get('id', '?')} names image id {iid}, not listed")
        if cid not in id2name:
            raise TLError(
                f"{path}: annotation {a.get('id', '?')} has category_id {cid}, not in categories "
                f"({', '.join(str(k) for k in sorted(id2name))})"
            )
        per[iid].append(([x, y, x + bw, y + bh], id2name[cid], bool(a.get("iscrowd", 0))))
    samples = []
    background = 0
    for iid, (p, w, h) in sorted(images.items(), key=lambda kv: str(kv[1][0])):
        objs = per[iid]
        if not objs:
            background += 1
            samples.append(_empty(p, w, h))
            continue
        arr = boxes.check(np.array([o[0] for o in objs]), w, h, f"{path} (image {p.name})")
        samples.append(
            Sample(p, w, h, arr, [o[1] for o in objs], np.array([o[2] for o in objs], dtype=bool))
        )
    return samples, background, id2name


def yolo_names(*folders: Path) -> list[str] | None:
    """Class names from ``data.yaml`` (``names:`` list or {index: name}) or ``classes.txt``."""
    import yaml

    for folder in folders:
        for name in ("data.yaml", "dataset.yaml"):
            f = folder / name
            if f.is_file():
                try:
                    doc = yaml.safe_load(f.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                    raise TLError(f"{f}: not readable YAML ({type(e).__name__})") from None
                names = doc.get("names") if isinstance(doc, dict) else None
                if isinstance(names, dict):
                    try:
                        keys = sorted(int(k) for k in names)
                    except (TypeError, ValueError):
                        raise TLError(f"{f}: 'names' keys must be class indices") from None
                    if keys != list(range(len(keys))):
                        raise TLError(f"{f}: 'names' indices must be 0..{len(keys) - 1}")
                    names = [names[k] if k in names else names[str(k)] for k in keys]
                if not isinstance(names, list) or not names:
                    raise TLError(f"{f}: no 'names' list of class names")
                return [str(n) for n in names]
        f = folder / "classes.txt"
        if f.is_file():
            names = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if not names:
                raise TLError(f"{f}: no class names")
            return names
    return None


def read_yolo(
    img_dir: Path, lbl_dir: Path, names: list[str], boxes: _Boxes
) -> tuple[list[Sample], int]:
    """YOLO txt: ``labels/<stem>.txt`` per image of ``images/``, one ``class cx cy w h`` line
    per box, normalised to [0, 1]. A polygon line (``class x1 y1 x2 y2 ...``, YOLO
    segmentation) becomes its bounding box. An image with no txt (or an empty one) is a
    background image."""
    images = _images_in(img_dir)
    txts = sorted(lbl_dir.glob("*.txt")) if lbl_dir.is_dir() else []
    for txt in txts:
        if txt.stem not in images and txt.name != "classes.txt":
            raise TLError(f"{txt}: its image {txt.stem}.* is missing from {img_dir}")
    samples, background = [], 0
    for stem, p in images.items():
        w, h = _image_size(p)
        txt = lbl_dir / f"{stem}.txt"
        lines = []
        if txt.is_file():
            lines = [ln.split() for ln in txt.read_text(encoding="utf-8").splitlines()]
            lines = [ln for ln in lines if ln]
        if not lines:
            background += 1
            samples.append(_empty(p, w, h))
            continue
        coords, cls = [], []
        for i, parts in enumerate(lines, 1):
            where = f"{txt}:{i}"
            try:
                k = int(parts[0])
                vals = [float(v) for v in parts[1:]]
            except ValueError:
                raise TLError(f"{where}: expected 'class cx cy w h' numbers") from None
            if not 0 <= k < len(names):
                raise TLError(f"{where}: class index {k} is not one of the {len(names)} names")
            if len(vals) == 4:
                cx, cy, bw, bh = vals
                box = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
            elif len(vals) >= 6 and len(vals) % 2 == 0:
                xs, ys = vals[0::2], vals[1::2]
                box = [min(xs), min(ys), max(xs), max(ys)]
            else:
                raise TLError(
                    f"{where}: expected 'class cx cy w h' (or a polygon), got {len(vals)} values"
                )
            coords.append([box[0] * w, box[1] * h, box[2] * w, box[3] * h])
            cls.append(names[k])
        arr = boxes.check(np.array(coords), w, h, str(txt))
        samples.append(Sample(p, w, h, arr, cls, np.zeros(len(cls), bool)))
    return samples, background


# --------------------------------------------------------------------------- layout


def _split_dirs(root: Path) -> dict[str, Path]:
    out = {}
    for split, names in SPLIT_DIRS.items():
        for n in names:
            if (root / n).is_dir():
                out[split] = root / n
                break
    return out


def read_detection(
    root: str | Path,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    carve_splits: bool = True,
) -> DetectionSplits:
    """Read a detection dataset root.

    Layouts: ``root/{train,val,test}/`` each in one format (``valid`` is Roboflow's name for
    val); YOLO's ``root/images/{train,val}`` + ``root/labels/{train,val}``; or one pool at the
    root, carved into train/val/test by image with ``seed``. Class names come from the train
    split (sorted, or the YOLO names' order); a class that appears only in val/test is an error.
    ``carve_splits=False`` (``tl eval dataset.root=OTHER`` scores a folder whole): nothing is
    carved, a pool is all ``train`` and ``val`` is empty unless the root has a val/ folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TLError(f"dataset.root={root}: not a folder")
    checker = _Boxes()
    dirs = _split_dirs(root)
    yolo_split = (
        not dirs and (root / "images" / "train").is_dir() and (root / "labels" / "train").is_dir()
    )
    fmt_of: dict[str, str] = {}
    raw: dict[str, list[Sample]] = {}
    backgrounds: dict[str, int] = {}
    yolo_class_names: list[str] | None = None
    coco_ids: dict[int, str] | None = None
    coco_src: Path | None = None

    def read(split: str, folder: Path, fmt: str, img: Path | None = None, lbl: Path | None = None):
        nonlocal yolo_class_names, coco_ids, coco_src
        if fmt == "voc":
            samples, bg = read_voc(folder, checker)
        elif fmt == "coco":
            samples, bg, ids = read_coco(folder, checker)
            if coco_ids is None:
                coco_ids, coco_src = ids, coco_file(folder)
            else:
                _same_coco_ids(coco_ids, coco_src, ids, coco_file(folder))
        else:
            if yolo_class_names is None:
                yolo_class_names = yolo_names(folder, root)
                if yolo_class_names is None:
                    raise TLError(
                        f"{folder}: YOLO labels need class names: data.yaml ('names:') or "
                        f"classes.txt in {folder} or {root}"
                    )
            if img is None:
                img, lbl = yolo_dirs(folder)  # type: ignore[misc]
            samples, bg = read_yolo(img, lbl, yolo_class_names, checker)
        raw[split] = samples
        backgrounds[split] = bg
        fmt_of[split] = fmt

    if dirs:
        if "train" not in dirs:
            raise TLError(f"dataset.root={root}: has {', '.join(dirs)} but no train/ folder")
        for split, folder in dirs.items():
            fmt = detect_format(folder)
            if fmt is None:
                raise TLError(f"{folder}: no labels found ({_expected()})")
            read(split, folder, fmt)
    elif yolo_split:
        for split, names in SPLIT_DIRS.items():
            for n in names:
                img, lbl = root / "images" / n, root / "labels" / n
                if img.is_dir():
                    read(split, root, "yolo", img, lbl)
                    break
    else:
        fmt = detect_format(root)
        if fmt is None:
            raise TLError(f"dataset.root={root}: no detection labels found ({_expected()})")
        read("pool", root, fmt)
    formats = sorted(set(fmt_of.values()))
    if len(formats) > 1:
        detail = ", ".join(f"{s}={f}" for s, f in fmt_of.items())
        raise TLError(f"dataset.root={root}: mixed label formats ({detail}); use one format")
    fmt = formats[0]

    carved = "pool" in raw and carve_splits
    if not carve_splits:
        if "pool" in raw:
            raw["train"] = raw.pop("pool")
            backgrounds["train"] = backgrounds.pop("pool")
        raw.setdefault("val", [])
    elif carved:
        pool = raw.pop("pool")
        raw.update(carve(pool, val_fraction, test_fraction, seed, str(root)))
        bg = backgrounds.pop("pool")
        backgrounds = {s: sum(1 for x in v if x.num_boxes == 0) for s, v in raw.items()}
        assert sum(backgrounds.values()) == bg
    elif "val" not in raw:
        parts = carve(raw["train"], val_fraction, 0.0, seed, str(dirs.get("train", root)))
        raw["train"], raw["val"] = parts["train"], parts["val"]
        backgrounds = {s: sum(1 for x in v if x.num_boxes == 0) for s, v in raw.items()}

    train_names = {n for s in raw["train"] for n in s.names}
    if yolo_class_names is not None:
        class_names = list(yolo_class_names)
    elif coco_ids is not None:
        used = {n for v in raw.values() for s in v for n in s.names}
        class_names = [n for _, n in sorted(coco_ids.items()) if n in used]
    else:
        class_names = sorted(train_names)
    if not train_names:
        raise TLError(f"dataset.root={root}: the train split has no boxes")
    for split in ("val", "test"):
        for s in raw.get(split, []):
            unknown = [n for n in s.names if n not in train_names]
            if unknown:
                raise TLError(
                    f"{s.path}: class {unknown[0]!r} ({split}) never appears in train "
                    f"(train classes: {', '.join(sorted(train_names))})"
                )
    return DetectionSplits(fmt, class_names, raw, checker.clipped, backgrounds, carved)


def _same_coco_ids(a: dict[int, str], a_src: Path | None, b: dict[int, str], b_src: Path | None):
    """Each split's COCO file must map the same ids to the same names (Roboflow exports do)."""
    for cid, name in b.items():
        if cid in a and a[cid] != name:
            raise TLError(
                f"{b_src}: category id {cid} is {name!r} here but {a[cid]!r} in {a_src}; "
                "the splits' category ids do not match"
            )
    inv = {n: i for i, n in a.items()}
    for cid, name in b.items():
        if name in inv and inv[name] != cid:
            raise TLError(
                f"{b_src}: category {name!r} has id {cid} here but {inv[name]} in {a_src}; "
                "the splits' category ids do not match"
            )


def _expected() -> str:
    return (
        "expected Pascal VOC images/ + annotations/*.xml, COCO annotations.json or "
        "_annotations.coco.json beside the images, or YOLO images/ + labels/*.txt"
    )


def carve(
    samples: list[Sample], val_fraction: float, test_fraction: float, seed: int, where: str
) -> dict[str, list[Sample]]:
    """Split one pool by image, seeded: train / val (/ test when ``test_fraction`` > 0)."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise TLError(f"dataset.{name}={f} must be in [0, 1)")
    if val_fraction <= 0:
        raise TLError("dataset.val_fraction must be > 0 when the dataset has no val/ split")
    order = sorted(samples, key=lambda s: str(s.path))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise TLError(
            f"{where}: {n} images are too few for dataset.val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}"
        )
    out = {"val": order[:n_val], "train": order[n_val + n_test :]}
    if n_test:
        out["test"] = order[n_val : n_val + n_test]
    return {k: sorted(v, key=lambda s: str(s.path)) for k, v in out.items()}
