"""Path checks that need no torch: the same one-line errors whether they come from the fast
checks before a command loads torch (`tl_cli.run.early`) or from the code that reads the file."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from tl_cli.core.errors import TLError


def is_set(value: Any) -> bool:
    """A config value the user (or a config) gave: not None, not empty, not Hydra's ``???``."""
    return value is not None and str(value) not in ("", "???")


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a checkpoint, from the file alone (no unpickling), or None.

    A truncated file, a text file or a raw pickle is not a zip archive (torch's format keeps its
    directory at the end), so it is "not a readable checkpoint" before anything is loaded.
    """
    p = Path(str(path)).expanduser()
    if not p.exists():
        return "file not found"
    if not p.is_file():
        return "not a file"
    if p.stat().st_size == 0:
        return "not a readable checkpoint (empty file)"
    if not zipfile.is_zipfile(p):
        return "not a readable checkpoint (not a torch zip archive: truncated, or not a checkpoint)"
    return None


def require_checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The checkpoint path, or a TLError naming it (``checkpoint=PATH: file not found``)."""
    p = Path(str(path)).expanduser()
    problem = checkpoint_problem(p)
    if problem:
        raise TLError(f"checkpoint={p}: {problem}")
    return p


def require_exists(key: str, value: Any) -> Path:
    """A data path that must exist (``dataset.root=DIR does not exist``)."""
    p = Path(os.path.expanduser(str(value)))
    if not p.exists():
        raise TLError(f"{key}={p} does not exist")
    return p
