"""Outputs: never over a user's file or an input, never half a file, strict JSON, one run per dir."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from tl_cli.commands import evaluate, export, predict, train
from tl_cli.core import outputs
from tl_cli.core.errors import TLError
from tl_cli.modalities.image.modality import ImageModality

from .conftest import compose_cfg, run_tl
from .trained_run import trained_run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_data) -> Path:
    return trained_run(tmp_path_factory, tiny_data)[0] / "checkpoints/best.ckpt"


@pytest.fixture
def images(tiny_data, tmp_path) -> Path:
    d = tmp_path / "in"
    shutil.copytree(tiny_data / "test" / "cat", d)
    return d


def cfg_for(name: str, ckpt: Path, out_dir: Path, *extra: str):
    cfg = compose_cfg([f"checkpoint={ckpt}", *extra], config_name=name)
    with open_dict(cfg):
        cfg.output_dir = str(out_dir)
    return cfg


def no_temp_files(d: Path) -> bool:
    return not [p for p in d.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


def refuse_constants(name: str):
    raise ValueError(f"not JSON: {name}")


# --------------------------------------------------------------------------- existing files


def test_predict_refuses_an_existing_output_unless_overwrite(ckpt, images, tmp_path):
    notes = tmp_path / "notes.csv"
    notes.write_text("my notes\n")
    with pytest.raises(TLError, match=r"notes\.csv already exists; pass overwrite=true") as e:
        predict.run(
            cfg_for("predict", ckpt, tmp_path / "run", f"inputs={images}", f"output={notes}")
        )
    assert e.value.exit_code == 2 and notes.read_text() == "my notes\n"
    res = predict.run(
        cfg_for(
            "predict",
            ckpt,
            tmp_path / "run",
            f"inputs={images}",
            f"output={notes}",
            "overwrite=true",
        )
    )
    assert res["num_images"] == 4 and notes.read_text().startswith("path,label_1")
    assert no_temp_files(tmp_path)


def test_output_that_is_an_input_image_is_refused_even_with_overwrite(ckpt, images, tmp_path):
    target = images / "cat_000.png"
    before = target.read_bytes()
    with pytest.raises(TLError, match="would overwrite .*cat_000.png, one of this run's inputs"):
        predict.run(
            cfg_for(
                "predict",
                ckpt,
                tmp_path / "run",
                f"inputs={images}",
                f"output={target}",
                "overwrite=true",
            )
        )
    assert target.read_bytes() == before


@pytest.mark.parametrize("link", ["hard", "sym"])
def test_a_link_to_the_checkpoint_is_refused_even_with_overwrite(ckpt, images, tmp_path, link):
    mine = tmp_path / "best.ckpt"
    shutil.copy(ckpt, mine)
    before = mine.read_bytes()
    preds = tmp_path / "preds.csv"
    if link == "hard":
        os.link(mine, preds)
    else:
        preds.symlink_to(mine)
    with pytest.raises(TLError, match="would overwrite .*best.ckpt, one of this run's inputs"):
        predict.run(
            cfg_for(
                "predict",
                mine,
                tmp_path / "run",
                f"inputs={images}",
                f"output={preds}",
                "overwrite=true",
            )
        )
    assert mine.read_bytes() == before


def test_export_sidecar_that_is_the_checkpoint_is_refused(ckpt, tmp_path):
    m_json = tmp_path / "m.json"  # cp best.ckpt m.json; tl export checkpoint=m.json output=m.pt
    shutil.copy(ckpt, m_json)
    before = m_json.read_bytes()
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(
            TLError, match=r"sidecar .*m\.json would overwrite .*m\.json, one of this run's inputs"
        ):
            export.run(
                cfg_for(
                    "export",
                    m_json,
                    tmp_path / "run",
                    "format=torchscript",
                    f"output={tmp_path / 'm.pt'}",
                    *extra,
                )
            )
    assert m_json.read_bytes() == before and not (tmp_path / "m.pt").exists()


def test_export_refuses_an_existing_sidecar_or_model_before_any_work(ckpt, tmp_path, monkeypatch):
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    (deploy / "model.json").write_text('{"mine": true}\n')
    monkeypatch.setattr(export, "load_module", lambda p: pytest.fail("work started"))
    with pytest.raises(
        TLError, match=r"sidecar .*model\.json already exists; pass overwrite=true"
    ) as e:
        export.run(
            cfg_for(
                "export",
                ckpt,
                tmp_path / "run",
                "format=torchscript",
                f"output={deploy / 'model.pt'}",
            )
        )
    assert e.value.exit_code == 2 and not (deploy / "model.pt").exists()
    assert (deploy / "model.json").read_text() == '{"mine": true}\n'
    (deploy / "other.pt").write_bytes(b"my model")
    with pytest.raises(TLError, match=r"other\.pt already exists"):
        export.run(
            cfg_for(
                "export",
                ckpt,
                tmp_path / "run",
                "format=torchscript",
                f"output={deploy / 'other.pt'}",
            )
        )
    assert (deploy / "other.pt").read_bytes() == b"my model"
    monkeypatch.undo()
    export.run(
        cfg_for(
            "export",
            ckpt,
            tmp_path / "run",
            "format=torchscript",
            f"output={deploy / 'model.pt'}",
            "overwrite=true",
        )
    )
    side = json.loads((deploy / "model.json").read_text())
    assert side["file"] == "model.pt" and (deploy / "model.pt").stat().st_size > 1000
    assert no_temp_files(deploy)


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_full_disk_names_the_file_and_keeps_the_old_one(ckpt, images, tmp_path, monkeypatch, fmt):
    out = tmp_path / f"preds.{fmt}"
    out.write_text("the old predictions\n")

    def half_then_full(f, *args):
        f.write(b'{"schema_version": 1, "predicti')
        raise OSError(errno.ENOSPC, "No space left on device")

    if fmt == "json":
        monkeypatch.setattr(outputs, "_write_file", half_then_full)
    else:
        from tl_cli.tasks.classification import task as classification

        monkeypatch.setattr(
            classification, "write_csv", lambda path, *a, **k: half_then_full(open(path, "wb"))
        )
    with pytest.raises(TLError) as e:
        predict.run(
            cfg_for(
                "predict",
                ckpt,
                tmp_path / "run",
                f"inputs={images}",
                f"output={out}",
                "overwrite=true",
            )
        )
    assert e.value.exit_code == 1
    assert str(e.value).startswith(f"could not write {out}: No space left on device")
    assert out.read_text() == "the old predictions\n" and no_temp_files(tmp_path)


def test_atomic_path_removes_the_temp_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "curves.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), outputs.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".png") and tmp.name.startswith(".")
        tmp.write_bytes(b"new, half")
        raise RuntimeError("savefig broke")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


# --------------------------------------------------------------------------- run dirs


def test_a_second_run_into_a_locked_run_dir_gets_one_line(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = os.open(run_dir / ".tl.lock", os.O_RDWR | os.O_CREAT)  # another tl run holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        with pytest.raises(TLError) as e:
            train.run(tiny_cfg("trainer.max_epochs=1"))
        assert str(e.value).startswith(f"{run_dir} is in use by another tl run (pid 4242)")
        assert "\n" not in str(e.value) and e.value.exit_code == 2
    finally:
        os.close(fd)
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize(
    "name",
    [
        "checkpoints/last.ckpt",
        "metrics.json",
        "report.md",
        "curves.png",
        # issue 23: the CSV logger's files were replaced by a second tl train
        "csv/metrics.csv",
        "csv/hparams.yaml",
    ],
)
def test_rerun_into_a_dir_with_earlier_outputs_is_refused(tiny_cfg, tmp_path, name):
    earlier = tmp_path / "run" / name
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"earlier run")
    with pytest.raises(
        TLError,
        match=rf"{earlier} already exists: choose another hydra.run.dir, or pass overwrite=true",
    ):
        train.run(tiny_cfg("trainer.max_epochs=1"))
    assert earlier.read_bytes() == b"earlier run"


def test_a_completed_run_releases_its_lock(tiny_cfg, tmp_path):
    train.run(tiny_cfg("trainer.max_epochs=1"))
    run_dir = tmp_path / "run"
    assert not (run_dir / ".tl.lock").exists() and not outputs._HELD
    json.loads((run_dir / "metrics.json").read_text(), parse_constant=refuse_constants)


# --------------------------------------------------------------------------- NaN


def test_strict_json_writes_null_and_names_the_nonfinite_keys(tmp_path):
    doc = {
        "acc": 0.5,
        "loss": math.nan,
        "per_class": {"cat": {"f1": math.inf}},
        "h": [1.0, -math.inf],
    }
    path = outputs.write_json(tmp_path / "eval.json", doc)
    got = json.loads(path.read_text(), parse_constant=refuse_constants)
    assert got["loss"] is None and got["per_class"]["cat"]["f1"] is None and got["h"] == [1.0, None]
    assert got["nonfinite"] == ["h[1]", "loss", "per_class.cat.f1"] and got["acc"] == 0.5
    assert "nonfinite" not in json.loads(outputs.dumps({"acc": 1.0}))


@pytest.fixture
def nan_ckpt(ckpt, tmp_path) -> Path:
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    for k, v in c["state_dict"].items():
        if k.startswith("head.") and v.is_floating_point():
            v.fill_(math.nan)
    path = tmp_path / "nan.ckpt"
    torch.save(c, path)
    return path


def test_predict_refuses_nan_model_outputs(nan_ckpt, images, tmp_path):
    out = tmp_path / "preds.csv"
    with pytest.raises(TLError) as e:
        predict.run(
            cfg_for("predict", nan_ckpt, tmp_path / "run", f"inputs={images}", f"output={out}")
        )
    msg = str(e.value)
    assert e.value.exit_code == 1 and "\n" not in msg
    assert msg.startswith(f"checkpoint={nan_ckpt}: the model's output for ") and "NaN/inf" in msg
    assert "head.0." in msg and not out.exists()


def test_eval_json_is_strict_with_a_nan_checkpoint(nan_ckpt, tmp_path):
    # the scores of a model with NaN outputs mean nothing: exit 1, after eval.json is written
    with pytest.raises(TLError, match=r"outputs are NaN/inf .* scores mean nothing") as e:
        evaluate.run(cfg_for("eval", nan_ckpt, tmp_path / "ev"))
    assert e.value.exit_code == 1
    doc = json.loads((tmp_path / "ev" / "eval.json").read_text(), parse_constant=refuse_constants)
    assert doc["loss"] is None and "loss" in doc["nonfinite"] and "NaN/inf" in doc["unusable"]


# --------------------------------------------------------------------------- paths


def _tree(root: Path, tiny_data: Path) -> Path:
    for sub, cls, n in (("a", "cat", 3), ("b", "dog", 4)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            shutil.copy(tiny_data / "test" / cls / f"{cls}_{i:03d}.png", root / sub / f"{i}.png")
    return root


def test_symlink_loop_glob_counts_each_image_once(tiny_data, tmp_path, monkeypatch):
    d = _tree(tmp_path / "d", tiny_data)
    (d / "a" / "loop").symlink_to(d)  # a directory loop (the old glob found 292 "images" in 7)
    monkeypatch.chdir(tmp_path)
    for spec in ("d/**/*.png", str(d / "**" / "*.png"), "d", "d/**"):
        found = ImageModality().find(spec)
        assert len(found) == 7, (spec, len(found))
        assert len({os.path.realpath(f) for f in found}) == 7
    assert len(ImageModality().find("d/*/*.png")) == 7


def test_a_folder_reached_twice_counts_once(tiny_data, tmp_path, monkeypatch):
    e = _tree(tmp_path / "e", tiny_data)
    (e / "also_a").symlink_to(e / "a")  # the same folder under two names
    os.link(e / "b" / "0.png", e / "b" / "hard.png")  # the same file under two names
    monkeypatch.chdir(tmp_path)
    for spec in ("e/**/*.png", "e", "e/*/*.png", "[e/a,e/also_a,e/b]"):
        found = ImageModality().find(compose_cfg([f"inputs={spec}"], "predict").inputs)
        assert len(found) == 7, (spec, found)


def test_output_with_a_trailing_slash_is_a_folder(ckpt, images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = predict.run(
        cfg_for("predict", ckpt, tmp_path / "run", f"inputs={images}", "output=newdir/")
    )
    assert (tmp_path / "newdir").is_dir() and (tmp_path / "newdir" / "predictions.csv").is_file()
    assert Path(res["output"]) == Path("newdir/predictions.csv")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TLError, match="exists and is not a folder"):
        predict.run(cfg_for("predict", ckpt, tmp_path / "run", f"inputs={images}", "output=afile/"))


# --------------------------------------------------------------------------- issue 23: overwrites


@pytest.mark.parametrize("name", ["misclassified.csv", "top_losses.png"])
def test_eval_never_replaces_an_earlier_error_analysis(ckpt, tmp_path, name):
    """tl eval hydra.run.dir=DIR silently replaced DIR/misclassified.csv and top_losses.png."""
    earlier = tmp_path / "ev" / name
    earlier.parent.mkdir()
    earlier.write_bytes(b"earlier run")
    with pytest.raises(TLError, match=rf"{earlier} already exists: choose another"):
        evaluate.run(cfg_for("eval", ckpt, tmp_path / "ev"))
    assert earlier.read_bytes() == b"earlier run"
    assert sorted(p.name for p in earlier.parent.iterdir()) == [name]


def test_every_command_default_output_is_in_the_one_list():
    from tl_cli.commands import pretrain

    names = set(outputs.RUN_OUTPUTS)
    assert set(pretrain.OUTPUTS) <= names
    assert {f"model{ext}" for ext in export.FORMATS.values()} | {"model.json"} <= names
    assert {"checkpoints/zeroshot.ckpt", "fewshot.json", "failed.json"} <= names


def test_a_refused_rerun_leaves_the_earlier_runs_hydra_config_alone(ckpt, images, tmp_path):
    """The refusal comes before Hydra writes RUN/.hydra/*.yaml: a second tl train into a run dir,
    or tl predict / eval / export pointed at it, left the first run's recorded config rewritten
    (tl predict made it say command: predict)."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    shutil.copy(ckpt, run_dir / "checkpoints" / "best.ckpt")
    recorded = {}
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        (run_dir / ".hydra" / name).write_text(f"command: train  # {name}\n")
        recorded[name] = (run_dir / ".hydra" / name).stat().st_mtime_ns
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    commands = {
        "train": ["train", "backbone.name=test_efficientnet", "trainer.max_epochs=1"],
        "predict": ["predict", f"checkpoint={ckpt}", f"inputs={images}"],
        "eval": ["eval", f"checkpoint={ckpt}"],
        "export": ["export", f"checkpoint={ckpt}", "format=safetensors"],
    }
    for name, args in commands.items():
        r = run_tl(*args, f"hydra.run.dir={run_dir}")
        assert r.returncode == 2, (name, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        assert lines[0] == (
            f"tl: error: {run_dir / 'checkpoints' / 'best.ckpt'} already exists: choose "
            "another hydra.run.dir, or pass overwrite=true to replace it"
        ), (name, lines[0])
        for f, mtime in recorded.items():
            assert (run_dir / ".hydra" / f).read_text() == f"command: train  # {f}\n", name
            assert (run_dir / ".hydra" / f).stat().st_mtime_ns == mtime, name
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before, name


def test_every_output_follows_the_umask(ckpt, tmp_path):
    """Issue 23: model.safetensors (safetensors recreates its file), misclassified.csv and
    top_losses.png (written through mkstemp) were created 0600, unlike every other output."""
    old = os.umask(0o027)
    try:
        cfg = cfg_for("export", ckpt, tmp_path / "ex", "format=safetensors")
        export.run(cfg)
        c = torch.load(ckpt, map_location="cpu", weights_only=True)
        c["state_dict"] = {
            k: -v if k.startswith("head.") else v for k, v in c["state_dict"].items()
        }
        wrong = tmp_path / "wrong.ckpt"  # a head that gets things wrong: errors to analyse
        torch.save(c, wrong)
        evaluate.run(cfg_for("eval", wrong, tmp_path / "ev"))
    finally:
        os.umask(old)
    files = [
        tmp_path / "ex" / "model.safetensors",
        tmp_path / "ex" / "model.json",
        tmp_path / "ev" / "misclassified.csv",
        tmp_path / "ev" / "top_losses.png",
        tmp_path / "ev" / "eval.json",
    ]
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files}
    assert set(modes.values()) == {"0o640"}, modes
