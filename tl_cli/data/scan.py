"""Cheap checks of image files before any training starts.

`check_image` opens each file and reads just enough of it to catch what breaks a run hours in:
zero-byte files, text files with an image extension, truncated or corrupt JPEG/PNG files and
decompression-bomb-sized images. PNGs are checked with PIL's ``verify()`` (chunk structure and
CRCs, no pixel decode); JPEGs are decoded at 1/8 scale (libjpeg's DCT scaling), which still walks
the whole entropy-coded stream and so catches truncation; other formats are decoded.

Cost, measured on the shared CIFAR-10 subset (5,506 PNGs, 2 CPU cores): see README.md, "Scan cost"
(under Failure modes, Bad data).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tl_cli.core.errors import TLError, log_line

# We enforce PIL's pixel limit ourselves (with a clear message naming the file), so PIL's own
# warning between 1x and 2x the limit would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: Pillow formats that "open" but hold no pixels Pillow can decode (stubs needing an external
#: handler) or are not still images (video): never taken for images by their extension
NOT_STILL_IMAGES = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "MPEG"})
#: the words an error line uses for "any image" (the list of extensions is long)
IMAGE_FORMATS_HINT = "any still image Pillow reads: JPEG, PNG, TIFF, PGM/PPM, GIF, BMP, WebP, ..."


@functools.cache
def image_extensions() -> tuple[str, ...]:
    """Every file extension of a still-image format Pillow can read (``.jpg``, ``.tif``, ``.pgm``,
    ``.gif``, ...), lower case, sorted: Pillow's own registry, so a format it learns is read too.
    A file with another extension is an image when its content is one (`looks_like_image`)."""
    Image.init()
    return tuple(
        sorted(
            ext
            for ext, fmt in Image.registered_extensions().items()
            if fmt in Image.OPEN and fmt not in NOT_STILL_IMAGES
        )
    )


def looks_like_image(path: str | os.PathLike[str]) -> bool:
    """Whether Pillow recognises the file's content as an image (reads the header only): how a
    file without an image extension is told apart from notes, CSVs and other non-image files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return im.format not in NOT_STILL_IMAGES
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify is not an image
        return False


#: Names that mean "a split", not "a class", when found as class folders.
SPLIT_NAMES = frozenset(
    {"train", "training", "val", "valid", "validation", "test", "testing", "eval"}
)
#: How many skipped files are printed one per line before the rest are summarised.
MAX_LISTED = 10


@dataclass(frozen=True)
class BadImage:
    path: str
    reason: str


def pixel_limit() -> int | None:
    """PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, about 89M pixels by default)."""
    return Image.MAX_IMAGE_PIXELS


def _too_big(w: int, h: int) -> str | None:
    limit = pixel_limit()
    if limit and w * h > limit:
        return (
            f"{w}x{h} image ({w * h / 1e6:.0f}M pixels) is over the {limit / 1e6:.0f}M-pixel limit; "
            f"refused as a possible decompression bomb"
        )
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, Image.DecompressionBombError):
        return f"refused as a possible decompression bomb ({str(e).split(',')[0]})"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image PIL can read (unknown format or not an image at all)"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"corrupt or truncated image ({msg})"


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """``Image.open`` with the pixel limit enforced and errors as a TLError naming the file."""
    try:
        with warnings.catch_warnings():  # pytest and -W options reset the module-level filter
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except FileNotFoundError:
        raise TLError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise TLError(f"{path}: {_reason(e)}") from None
    big = _too_big(*im.size)
    if big:
        im.close()
        raise TLError(f"{path}: {big}")
    return im


def check_image(path: str | os.PathLike[str]) -> str | None:
    """None if ``path`` looks like a readable image, else a short reason."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"dangling symlink (its target {os.readlink(path)} does not exist)"
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            big = _too_big(*im.size)
            if big:
                return big
            if im.format == "PNG":
                im.verify()  # chunk structure + CRCs, no pixel decode
            else:
                if im.format == "JPEG":
                    w, h = im.size
                    im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))  # decode at 1/8 scale
                im.load()
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad file
        return _reason(e)
    return None


def scan_images(
    paths: Sequence[str | os.PathLike[str]], workers: int | None = None
) -> list[BadImage]:
    """Check every file; returns the bad ones in input order.

    PIL releases the GIL while decoding, so threads help on big JPEGs (about 1.3x on 2 cores at
    1600x1200); on small files (CIFAR's 32px PNGs) thread overhead makes them 4x slower, so by
    default threads are used only when the files average over 256 KiB.
    """
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if _big_files(paths) else 1
    with _scan_progress(len(paths)) as advance:
        if workers <= 1 or len(paths) < 64:
            reasons: list[str | None] = []
            for p in paths:
                reasons.append(check_image(p))
                advance()
        else:
            with ThreadPoolExecutor(workers) as pool:
                reasons = []
                for r in pool.map(check_image, paths, chunksize=64):
                    reasons.append(r)
                    advance()
    return [BadImage(str(p), r) for p, r in zip(paths, reasons, strict=True) if r]


#: a scan of this many files or more shows progress (a bar, or a line every 30 s in logs): large
#: JPEGs take about 13 ms each, so 100,000 of them take minutes
SCAN_PROGRESS_FROM = 5000


def _scan_progress(n: int):
    """``progress`` for a long scan; a no-op context for a short one (it takes well under 1 s)."""
    import contextlib

    if n < SCAN_PROGRESS_FROM:
        return contextlib.nullcontext(lambda: None)
    from tl_cli.core.console import progress

    return progress("checking images", n, unit="file")


def _big_files(
    paths: Sequence[str | os.PathLike[str]], sample: int = 32, threshold: int = 256 * 1024
) -> bool:
    if len(paths) < 64:
        return False
    step = max(1, len(paths) // sample)
    sizes = []
    for p in paths[::step][:sample]:
        try:
            sizes.append(os.path.getsize(p))
        except OSError:
            pass
    return bool(sizes) and sum(sizes) / len(sizes) > threshold


def drop_corrupt(
    found: dict[str, list[Path]],
    where: Path,
    skip: bool,
    scan: Callable[[Sequence[Path]], list[BadImage]] = scan_images,
    noun: str = "image",
) -> tuple[dict[str, list[Path]], list[BadImage]]:
    """Scan class -> files; raise on the first bad file, or (``skip``) drop bad files with a warning.

    ``scan`` finds the bad files (images: :func:`scan_images`); ``noun`` names them in messages.
    Returns the kept files per class and the skipped files.
    """
    paths = [p for files in found.values() for p in files]
    bad = scan(paths)
    if not bad:
        return found, []
    if not skip:
        more = (
            f" (and {len(bad) - 1} more unreadable {noun}(s) under {where})" if len(bad) > 1 else ""
        )
        raise TLError(
            f"{bad[0].path}: {bad[0].reason}{more}; fix or remove it, or pass dataset.skip_corrupt=true to skip unreadable {noun}s"
        )
    bad_set = {b.path for b in bad}
    kept: dict[str, list[Path]] = {}
    for cls, files in found.items():
        keep = [p for p in files if str(p) not in bad_set]
        if not keep:
            raise TLError(
                f"{where / cls}: class folder has no readable {noun}s (all {len(files)} are corrupt)"
            )
        kept[cls] = keep
    warn_skipped(bad, where, noun)
    return kept, bad


def warn_skipped(bad: Sequence[BadImage], where: Path, noun: str = "image") -> None:
    """One warning line per skipped file (up to MAX_LISTED), on stderr and in the run's log
    (``<command>.log`` keeps which files a run left out)."""
    lines = [
        f"tl: warning: skipping {len(bad)} unreadable {noun}(s) under {where} (dataset.skip_corrupt=true)",
        *(f"tl: warning: skipped {b.path}: {b.reason}" for b in bad[:MAX_LISTED]),
    ]
    if len(bad) > MAX_LISTED:
        lines.append(f"tl: warning: ... and {len(bad) - MAX_LISTED} more (listed in metrics.json)")
    for line in lines:
        print(line, file=sys.stderr)
        log_line(line, level=30)


def check_split_depth(root: Path, class_dirs: Iterable[str], placeholder: str = "<image>") -> None:
    """In the ``root/<class>/*`` layout, a "class" named like a split that holds class folders means
    the files sit one level deeper than expected (e.g. ``root/training/cat/*.jpg``)."""
    for name in sorted(class_dirs):
        d = root / name
        if name.lower() in SPLIT_NAMES and any(
            c.is_dir() and not c.name.startswith(".") for c in d.iterdir()
        ):
            raise TLError(
                f"{d}: looks like a split folder holding class folders, but {root} has no train/ folder; "
                f"use {root}/train (+ val/, test/)/<class>/{placeholder} or {root}/<class>/{placeholder}"
            )
