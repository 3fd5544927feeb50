"""`tl predict checkpoint=CKPT inputs=DIR|FILE|GLOB [output=preds.csv] [topk=5]`: label images.

Batched inference with the checkpoint's own preprocessing (eval transform: resize, centre crop,
normalise). One row per image: path, the top-k labels and probabilities. An image that cannot
be read gets an error row and is counted; it does not stop the batch.

Output goes to ``output`` when given (``.csv`` or ``.json``, or ``format=``; a path ending in ``/``
is a folder), else to ``predictions.csv`` in the run dir. Nothing else is written outside the run
dir. An existing file is replaced only with ``overwrite=true``, an input or the checkpoint never;
the file is written beside the target and renamed (`tl_cli.outputs`). A model whose outputs are
NaN/inf is refused (exit 1) before anything is written.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from tl_cli.checkpoint import load_module
from tl_cli.console import console, progress, say
from tl_cli.data import IMG_EXTS, default_num_workers, eval_transform, load_image
from tl_cli.errors import EXIT_FAILED, TLError
from tl_cli.outputs import atomic_path, check_output, lock_run_dir, release_run_dir, write_json

PREDICTIONS_SCHEMA_VERSION = 1
FORMATS = ("csv", "json")


def required_key(cfg: DictConfig, key: str, usage: str) -> Any:
    if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
        raise TLError(f"{key} is required: {usage}")
    return cfg.get(key)


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMG_EXTS and not p.name.startswith(".")


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


def find_inputs(inputs: Any) -> list[str]:
    """Image paths from a directory (recursive), a file, a glob, or a list of those; sorted, unique.

    A file named explicitly is kept whatever its extension (an unreadable one becomes an error row);
    directories and globs keep the image extensions only. Directory symlinks are followed, but a
    folder is never entered twice (no symlink loops), and a file reached by several paths counts once.
    """
    specs = (
        [str(i) for i in inputs] if isinstance(inputs, list | tuple | ListConfig) else [str(inputs)]
    )
    found: list[str] = []
    for spec in specs:
        spec = os.path.expanduser(spec)
        p = Path(spec)
        if p.is_dir():
            hits = sorted(f for f in _walk(spec) if _is_image_name(Path(f)))
            if not hits:
                raise TLError(f"inputs={spec}: no images in this folder ({', '.join(IMG_EXTS)})")
        elif p.is_file():
            hits = [spec]
        elif glob.has_magic(spec):
            matched = (
                _recursive_glob(spec)
                if "**" in spec.split(os.sep)
                else glob.glob(spec, recursive=True)
            )
            hits = sorted(f for f in matched if Path(f).is_file() and _is_image_name(Path(f)))
            if not hits:
                raise TLError(f"inputs={spec}: the pattern matches no image files")
        else:
            raise TLError(f"inputs={spec}: no such file or folder")
        found.extend(hits)
    return _unique_files(found)


class _Images(Dataset):
    """(tensor or None, index, error) per path; a bad image is reported, not raised."""

    def __init__(self, paths: list[str], transform: Any) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            return self.transform(load_image(self.paths[i])), i, None
        except TLError as e:  # load_image's own message names the file and the problem
            return None, i, str(e)[:300]
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return None, i, f"{type(e).__name__}: {msg}"[:300]


def _collate(
    batch: list[tuple[torch.Tensor | None, int, str | None]],
) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    good = [(x, i) for x, i, err in batch if err is None]
    errors = [(i, err) for _, i, err in batch if err is not None]
    x = torch.stack([g[0] for g in good]) if good else None
    return x, [g[1] for g in good], errors


def inside_run_dir(path: Path, out_dir: Path) -> None:
    if path.is_symlink() or not path.resolve().is_relative_to(out_dir.resolve()):
        raise TLError(
            f"{path} points outside the run dir {out_dir}; pass output=PATH to write elsewhere"
        )


def output_path(cfg: DictConfig, default_name: str, protect: list[str]) -> Path:
    """Where to write: ``output`` as given (a folder, or a path ending in /, gets ``default_name``),
    else the run dir.

    The default stays inside the run dir (a symlink there that points elsewhere is refused). An
    existing file is refused unless ``overwrite=true``, and one of ``protect`` (the checkpoint, the
    inputs; the same file by device and inode) always: see `tl_cli.outputs.check_output`.
    """
    out_dir = Path(str(cfg.output_dir))
    given = cfg.get("output")
    if given:
        raw = os.path.expanduser(str(given))
        path = Path(raw)
        if raw.endswith(("/", os.sep)) or path.is_dir():
            if os.path.lexists(path) and not path.is_dir():
                raise TLError(f"output={given}: {path} exists and is not a folder")
            path = path / default_name  # a folder (created when written): the default name in it
    else:
        path = out_dir / default_name
        inside_run_dir(path, out_dir)
    return check_output(path, overwrite=bool(cfg.get("overwrite", False)), inputs=protect)


def _nonfinite_message(ckpt_path: str, module: torch.nn.Module, image: str) -> str:
    bad = next(
        (
            n
            for n, t in module.state_dict().items()
            if t.is_floating_point() and not torch.isfinite(t).all()
        ),
        None,
    )
    why = (
        f"its weight {bad} is not finite (a corrupt or diverged checkpoint)"
        if bad
        else "the logits overflowed"
    )
    return (
        f"checkpoint={ckpt_path}: the model's output for {image} is NaN/inf ({why}); "
        f"no predictions were written"
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    usage = (
        "tl predict checkpoint=RUN/checkpoints/best.ckpt inputs=DIR|FILE|GLOB [output=preds.csv]"
    )
    ckpt_path = str(required_key(cfg, "checkpoint", usage))
    inputs = required_key(cfg, "inputs", usage)
    topk_req = cfg.get("topk", 5)
    if isinstance(topk_req, bool) or not isinstance(topk_req, int) or topk_req < 1:
        raise TLError(f"topk={topk_req!r} must be a whole number >= 1")
    batch_size = cfg.get("batch_size", 32)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TLError(f"batch_size={batch_size!r} must be a whole number >= 1")
    paths = find_inputs(inputs)
    fmt = str(cfg.get("format", "auto")).lower()
    protect = [ckpt_path, *paths]
    out = output_path(cfg, "predictions.json" if fmt == "json" else "predictions.csv", protect)
    if not cfg.get("output"):
        lock_run_dir(out.parent)  # the run dir: one tl run at a time
    if fmt == "auto":
        fmt = "json" if out.suffix.lower() == ".json" else "csv"
    if fmt not in FORMATS:
        raise TLError(f"format={fmt!r} must be auto, csv or json")

    module, ckpt = load_module(ckpt_path)
    meta = ckpt["tl"]
    class_names = list(meta["class_names"])
    k = min(topk_req, len(class_names))
    want = str(cfg.get("device", "auto"))
    device = torch.device(
        "cuda" if want in ("auto", "cuda", "gpu") and torch.cuda.is_available() else "cpu"
    )
    workers = cfg.get("num_workers")
    workers = (
        (default_num_workers() if len(paths) > 4 * batch_size else 0)
        if workers is None
        else int(workers)
    )
    loader = DataLoader(
        _Images(paths, eval_transform(meta["preprocessing"])),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
    )

    rows: list[dict[str, Any]] = [{"path": p, "topk": [], "error": None} for p in paths]
    module.to(device).eval()
    with (
        torch.inference_mode(),
        progress(f"predicting {len(paths)} images", total=len(loader)) as advance,
    ):
        for x, idx, errors in loader:
            for i, err in errors:
                rows[i]["error"] = err
            if x is not None:
                logits = module(move_data_to_device(x, device)).float()
                finite = torch.isfinite(logits).all(dim=1).cpu()
                if not bool(finite.all()):
                    first = idx[int((~finite).nonzero()[0])]
                    raise TLError(
                        _nonfinite_message(ckpt_path, module, paths[first]), exit_code=EXIT_FAILED
                    )
                probs = torch.softmax(logits, dim=1).cpu()
                top_p, top_i = probs.topk(k, dim=1)
                for j, i in enumerate(idx):
                    rows[i]["topk"] = [
                        {"label": class_names[c], "prob": float(p)}
                        for p, c in zip(top_p[j].tolist(), top_i[j].tolist(), strict=True)
                    ]
            advance()

    n_err = sum(1 for r in rows if r["error"])
    # again: a file that appeared while predicting is not replaced either
    check_output(out, overwrite=bool(cfg.get("overwrite", False)), inputs=protect)
    if fmt == "csv":
        with atomic_path(out) as tmp:  # written beside it, then renamed: never half a file
            write_csv(tmp, rows, k)
    else:
        doc = {
            "schema_version": PREDICTIONS_SCHEMA_VERSION,
            "checkpoint": str(Path(ckpt_path).resolve()),
            "class_names": class_names,
            "topk": k,
            "num_images": len(rows),
            "num_errors": n_err,
            "predictions": rows,
        }
        write_json(out, doc)
    if not cfg.get("output"):
        release_run_dir(out.parent)
    _print(rows, k, out, n_err)
    if rows and n_err == len(rows):
        raise TLError(
            f"none of the {len(rows)} inputs could be read (first: {rows[0]['path']}: {rows[0]['error']}); rows in {out}",
            exit_code=EXIT_FAILED,
        )
    return {
        "output": str(out),
        "num_images": len(rows),
        "num_errors": n_err,
        "topk": k,
        "format": fmt,
    }


def write_csv(path: Path, rows: list[dict[str, Any]], k: int) -> None:
    """Columns: path, label_1, prob_1, ..., label_k, prob_k, error (empty when the image was read)."""
    header = (
        ["path"] + [c for j in range(1, k + 1) for c in (f"label_{j}", f"prob_{j}")] + ["error"]
    )
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            cells: list[Any] = [r["path"]]
            for j in range(k):
                if j < len(r["topk"]):
                    cells += [r["topk"][j]["label"], f"{r['topk'][j]['prob']:.6f}"]
                else:
                    cells += ["", ""]
            w.writerow([*cells, r["error"] or ""])


def _print(rows: list[dict[str, Any]], k: int, out: Path, n_err: int, limit: int = 20) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(
        title=f"predictions ({len(rows)} images{', first ' + str(limit) if len(rows) > limit else ''})",
        header_style="bold",
    )
    t.add_column("image")
    t.add_column("top-1", justify="left")
    t.add_column("prob", justify="right")
    if k > 1:
        t.add_column(f"top-2..{k}" if k > 2 else "top-2", justify="left")
    for r in rows[:limit]:
        name = escape(r["path"] if len(r["path"]) <= 60 else "..." + r["path"][-57:])
        if r["error"]:
            cells = [name, f"[red]error[/] {escape(r['error'][:60])}", ""]
            if k > 1:
                cells.append("")
        else:
            top = r["topk"]
            cells = [name, escape(top[0]["label"]), f"{top[0]['prob']:.3f}"]
            if k > 1:
                cells.append(escape(", ".join(f"{e['label']} {e['prob']:.2f}" for e in top[1:])))
        t.add_row(*cells)
    console.print(t)
    say(
        f"wrote {len(rows)} predictions to {escape(str(out))}"
        + (f" ([red]{n_err} unreadable[/], error rows)" if n_err else "")
    )
