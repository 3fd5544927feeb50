"""task=detection: format readers, box-aware transforms, the detector, cache, metrics, outputs."""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tl_cli.core.errors import TLError
from tl_cli.tasks.detection import metrics as M
from tl_cli.tasks.detection.dataset import DetectionDataset, collate
from tl_cli.tasks.detection.formats import read_detection
from tl_cli.tasks.detection.model import MultiScaleFeatures, build_detector
from tl_cli.tasks.detection.transforms import build_transforms, make_target

from .detection_data import SHAPES, make_images, write_coco, write_voc, write_yolo

ROOT = Path(__file__).resolve().parents[1]
RACCOON = ROOT.parent / "shared" / "data" / "detection-raccoon"
TINY_BACKBONE = {"name": "test_efficientnet", "source": "timm", "weights": "none"}


def _expected(items):
    return {p.name: sorted((n, x1, y1, x2, y2) for n, x1, y1, x2, y2 in objs) for p, objs in items}


def _read(split_samples):
    out = {}
    for s in split_samples:
        out[s.path.name] = sorted(
            (n, *(round(float(v), 3) for v in b)) for n, b in zip(s.names, s.boxes, strict=True)
        )
    return out


def _all(data):
    got = {}
    for v in data.splits.values():
        got.update(_read(v))
    return got


# --------------------------------------------------------------------------- readers


@pytest.mark.parametrize("fmt", ["voc", "coco", "yolo", "yolo_classes_txt"])
def test_reader_round_trip(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / fmt
    if fmt == "voc":
        items = write_voc(root, 12)
    elif fmt == "coco":
        items = write_coco(root, 12)
    elif fmt == "yolo":
        items = write_yolo(root, 12)
    else:
        items = write_yolo(root, 12, names_file="classes.txt")
    data = read_detection(root, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert data.format == fmt.split("_")[0]
    assert sorted(data.class_names) == sorted(SHAPES)
    assert data.carved and {len(v) for v in data.splits.values()} == {3, 6}
    want = _expected(items)
    got = _all(data)
    assert set(got) == set(want)
    for name, boxes in want.items():
        # YOLO stores normalised centres with 6 decimals: a small rounding error is expected
        tol = 0.01 if fmt.startswith("yolo") else 1e-6
        for (n1, *b1), (n2, *b2) in zip(boxes, got[name], strict=True):
            assert n1 == n2 and np.allclose(b1, b2, atol=tol)


def test_carving_is_seeded_and_by_image(tmp_path: Path) -> None:
    write_voc(tmp_path, 20)
    a = read_detection(tmp_path, 0.2, 0.2, seed=1)
    b = read_detection(tmp_path, 0.2, 0.2, seed=1)
    c = read_detection(tmp_path, 0.2, 0.2, seed=2)
    names = {k: [s.path.name for s in v] for k, v in a.splits.items()}
    assert names == {k: [s.path.name for s in v] for k, v in b.splits.items()}
    assert names != {k: [s.path.name for s in v] for k, v in c.splits.items()}
    flat = [n for v in names.values() for n in v]
    assert len(flat) == len(set(flat)) == 20


def test_no_carve_keeps_every_image(tmp_path: Path) -> None:
    """dm.carve = False (tl eval dataset.root=OTHER): a pool stays whole; split folders stay as
    given, with no val carved out of train."""
    from tl_cli.tasks.detection.data import DetectionData

    write_voc(tmp_path / "pool", 10)
    dm = DetectionData(str(tmp_path / "pool"))
    dm.carve = False
    dm.prepare()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 10, "val": 0}
    assert "scored whole" in dm.layout
    write_coco(tmp_path / "split" / "train", 6, seed=0)
    write_coco(tmp_path / "split" / "test", 3, seed=2)
    data = read_detection(tmp_path / "split", carve_splits=False)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 6, "test": 3, "val": 0}
    assert not data.carved


def test_split_folders_roboflow_coco(tmp_path: Path) -> None:
    write_coco(tmp_path / "train", 8, seed=0)
    write_coco(tmp_path / "valid", 3, seed=1)
    write_coco(tmp_path / "test", 3, seed=2)
    data = read_detection(tmp_path)
    assert not data.carved
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 8, "val": 3, "test": 3}
    assert data.class_names == ["red", "blue"]  # COCO id order


def test_yolo_images_labels_split_layout(tmp_path: Path) -> None:
    for split, n in (("train", 6), ("val", 2)):
        items = make_images(tmp_path / "images" / split, n, seed=len(split))
        (tmp_path / "labels" / split).mkdir(parents=True)
        for p, objs in items:
            lines = [f"{list(SHAPES).index(o[0])} 0.5 0.5 0.2 0.2" for o in objs]
            (tmp_path / "labels" / split / f"{p.stem}.txt").write_text("\n".join(lines))
    (tmp_path / "data.yaml").write_text("names:\n  0: red\n  1: blue\n")
    data = read_detection(tmp_path)
    assert data.format == "yolo" and data.class_names == ["red", "blue"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 6, "val": 2}


def test_difficult_objects_are_ignored(tmp_path: Path) -> None:
    write_voc(tmp_path, 10, difficult=True)
    data = read_detection(tmp_path)
    flags = np.concatenate([s.ignore for v in data.splits.values() for s in v])
    boxes = sum(s.num_boxes for v in data.splits.values() for s in v)
    assert flags.any() and flags.sum() < boxes


def test_background_images_are_counted_and_kept(tmp_path: Path) -> None:
    write_voc(tmp_path, 10)
    (tmp_path / "annotations" / "img_003.xml").unlink()
    data = read_detection(tmp_path)
    assert sum(data.backgrounds.values()) == 1
    s = next(s for v in data.splits.values() for s in v if s.path.name == "img_003.png")
    assert s.num_boxes == 0


# --------------------------------------------------------------------------- bad input


def _voc_box(root: Path, stem: str, box: tuple) -> None:
    x = root / "annotations" / f"{stem}.xml"
    text = x.read_text()
    start = text.index("<bndbox>")
    end = text.index("</bndbox>") + len("</bndbox>")
    new = "<bndbox>" + "".join(
        f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
    )
    x.write_text(text[:start] + new + "</bndbox>" + text[end:])


def test_box_outside_is_clipped_and_counted(tmp_path: Path) -> None:
    write_voc(tmp_path, 8)
    _voc_box(tmp_path, "img_000", (-5, 3, 120, 40))  # image is 96x72
    data = read_detection(tmp_path)
    assert data.clipped == 1
    s = next(s for v in data.splits.values() for s in v if s.path.name == "img_000.png")
    assert s.boxes[0].tolist() == [0.0, 2.0, 96.0, 40.0]


@pytest.mark.parametrize(
    ("box", "words"),
    [
        ((50, 10, 40, 30), "x2 <= x1"),
        ((200, 10, 300, 30), "outside"),
        ((5, 30, 40, 28), "x2 <= x1"),
    ],
)
def test_bad_boxes_refused(tmp_path: Path, box: tuple, words: str) -> None:
    write_voc(tmp_path, 6)
    _voc_box(tmp_path, "img_002", box)
    with pytest.raises(TLError, match=words) as e:
        read_detection(tmp_path)
    assert "img_002.xml" in str(e.value)


def test_missing_and_unreadable_images(tmp_path: Path) -> None:
    write_voc(tmp_path / "a", 6)
    (tmp_path / "a" / "images" / "img_001.png").unlink()
    with pytest.raises(TLError, match="img_001.*missing"):
        read_detection(tmp_path / "a")
    write_voc(tmp_path / "b", 6)
    (tmp_path / "b" / "images" / "img_001.png").write_bytes(b"not an image")
    with pytest.raises(TLError, match="img_001.png: not a readable image"):
        read_detection(tmp_path / "b")
    write_coco(tmp_path / "c", 6)
    (tmp_path / "c" / "img_004.png").unlink()
    with pytest.raises(TLError, match="img_004.png.*missing"):
        read_detection(tmp_path / "c")
    write_yolo(tmp_path / "d", 6)
    (tmp_path / "d" / "images" / "img_005.png").unlink()
    with pytest.raises(TLError, match="img_005.txt: its image"):
        read_detection(tmp_path / "d")


def test_unknown_class_in_val_refused(tmp_path: Path) -> None:
    write_voc(tmp_path / "train", 6)
    write_voc(tmp_path / "val", 3, seed=1)
    x = tmp_path / "val" / "annotations" / "img_001.xml"
    text = x.read_text()
    x.write_text(
        text.replace("<name>red</name>", "<name>green</name>").replace(
            "<name>blue</name>", "<name>green</name>"
        )
    )
    with pytest.raises(TLError, match="class 'green' \\(val\\) never appears in train"):
        read_detection(tmp_path)


def test_coco_category_ids_must_match(tmp_path: Path) -> None:
    write_coco(tmp_path / "train", 6, cat_ids={"red": 1, "blue": 2})
    write_coco(tmp_path / "valid", 3, seed=1, cat_ids={"red": 2, "blue": 1})
    with pytest.raises(TLError, match="category ids do not match"):
        read_detection(tmp_path)
    one = tmp_path / "one"
    write_coco(one, 4)
    f = one / "_annotations.coco.json"
    doc = json.loads(f.read_text())
    doc["annotations"][0]["category_id"] = 7
    f.write_text(json.dumps(doc))
    with pytest.raises(TLError, match="category_id 7, not in categories"):
        read_detection(one)


def test_mixed_formats_refused(tmp_path: Path) -> None:
    write_voc(tmp_path / "train", 6)
    write_coco(tmp_path / "val", 3)
    with pytest.raises(TLError, match="mixed label formats"):
        read_detection(tmp_path)
    write_voc(tmp_path / "both", 4)
    write_yolo(tmp_path / "both", 4)
    with pytest.raises(TLError, match="mixed label formats \\(voc and yolo\\)"):
        read_detection(tmp_path / "both")


def test_xml_entities_are_never_expanded(tmp_path: Path) -> None:
    write_voc(tmp_path, 4)
    x = tmp_path / "annotations" / "img_000.xml"
    x.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e "red">]>' + x.read_text())
    with pytest.raises(TLError, match="DOCTYPE/ENTITY declaration is refused"):
        read_detection(tmp_path)


def test_no_labels_found(tmp_path: Path) -> None:
    make_images(tmp_path / "images", 3)
    with pytest.raises(TLError, match="no detection labels found"):
        read_detection(tmp_path)


# --------------------------------------------------------------------------- transforms


def test_eval_resize_scales_boxes(tmp_path: Path) -> None:
    items = write_voc(tmp_path, 4, size=(100, 60))
    data = read_detection(tmp_path, 0.25, 0.25)
    ds = DetectionDataset(data.splits["train"], data.class_names, image_size=200)
    img, t = ds[0]
    assert tuple(img.shape[-2:]) == (120, 200) and img.dtype == torch.float32
    assert torch.allclose(t["scale"], torch.tensor([2.0, 2.0]))
    orig = {p.name: o for p, o in items}[data.splits["train"][0].path.name]
    want = torch.tensor([[x1, y1, x2, y2] for _, x1, y1, x2, y2 in orig], dtype=torch.float32) * 2
    got = t["boxes"][t["labels"].argsort()] if len(orig) > 1 else t["boxes"]
    assert torch.allclose(got.sort(0).values, want.sort(0).values, atol=1e-4)


def test_augmentation_keeps_boxes_on_the_object() -> None:
    """Draw a filled box, augment many times: the transformed box bounds the transformed mask."""
    h, w = 90, 140
    box = (30, 20, 100, 70)
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[:, box[1] : box[3], box[0] : box[2]] = 255
    tf = build_transforms(128, train=True, augment="default")
    torch.manual_seed(0)
    checked = 0
    for _ in range(40):
        out, t = tf(img, make_target([box], [1], [False], h, w))
        assert max(out.shape[-2:]) <= 128 * 1.0 + 1e-6
        if len(t["boxes"]) == 0:
            continue  # the crop cut the object off entirely (sanitised away)
        mask = out[0] > 0.5
        ys, xs = torch.nonzero(mask, as_tuple=True)
        got = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(t["boxes"][0].as_subclass(torch.Tensor), got, atol=2.0), (
            t["boxes"],
            got,
        )
        checked += 1
    assert checked >= 30


# --------------------------------------------------------------------------- model


def test_multiscale_features_timm_and_torchvision() -> None:
    from tl_cli.modalities.backbones import build_backbone

    bb = build_backbone(TINY_BACKBONE, pretrained=False)
    f = MultiScaleFeatures(bb)
    maps = f(torch.zeros(1, 3, 96, 64))
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(12, 8), (6, 4), (3, 2)]
    assert [m.shape[1] for m in maps.values()] == f.out_channels
    rn = build_backbone({"name": "resnet18", "weights": "none"}, pretrained=False)
    f2 = MultiScaleFeatures(rn)
    maps = f2(torch.zeros(1, 3, 64, 64))
    assert f2.names == ["layer2", "layer3", "layer4"] and f2.out_channels == [128, 256, 512]
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(8, 8), (4, 4), (2, 2)]
    vit = build_backbone({"name": "vit_b_16", "weights": "none"}, pretrained=False)
    with pytest.raises(TLError, match="convolutional backbone"):
        MultiScaleFeatures(vit)


def _batch(n: int = 2):
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 96), torch.rand(3, 96, 64)][:n]
    targets = [
        {
            "boxes": torch.tensor([[8.0, 8, 40, 30], [50, 10, 90, 60]]),
            "labels": torch.tensor([1, 2]),
            "ignore": torch.tensor([False, True]),
        },
        {
            "boxes": torch.tensor([[10.0, 20, 50, 80]]),
            "labels": torch.tensor([2]),
            "ignore": torch.tensor([False]),
        },
    ][:n]
    return images, targets


@pytest.mark.parametrize("head", ["fcos", "retinanet", "fasterrcnn"])
def test_heads_train_and_detect_and_cache_path_matches_live(head: str) -> None:
    det = build_detector(TINY_BACKBONE, ["red", "blue"], head, 96, 32, 1, pretrained=False)
    images, targets = _batch()
    det.train()
    torch.manual_seed(1)
    losses = det(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    det.eval()
    with torch.no_grad():
        live = det(images)
        # per-image maps, as the cache stores them, padded back into a batch
        per = []
        for img in images:
            m, _ = det.body_maps([img])
            per.append(OrderedDict((k, v[0]) for k, v in m.items()))
        from tl_cli.tasks.detection.model import pad_maps

        cached = det.detect(pad_maps(per), [tuple(i.shape[-2:]) for i in images])
    for a, b in zip(live, cached, strict=True):
        assert set(a) >= {"boxes", "scores", "labels"}
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4)
        assert torch.allclose(a["scores"], b["scores"], atol=1e-5)


def test_frozen_batchnorm_in_backbone() -> None:
    from timm.layers import FrozenBatchNormAct2d

    det = build_detector(TINY_BACKBONE, ["a"], "fcos", 64, 32, 1, pretrained=False)
    body = det.body
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNormAct2d) for m in body.modules())


def test_coco_detector_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tl_cli.core import network

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(
        network, "probe", lambda url, timeout=3.0: "download.pytorch.org unreachable"
    )
    t = time.time()
    with pytest.raises(
        TLError, match="cannot download pretrained weights for torchvision detector"
    ):
        build_detector(
            {"name": "fasterrcnn_mobilenet_v3_large_320_fpn"}, ["a", "b"], image_size=320
        )
    assert time.time() - t < 10


def test_coco_detector_gets_a_new_box_predictor() -> None:
    det = build_detector(
        {"name": "fasterrcnn_mobilenet_v3_large_320_fpn"},
        ["a", "b"],
        image_size=160,
        pretrained=False,
    )
    assert det.det.roi_heads.box_predictor.cls_score.out_features == 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in det.body.modules())
    assert det.det.transform.max_size == 160
    det.eval()
    with torch.no_grad():
        out = det([torch.rand(3, 120, 160)])
    assert out[0]["boxes"].shape[-1] == 4


# --------------------------------------------------------------------------- metrics and outputs


def test_metrics_ignore_difficult_and_error_analysis(tmp_path: Path) -> None:
    preds = [
        {
            "boxes": torch.tensor([[10.0, 10, 50, 50], [60, 60, 90, 90], [0, 0, 8, 8]]),
            "scores": torch.tensor([0.9, 0.8, 0.7]),
            "labels": torch.tensor([1, 1, 1]),
        },
        {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        },
    ]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 10, 50, 50], [60, 60, 90, 90]]),
            "labels": torch.tensor([1, 1]),
            "ignore": torch.tensor([False, True]),
        },
        {
            "boxes": torch.tensor([[5.0, 5, 30, 30]]),
            "labels": torch.tensor([1]),
            "ignore": torch.tensor([False]),
        },
    ]
    m = M.make_metric(extended=True)
    m.update(*M.metric_inputs(preds, targets))
    r = m.compute()
    flat = M.summarise(r, ["thing"], "test")
    # 2 scored boxes; one hit at rank 1, the other missed; the det on the difficult box is
    # neither; the small det is a false positive ranked after the hit
    assert flat["test/map_50"] == pytest.approx(0.5, abs=0.01)
    assert set(flat) >= {"test/map", "test/map_50", "test/map_75", "test/mar_100", "test/ap/thing"}
    curves = M.pr_curves(r, ["thing"])
    assert M.ap50_per_class(curves)["thing"] == pytest.approx(0.5, abs=0.01)
    png = M.plot_pr(curves, tmp_path / "pr.png")
    assert png.stat().st_size > 1000
    ea = M.error_analysis(preds, targets, ["a.jpg", "b.jpg"], score_threshold=0.5)
    assert ea["most_missed"] == [
        {"image": "b.jpg", "boxes": 1, "hits": 0, "missed": 1, "spurious": 0}
    ]
    assert ea["most_spurious"] == [
        {"image": "a.jpg", "boxes": 2, "hits": 1, "missed": 0, "spurious": 1}
    ]
    drawn = [
        M.draw(torch.zeros(3, 100, 120, dtype=torch.uint8), p, ["thing"], t)
        for p, t in zip(preds, targets, strict=True)
    ]
    g = M.grid(drawn, tmp_path / "grid.png", size=64)
    assert Image.open(g).size[0] > 64


def test_prediction_rows_and_coco_results_in_original_pixels(tmp_path: Path) -> None:
    from tl_cli.tasks.detection.outputs import coco_results, detect_files, rows, save_drawn

    class Fixed(torch.nn.Module):
        """Returns one box at a fixed place of the resized image."""

        training = False

        def forward(self, images):
            return [
                {
                    "boxes": torch.tensor([[10.0, 20, 50, 40]]),
                    "scores": torch.tensor([0.9]),
                    "labels": torch.tensor([2]),
                }
                for _ in images
            ]

    p = tmp_path / "x.png"
    Image.fromarray(np.zeros((50, 200, 3), np.uint8)).save(p)  # resized to 100x25: scale 0.5
    out = list(detect_files(Fixed(), [p], image_size=100))
    path, raw, det = out[0]
    assert tuple(raw.shape) == (3, 50, 200)
    r = rows(path, det, ["a", "b"], 0.5)
    assert r == [
        {
            "path": str(p),
            "label": "b",
            "score": 0.9,
            "x1": 20.0,
            "y1": 40.0,
            "x2": 100.0,
            "y2": 50.0,
        }
    ]
    assert rows(path, det, ["a", "b"], 0.95) == []
    c = coco_results([det], [7], ["a", "b"], {"a": 3, "b": 9})
    assert c == [{"image_id": 7, "category_id": 9, "bbox": [20.0, 40.0, 80.0, 10.0], "score": 0.9}]
    drawn = save_drawn(raw, det, ["a", "b"], tmp_path / "out" / "x.png")
    assert drawn.is_file()
    with pytest.raises(TLError, match="exists"):
        save_drawn(raw, det, ["a", "b"], drawn)


# --------------------------------------------------------------------------- end to end


def test_tiny_end_to_end_train_eval_predict_export(tmp_path: Path) -> None:
    """tl train task=detection (frozen bundled backbone, cached maps, FCOS) on coloured shapes
    (the boxes are learnable), then tl eval, tl predict (original pixels, drawn copies) and
    tl export (ONNX, any batch), all through the unchanged commands."""
    import onnxruntime as ort
    from omegaconf import open_dict
    from torchvision.ops import box_iou

    from tl_cli.commands import evaluate, export, predict
    from tl_cli.commands.train import run
    from tl_cli.tasks.detection.task import DetectionTask
    from tl_cli.tasks.loading import load_module

    from .conftest import compose_cfg, run_cfg

    write_voc(tmp_path / "data", 36, size=(96, 72))
    cfg = compose_cfg(
        [
            "task=detection",
            f"dataset.root={tmp_path / 'data'}",
            "dataset.image_size=96",
            "dataset.cache_views=2",
            "head.fpn_channels=64",  # GroupNorm(32) of a 1x1 P7 map needs 2+ channels per group
            "head.head_convs=2",
            "trainer.max_epochs=6",
            "trainer.accelerator=cpu",
            "fail_under.map_50=0.3",
        ]
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    metrics = run(cfg)
    assert metrics["task"] == "detection" and metrics["test/map_50"] > 0.3, metrics
    assert {"val/map_50", "test/map", "test/map_75", "test/mar_100"} <= set(metrics)
    assert metrics["class_names"] == ["__background__", "blue", "red"]
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    module, _ = load_module(ckpt)
    assert isinstance(module, DetectionTask)

    res = evaluate.run(run_cfg([f"checkpoint={ckpt}"], tmp_path / "ev", "eval"))
    assert res["map_50"] == pytest.approx(metrics["test/map_50"], abs=1e-4)
    for f in ("pr_curve.png", "test_detections.png", "report.md"):
        assert (tmp_path / "ev" / f).is_file()
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "Per-class AP" in report and "most missed" in report
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {r["class"] for r in saved["per_class"]} == {"blue", "red"}

    # another folder (one pool of VOC files): read as boxes, scored whole, nothing carved
    write_voc(tmp_path / "other", 9, seed=5, size=(96, 72))
    res = evaluate.run(
        run_cfg(
            [f"checkpoint={ckpt}", f"dataset.root={tmp_path / 'other'}"], tmp_path / "ev2", "eval"
        )
    )
    assert res["split"] == "all" and res["num_samples"] == 9, res

    images = tmp_path / "data" / "images"
    out = tmp_path / "preds.csv"
    predict.run(
        run_cfg(
            [f"checkpoint={ckpt}", f"inputs={images}", f"output={out}", "draw=true"],
            tmp_path / "pr",
            "predict",
        )
    )
    import csv

    rows = list(csv.DictReader(out.open()))
    assert rows and set(rows[0]) >= {"path", "label", "score", "x1", "y1", "x2", "y2"}
    # boxes come back in original pixels: each image's best box overlaps one of its true boxes
    data = read_detection(tmp_path / "data", 0.15, 0.15)
    truth = {s.path.name: s for v in data.splits.values() for s in v}
    best: dict[str, list[float]] = {}
    for r in rows:
        name = Path(r["path"]).name
        if name not in best or float(r["score"]) > best[name][4]:
            best[name] = [float(r[k]) for k in ("x1", "y1", "x2", "y2", "score")]
    hits = sum(
        int(box_iou(torch.tensor([b[:4]]), torch.as_tensor(truth[n].boxes)).max() > 0.5)
        for n, b in best.items()
    )
    assert hits >= 0.6 * len(best)
    assert len(list((tmp_path / "preds_drawn").glob("*.png"))) == len(best)

    onnx = tmp_path / "det.onnx"
    got = export.run(
        run_cfg([f"checkpoint={ckpt}", "format=onnx", f"output={onnx}"], tmp_path / "ex", "export")
    )
    assert got["passed"] is True
    side = json.loads(onnx.with_suffix(".json").read_text())
    assert side["output"]["name"] == "detections" and side["class_names"][1:] == ["blue", "red"]
    # on real images the graph agrees with the eager detector (torchvision's post-processing)
    sess = ort.InferenceSession(str(onnx))
    ds = DetectionDataset(data.splits["test"], ["blue", "red"], 96)
    mean = torch.tensor(side["preprocessing"]["mean"]).view(3, 1, 1)
    std = torch.tensor(side["preprocessing"]["std"]).view(3, 1, 1)
    batch, eager = [], []
    for i in range(len(ds)):
        img = ds[i][0]
        x = torch.zeros(3, 96, 96)
        x[:, : img.shape[1], : img.shape[2]] = (img - mean) / std
        batch.append(x)
        with torch.no_grad():
            eager.append(module.detector([img])[0])
    dets = sess.run(None, {"image": torch.stack(batch).numpy()})[0]  # the whole split at once
    compared = 0
    for d, e in zip(dets, eager, strict=True):
        keep = e["scores"] >= 0.3
        mine = d[d[:, 4] >= 0.3]
        assert len(mine) == int(keep.sum())
        if len(mine):
            assert np.allclose(mine[:, :4], e["boxes"][keep].numpy(), atol=0.05)
            assert np.allclose(mine[:, 5], e["labels"][keep].numpy())
            compared += len(mine)
    assert compared > 0


def test_finetune_trains_the_backbone_from_the_first_epoch(tmp_path: Path) -> None:
    """tl finetune task=detection: no L-BFGS head fit, so no head-only epoch; the backbone moves
    except its stem and stride-2/4 stages."""
    from omegaconf import open_dict

    from tl_cli.commands.train import run
    from tl_cli.tasks.loading import load_module

    from .conftest import compose_cfg

    write_voc(tmp_path / "data", 16, size=(64, 48))
    cfg = compose_cfg(
        [
            "task=detection",
            f"dataset.root={tmp_path / 'data'}",
            "dataset.image_size=64",
            "head.fpn_channels=64",
            "head.head_convs=1",
            "trainer.max_epochs=2",
            "trainer.accelerator=cpu",
        ],
        config_name="finetune",
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    metrics = run(cfg)
    assert metrics["epochs"] == 2 and len(metrics["history"]) == 2
    assert "stages" not in metrics  # no head-only stage
    tuned, _ = load_module(tmp_path / "run" / "checkpoints" / "best.ckpt")
    from tl_cli.modalities.backbones import build_backbone

    fresh = build_backbone({"name": "efficientnet_lite0"})
    a = dict(fresh.named_parameters())
    moved = [n for n, p in tuned.backbone.named_parameters() if not torch.equal(p, a[n])]
    assert moved
    # the stem and the stride-2/4 stages stay as pretrained (torchvision's trainable layers)
    early = ("model.conv_stem.", "model.bn1.", "model.blocks.0.", "model.blocks.1.")
    assert not [n for n in moved if n.startswith(early)], moved
    assert any(n.startswith("model.blocks.2.") for n in moved)


def test_collate_keeps_lists(tmp_path: Path) -> None:
    write_voc(tmp_path, 4)
    data = read_detection(tmp_path, 0.25, 0.25)
    ds = DetectionDataset(data.splits["train"], data.class_names, 64, train=True)
    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2


@pytest.mark.slow
def test_raccoon_reads_as_voc() -> None:
    if not RACCOON.is_dir():
        if os.environ.get("TL_REQUIRE_SHARED") == "1":
            pytest.fail(f"TL_REQUIRE_SHARED=1 but {RACCOON} is missing")
        pytest.skip(f"{RACCOON} not present")
    data = read_detection(RACCOON)
    assert data.format == "voc" and data.class_names == ["raccoon"]
    assert sum(len(v) for v in data.splits.values()) == 200
    assert sum(s.num_boxes for v in data.splits.values() for s in v) == 217


def test_finetune_lr_mults_auto_keep_the_measured_defaults_for_detection(tmp_path):
    """Detection heads start at random (no L-BFGS fit): backbone x 0.1, head x 1.0, as measured."""
    from tl_cli.run.training import build

    from .conftest import compose_cfg

    write_voc(tmp_path / "data", 6, size=(64, 48))
    module, _ = build(
        compose_cfg(
            [
                "task=detection",
                "strategy=finetune",
                f"dataset.root={tmp_path / 'data'}",
                "dataset.image_size=64",
                "head.fpn_channels=64",
            ]
        )
    )
    assert module.strategy.head_fit == "sgd"
    assert (module.strategy.backbone_lr_mult, module.strategy.head_lr_factor) == (0.1, 1.0)
