"""tl predict: batched top-k inference with the checkpoint's preprocessing; bad images become rows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from tl_cli.commands import predict
from tl_cli.core.errors import TLError
from tl_cli.modalities.image.data import eval_transform, load_image
from tl_cli.tasks.loading import load_module

from .conftest import compose_cfg, run_tl
from .trained_run import trained_run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_data) -> Path:
    return trained_run(tmp_path_factory, tiny_data)[0] / "checkpoints/best.ckpt"


@pytest.fixture
def inputs(tiny_data, tmp_path) -> Path:
    """2 good images, a text file named .jpg, a truncated PNG."""
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(tiny_data / "test/cat/cat_000.png", d / "a_cat.png")
    shutil.copy(tiny_data / "test/fox/fox_001.png", d / "b_fox.png")
    (d / "c_broken.jpg").write_text("not an image")
    (d / "d_trunc.png").write_bytes((tiny_data / "test/dog/dog_000.png").read_bytes()[:120])
    return d


def pcfg(ckpt: Path, out_dir: Path, *extra: str):
    cfg = compose_cfg([f"checkpoint={ckpt}", *extra], config_name="predict")
    with open_dict(cfg):
        cfg.output_dir = str(out_dir)
    return cfg


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_csv_rows_topk_and_error_rows(ckpt, inputs, tmp_path):
    out = tmp_path / "preds.csv"
    res = predict.run(
        pcfg(ckpt, tmp_path / "run", f"inputs={inputs}", f"output={out}", "topk=2", "batch_size=3")
    )
    assert res["num_images"] == 4 and res["num_errors"] == 2
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "error"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert [Path(r["path"]).name for r in rows] == sorted(by_name)  # sorted, one row per image
    assert by_name["a_cat.png"]["label_1"] == "cat" and by_name["b_fox.png"]["label_1"] == "fox"
    for name in ("a_cat.png", "b_fox.png"):
        r = by_name[name]
        p1, p2 = float(r["prob_1"]), float(r["prob_2"])
        assert (
            1.0 >= p1 >= p2 >= 0
            and p1 > 0  # 6 decimals: a confident head rounds p2 to 0
            and p1 + p2 <= 1.0 + 1e-6
            and r["label_2"] != r["label_1"]
            and r["error"] == ""
        )
    for name in ("c_broken.jpg", "d_trunc.png"):
        r = by_name[name]
        assert r["error"] and r["label_1"] == "" and r["prob_1"] == ""
    assert (
        "c_broken.jpg" in by_name["c_broken.jpg"]["error"]
        or "image" in by_name["c_broken.jpg"]["error"]
    )
    assert not (tmp_path / "run").exists() or not any(
        (tmp_path / "run").iterdir()
    )  # wrote only where told


def test_probabilities_match_the_checkpoint_preprocessing(ckpt, inputs, tmp_path):
    out = tmp_path / "p.json"
    predict.run(
        pcfg(ckpt, tmp_path / "run", f"inputs={inputs / 'a_cat.png'}", f"output={out}", "topk=3")
    )
    doc = json.loads(out.read_text())
    module, meta = load_module(ckpt)
    x = eval_transform(meta["tl"]["preprocessing"])(load_image(inputs / "a_cat.png"))[None]
    with torch.no_grad():
        probs = torch.softmax(module(x), 1)[0]
    names = meta["tl"]["class_names"]
    got = {e["label"]: e["prob"] for e in doc["predictions"][0]["topk"]}
    assert got == pytest.approx({names[i]: float(probs[i]) for i in range(3)}, abs=1e-6)


def test_json_output_schema_and_topk_capped(ckpt, inputs, tmp_path):
    out = tmp_path / "preds.json"
    res = predict.run(pcfg(ckpt, tmp_path / "run", f"inputs={inputs}", f"output={out}", "topk=10"))
    doc = json.loads(out.read_text())
    assert res["format"] == "json" and doc["schema_version"] == 1
    assert doc["class_names"] == ["cat", "dog", "fox"] and doc["topk"] == 3  # capped at 3 classes
    assert doc["num_images"] == 4 and doc["num_errors"] == 2
    good = [p for p in doc["predictions"] if p["error"] is None]
    assert len(good) == 2 and all(len(p["topk"]) == 3 for p in good)
    assert all(sum(e["prob"] for e in p["topk"]) == pytest.approx(1.0, abs=1e-5) for p in good)
    assert all(p["topk"] == [] and p["error"] for p in doc["predictions"] if p["error"])


def test_default_output_is_the_run_dir(ckpt, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    res = predict.run(pcfg(ckpt, run_dir, f"inputs={tiny_data / 'test'}"))
    assert Path(res["output"]) == run_dir / "predictions.csv"
    rows = read_csv(run_dir / "predictions.csv")
    assert len(rows) == 12 and all(r["error"] == "" for r in rows)
    # predictions agree with the folder labels (the tiny model scores 1.0 on this split)
    assert all(Path(r["path"]).parent.name == r["label_1"] for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing else written


def test_glob_and_list_inputs(ckpt, tiny_data, inputs, tmp_path):
    res = predict.run(
        pcfg(ckpt, tmp_path / "r1", f"inputs='{tiny_data}/test/*/*_00[01].png'")
    )  # quoted for Hydra
    assert res["num_images"] == 6
    res = predict.run(
        pcfg(ckpt, tmp_path / "r2", f"inputs=[{tiny_data / 'test/cat'},{inputs / 'b_fox.png'}]")
    )
    assert res["num_images"] == 5 and res["num_errors"] == 0


def test_default_output_symlinked_out_of_the_run_dir_is_refused(ckpt, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "predictions.csv").symlink_to(tmp_path / "elsewhere.csv")
    with pytest.raises(TLError, match="outside the run dir"):
        predict.run(pcfg(ckpt, run_dir, f"inputs={tiny_data / 'test'}"))
    assert not (tmp_path / "elsewhere.csv").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["inputs=/no/such/dir"], "inputs=/no/such/dir: no such file or folder"),
        (["inputs=/no/such/*.png"], "the pattern matches no images"),
        (["inputs=INPUTS", "topk=0"], "topk=0 must be a whole number >= 1"),
        (["inputs=INPUTS", "format=xml"], "format='xml' must be auto, csv or json"),
        (["inputs=INPUTS", "output=CKPT"], "would overwrite"),
    ],
)
def test_bad_input_is_one_clear_error(ckpt, inputs, tmp_path, extra, match):
    extra = [e.replace("INPUTS", str(inputs)).replace("CKPT", str(ckpt)) for e in extra]
    with pytest.raises(TLError, match=match) as e:
        predict.run(pcfg(ckpt, tmp_path / "run", *extra))
    assert e.value.exit_code == 2


def test_all_inputs_unreadable_exits_1_but_writes_rows(ckpt, inputs, tmp_path):
    out = tmp_path / "bad.csv"
    with pytest.raises(TLError, match="none of the 1 inputs could be read") as e:
        predict.run(
            pcfg(ckpt, tmp_path / "run", f"inputs={inputs / 'c_broken.jpg'}", f"output={out}")
        )
    assert e.value.exit_code == 1 and len(read_csv(out)) == 1


def test_cli_predict_and_missing_checkpoint(ckpt, inputs, tmp_path):
    out = tmp_path / "cli.csv"
    ok = run_tl(
        "predict",
        f"checkpoint={ckpt}",
        f"inputs={inputs}",
        f"output={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert ok.returncode == 0, ok.stderr
    assert len(read_csv(out)) == 4 and "2 unreadable" in ok.stdout
    bad = run_tl(
        "predict",
        f"checkpoint={tmp_path / 'nope.ckpt'}",
        f"inputs={inputs}",
        f"hydra.run.dir={tmp_path / 'r2'}",
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip().splitlines()[-1]
        == f"tl: error: checkpoint={tmp_path / 'nope.ckpt'}: file not found"
    )
