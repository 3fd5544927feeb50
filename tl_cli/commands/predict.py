"""`tl predict checkpoint=CKPT inputs=DIR|FILE|GLOB [output=preds.csv]`: run a checkpoint on inputs.

Batched inference with the checkpoint's own preprocessing. The task in the checkpoint decides
what a row holds and which file formats exist (its `Predictor`: classification writes the top-k
labels and probabilities, ``topk=5``). An input that cannot be read gets an error row and is
counted; it does not stop the batch.

Output goes to ``output`` when given (its extension, or ``format=``; a path ending in ``/`` is a
folder), else to ``predictions.<format>`` in the run dir. Nothing else is written outside the run
dir. An existing file is replaced only with ``overwrite=true``, an input or the checkpoint never;
the file is written beside the target and renamed (`tl_cli.core.outputs`). A model whose outputs
are NaN/inf is refused (exit 1) before anything is written.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from tl_cli.core.config import required_key
from tl_cli.core.console import progress, say
from tl_cli.core.errors import EXIT_FAILED, TLError
from tl_cli.core.outputs import check_output, lock_run_dir, output_path, release_run_dir
from tl_cli.data.base import default_num_workers
from tl_cli.modalities.base import ReadEach, collate_reads, modality_of
from tl_cli.tasks.loading import load_module


def _nonfinite_message(ckpt_path: str, module: torch.nn.Module, item: str) -> str:
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
        f"checkpoint={ckpt_path}: the model's output for {item} is NaN/inf ({why}); "
        f"no predictions were written"
    )


def _positive_int(cfg: DictConfig, key: str, default: int) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise TLError(f"{key}={v!r} must be a whole number >= 1")
    return v


def run(cfg: DictConfig) -> dict[str, Any]:
    usage = (
        "tl predict checkpoint=RUN/checkpoints/best.ckpt inputs=DIR|FILE|GLOB [output=preds.csv]"
    )
    ckpt_path = str(required_key(cfg, "checkpoint", usage))
    inputs = required_key(cfg, "inputs", usage)
    batch_size = _positive_int(cfg, "batch_size", 32)
    module, ckpt = load_module(ckpt_path)
    module.set_tta(cfg.get("tta", "none"))  # tta=flip: the mean over each image and its mirror
    meta = ckpt["tl"]
    predictor = module.predictor(modality_of(meta), meta["preprocessing"], cfg)
    items = predictor.find(inputs)
    paths = [predictor.item_name(i) for i in items]
    fmt = str(cfg.get("format", "auto")).lower()
    if fmt not in ("auto", *predictor.formats):
        *first, last = ("auto", *predictor.formats)
        raise TLError(f"format={fmt!r} must be {', '.join(first)} or {last}")
    protect = [ckpt_path, *predictor.protected(inputs, items)]
    default = predictor.formats[0] if fmt == "auto" else fmt
    out = output_path(cfg, f"predictions.{default}", protect)
    if fmt == "auto":
        ext = out.suffix.lower().lstrip(".")
        fmt = ext if ext in predictor.formats else predictor.formats[0]
    if not cfg.get("output"):
        lock_run_dir(out.parent)  # the run dir: one tl run at a time

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
        ReadEach(items, predictor.load()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_reads(predictor.collate),
    )
    rows: list[dict[str, Any]] = [{"path": p, "result": None, "error": None} for p in paths]
    module.to(device).eval()
    with (
        torch.inference_mode(),
        progress(f"predicting {len(paths)} {predictor.noun}", total=len(loader)) as advance,
    ):
        for x, idx, errors in loader:
            for i, err in errors:
                rows[i]["error"] = err
            if x is not None:
                outputs = predictor.forward(move_data_to_device(x, device))
                bad = predictor.nonfinite(outputs)
                if bad is not None:
                    raise TLError(
                        _nonfinite_message(ckpt_path, module, paths[idx[bad]]),
                        exit_code=EXIT_FAILED,
                    )
                for i, result in zip(idx, predictor.postprocess(outputs), strict=True):
                    rows[i]["result"] = result
            advance()

    n_err = sum(1 for r in rows if r["error"])
    # again: a file that appeared while predicting is not replaced either
    check_output(out, overwrite=bool(cfg.get("overwrite", False)), inputs=protect)
    predictor.write(out, rows, fmt)
    if not cfg.get("output"):
        release_run_dir(out.parent)
    predictor.show(rows)
    from rich.markup import escape

    say(
        f"wrote {len(rows)} predictions to {escape(str(out))}"
        + (f" ([red]{n_err} unreadable[/], error rows)" if n_err else "")
    )
    if rows and n_err == len(rows):
        raise TLError(
            f"none of the {len(rows)} inputs could be read (first: {rows[0]['path']}: {rows[0]['error']}); rows in {out}",
            exit_code=EXIT_FAILED,
        )
    return {
        "output": str(out),
        "num_inputs": len(rows),
        "num_images": len(rows),
        "num_errors": n_err,
        "topk": getattr(predictor, "k", None),
        "format": fmt,
    }
