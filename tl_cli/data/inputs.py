"""Finding input files for `tl predict`: a folder (recursive), a file, a glob, or a list of those.

Directory symlinks are followed, but a folder is never entered twice (no symlink loops), and a
file reached by several paths counts once. The modality (``tl_cli.modalities.base``) says which file
extensions count.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

from tl_cli.core.errors import TLError


def _walk(root: str) -> list[str]:
    """Files under ``root``, following directory symlinks but never a directory twice (no loops)."""
    seen: set[tuple[int, int]] = set()
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    return files


def _match_parts(parts: list[str], pat: list[str]) -> bool:
    """Path components against glob components; ``**`` matches any number of folders."""
    if not pat:
        return not parts
    if pat[0] == "**":
        for i in range(len(parts) + 1):
            if i and parts[i - 1].startswith("."):
                return False  # like glob: ** does not enter hidden folders
            if _match_parts(parts[i:], pat[1:]):
                return True
        return False
    if not parts:
        return False
    if parts[0].startswith(".") and not pat[0].startswith("."):
        return False  # like glob: wildcards do not match hidden names
    return fnmatch.fnmatchcase(parts[0], pat[0]) and _match_parts(parts[1:], pat[1:])


def _recursive_glob(spec: str) -> list[str]:
    """``glob(spec, recursive=True)`` for a spec with ``**``, without following a symlink loop."""
    parts = spec.split(os.sep)
    n = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    root = os.sep.join(parts[:n]) or ("/" if spec.startswith(os.sep) else "")
    pat = [p for p in parts[n:] if p]
    hits = []
    for f in _walk(root or "."):
        rel = os.path.relpath(f, root or ".").split(os.sep)
        if _match_parts(rel, pat):
            hits.append(f if root else os.path.relpath(f, "."))
    return hits


def _unique_files(paths: list[str]) -> list[str]:
    """Each file once: the same file reached by two paths (symlinks, hard links) is kept once."""
    seen: set[Any] = set()
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            key: Any = (st.st_dev, st.st_ino)
        except OSError:
            key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def input_specs(inputs: Any) -> list[str]:
    """``inputs=`` as a list of strings (one value, or a list from the command line)."""
    return (
        [str(i) for i in inputs] if isinstance(inputs, list | tuple | ListConfig) else [str(inputs)]
    )


def input_files(inputs: Any, what: str) -> list[Path]:
    """``inputs=`` naming files only (text lines, tables): each must exist; ``what`` says in the
    error line which files the command reads."""
    out = []
    for spec in input_specs(inputs):
        p = Path(os.path.expanduser(spec))
        if not p.is_file():
            raise TLError(f"inputs={spec}: no such file ({what})")
        out.append(p)
    return out


def find_inputs(
    inputs: Any,
    extensions: tuple[str, ...],
    noun: str = "images",
    sniff: Callable[[Path], bool] | None = None,
    formats: str | None = None,
) -> list[str]:
    """Input file paths from a directory (recursive), a file, a glob, or a list of those; sorted, unique.

    A file named explicitly is kept whatever its extension (an unreadable one becomes an error row);
    directories and globs keep ``extensions`` only, and files whose content ``sniff`` recognises
    (images without an image extension). Directory symlinks are followed, but a folder is never
    entered twice (no symlink loops), and a file reached by several paths counts once.
    ``formats`` names the accepted files in error lines (default: the extensions).
    """
    listing = formats or ", ".join(extensions)

    def wanted(p: Path) -> bool:
        if p.name.startswith("."):
            return False
        return p.suffix.lower() in extensions or (sniff is not None and sniff(p))

    found: list[str] = []
    for spec in input_specs(inputs):
        spec = os.path.expanduser(spec)
        p = Path(spec)
        if p.is_dir():
            hits = sorted(f for f in _walk(spec) if wanted(Path(f)))
            if not hits:
                raise TLError(f"inputs={spec}: no {noun} in this folder ({listing})")
        elif p.is_file():
            hits = [spec]
        elif glob.has_magic(spec):
            matched = (
                _recursive_glob(spec)
                if "**" in spec.split(os.sep)
                else glob.glob(spec, recursive=True)
            )
            hits = sorted(f for f in matched if Path(f).is_file() and wanted(Path(f)))
            if not hits:
                raise TLError(f"inputs={spec}: the pattern matches no {noun} ({listing})")
        else:
            raise TLError(f"inputs={spec}: no such file or folder")
        found.extend(hits)
    return _unique_files(found)
