"""CI gates (fail_under / fail_over), the eval.json / metrics.json schemas, reproducible scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from tl_cli.commands import evaluate, train
from tl_cli.core.errors import TLError
from tl_cli.run import gates

from .conftest import compose_cfg, run_tl
from .trained_run import trained_run

# The documented schema (README.md, "`eval.json` (schema_version 1)"): these keys and types stay.
EVAL_SCHEMA = {
    "schema_version": int,
    "checkpoint": str,
    "dataset": str,
    "split": str,
    "class_names": list,
    "acc": float,
    "macro_f1": float,
    "loss": float,
    "num_samples": int,
    "per_class": dict,
    "confusion_matrix": list,
    "gates": list,
}
METRICS_SCHEMA = {
    "schema_version": int,
    "val/acc": float,
    "val/loss": float,
    "test/acc": float,
    "test/loss": float,
    "test/macro_f1": float,
    "best_epoch": int,
    "epochs": int,
    "fit_seconds": float,
    "history": list,
    "backbone": str,
    "strategy": str,
    "num_classes": int,
    "class_names": list,
    "train_size": int,
    "val_size": int,
    "test_size": int,
    "best_checkpoint": str,
    "gates": list,
}
HISTORY_KEYS = {"epoch", "train/loss", "train/acc", "val/loss", "val/acc", "seconds"}
GATE_KEYS = {"rule", "metric", "threshold", "key", "value", "passed", "error"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data) -> Path:
    return trained_run(tmp_path_factory, tiny_data)[0]


def eval_cfg(ckpt: Path, out: Path, *extra: str):
    cfg = compose_cfg([f"checkpoint={ckpt}", *extra], config_name="eval")
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def test_fail_under_composes_without_plus_on_train_and_eval():
    cfg = compose_cfg(["fail_under.acc=0.9", "fail_under.val.acc=0.8", "fail_over.loss=0.5"])
    assert cfg.fail_under.acc == 0.9 and cfg.fail_under.val.acc == 0.8 and cfg.fail_over.loss == 0.5
    ev = compose_cfg(
        ["checkpoint=x.ckpt", "fail_under.per_class.cat.recall=0.7"], config_name="eval"
    )
    parsed = gates.parse(ev)
    assert [(g.rule, g.metric, g.threshold) for g in parsed] == [
        ("fail_under", "per_class.cat.recall", 0.7)
    ]
    assert compose_cfg([]).fail_under == {}  # no gates by default


@pytest.mark.parametrize("value", ["abc", True, None])
def test_threshold_that_is_not_a_number_is_bad_input(value):
    with pytest.raises(TLError, match="fail_under.acc=.* is not a number") as e:
        gates.parse({"fail_under": {"acc": value}})
    assert e.value.exit_code == 2


def test_gate_semantics_under_and_over():
    data = {"acc": 0.8, "loss": 0.4, "per_class": {"cat": {"recall": 0.5}}}
    gs = gates.parse(
        {
            "fail_under": {"acc": 0.8, "per_class": {"cat": {"recall": 0.6}}},
            "fail_over": {"loss": 0.3},
        }
    )
    gates.evaluate(gs, data, "eval")
    assert [g.passed for g in gs] == [True, False, False]  # equal to the threshold passes
    with pytest.raises(TLError) as e:
        gates.enforce(gs, "eval.json")
    assert e.value.exit_code == 1
    msg = str(e.value)
    assert (
        "\n" not in msg
        and "per_class.cat.recall 0.5000 < 0.6" in msg
        and "loss 0.4000 > 0.3" in msg
    )


def test_train_gate_names_resolve_to_test_then_val():
    with_test = {"val/acc": 0.5, "test/acc": 0.9, "test/macro_f1": 0.7}
    assert gates.resolve_train_key("acc", with_test) == "test/acc"
    assert gates.resolve_train_key("val.acc", with_test) == "val/acc"
    assert gates.resolve_train_key("acc", {"val/acc": 0.5}) == "val/acc"
    assert gates.resolve_train_key("macro_f1", {"val/acc": 0.5}) is None


def test_eval_gates_pass_and_fail_after_writing_outputs(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints/best.ckpt"
    res = evaluate.run(
        eval_cfg(ckpt, tmp_path / "ok", "fail_under.acc=0.5", "fail_under.macro_f1=0.5")
    )
    assert res["acc"] == 1.0 and [g["passed"] for g in res["gates"]] == [True, True]

    with pytest.raises(TLError, match=r"gate failed: acc 1\.0000 < 1\.01 \(fail_under\.acc\)") as e:
        evaluate.run(eval_cfg(ckpt, tmp_path / "bad", "fail_under.acc=1.01"))
    assert e.value.exit_code == 1
    saved = json.loads((tmp_path / "bad/eval.json").read_text())  # the artifact is there for CI
    assert saved["gates"][0]["passed"] is False and saved["gates"][0]["value"] == 1.0
    assert (tmp_path / "bad/confusion_matrix.png").is_file() and (
        tmp_path / "bad/report.md"
    ).is_file()


def test_eval_gate_on_unknown_metric_names_it(run_dir, tmp_path):
    with pytest.raises(
        TLError, match="fail_under.accuracy: no metric 'accuracy' in eval.json"
    ) as e:
        evaluate.run(
            eval_cfg(run_dir / "checkpoints/best.ckpt", tmp_path / "e", "fail_under.accuracy=0.9")
        )
    assert e.value.exit_code == 2


def test_eval_cli_gate_exit_codes(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints/best.ckpt"
    bad = run_tl(
        "eval",
        f"checkpoint={ckpt}",
        f"hydra.run.dir={tmp_path / 'cli'}",
        "fail_under.acc=1.01",
        "fail_under.macro_f1=0.5",
    )
    assert bad.returncode == 1, bad.stderr
    err = bad.stderr.strip().splitlines()
    assert (
        err[-1].startswith("tl: error: gate failed: acc 1.0000 < 1.01")
        and "macro_f1" not in err[-1]
    )
    assert "Traceback" not in bad.stderr
    assert "FAIL" in bad.stdout  # the gates table


def test_eval_json_schema_and_identical_scores_twice(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints/best.ckpt"
    evaluate.run(eval_cfg(ckpt, tmp_path / "a", "fail_under.acc=0.5"))
    evaluate.run(eval_cfg(ckpt, tmp_path / "b", "fail_under.acc=0.5"))
    a = json.loads((tmp_path / "a/eval.json").read_text())
    b = json.loads((tmp_path / "b/eval.json").read_text())
    for key, typ in EVAL_SCHEMA.items():
        assert isinstance(a[key], typ), key
    assert a["schema_version"] == 1
    assert set(a["per_class"]["cat"]) >= {"precision", "recall", "f1", "support"}
    assert len(a["confusion_matrix"]) == len(a["class_names"]) == 3
    assert set(a["gates"][0]) == GATE_KEYS
    assert a == b  # bit-identical numbers on CPU


def test_metrics_json_schema(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    for key, typ in METRICS_SCHEMA.items():
        assert isinstance(m[key], typ), key
    assert m["schema_version"] == 1 and m["gates"] == []
    assert len(m["history"]) == m["epochs"] == 4
    assert all(HISTORY_KEYS <= set(r) for r in m["history"])


def test_train_gate_fails_with_exit_1_after_writing_outputs(tiny_cfg):
    cfg = tiny_cfg("trainer.max_epochs=1", "fail_under.val.acc=1.01", "fail_under.acc=0.0")
    with pytest.raises(
        TLError, match=r"gate failed: val/acc [0-9.]+ < 1\.01 \(fail_under\.val\.acc\)"
    ) as e:
        train.run(cfg)
    assert e.value.exit_code == 1 and "fail_under.acc)" not in str(e.value)
    out = Path(cfg.output_dir)
    m = json.loads((out / "metrics.json").read_text())
    assert [(g["key"], g["passed"]) for g in m["gates"]] == [("val/acc", False), ("test/acc", True)]
    assert (out / "report.md").is_file() and "**FAIL**" in (out / "report.md").read_text()


def test_train_gate_with_unknown_metric_fails_before_training(tiny_cfg):
    cfg = tiny_cfg("fail_under.accuracy=0.5")
    with pytest.raises(
        TLError, match="fail_under.accuracy: tl train has no metric 'accuracy'"
    ) as e:
        train.run(cfg)
    assert e.value.exit_code == 2
    assert not (Path(cfg.output_dir) / "checkpoints").exists()


# -- non-finite metrics (NaN / inf) fail every gate that names them


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("rule", ["fail_under", "fail_over"])
def test_nonfinite_metric_fails_gate_of_either_rule(bad, rule):
    gs = gates.parse({rule: {"loss": 0.5, "per_class": {"cat": {"f1": 0.5}}}})
    gates.evaluate(gs, {"loss": bad, "per_class": {"cat": {"f1": bad}}}, "eval")
    assert [g.passed for g in gs] == [False, False] and not any(g.error for g in gs)
    assert all(g.as_dict()["value"] is None for g in gs)  # no NaN/inf in eval.json
    with pytest.raises(TLError) as e:
        gates.enforce(gs, "eval.json")
    kind = "nan" if bad != bad else ("inf" if bad > 0 else "-inf")
    assert e.value.exit_code == 1 and "\n" not in str(e.value)
    assert f"loss = {kind} is not finite ({rule}.loss)" in str(e.value)
    assert f"per_class.cat.f1 = {kind} is not finite" in str(e.value)


@pytest.mark.parametrize("rule", ["fail_under", "fail_over"])
def test_nonfinite_flagged_none_fails_not_missing(rule):
    """Strict JSON writes NaN as null and lists the key under "nonfinite"."""
    ev = gates.parse({rule: {"loss": 0.5, "acc": 0.9}})  # acc equal to the threshold: passes
    gates.evaluate(ev, {"loss": None, "acc": 0.9, "nonfinite": ["loss"]}, "eval")
    assert [g.passed for g in ev] == [False, True] and not any(g.error for g in ev)
    with pytest.raises(TLError, match=rf"loss is not finite \({rule}\.loss\)") as e:
        gates.enforce(ev, "eval.json")
    assert e.value.exit_code == 1 and "acc" not in str(e.value)

    metrics = {
        "val/loss": None,
        "val/acc": 0.9,
        "test/loss": None,
        "nonfinite": ["val/loss", "test/loss"],
    }
    tr = gates.parse({rule: {"loss": 0.5, "val": {"loss": 0.5}}})
    gates.evaluate(tr, metrics, "train")
    assert [(g.key, g.passed, g.error) for g in tr] == [
        ("test/loss", False, None),
        ("val/loss", False, None),
    ]
    # a None that is not flagged is still a missing metric (bad input, exit 2)
    miss = gates.parse({rule: {"loss": 0.5}})
    gates.evaluate(miss, {"loss": None, "acc": 0.9}, "eval")
    with pytest.raises(TLError, match="no metric 'loss'") as e:
        gates.enforce(miss, "eval.json")
    assert e.value.exit_code == 2


def test_finite_metrics_still_pass_and_fail_as_before():
    gs = gates.parse({"fail_under": {"acc": 0.5}, "fail_over": {"loss": 1e9}})
    gates.evaluate(gs, {"acc": 0.5, "loss": 3.0, "nonfinite": []}, "eval")
    assert [g.passed for g in gs] == [True, True]
    gates.enforce(gs, "eval.json")  # no error


def nan_head_checkpoint(run_dir: Path, path: Path) -> Path:
    """The run's best.ckpt with every head weight NaN."""
    import torch

    ckpt = torch.load(run_dir / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    head = [k for k in ckpt["state_dict"] if k.startswith("head") and k.endswith("weight")]
    assert head
    for k in head:
        ckpt["state_dict"][k] = torch.full_like(ckpt["state_dict"][k], float("nan"))
    torch.save(ckpt, path)
    return path


def test_eval_cli_nan_checkpoint_fails_loss_gate(run_dir, tmp_path):
    nan_ckpt = nan_head_checkpoint(run_dir, tmp_path / "nan.ckpt")
    r = run_tl(
        "eval", f"checkpoint={nan_ckpt}", f"hydra.run.dir={tmp_path / 'e'}", "fail_over.loss=0.5"
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "is not finite (fail_over.loss)" in last and last.startswith("tl: error: gate failed")
    assert "Traceback" not in r.stderr


def test_eval_nan_model_fails_every_gate_whatever_its_accuracy(run_dir, tmp_path):
    """Issue 23: NaN head weights gave acc 0.5 (an argmax over NaN logits) and passed
    fail_under.acc=0.1. A model with NaN/inf outputs fails every gate; without gates eval still
    exits 1 (its scores mean nothing), after writing eval.json."""
    nan_ckpt = nan_head_checkpoint(run_dir, tmp_path / "nan.ckpt")
    r = run_tl(
        "eval", f"checkpoint={nan_ckpt}", f"hydra.run.dir={tmp_path / 'g'}", "fail_under.acc=0.1"
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("tl: error: gate failed: acc ") and "(fail_under.acc)" in lines[0]
    assert "is not usable: the model's outputs are NaN/inf" in lines[0]
    ev = json.loads((tmp_path / "g" / "eval.json").read_text())
    assert ev["gates"][0]["passed"] is False and "NaN/inf" in ev["unusable"]
    r = run_tl("eval", f"checkpoint={nan_ckpt}", f"hydra.run.dir={tmp_path / 'n'}")
    assert r.returncode == 1 and (tmp_path / "n" / "eval.json").is_file()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "its weight head." in lines[0] and "scores mean nothing" in lines[0]
