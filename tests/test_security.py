"""Untrusted checkpoints and configs (issue 5): no code runs, no config is eval'd, outputs stay put.

A crafted checkpoint is tried against every command that loads one: tl eval, tl predict,
tl export and resume (tl train ckpt_path=). Two kinds:

* a pickle whose unpickling would run code (``__reduce__`` -> os.system("touch MARKER"));
* plain data (loads fine with weights_only=True) whose stored config would run code if it were
  instantiated or resolved: a ``_target_`` naming a file writer, or a string that OmegaConf would
  turn into one (``${oc.create:{_target_: pathlib.Path.touch, ...}}``) or into a secret
  (``${oc.env:TOKEN}``). Checkpoints are data (tl_cli.core.checkpoint): neither may do anything.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from tests.conftest import TINY, compose_cfg, run_tl
from tl_cli.core import checkpoint as tl_module
from tl_cli.core.checkpoint import read_checkpoint
from tl_cli.core.errors import TLError
from tl_cli.tasks.loading import load_module

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
        for reader in (tl_module.read_checkpoint, read_checkpoint):
            with pytest.raises(TLError, match=rf"checkpoint={path}: refused"):
                reader(path)
    with pytest.raises(TLError, match=r"\(posix.system\) that is not plain data"):
        read_checkpoint(path)
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


# --------------------------------------------------------------------------- plain-data bombs

#: interpolation forms that OmegaConf would resolve (and Hydra's instantiate would then call)
INTERPOLATIONS = {
    "oc.create": "${oc.create:{_target_:pathlib.Path.touch,_args_:['MARKER']}}",
    "oc.env": "${oc.env:TL_TEST_SECRET}",
    "oc.decode": "${oc.decode:'{a: 1}'}",
    "nested": "prefix-${oc.select:${oc.env:HOME}}",
    "escaped": "\\${oc.env:TL_TEST_SECRET}",
    "plain-ref": "${backbone.name}",
}
#: every stored field a crafted checkpoint could hide one in
FIELDS = [
    ("hyper_parameters", "backbone", "weights_path"),
    ("hyper_parameters", "backbone", "name"),
    ("hyper_parameters", "head", "dropout"),
    ("hyper_parameters", "strategy", "cache_dir"),
    ("hyper_parameters", "optimizer", "lr"),
    ("hyper_parameters", "scheduler", "name"),
    ("hyper_parameters", "class_names", 0),
    ("hyper_parameters", "preprocessing_overrides", "image_size"),
    ("hyper_parameters", "label_smoothing", None),
    ("tl", "dataset", "root"),
    ("tl", "preprocessing", "interpolation"),
    ("tl", "task", None),
]


def _crafted(good: Path, path: Path, section: str, key, sub, value) -> Path:
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    if sub is None:
        ckpt[section][key] = value
    else:
        ckpt[section][key][sub] = value
    torch.save(ckpt, path)
    return path


def test_an_interpolation_bomb_really_runs_code_when_resolved(tmp_path: Path) -> None:
    """The control: OmegaConf + instantiate on such a string writes a file."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    marker = tmp_path / "control_marker"
    node = OmegaConf.create({"x": INTERPOLATIONS["oc.create"].replace("MARKER", str(marker))})
    instantiate(node.x)
    assert marker.exists()


@pytest.mark.parametrize("form", list(INTERPOLATIONS))
def test_interpolations_in_every_field_are_refused_naming_the_key(
    tmp_path: Path, good_ckpt: Path, form: str, monkeypatch
) -> None:
    monkeypatch.setenv("TL_TEST_SECRET", "s3cret")
    marker = tmp_path / "marker"
    value = INTERPOLATIONS[form].replace("MARKER", str(marker))
    for section, key, sub in FIELDS:
        path = _crafted(good_ckpt, tmp_path / "c.ckpt", section, key, sub, value)
        where = f"{section}.{key}" + (
            f"[{sub}]" if isinstance(sub, int) else f".{sub}" if sub else ""
        )
        with pytest.raises(TLError, match=r"looks like an interpolation") as e:
            load_module(path)
        assert where in str(e.value) and "s3cret" not in str(e.value), (where, str(e.value))
    assert not marker.exists()


@pytest.mark.parametrize("where", ["strategy", "head", "backbone", "optimizer", "dataset"])
def test_foreign_targets_are_refused(tmp_path: Path, good_ckpt: Path, where: str) -> None:
    marker = tmp_path / "marker"
    path = _target_bomb(good_ckpt, tmp_path / "t.ckpt", marker, where)
    with pytest.raises(TLError, match=r"may not name code to call"):
        load_module(path)
    assert not marker.exists()


def test_nested_targets_are_refused_even_with_a_known_name(tmp_path: Path, good_ckpt: Path) -> None:
    ckpt = torch.load(good_ckpt, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["head"]["extra"] = {"_target_": "tl_cli.heads.LinearHead"}
    torch.save(ckpt, tmp_path / "n.ckpt")
    with pytest.raises(TLError, match=r"hyper_parameters.head.extra._target_"):
        load_module(tmp_path / "n.ckpt")


def test_unknown_registry_names_and_options_are_refused(tmp_path: Path, good_ckpt: Path) -> None:
    cases = [
        ("head", "name", "os.system", r"head.name='os.system' is not a known head"),
        ("strategy", "name", "pathlib.Path.touch", r"is not a known strategy"),
        ("optimizer", "name", "torch.save", r"is not a known optimizer"),
        ("head", "hidden_evil", 3, r"head.hidden_evil is not an option of head=linear"),
    ]
    for key, sub, value, msg in cases:
        path = _crafted(good_ckpt, tmp_path / "u.ckpt", "hyper_parameters", key, sub, value)
        with pytest.raises(TLError, match=msg):
            load_module(path)


def test_format1_checkpoints_with_tl_targets_still_load(tmp_path: Path, good_ckpt: Path) -> None:
    """tl 0.1 wrote Hydra _target_ strings; its own classes are upgraded to registry names."""
    ckpt = torch.load(good_ckpt, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    hp["backbone"] = {"_target_": "tl_cli.backbones.create_backbone", **hp["backbone"]}
    hp["head"] = {
        "_target_": "tl_cli.heads.LinearHead",
        **{k: v for k, v in hp["head"].items() if k != "name"},
    }
    hp["strategy"] = {
        "_target_": "tl_cli.strategies.FeatureExtraction",
        **{k: v for k, v in hp["strategy"].items() if k != "name"},
    }
    hp["optimizer"] = {
        "_target_": "torch.optim.AdamW",
        **{k: v for k, v in hp["optimizer"].items() if k != "name"},
    }
    hp["image_size"] = hp.pop("preprocessing_overrides").get("image_size")
    ds = ckpt["tl"]["dataset"]
    ckpt["tl"]["dataset"] = {
        "_target_": "tl_cli.data.ImageFolderDataModule",
        **{k: v for k, v in ds.items() if k != "name"},
    }
    for k in ("format", "task", "modality"):
        ckpt["tl"].pop(k)
    torch.save(ckpt, tmp_path / "v1.ckpt")
    module, loaded = load_module(tmp_path / "v1.ckpt")
    ref, _ = load_module(good_ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(module(x), ref(x))
    assert loaded["tl"]["dataset"]["name"] == "imagefolder"


@pytest.mark.slow
def test_no_command_resolves_or_instantiates_checkpoint_content(
    tmp_path: Path, good_ckpt: Path, tiny_data: Path
) -> None:
    image = next(tiny_data.rglob("*.png"))
    cases = [
        ("eval", ("hyper_parameters", "strategy", "cache_dir"), "oc.create"),
        ("eval-dataset", ("tl", "dataset", "root"), "oc.create"),
        ("predict", ("hyper_parameters", "head", "dropout"), "oc.env"),
        ("export", ("hyper_parameters", "backbone", "weights_path"), "nested"),
        ("export-target", None, None),
    ]
    for name, field, form in cases:
        marker = tmp_path / f"marker_{name}"
        if field is None:
            evil = _target_bomb(good_ckpt, tmp_path / f"{name}.ckpt", marker, "backbone")
        else:
            value = INTERPOLATIONS[form].replace("MARKER", str(marker))
            evil = _crafted(good_ckpt, tmp_path / f"{name}.ckpt", *field, value)
        cmd = name.split("-")[0]
        extra = {"predict": [f"inputs={image}"], "export": ["format=safetensors"]}.get(cmd, [])
        r = run_tl(
            cmd,
            f"checkpoint={evil}",
            *extra,
            f"hydra.run.dir={tmp_path / name}",
            env={"TL_TEST_SECRET": "s3cret"},
        )
        assert r.returncode == 2 and not marker.exists(), (name, r.stderr[-2000:])
        line = _one_line(r.stderr)
        assert "refused" in line and "s3cret" not in line, (name, line)


def test_resume_refuses_crafted_checkpoints(tmp_path: Path, good_ckpt: Path, tiny_cfg) -> None:
    from tl_cli.commands.train import run

    marker = tmp_path / "marker"
    evil = _target_bomb(good_ckpt, tmp_path / "t.ckpt", marker)
    with pytest.raises(TLError, match=r"may not name code to call"):
        run(tiny_cfg(f"ckpt_path={evil}"))
    value = INTERPOLATIONS["oc.create"].replace("MARKER", str(marker))
    evil = _crafted(
        good_ckpt, tmp_path / "i.ckpt", "hyper_parameters", "strategy", "cache_dir", value
    )
    with pytest.raises(TLError, match=r"looks like an interpolation"):
        run(tiny_cfg(f"ckpt_path={evil}", f"output_dir={tmp_path / 'r2'}"))
    assert not marker.exists()


# --------------------------------------------------------------------------- no config evaluation


def test_config_values_are_never_evaluated(tiny_cfg, tmp_path: Path) -> None:
    from tl_cli.commands.train import run

    marker = tmp_path / "marker"
    code = f"__import__('os').system('touch {marker}')"
    for override in (f'optimizer.lr="{code}"', f'label_smoothing="{code}"', f'seed="{code}"'):
        with pytest.raises(TLError):  # one clear line, and nothing ran
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
    from tl_cli.commands import predict

    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    before = _files(tmp_path)
    predict.run(_predict_cfg(good_ckpt, tiny_data / "test", sandbox / "run"))
    new = _files(tmp_path) - before
    assert new and all(p.is_relative_to(sandbox / "run") for p in new), new


def test_predict_refuses_a_symlink_out_of_the_run_dir(
    tmp_path: Path, good_ckpt: Path, tiny_data: Path
) -> None:
    from tl_cli.commands import predict

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
    from tl_cli.commands import export, predict

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


# --------------------------------------------------------------------------- stored paths


def test_checkpoints_store_absolute_dataset_roots(tmp_path: Path, tiny_data: Path, monkeypatch):
    """A relative dataset.root is stored absolute: eval from elsewhere scores the same folder."""
    import shutil

    from tl_cli.commands.train import run
    from tl_cli.run.evaluation import dataset_for

    work = tmp_path / "work"
    shutil.copytree(tiny_data, work / "data")
    monkeypatch.chdir(work)
    cfg = compose_cfg([*TINY, "dataset.root=data", "trainer.max_epochs=1"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    run(cfg)
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert ckpt["tl"]["dataset"]["root"] == str((work / "data").resolve())
    # another directory with a folder of the same relative name: not used
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other / "data")
    monkeypatch.chdir(other)
    ecfg = compose_cfg([f"checkpoint={tmp_path / 'run/checkpoints/best.ckpt'}"], "eval")
    dm, _ = dataset_for(ckpt["tl"], ecfg, "best.ckpt")
    assert Path(dm.root) == (work / "data").resolve()
    # the stored folder is gone: one clear line, not a silent switch
    shutil.rmtree(work / "data")
    with pytest.raises(
        TLError, match=r"dataset.root .* does not exist here; pass dataset.root=DIR"
    ):
        dataset_for(ckpt["tl"], ecfg, "best.ckpt")


def test_resume_never_copies_a_file_the_checkpoint_names_unless_it_is_a_tl_checkpoint(
    tmp_path: Path, tiny_cfg
) -> None:
    """A resumed checkpoint names its run's best file; a crafted one must not pull e.g. a secret
    into the new run dir as best.ckpt."""
    from tl_cli.commands.train import run

    run(tiny_cfg("trainer.max_epochs=1", f"output_dir={tmp_path / 'a'}"))
    secret = tmp_path / "secret.ckpt"
    secret.write_text("token=s3cret\n")
    ckpt = torch.load(tmp_path / "a/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    touched = 0
    for state in ckpt["callbacks"].values():
        if isinstance(state, dict) and "best.ckpt" in str(state.get("best_model_path", "")):
            state["best_model_path"] = str(secret)
            touched += 1
    assert touched
    torch.save(ckpt, tmp_path / "evil.ckpt")
    run(
        tiny_cfg(
            "trainer.max_epochs=2",
            f"ckpt_path={tmp_path / 'evil.ckpt'}",
            f"output_dir={tmp_path / 'b'}",
        )
    )
    best = tmp_path / "b/checkpoints/best.ckpt"
    assert best.is_file() and b"s3cret" not in best.read_bytes()
