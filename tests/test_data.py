"""Image-folder layouts, the seeded stratified split, transforms from the backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tl_cli.core.errors import TLError
from tl_cli.modalities.image.data import (
    ImageFolderDataModule,
    SampleDataModule,
    eval_transform,
    load_image,
    train_transform,
)

from .conftest import make_image_folder

PREP = {
    "input_size": 32,
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


def dm(root: Path, **kw) -> ImageFolderDataModule:
    return ImageFolderDataModule(root=str(root), num_workers=0, **kw).prepare()


def test_layout_train_val_test(tmp_path):
    d = dm(make_image_folder(tmp_path, {"train": 5, "val": 2, "test": 3}))
    assert [len(d.splits[s]) for s in ("train", "val", "test")] == [15, 6, 9]
    assert d.class_names == ["cat", "dog", "fox"]


def test_layout_train_test_carves_val_stratified(tmp_path):
    d = dm(make_image_folder(tmp_path, {"train": 10, "test": 2}), val_fraction=0.2)
    val_labels = sorted(y for _, y in d.splits["val"])
    assert val_labels == [0, 0, 1, 1, 2, 2]  # 20% of 10 per class
    assert len(d.splits["train"]) == 24 and len(d.splits["test"]) == 6
    assert not set(p for p, _ in d.splits["val"]) & set(p for p, _ in d.splits["train"])


def test_layout_class_folders_only(tmp_path):
    d = dm(make_image_folder(tmp_path, {"": 10}))
    assert set(d.splits) == {"train", "val"} and len(d.splits["val"]) == 3


def test_split_is_seeded(tmp_path):
    root = make_image_folder(tmp_path, {"": 20})
    a = dm(root, split_seed=1).splits["val"]
    b = dm(root, split_seed=1).splits["val"]
    c = dm(root, split_seed=2).splits["val"]
    assert a == b and a != c


def test_all_extensions_and_modes_load_as_rgb(tmp_path):
    for cls in ("a", "b"):
        d = tmp_path / cls
        d.mkdir()
        Image.new("L", (8, 8), 100).save(d / "grey.jpg")
        Image.new("RGBA", (8, 8), (1, 2, 3, 128)).save(d / "rgba.png")
        Image.new("P", (8, 8)).save(d / "pal.bmp")
        Image.new("RGB", (8, 8)).save(d / "x.webp")
        Image.new("CMYK", (8, 8)).save(d / "cmyk.JPEG")
    d = dm(tmp_path)
    assert len(d.splits["train"]) + len(d.splits["val"]) == 10
    for p, _ in d.splits["train"] + d.splits["val"]:
        assert load_image(p).mode == "RGB"


def test_transforms_follow_preprocessing():
    img = Image.new("RGB", (50, 40), (255, 0, 0))
    x = eval_transform(PREP)(img)
    assert x.shape == (3, 32, 32)
    assert x[0].mean().item() == pytest.approx(1.0)  # (1 - 0.5) / 0.5
    assert train_transform(PREP)(img).shape == (3, 32, 32)


def _missing(r: Path) -> None:
    pass


def _empty_class(r: Path) -> None:
    make_image_folder(r, {"": 2})
    (r / "empty").mkdir()


def _single_class(r: Path) -> None:
    make_image_folder(r, {"": 2})
    for cls in ("dog", "fox"):
        for p in (r / cls).glob("*"):
            p.unlink()
        (r / cls).rmdir()


def _wrong_depth(r: Path) -> None:
    make_image_folder(r, {"": 2})
    Image.new("RGB", (4, 4)).save(r / "stray.png")


def _too_few_for_val(r: Path) -> None:
    make_image_folder(r, {"": 1})


@pytest.mark.parametrize(
    "setup,match",
    [
        (_missing, "does not exist"),
        (_empty_class, "no images"),
        (_single_class, "at least 2"),
        (_wrong_depth, "directly in this folder"),
        (_too_few_for_val, "needs at least 2 per class"),
    ],
    ids=["missing-root", "empty-class", "single-class", "wrong-depth", "too-few-for-val"],
)
def test_bad_layouts_name_the_path(tmp_path, setup, match):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(TLError, match=match) as e:
        dm(root)
    assert str(root) in str(e.value)


def test_val_test_classes_must_match_train(tmp_path):
    root = make_image_folder(tmp_path, {"train": 3, "val": 2})
    for p in (root / "val" / "fox").glob("*"):
        p.unlink()
    (root / "val" / "fox").rmdir()
    with pytest.raises(TLError, match="missing fox"):
        dm(root)


def test_sample_dataset_ships_with_the_package():
    d = SampleDataModule(num_workers=0).prepare()
    assert d.num_classes == 10 and len(d.splits["test"]) == 200
    assert len(d.splits["train"]) + len(d.splits["val"]) == 600
