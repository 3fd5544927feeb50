"""Bad data (issue 5): corrupt images, odd formats, decompression bombs, bad layouts, class mismatch.

Every failure must be one clear line naming the file or value at fault; corrupt images are found
before training starts, or skipped with dataset.skip_corrupt=true and counted in metrics.json.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict
from PIL import Image

from tests.conftest import TINY, compose_cfg, make_image_folder, run_tl
from tl_cli.core.errors import TLError
from tl_cli.data.scan import check_image, scan_images
from tl_cli.modalities.image.data import ImageFolderDataModule, load_image


def _dm(root: Path, **kw) -> ImageFolderDataModule:
    return ImageFolderDataModule(root=str(root), num_workers=0, **{"val_fraction": 0.25, **kw})


def _jpeg_bytes(size=(48, 40), color=(200, 30, 30)) -> bytes:
    rng = np.random.default_rng(1)
    arr = np.clip(
        np.array(color)[None, None, :] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255
    ).astype("uint8")
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=90)
    return b.getvalue()


def _png_bytes(size=(48, 40)) -> bytes:
    rng = np.random.default_rng(2)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(b, "PNG")
    return b.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG file that declares w x h pixels (a decompression-bomb shape) without the data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


BAD = {
    "truncated.jpg": lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2],
    "no_eoi.jpg": lambda: _jpeg_bytes()[:-2],
    "truncated.png": lambda: _png_bytes()[: len(_png_bytes()) // 2],
    "bad_crc.png": lambda: _flip(_png_bytes(), 60),
    "empty.png": lambda: b"",
    "notes.jpg": lambda: b"this is a text file, not a JPEG\n",
    "bomb.png": lambda: _png_header_only(20000, 20000),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", sorted(BAD))
def test_check_image_flags_each_kind_of_bad_file(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(BAD[name]())
    reason = check_image(p)
    assert reason, f"{name} passed the scan"
    expected = {
        "empty.png": "empty file",
        "notes.jpg": "not an image",
        "bomb.png": "decompression bomb",
    }.get(name, "corrupt or truncated")
    assert expected in reason


@pytest.mark.parametrize("name", sorted(BAD))
def test_corrupt_image_fails_before_training_naming_the_file(tmp_path: Path, name: str) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 4})
    bad = root / "train" / "dog" / name
    bad.write_bytes(BAD[name]())
    with pytest.raises(TLError) as e:
        _dm(root).prepare()
    msg = str(e.value)
    assert msg.startswith(str(bad)) and "\n" not in msg
    assert "dataset.skip_corrupt=true" in msg
    assert e.value.exit_code == 2


def test_many_corrupt_images_are_counted_in_the_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 4})
    for name in ("a.png", "b.png", "c.png"):
        (root / "train" / "cat" / name).write_bytes(b"")
    with pytest.raises(TLError, match=r"and 2 more unreadable image\(s\)"):
        _dm(root).prepare()


def test_val_and_test_splits_are_scanned_too(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 4, "test": 2})
    bad = root / "test" / "fox" / "x.png"
    bad.write_bytes(b"")
    with pytest.raises(TLError, match=str(bad)):
        _dm(root).prepare()


def test_scan_finds_nothing_wrong_in_good_images(tmp_path: Path) -> None:
    # 90 files: the threaded path is eligible
    root = make_image_folder(tmp_path / "data", {"train": 30})
    files = sorted(root.rglob("*.png"))
    assert scan_images(files) == [] and scan_images(files, workers=2) == []
    (root / "train" / "cat" / "cat_007.png").write_bytes(b"")
    bad = scan_images(sorted(root.rglob("*.png")), workers=2)
    assert [Path(b.path).name for b in bad] == ["cat_007.png"]


def test_skip_corrupt_skips_with_a_warning_and_counts_in_metrics(tmp_path: Path, capsys) -> None:
    from tl_cli.commands.train import run

    root = make_image_folder(tmp_path / "data", {"train": 8, "test": 2})
    bad = {}
    for i, name in enumerate(["truncated.jpg", "empty.png", "notes.jpg", "bomb.png"]):
        cls = ["cat", "dog", "fox"][i % 3]
        p = root / "train" / cls / name
        p.write_bytes(BAD[name]())
        bad[str(p)] = name
    cfg = compose_cfg(
        [*TINY, f"dataset.root={root}", "dataset.skip_corrupt=true", "trainer.max_epochs=1"]
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    metrics = run(cfg)
    err = capsys.readouterr().err
    assert "skipping 4 unreadable image(s)" in err
    for p in bad:
        assert f"skipped {p}:" in err
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["skipped_corrupt"] == 4 == metrics["skipped_corrupt"]
    assert sorted(saved["skipped_corrupt_files"]) == sorted(bad)
    # 8 good images x 3 classes, the bad ones left out
    assert saved["train_size"] + saved["val_size"] == 24


def test_skipped_files_are_named_in_the_run_log_too(tmp_path: Path, capsys) -> None:
    """Hydra's job logging gives the root logger a file handler (RUN/<command>.log): the skipped
    files are listed there as well as on stderr, so the run's record says what it left out."""
    import logging

    from tl_cli.data.scan import BadImage, warn_skipped

    log = tmp_path / "zeroshot.log"
    handler = logging.FileHandler(log)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        warn_skipped([BadImage(str(tmp_path / "cat" / "t.jpg"), "truncated")], tmp_path)
    finally:
        root.removeHandler(handler)
        handler.close()
    text = log.read_text()
    assert f"skipping 1 unreadable image(s) under {tmp_path}" in text
    assert f"skipped {tmp_path / 'cat' / 't.jpg'}: truncated" in text
    assert "skipping 1 unreadable image(s)" in capsys.readouterr().err


def test_skip_corrupt_still_fails_when_a_class_has_no_readable_image(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 3})
    (root / "train" / "wolf").mkdir()
    (root / "train" / "wolf" / "a.png").write_bytes(b"")
    with pytest.raises(TLError, match=r"wolf: class folder has no readable images"):
        _dm(root, skip_corrupt=True).prepare()


def test_good_run_records_zero_skipped(tiny_cfg) -> None:
    from tl_cli.commands.train import run

    metrics = run(tiny_cfg("trainer.max_epochs=1"))
    assert metrics["skipped_corrupt"] == 0 and metrics["skipped_corrupt_files"] == []


def test_cli_corrupt_image_is_one_line_exit_2_no_traceback(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 4})
    bad = root / "train" / "cat" / "half.jpg"
    bad.write_bytes(BAD["truncated.jpg"]())
    r = run_tl("train", *TINY, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"tl: error: {bad}: corrupt or truncated image"
    ), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training


# --------------------------------------------------------------------------- odd formats


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _close(a, b, tol=12) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def test_odd_formats_load_as_rgb(tmp_path: Path) -> None:
    red = (220, 20, 20)
    rgba = Image.new("RGBA", (8, 8), (*red, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent -> white background
    pal_t = Image.new("P", (8, 8), 1)
    pal_t.putpalette([0, 0, 0, *red] + [0] * 762)
    pal_t.putpixel((0, 0), 0)
    cases = {
        "grey.png": (_save(Image.new("L", (8, 8), 128), tmp_path / "grey.png"), (128, 128, 128)),
        "grey_alpha.png": (
            _save(Image.new("LA", (8, 8), (128, 255)), tmp_path / "grey_alpha.png"),
            (128, 128, 128),
        ),
        "bilevel.png": (
            _save(Image.new("1", (8, 8), 1), tmp_path / "bilevel.png"),
            (255, 255, 255),
        ),
        "cmyk.jpg": (
            _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95),
            (255, 0, 0),
        ),
        "rgba.png": (_save(rgba, tmp_path / "rgba.png"), red),
        "palette.png": (
            _save(
                Image.new("RGB", (8, 8), red).convert("P", palette=Image.Palette.ADAPTIVE),
                tmp_path / "palette.png",
            ),
            red,
        ),
        "palette_transparent.png": (
            _save(pal_t, tmp_path / "palette_transparent.png", transparency=0),
            red,
        ),
        "sixteen_bit.png": (
            _save(
                Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)),
                tmp_path / "sixteen_bit.png",
            ),
            (255, 255, 255),
        ),
        "sixteen_bit_mid.png": (
            _save(
                Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)),
                tmp_path / "sixteen_bit_mid.png",
            ),
            (128, 128, 128),
        ),
        "image.webp": (
            _save(Image.new("RGB", (8, 8), red), tmp_path / "image.webp", lossless=True),
            red,
        ),
        "image.bmp": (_save(Image.new("RGB", (8, 8), red), tmp_path / "image.bmp"), red),
    }
    for name, (path, expected) in cases.items():
        assert check_image(path) is None, f"{name}: a valid image was flagged by the scan"
        im = load_image(path)
        assert im.mode == "RGB" and im.size == (8, 8), name
        assert _close(im.getpixel((4, 4)), expected), (name, im.getpixel((4, 4)), expected)
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "palette_transparent.png").getpixel((0, 0)) == (255, 255, 255)
    with Image.open(tmp_path / "sixteen_bit.png") as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file


def test_every_still_image_format_pillow_reads_is_a_class_image(tmp_path: Path, capsys) -> None:
    """Issue 29: AT&T/ORL faces (.pgm) were refused ("class folder has no images (.jpg, ...)");
    microscopy comes as 16-bit .tif, scans as .ppm, web images as .gif. Images are told by
    Pillow (extension or content); other files are skipped and counted, never read as images."""
    grey16 = np.linspace(0, 4000, 64, dtype=np.uint16).reshape(8, 8)
    for cls, shade in (("s1", 60), ("s2", 200)):
        d = tmp_path / cls
        d.mkdir()
        Image.new("L", (8, 8), shade).save(d / "face.pgm")
        Image.new("RGB", (8, 8), (shade, 0, 0)).save(d / "scan.ppm")
        Image.fromarray(grey16 + shade).save(d / "cells.tif")  # 16-bit greyscale TIFF
        Image.new("RGB", (8, 8), (0, shade, 0)).convert("P").save(d / "web.gif")
        Image.new("CMYK", (8, 8), (0, shade, 0, 0)).save(d / "print.tiff")
        Image.new("F", (8, 8), shade / 255).save(d / "float.tif")  # 32-bit float in [0, 1]
        Image.new("RGB", (8, 8), (shade,) * 3).save(d / "no_extension", format="PNG")
        (d / "notes.txt").write_text("not an image")
        (d / "labels.csv").write_text("a,b\n")
    data = _dm(tmp_path)
    data.prepare()
    files = sorted(Path(p).name for p, _ in data.splits["train"] + data.splits["val"])
    assert len(files) == 14 and "notes.txt" not in files and "labels.csv" not in files
    assert files.count("face.pgm") == 2 and files.count("no_extension") == 2
    assert "skipped 4 file(s) that are not images" in capsys.readouterr().out
    assert data.skipped_other == 4
    for p, _ in data.splits["train"] + data.splits["val"]:
        im = load_image(p)
        assert im.mode == "RGB" and im.size == (8, 8), p
    with Image.open(tmp_path / "s1" / "cells.tif") as raw:
        assert raw.mode.startswith("I;16")  # really 16 bits
    # 16-bit scales from its full range; float from [0, 1]
    assert load_image(tmp_path / "s1" / "cells.tif").getpixel((7, 7))[0] == round(
        4060 / 65535 * 255
    )
    assert _close(load_image(tmp_path / "s2" / "float.tif").getpixel((0, 0)), (200, 200, 200), 1)


def test_a_folder_of_only_non_images_names_what_it_reads(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "readme.md").write_text("# not an image")
    with pytest.raises(TLError, match=r"class folder has no images \(any still image Pillow reads"):
        _dm(tmp_path).prepare()


def test_predict_finds_images_by_format_not_a_short_extension_list(tmp_path: Path) -> None:
    from tl_cli.modalities.base import get_modality

    Image.new("L", (8, 8), 9).save(tmp_path / "face.pgm")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo", format="JPEG")
    (tmp_path / "notes.txt").write_text("x")
    found = get_modality("image").find(str(tmp_path))
    assert [Path(f).name for f in found] == ["face.pgm", "photo"]


def test_exif_rotated_jpeg_is_upright(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 230))
    img.paste((230, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    assert check_image(path) is None
    im = load_image(path)
    assert im.size == (20, 40)  # portrait once rotated
    assert _close(im.getpixel((10, 5)), (230, 0, 0), 30)  # the left half is now on top
    assert _close(im.getpixel((10, 35)), (0, 0, 230), 30)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("w,h", [(10000, 10000), (20000, 20000)])  # over 1x and over 2x PIL's limit
def test_decompression_bomb_is_refused_with_a_clear_message(tmp_path: Path, w: int, h: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(w, h))
    assert path.stat().st_size < 200  # tiny file, huge image
    with pytest.raises(TLError) as e:
        load_image(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "decompression bomb" in msg and "\n" not in msg
    assert "decompression bomb" in (check_image(path) or "")


# --------------------------------------------------------------------------- layouts


def test_empty_class_folder(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 3})
    (root / "train" / "empty").mkdir()
    with pytest.raises(TLError, match=rf"{root / 'train' / 'empty'}: class folder has no images"):
        _dm(root).prepare()


def test_single_class(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_image_folder(root, {"train": 3})
    for cls in ("dog", "fox"):
        for p in (root / "train" / cls).iterdir():
            p.unlink()
        (root / "train" / cls).rmdir()
    with pytest.raises(TLError, match=r"found 1 class folder\(s\); a classifier needs at least 2"):
        _dm(root).prepare()


def test_val_fraction_leaving_a_class_without_validation_image(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 3})
    for p in sorted((root / "train" / "fox").iterdir())[1:]:
        p.unlink()  # fox keeps one image: nothing left to validate on
    with pytest.raises(
        TLError, match=r"class 'fox' has 1 image; dataset.val_fraction=0.25 needs at least 2"
    ):
        _dm(root).prepare()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_val_fraction_out_of_range(tmp_path: Path, fraction: float) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 3})
    with pytest.raises(TLError, match=rf"dataset.val_fraction={fraction} must be between 0 and 1"):
        _dm(root, val_fraction=fraction).prepare()


def test_tiny_val_fraction_still_gives_every_class_a_validation_image(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 5})
    dm = _dm(root, val_fraction=0.01).prepare()
    assert sorted({y for _, y in dm.splits["val"]}) == [0, 1, 2]


def test_val_folder_with_different_classes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 3, "val": 2})
    (root / "val" / "fox").rename(root / "val" / "wolf")
    with pytest.raises(
        TLError, match=r"class folders differ from .*train: missing fox; extra wolf"
    ):
        _dm(root).prepare()


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(TLError, match=r"dataset.root is not set"):
        ImageFolderDataModule(root=None).prepare()
    with pytest.raises(TLError, match=rf"dataset.root={tmp_path / 'nope'} does not exist"):
        _dm(tmp_path / "nope").prepare()
    (tmp_path / "file").write_text("x")
    with pytest.raises(TLError, match=r"is not a directory"):
        _dm(tmp_path / "file").prepare()


def test_cli_without_dataset_root_is_one_clear_line(tmp_path: Path) -> None:
    r = run_tl("train", "dataset=imagefolder", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset.root" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_images_directly_in_train_folder(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 3})
    for p in (root / "train" / "cat").iterdir():
        p.rename(root / "train" / p.name)
    (root / "train" / "cat").rmdir()
    with pytest.raises(TLError, match=rf"{root / 'train'}: 3 image\(s\) directly in this folder"):
        _dm(root).prepare()


def test_flat_folder_of_images(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(root / f"{i}.png")
    with pytest.raises(TLError, match=rf"{root}: 4 image\(s\) directly in this folder"):
        _dm(root).prepare()


@pytest.mark.parametrize("splits", [("training", "testing"), ("val", "test")])
def test_split_folders_with_other_names_are_one_level_too_deep(tmp_path: Path, splits) -> None:
    # root/training/<class>/img would otherwise train a 2-class model on the classes "training", "testing"
    root = make_image_folder(tmp_path / "data", {splits[0]: 3, splits[1]: 2})
    with pytest.raises(TLError, match=r"looks like a split folder holding class folders"):
        _dm(root).prepare()


def test_nested_images_inside_class_folders_are_fine(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"train": 4})
    sub = root / "train" / "cat" / "2019"
    sub.mkdir()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(sub / "deep.png")
    dm = _dm(root).prepare()
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 13


# --------------------------------------------------------------------------- class mismatch at eval


def test_eval_on_data_with_other_classes_lists_the_differences(tiny_cfg, tmp_path: Path) -> None:
    from tl_cli.commands import evaluate
    from tl_cli.commands.train import run

    run(tiny_cfg("trainer.max_epochs=1"))
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    other = make_image_folder(tmp_path / "other", {"": 2})
    (other / "fox").rename(other / "wolf")
    cfg = compose_cfg(
        [f"checkpoint={ckpt}", f"dataset.root={other}", "dataset.num_workers=0"], "eval"
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "eval")
    with pytest.raises(TLError) as e:
        evaluate.run(cfg)
    msg = str(e.value)
    assert (
        "classes differ from the checkpoint's" in msg
        and "missing fox" in msg
        and "unknown to the model wolf" in msg
    )
    assert str(other) in msg
