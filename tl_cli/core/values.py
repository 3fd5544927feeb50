"""Checking config values: numbers and whole numbers with one error line naming the key."""

from __future__ import annotations

import math
from typing import Any

from tl_cli.core.errors import TLError


def number(key: str, value: Any, allowed: str) -> float:
    if isinstance(value, bool):
        raise TLError(f"{key}={value!r} must be a number {allowed}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TLError(f"{key}={value!r} must be a number {allowed}") from None
    if not math.isfinite(v):
        raise TLError(f"{key}={value!r} must be a number {allowed}")
    return v


def integer(key: str, value: Any, allowed: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.isinteger()):
        raise TLError(f"{key}={value!r} must be an integer {allowed}")
    try:
        return int(str(value)) if not isinstance(value, int | float) else int(value)
    except (TypeError, ValueError):
        raise TLError(f"{key}={value!r} must be an integer {allowed}") from None


#: the largest dataset.image_size accepted (a 100000 px input was OOM-killed at 23.6 GB)
#: the largest dataset.image_size accepted (a 100000 px input was OOM-killed at 23.6 GB)
MAX_IMAGE_SIZE = 1024


def check_image_size(image_size: Any) -> None:
    """``dataset.image_size``: null or [16, MAX_IMAGE_SIZE] (train, pretrain; and what a
    checkpoint may hold: tl_cli.core.checkpoint.MAX_INPUT_SIZE)."""
    if image_size is not None:
        v = integer("dataset.image_size", image_size, f"in [16, {MAX_IMAGE_SIZE}] (or null)")
        if not 16 <= v <= MAX_IMAGE_SIZE:
            raise TLError(
                f"dataset.image_size={image_size!r} must be in [16, {MAX_IMAGE_SIZE}] pixels, or null "
                f"for the backbone's own size (memory grows with its square)"
            )


def check_dataset_values(
    image_size: Any,
    batch_size: Any,
    num_workers: Any,
    val_fraction: Any,
    split_seed: Any,
    augment: Any,
) -> None:
    """The data module's shared values (called by ``TransferDataModule.__init__``)."""
    check_image_size(image_size)
    if integer("dataset.batch_size", batch_size, ">= 1") < 1:
        raise TLError(f"dataset.batch_size={batch_size!r} must be an integer >= 1")
    if num_workers is not None and integer("dataset.num_workers", num_workers, ">= 0") < 0:
        raise TLError(
            f"dataset.num_workers={num_workers!r} must be an integer >= 0 (null: one per spare core)"
        )
    vf = number("dataset.val_fraction", val_fraction, "between 0 and 1 (exclusive)")
    if not 0.0 < vf < 1.0:
        raise TLError(f"dataset.val_fraction={val_fraction!r} must be between 0 and 1 (exclusive)")
    integer("dataset.split_seed", split_seed, "")
    if augment not in (None, False, "none", "light"):
        raise TLError(f"dataset.augment={augment!r} must be light or none")
