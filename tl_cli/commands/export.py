"""`tl export checkpoint=CKPT format=onnx|torchscript|safetensors [output=PATH]`.

Writes the trained network (the task's ``export_spec``: for classification backbone + head in
eval mode, the modality's input tensors in, logits out; the batch size is free) and a JSON
sidecar with the task's fields (class names, output names) and the preprocessing, then checks the
export against the PyTorch model on seeded sample inputs and reports the max absolute difference
of the outputs:

* onnx: run with onnxruntime when it is installed (``pip install 'tl-cli[onnx]'``);
* torchscript: the saved file is loaded back with ``torch.jit.load`` and run;
* safetensors: the weights are loaded into a freshly built model (from the sidecar's
  ``architecture``) and run.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from tl_cli import __version__
from tl_cli.core.config import required_key
from tl_cli.core.console import console, say
from tl_cli.core.errors import EXIT_FAILED, TLError
from tl_cli.core.metrics import SIDECAR_SCHEMA_VERSION
from tl_cli.core.outputs import (
    atomic_path,
    check_output,
    inside_run_dir,
    lock_run_dir,
    output_path,
    release_run_dir,
    write_json,
)
from tl_cli.modalities.base import modality_of
from tl_cli.run.loggers import available
from tl_cli.tasks.base import TASKS
from tl_cli.tasks.loading import load_module

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
ONNX_EXTRA = "pip install 'tl-cli[onnx]' (onnx, onnxscript, onnxruntime)"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Export a checkpoint's model, check the written file against PyTorch, write its sidecar."""
    opts = _options(cfg)
    ckpt_path, out, sidecar = opts["checkpoint"], opts["out"], opts["sidecar"]
    module, ckpt = load_module(ckpt_path)
    meta = ckpt["tl"]
    prep = dict(meta["preprocessing"])
    modality = modality_of(meta)
    spec = module.export_spec(modality, prep)
    exporter, verification = _write_model(cfg, opts, spec, modality, prep, ckpt)
    doc = _sidecar_doc(opts, spec, modality, prep, ckpt, exporter, verification)
    check_output(
        sidecar, overwrite=opts["overwrite"], inputs=[ckpt_path], label=f"the sidecar {sidecar}"
    )
    write_json(sidecar, doc)
    if opts["in_run_dir"]:
        release_run_dir(out.parent)
    _print(out, sidecar, doc)
    return {"output": str(out), "sidecar": str(sidecar), **verification}


def _options(cfg: DictConfig) -> dict[str, Any]:
    """Every option checked and every output path claimed before the checkpoint is read."""
    usage = "tl export checkpoint=RUN/checkpoints/best.ckpt format=onnx|torchscript|safetensors [output=PATH]"
    ckpt_path = str(required_key(cfg, "checkpoint", usage))
    fmt = str(cfg.get("format", "onnx")).lower()
    if fmt not in FORMATS:
        raise TLError(f"format={fmt!r} must be one of {', '.join(FORMATS)}")
    if fmt == "onnx" and not available("onnx"):
        raise TLError(f"format=onnx needs the onnx package, which is not installed: {ONNX_EXTRA}")
    atol = float(cfg.get("atol", 1e-4))
    n_samples = int(cfg.get("verify_batch", 3))
    if n_samples < 1:
        raise TLError(f"verify_batch={n_samples} must be at least 1")
    out = output_path(cfg, f"model{FORMATS[fmt]}", [ckpt_path])
    if out.suffix.lower() == ".json":
        raise TLError(
            f"output={out}: .json is the sidecar's name; give the model file a {FORMATS[fmt]} name"
        )
    sidecar = out.with_suffix(".json")
    # the sidecar is an output too: never the checkpoint, never an existing file without overwrite
    in_run_dir = not cfg.get("output")
    if in_run_dir:
        inside_run_dir(sidecar, Path(str(cfg.output_dir)))
    overwrite = bool(cfg.get("overwrite", False))
    check_output(sidecar, overwrite=overwrite, inputs=[ckpt_path], label=f"the sidecar {sidecar}")
    if in_run_dir:
        lock_run_dir(out.parent)  # the run dir: one tl run at a time
    return {
        "checkpoint": ckpt_path,
        "format": fmt,
        "atol": atol,
        "samples": n_samples,
        "out": out,
        "sidecar": sidecar,
        "in_run_dir": in_run_dir,
        "overwrite": overwrite,
    }


def _write_model(
    cfg: DictConfig,
    opts: dict[str, Any],
    spec: Any,
    modality: Any,
    prep: dict[str, Any],
    ckpt: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """The model file, written beside its name and checked before it is renamed into place
    (never half a model file; a file that fails the check is removed). Returns the exporter's
    description and the check's result."""
    fmt, atol, n_samples, out = opts["format"], opts["atol"], opts["samples"], opts["out"]
    net = spec.net
    example = modality.example(prep, 2, seed=0)
    # another batch size: the export must not fix it
    samples = modality.example(prep, n_samples, seed=1)
    # again: a file that appeared meanwhile is not replaced either
    check_output(out, overwrite=opts["overwrite"], inputs=[opts["checkpoint"]])
    with atomic_path(out) as tmp:
        if fmt == "onnx":
            exporter = export_onnx(
                net,
                example,
                tmp,
                int(cfg.get("opset", 18)),
                modality.input_names(prep),
                modality.dynamic_axes(prep),
                modality.axis_min(prep),
                spec.output_names,
                spec.output_axes,
            )
        elif fmt == "torchscript":
            exporter = export_torchscript(net, example, tmp)
        else:
            exporter = export_safetensors(net, tmp, ckpt["tl"])

        # the check runs on the written file before it is renamed into place: a file that
        # fails it is removed with its temp name, and no sidecar is written
        verification: dict[str, Any] = {
            "samples": n_samples,
            "atol": atol,
            "runtime": None,
            "max_abs_diff": None,
            "passed": None,
        }
        if cfg.get("verify", True):
            with torch.inference_mode():
                ref = net(*samples).float()
            got, runtime = _run_export(fmt, tmp, samples, ckpt, modality)
            if got is None:
                verification["skipped"] = runtime
            else:
                diff = float((got.float() - ref).abs().max())
                verification.update(runtime=runtime, max_abs_diff=diff, passed=diff <= atol)
        if verification["passed"] is False:
            raise TLError(
                f"export check failed: max |diff| {verification['max_abs_diff']:.3g} > atol "
                f"{atol:g} ({fmt} via {verification['runtime']}); nothing was written to {out}",
                exit_code=EXIT_FAILED,
            )
    return exporter, verification


def _sidecar_doc(
    opts: dict[str, Any],
    spec: Any,
    modality: Any,
    prep: dict[str, Any],
    ckpt: dict[str, Any],
    exporter: Any,
    verification: dict[str, Any],
) -> dict[str, Any]:
    """The sidecar: what a runtime needs to feed the model and read its outputs."""
    hp = ckpt["hyper_parameters"]
    return {
        "schema_version": SIDECAR_SCHEMA_VERSION,
        "format": opts["format"],
        "file": opts["out"].name,
        "task": ckpt["tl"]["task"],
        **spec.sidecar,
        "preprocessing": prep,
        "modality": modality.name,
        "input": modality.describe_input(prep),
        **modality.sidecar_extras(prep),
        "architecture": {
            "backbone": hp.get("backbone"),
            "head": hp.get("head"),
            "preprocessing_overrides": hp.get("preprocessing_overrides"),
        },
        "source_checkpoint": str(Path(opts["checkpoint"]).resolve()),
        "exporter": exporter,
        "tl_version": __version__,
        "torch_version": torch.__version__,
        "verification": verification,
    }


# --------------------------------------------------------------------------- writers


def export_onnx(
    net: nn.Module,
    example: tuple[torch.Tensor, ...],
    out: Path,
    opset: int,
    names: list[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    axis_min: dict[str, int] | None = None,
    output_names: list[str] | None = None,
    output_axes: dict[str, dict[int, str]] | None = None,
) -> str:
    """torch.export-based exporter (needs onnxscript); the TorchScript-based one otherwise."""
    import logging

    for name in (
        "onnx_ir",
        "onnxscript",
        "torch.onnx",
        "torch.export",
        "torch._dynamo",
        "torch.fx",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)  # their INFO lines are exporter internals
    names = names or [f"input_{i}" for i in range(len(example))]
    axes = dynamic_axes or {n: {0: "batch"} for n in names}
    lows = axis_min or {}
    dims = {
        a: torch.export.Dim(a, min=int(lows.get(a, 1))) for ax in axes.values() for a in ax.values()
    }
    attempts: list[tuple[str, dict[str, Any]]] = []
    if available("onnxscript"):
        # ExportModel.forward(*xs): one spec per graph input, nested in the *xs argument
        dynamic_shapes = (tuple({i: dims[a] for i, a in axes.get(n, {}).items()} for n in names),)
        attempts.append(
            (
                f"torch.export, opset {opset}",
                dict(dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset),
            )
        )
    attempts.append(
        (
            f"TorchScript-based, opset {min(opset, 20)}",
            dict(
                dynamo=False,
                dynamic_axes={**axes, **(output_axes or {"logits": {0: "batch"}})},
                opset_version=min(opset, 20),
            ),
        )
    )
    errors = []
    for label, kw in attempts:  # the torch.export exporter first, the TorchScript one as fallback
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    net,
                    tuple(example),
                    str(out),
                    input_names=names,
                    output_names=output_names or ["logits"],
                    **({"external_data": False, "verbose": False} if kw["dynamo"] else {}),
                    **kw,
                )
            return f"torch.onnx ({label})"
        except Exception as e:  # noqa: BLE001
            errors.append(
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            )
    raise TLError(f"format=onnx: the model could not be exported ({'; '.join(errors)[:300]})")


def export_torchscript(net: nn.Module, example: tuple[torch.Tensor, ...], out: Path) -> str:
    """``torch.jit.trace``: convolutional nets and ViTs trace to a graph with a free batch size."""
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net, tuple(example), check_trace=False)
            traced.save(str(out))
    except Exception as e:  # noqa: BLE001
        raise TLError(
            f"format=torchscript: tracing failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
        ) from None
    return f"torch.jit.trace (torch {torch.__version__})"


def export_safetensors(net: nn.Module, out: Path, meta: dict[str, Any]) -> str:
    """The network's weights (state-dict keys ``backbone.*``, ``head.*``), class names in the metadata."""
    from safetensors.torch import save_model

    save_model(
        net,
        str(out),
        metadata={
            "format": "pt",
            "tl_class_names": json.dumps(list(meta["class_names"])),
            "tl_preprocessing": json.dumps(dict(meta["preprocessing"])),
        },
    )
    return "safetensors.torch.save_model"


# --------------------------------------------------------------------------- checks


def _run_export(
    fmt: str, out: Path, xs: tuple[torch.Tensor, ...], ckpt: dict[str, Any], modality: Any
) -> tuple[torch.Tensor | None, str]:
    """Outputs of the written file on ``x`` and what ran it; (None, reason) when nothing can run it."""
    if fmt == "onnx":
        if not available("onnxruntime"):
            return None, f"onnxruntime is not installed, so the ONNX file was not run: {ONNX_EXTRA}"
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs, strict=True)}
        return torch.from_numpy(sess.run(None, feed)[0]), f"onnxruntime {ort.__version__}"
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(out), map_location="cpu")
        with torch.inference_mode():
            return loaded(*xs), "torch.jit.load"
    from safetensors.torch import load_model

    fresh = TASKS.get(ckpt["tl"]["task"])(**dict(ckpt["hyper_parameters"]), pretrained=False)
    net = fresh.export_spec(modality, dict(ckpt["tl"]["preprocessing"])).net
    load_model(net, str(out), strict=True)
    with torch.inference_mode():
        return net(*xs), "safetensors.torch.load_model into a fresh model"


def _print(out: Path, sidecar: Path, doc: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    v = doc["verification"]
    t = Table(title=f"tl export: {doc['format']}", show_header=False)
    t.add_column("key")
    t.add_column("value")
    t.add_row("model", escape(f"{out} ({out.stat().st_size / 1e6:.2f} MB)"))
    t.add_row("sidecar", escape(str(sidecar)))
    t.add_row("exporter", doc["exporter"])
    names = list(doc.get("class_names") or [])
    t.add_row(
        "classes",
        escape(f"{len(names)}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"),
    )
    t.add_row(
        "input",
        escape(f"{doc['input'].get('dtype', '')} {doc['input'].get('shape')} ({doc['modality']})"),
    )
    if v.get("max_abs_diff") is not None:
        ok = "[green]ok[/]" if v["passed"] else "[red]FAILED[/]"
        t.add_row(
            "check",
            f"{ok}: max |diff| {v['max_abs_diff']:.3g} (atol {v['atol']:g}) on {v['samples']} samples, {escape(str(v['runtime']))}",
        )
    elif v.get("skipped"):
        t.add_row("check", f"[yellow]skipped[/]: {escape(v['skipped'])}")
    else:
        t.add_row("check", "off (verify=false)")
    console.print(t)
    if v.get("skipped"):
        say(f"[yellow]warning[/]: export not checked: {escape(v['skipped'])}")
