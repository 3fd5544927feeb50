"""`tl predict checkpoint=CKPT inputs=DIR|FILE|GLOB [output=preds.csv] [topk=5]`: label images.

Batched inference with the checkpoint's own preprocessing (eval transform: resize, centre crop,
normalise). One row per image: path, the top-k labels and probabilities. An image that cannot
be read gets an error row and is counted; it does not stop the batch.

Output goes to ``output`` when given (``.csv`` or ``.json``, or ``format=``; a path ending in ``/``
is a folder), else to ``predictions.csv`` in the run dir. Nothing else is written outside the run
dir. An existing file is replaced only with ``overwrite=true``, an input or the checkpoint never;
the file is written beside the target and renamed (`tl_cli.core.outputs`). A model whose outputs are
NaN/inf is refused (exit 1) before anything is written.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from tl_cli.core.checkpoint import load_module
from tl_cli.core.console import console, progress, say
from tl_cli.core.errors import EXIT_FAILED, TLError
from tl_cli.core.metrics import PREDICTIONS_SCHEMA_VERSION
from tl_cli.core.outputs import atomic_path, check_output, lock_run_dir, release_run_dir, write_json
from tl_cli.data.base import default_num_workers
from tl_cli.modalities.base import ImageModality, ReadEach, collate_reads, modality_of

FORMATS = ("csv", "json")


def required_key(cfg: DictConfig, key: str, usage: str) -> Any:
    if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
        raise TLError(f"{key} is required: {usage}")
    return cfg.get(key)


def find_inputs(inputs: Any) -> list[str]:
    """Image files ``inputs=`` names (a folder, a file, a glob or a list): see `tl_cli.data.inputs`."""
    return ImageModality().find(inputs)


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
    inputs; the same file by device and inode) always: see `tl_cli.core.outputs.check_output`.
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
    module, ckpt = load_module(ckpt_path)
    meta = ckpt["tl"]
    modality = modality_of(meta)
    items = modality.find(inputs)
    paths = [modality.item_name(i) for i in items]
    fmt = str(cfg.get("format", "auto")).lower()
    protect = [ckpt_path, *modality.protected(inputs, items)]
    out = output_path(cfg, "predictions.json" if fmt == "json" else "predictions.csv", protect)
    if not cfg.get("output"):
        lock_run_dir(out.parent)  # the run dir: one tl run at a time
    if fmt == "auto":
        fmt = "json" if out.suffix.lower() == ".json" else "csv"
    if fmt not in FORMATS:
        raise TLError(f"format={fmt!r} must be auto, csv or json")

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
    prep = meta["preprocessing"]
    loader = DataLoader(
        ReadEach(items, modality.loader(prep)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_reads(modality, prep),
    )

    rows: list[dict[str, Any]] = [{"path": p, "topk": [], "error": None} for p in paths]
    module.to(device).eval()
    with (
        torch.inference_mode(),
        progress(f"predicting {len(paths)} {modality.noun}", total=len(loader)) as advance,
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
