"""tl export: ONNX / TorchScript / safetensors + a JSON sidecar, each checked against PyTorch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from tl_cli.commands import export
from tl_cli.core.errors import TLError
from tl_cli.tasks.loading import load_module

from .conftest import compose_cfg, run_tl
from .trained_run import trained_run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_data) -> Path:
    return trained_run(tmp_path_factory, tiny_data)[0] / "checkpoints/best.ckpt"


def ecfg(ckpt: Path, out_dir: Path, *extra: str):
    cfg = compose_cfg([f"checkpoint={ckpt}", *extra], config_name="export")
    with open_dict(cfg):
        cfg.output_dir = str(out_dir)
    return cfg


def reference(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    module, _ = load_module(ckpt)
    with torch.no_grad():
        return module(x)


def run_file(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file independently of tl's own check."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["image"] and [
            o.name for o in sess.get_outputs()
        ] == ["logits"]
        return torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
            return torch.jit.load(str(path))(x)
    from safetensors.torch import load_file

    from tl_cli.tasks.classification import ClassificationTask
    from tl_cli.tasks.classification.task import ExportModel

    side = json.loads(path.with_suffix(".json").read_text())
    arch = side["architecture"]
    fresh = ClassificationTask(
        arch["backbone"],
        arch["head"],
        {"name": "finetune"},
        {"name": "adamw"},
        {"name": "none"},
        side["class_names"],
        preprocessing_overrides=arch["preprocessing_overrides"],
        pretrained=False,
    )
    net = ExportModel(fresh.backbone, fresh.head).eval()
    net.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize(
    ("fmt", "ext"), [("onnx", ".onnx"), ("torchscript", ".pt"), ("safetensors", ".safetensors")]
)
def test_export_writes_model_and_sidecar_and_matches_pytorch(ckpt, tmp_path, fmt, ext):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx extra (in dev) runs the ONNX check")
    res = export.run(ecfg(ckpt, tmp_path / "run", f"format={fmt}"))
    model = tmp_path / "run" / f"model{ext}"
    assert Path(res["output"]) == model and model.is_file()
    side = json.loads((tmp_path / "run/model.json").read_text())
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["tl"]
    assert side["schema_version"] == 1 and side["format"] == fmt and side["file"] == model.name
    assert side["class_names"] == meta["class_names"] == ["cat", "dog", "fox"]
    prep = side["preprocessing"]
    assert (prep["mean"], prep["std"], prep["input_size"]) == (
        meta["preprocessing"]["mean"],
        meta["preprocessing"]["std"],
        32,
    )
    v = side["verification"]
    assert (
        v["passed"] is True and 0.0 <= v["max_abs_diff"] <= v["atol"] == 1e-4 and v["samples"] == 3
    )
    if fmt == "onnx":
        assert v["runtime"].startswith("onnxruntime")
    # an independent run on other inputs (batch 5: the batch size is not baked in)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    got = run_file(fmt, model, x)
    assert got.shape == (5, 3)
    assert float((got - reference(ckpt, x)).abs().max()) < 1e-4
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        [model.name, "model.json"]
    )


def test_explicit_output_and_sidecar_beside_it(ckpt, tmp_path):
    out = tmp_path / "deploy" / "classifier.pt"
    export.run(ecfg(ckpt, tmp_path / "run", "format=torchscript", f"output={out}"))
    assert (
        out.is_file()
        and json.loads((tmp_path / "deploy/classifier.json").read_text())["file"] == "classifier.pt"
    )
    assert not (tmp_path / "run").exists()  # only where told


def test_failed_check_exits_1_and_is_recorded(ckpt, tmp_path, monkeypatch):
    real = export._run_export

    def off_by_a_bit(*args, **kwargs):
        y, runtime = real(*args, **kwargs)
        return y + 0.01, runtime

    monkeypatch.setattr(export, "_run_export", off_by_a_bit)
    with pytest.raises(
        TLError, match=r"export check failed: max \|diff\| 0\.01 > atol 0\.0001"
    ) as e:
        export.run(ecfg(ckpt, tmp_path / "run", "format=safetensors"))
    assert e.value.exit_code == 1
    v = json.loads((tmp_path / "run/model.json").read_text())["verification"]
    assert v["passed"] is False and v["max_abs_diff"] == pytest.approx(0.01, abs=1e-6)


def test_onnx_without_onnxruntime_is_written_but_reported_unchecked(ckpt, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    real = export.available
    monkeypatch.setattr(export, "available", lambda m: False if m == "onnxruntime" else real(m))
    res = export.run(ecfg(ckpt, tmp_path / "run", "format=onnx"))
    assert res["passed"] is None and "onnxruntime is not installed" in res["skipped"]
    assert (tmp_path / "run/model.onnx").is_file()


def test_onnx_without_onnx_package_names_the_extra(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "available", lambda m: False)
    with pytest.raises(
        TLError, match=r"format=onnx needs the onnx package.*pip install 'tl-cli\[onnx\]'"
    ) as e:
        export.run(ecfg(ckpt, tmp_path / "run", "format=onnx"))
    assert e.value.exit_code == 2


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["format=tflite"], "format='tflite' must be one of onnx, torchscript, safetensors"),
        (["format=torchscript", "output=OUT/model.json"], r"\.json is the sidecar's name"),
        (["format=torchscript", "output=CKPT"], "would overwrite"),
        (["format=torchscript", "verify_batch=0"], "verify_batch=0 must be at least 1"),
    ],
)
def test_bad_input_is_one_clear_error(ckpt, tmp_path, extra, match):
    extra = [e.replace("OUT", str(tmp_path)).replace("CKPT", str(ckpt)) for e in extra]
    with pytest.raises(TLError, match=match) as e:
        export.run(ecfg(ckpt, tmp_path / "run", *extra))
    assert e.value.exit_code == 2


def test_cli_export(ckpt, tmp_path):
    r = run_tl(
        "export", f"checkpoint={ckpt}", "format=torchscript", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run/model.pt").is_file() and "max |diff|" in r.stdout
    bad = run_tl(
        "export", f"checkpoint={ckpt}", "format=tflite", f"hydra.run.dir={tmp_path / 'r2'}"
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip().splitlines()[-1].startswith("tl: error: format='tflite' must be one of")
    )
