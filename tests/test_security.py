"""Untrusted checkpoints and configs (issue 5): no code runs, no config is eval'd, outputs stay put.

A crafted checkpoint is tried against every command that loads one: tl eval, tl predict,
tl export and resume (tl train ckpt_path=). Two kinds:

* a pickle whose unpickling would run code (``__reduce__`` -> os.system("touch MARKER"));
* plain data (loads fine with weights_only=True) whose config names a ``_target_`` that would
  write a file when ``tl eval`` rebuilds the model from it (``pathlib.Path.touch``).
"""

from __future__ import annotations

import ast
import os
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from tests.conftest import TINY, compose_cfg, run_tl
from tl_cli import module as tl_module
from tl_cli.errors import TLError
from tl_cli.safety import check_checkpoint_targets, read_untrusted_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_bomb(path: Path, marker: Path, tl_shaped: bool = True) -> Path:
    payload = {"note": _RunsCode(marker)}
    if tl_shaped:  # looks like a tl checkpoint apart from the payload
        payload.update(
            {"tl": {"class_names": ["a", "b"]}, "hyper_parameters": {}, "state_dict": {}}
        )
    torch.save(payload, path)
    return path


def _target_bomb(good: Path, path: Path, marker: Path, where: str = "strategy") -> Path:
    """A real checkpoint, plain data only, with one config's _target_ swapped for a file writer."""
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    evil = {
        "_target_": "pathlib.Path.touch",
        "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}],
    }
    if where == "dataset":
        ckpt["tl"]["dataset"] = evil
    else:
        ckpt["hyper_parameters"][where] = evil
    torch.save(ckpt, path)
    return path


def _hardened() -> bool:
    """Whether tl_cli.module.read_checkpoint refuses foreign _target_s and names empty files
    (i.e. delegates to tl_cli.safety.read_untrusted_checkpoint, as the lead was asked to wire)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.ckpt"
        p.write_bytes(b"")
        try:
            tl_module.read_checkpoint(p)
        except TLError as e:
            if "not a readable checkpoint" not in str(e):
                return False
        except Exception:  # noqa: BLE001
            return False
        torch.save(
            {
                "tl": {},
                "state_dict": {},
                "hyper_parameters": {"strategy": {"_target_": "builtins.open"}},
            },
            p,
        )
        try:
            tl_module.read_checkpoint(p)
        except TLError:
            return True
        return False


HARDENED = _hardened()
needs_lead_wiring = pytest.mark.xfail(
    not HARDENED,
    strict=True,
    reason="SECURITY: tl_cli/module.py read_checkpoint must delegate to tl_cli.safety.read_untrusted_checkpoint "
    "(checks _target_ strings and empty/non-zip files); see its docstring in tl_cli/safety.py",
)


@pytest.fixture(scope="module")
def good_ckpt(tiny_data: Path, tmp_path_factory) -> Path:
    from tl_cli.train import run

    out = tmp_path_factory.mktemp("sec_good")
    cfg = compose_cfg([*TINY, f"dataset.root={tiny_data}", "trainer.max_epochs=1"])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    run(cfg)
    return out / "checkpoints" / "best.ckpt"


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tl: error: ") and "Traceback" not in stderr, (
        stderr[-3000:]
    )
    return lines[0]


# --------------------------------------------------------------------------- the crafted files are real threats


def test_the_pickle_bomb_really_runs_code_without_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "control_marker"
    path = _pickle_bomb(tmp_path / "control.ckpt", marker)
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()


def test_the_target_bomb_really_writes_a_file_when_instantiated(
    tmp_path: Path, good_ckpt: Path
) -> None:
    from hydra.utils import instantiate

    marker = tmp_path / "control_marker"
    path = _target_bomb(good_ckpt, tmp_path / "t.ckpt", marker)
    ckpt = torch.load(path, weights_only=True)  # plain data: it loads
    instantiate(ckpt["hyper_parameters"]["strategy"])  # what rebuilding the model from it would do
    assert marker.exists()


# --------------------------------------------------------------------------- pickle bombs


def test_read_checkpoint_refuses_the_pickle_bomb(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    for tl_shaped in (True, False):
        path = _pickle_bomb(tmp_path / f"evil_{tl_shaped}.ckpt", marker, tl_shaped)
        for reader in (tl_module.read_checkpoint, read_untrusted_checkpoint):
            with pytest.raises(TLError, match=rf"checkpoint={path}: refused"):
                reader(path)
    with pytest.raises(TLError, match=r"\(posix.system\) that is not plain data"):
        read_untrusted_checkpoint(path)
    assert not marker.exists()


@pytest.mark.slow
def test_no_command_runs_the_pickle_bomb(tmp_path: Path, tiny_data: Path) -> None:
    marker = tmp_path / "marker"
    evil = _pickle_bomb(tmp_path / "evil.ckpt", marker)
    image = next(tiny_data.rglob("*.png"))
    commands = {
        "eval": ["eval", f"checkpoint={evil}"],
        "predict": ["predict", f"checkpoint={evil}", f"inputs={image}"],
        "export": ["export", f"checkpoint={evil}", "format=safetensors"],
        "resume": ["train", *TINY, f"dataset.root={tiny_data}", f"ckpt_path={evil}"],
    }
    for name, args in commands.items():
        r = run_tl(*args, f"hydra.run.dir={tmp_path / name}")
        assert r.returncode == 2, (name, r.stderr[-2000:])
        line = _one_line(r.stderr)
        assert f"checkpoint={evil}: refused" in line, (name, line)
        assert not marker.exists(), f"tl {name} ran code from the checkpoint"


# --------------------------------------------------------------------------- _target_ injection (plain data)


@pytest.mark.parametrize("where", ["strategy", "head", "backbone", "optimizer", "dataset"])
def test_foreign_targets_are_refused_by_the_safe_reader(
    tmp_path: Path, good_ckpt: Path, where: str
) -> None:
    marker = tmp_path / "marker"
    path = _target_bomb(good_ckpt, tmp_path / "t.ckpt", marker, where)
    with pytest.raises(
        TLError, match=r"_target_='pathlib.Path.touch' is not one of tl's own classes"
    ):
        read_untrusted_checkpoint(path)
    assert not marker.exists()


def test_the_real_checkpoints_targets_are_all_allowed(good_ckpt: Path) -> None:
    ckpt = read_untrusted_checkpoint(good_ckpt)
    check_checkpoint_targets(ckpt, good_ckpt)
    for name in (
        "tl_cli.data.SampleDataModule",
        "tl_cli.data.TorchvisionDataModule",
        "torch.optim.SGD",
        "tl_cli.heads.MLPHead",
    ):
        check_checkpoint_targets({"hyper_parameters": {"x": {"_target_": name}}}, "p")
    for name in (
        "tl_cli.safety.atomic_save",
        "tl_cli.data.load_image",
        "torch.save",
        "builtins.open",
        "os.system",
        42,
        "nodots",
    ):
        with pytest.raises(TLError):
            check_checkpoint_targets({"tl": {"dataset": {"nested": [{"_target_": name}]}}}, "p")


@needs_lead_wiring
def test_load_module_does_not_instantiate_foreign_targets(tmp_path: Path, good_ckpt: Path) -> None:
    marker = tmp_path / "marker"
    path = _target_bomb(good_ckpt, tmp_path / "t.ckpt", marker)
    with pytest.raises(TLError, match=r"is not one of tl's own classes"):
        tl_module.load_module(path)
    assert not marker.exists()


@pytest.mark.slow
@needs_lead_wiring
def test_no_command_instantiates_foreign_targets(
    tmp_path: Path, good_ckpt: Path, tiny_data: Path
) -> None:
    image = next(tiny_data.rglob("*.png"))
    for name, where in (
        ("eval", "strategy"),
        ("eval-dataset", "dataset"),
        ("predict", "head"),
        ("export", "backbone"),
    ):
        marker = tmp_path / f"marker_{name}"
        evil = _target_bomb(good_ckpt, tmp_path / f"{name}.ckpt", marker, where)
        cmd = name.split("-")[0]
        extra = {"predict": [f"inputs={image}"], "export": ["format=safetensors"]}.get(cmd, [])
        r = run_tl(cmd, f"checkpoint={evil}", *extra, f"hydra.run.dir={tmp_path / name}")
        assert r.returncode == 2 and not marker.exists(), (name, r.stderr[-2000:])
        assert "is not one of tl's own classes" in _one_line(r.stderr)


def test_resume_refuses_foreign_targets(tmp_path: Path, good_ckpt: Path, tiny_cfg) -> None:
    from tl_cli.train import run

    marker = tmp_path / "marker"
    evil = _target_bomb(good_ckpt, tmp_path / "t.ckpt", marker)
    with pytest.raises(TLError, match=r"is not one of tl's own classes"):
        run(tiny_cfg(f"ckpt_path={evil}"))
    assert not marker.exists()


# --------------------------------------------------------------------------- no config evaluation


def test_config_values_are_never_evaluated(tiny_cfg, tmp_path: Path) -> None:
    from tl_cli.train import run

    marker = tmp_path / "marker"
    code = f"__import__('os').system('touch {marker}')"
    for override in (f'optimizer.lr="{code}"', f'label_smoothing="{code}"', f'seed="{code}"'):
        with pytest.raises(Exception):  # noqa: B017 - any refusal; what matters is that nothing ran
            run(tiny_cfg(override, f"output_dir={tmp_path / 'o'}"))
        assert not marker.exists(), override


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            )
            owner = (
                f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            )
            kw = {k.arg: k.value for k in node.keywords}
            yield node, name, owner, kw


def test_source_has_no_eval_and_every_checkpoint_load_is_weights_only() -> None:
    problems = []
    for src in sorted((ROOT / "tl_cli").glob("*.py")):
        tree = ast.parse(src.read_text(), str(src))
        for node, name, owner, kw in _calls(tree):
            where = f"{src.name}:{node.lineno}"
            bare = isinstance(node.func, ast.Name)  # eval(...), not model.eval()
            if name in ("eval", "exec", "compile") and (bare or owner == "builtins"):
                problems.append(f"{where}: {name}()")
            if (owner, name) in (
                ("pickle", "load"),
                ("pickle", "loads"),
                ("yaml", "load"),
                ("yaml", "unsafe_load"),
            ):
                problems.append(f"{where}: {owner}.{name}()")
            if (owner, name) == ("torch", "load") or name == "load_from_checkpoint":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: {owner or '?'}.{name}() without weights_only=True")
            if (
                name in ("fit", "test", "validate", "predict")
                and "ckpt_path" in kw
                and "weights_only" not in kw
            ):
                problems.append(f"{where}: .{name}(ckpt_path=...) without weights_only")
    assert not problems, problems


# --------------------------------------------------------------------------- output paths


def _files(d: Path) -> set[Path]:
    return {p for p in d.rglob("*") if p.is_file() or p.is_symlink()}


def _predict_cfg(ckpt: Path, inputs: Path, out_dir: Path, *extra: str):
    cfg = compose_cfg(
        [f"checkpoint={ckpt}", f"inputs={inputs}", "num_workers=0", *extra], "predict"
    )
    with open_dict(cfg):
        cfg.output_dir = str(out_dir)
    return cfg


def test_predict_writes_only_into_the_run_dir_by_default(
    tmp_path: Path, good_ckpt: Path, tiny_data: Path
) -> None:
    from tl_cli import predict

    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    before = _files(tmp_path)
    predict.run(_predict_cfg(good_ckpt, tiny_data / "test", sandbox / "run"))
    new = _files(tmp_path) - before
    assert new and all(p.is_relative_to(sandbox / "run") for p in new), new


def test_predict_refuses_a_symlink_out_of_the_run_dir(
    tmp_path: Path, good_ckpt: Path, tiny_data: Path
) -> None:
    from tl_cli import predict

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "predictions.csv").symlink_to(victim)
    with pytest.raises(TLError, match=r"points outside the run dir"):
        predict.run(_predict_cfg(good_ckpt, tiny_data / "test", run_dir))
    assert victim.read_text() == "keep me\n"


def test_predict_and_export_write_where_told_but_never_over_the_checkpoint(
    tmp_path: Path, good_ckpt: Path, tiny_data: Path
) -> None:
    from tl_cli import export, predict

    explicit = tmp_path / "elsewhere" / "preds.csv"
    explicit.parent.mkdir()
    predict.run(_predict_cfg(good_ckpt, tiny_data / "test", tmp_path / "run", f"output={explicit}"))
    assert explicit.is_file() and not (tmp_path / "run" / "predictions.csv").exists()

    before = good_ckpt.read_bytes()
    with pytest.raises(TLError, match=r"would overwrite"):
        predict.run(
            _predict_cfg(good_ckpt, tiny_data / "test", tmp_path / "run2", f"output={good_ckpt}")
        )
    cfg = compose_cfg(
        [f"checkpoint={good_ckpt}", "format=safetensors", f"output={good_ckpt}"], "export"
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run3")
    with pytest.raises(TLError, match=r"would overwrite"):
        export.run(cfg)
    assert good_ckpt.read_bytes() == before

    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    cfg = compose_cfg([f"checkpoint={good_ckpt}", "format=safetensors"], "export")
    with open_dict(cfg):
        cfg.output_dir = str(sandbox / "run")
    snapshot = _files(tmp_path)
    export.run(cfg)
    new = _files(tmp_path) - snapshot
    assert new and all(p.is_relative_to(sandbox / "run") for p in new), new
