"""Hydra multirun: every run in the sweep, a summary table at the end, failures counted; Optuna."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tl_cli.run import sweep

from .conftest import TINY, run_tl


def fake_job(
    root: Path,
    num: int,
    overrides: list[str],
    metrics: dict | None = None,
    failed: str | None = None,
) -> None:
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra/overrides.yaml")
    if metrics is not None:
        (d / "metrics.json").write_text(
            json.dumps({**metrics, "history": [], "class_names": ["a"]})
        )
    if failed:
        (d / sweep.FAILED_FILE).write_text(json.dumps({"error": failed, "exit_code": 1}))


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    common = ["dataset.root=/data", "trainer.max_epochs=2"]
    fake_job(
        tmp_path,
        0,
        [*common, "optimizer.lr=0.001", "strategy=finetune"],
        {"val/acc": 0.5, "test/acc": 0.4},
    )
    fake_job(
        tmp_path,
        1,
        [*common, "optimizer.lr=0.0003", "strategy=finetune"],
        {"val/acc": 0.75, "test/acc": 0.7},
    )
    fake_job(
        tmp_path,
        2,
        [*common, "optimizer.lr=0.001", "strategy=feature_extraction"],
        {"val/acc": 0.9},
        failed="gate failed: x",
    )
    fake_job(
        tmp_path, 10, [*common, "optimizer.lr=0.0003", "strategy=feature_extraction"]
    )  # crashed: no result
    return tmp_path


def test_summary_has_a_row_per_job_with_the_swept_overrides(sweep_dir):
    rows = sweep.collect(sweep_dir)
    assert [r["job"] for r in rows] == [0, 1, 2, 10]  # numeric order, not 0, 1, 10, 2
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "no result"]
    assert sweep.varying_keys(rows) == ["optimizer.lr", "strategy"]  # common overrides left out
    csv_path, md_path = sweep.write_summary(sweep_dir, rows, "val/acc")
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert [t["optimizer.lr"] for t in table] == ["0.001", "0.0003", "0.001", "0.0003"]
    assert (
        table[1]["val/acc"] == "0.75"
        and table[0]["test/acc"] == "0.4"
        and table[3]["val/acc"] == ""
    )
    assert table[2]["status"] == "failed" and table[2]["error"] == "gate failed: x"
    md = md_path.read_text()
    assert "Best by val/acc: job 1 (0.7500)" in md  # a failed job (0.9) is never the best
    assert "| 1* | ok | `0.0003` | `finetune` | 0.7500 |" in md


def test_best_ignores_failed_jobs_and_prefers_low_loss():
    rows = [
        {"job": 0, "status": "ok", "metrics": {"val/loss": 0.5, "val/acc": 0.9}},
        {"job": 1, "status": "ok", "metrics": {"val/loss": 0.2, "val/acc": 0.7}},
        {"job": 2, "status": "failed", "metrics": {"val/loss": 0.1, "val/acc": 0.95}},
        {"job": 3, "status": "ok", "metrics": {"val/loss": float("nan"), "val/acc": 0.1}},
    ]
    assert sweep._best(rows, "val/loss")["job"] == 1  # lowest loss among finished, finite jobs
    assert sweep._best(rows, "val/acc")["job"] == 0  # highest accuracy, failed job 2 ignored
    assert sweep._best(rows[2:3], "val/acc") is None and sweep._best(rows, None) is None


def test_callback_writes_summary_and_exits_1_when_a_job_failed(sweep_dir, capsys):
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    with pytest.raises(SystemExit) as e:
        sweep.SweepSummary().on_multirun_end(config=cfg)
    assert e.value.code == 1
    assert (sweep_dir / "summary.csv").is_file() and (sweep_dir / "summary.md").is_file()
    out, err = capsys.readouterr()
    assert "sweep: 4 runs" in out and "job 2 failed: gate failed: x" in out
    assert (
        err.strip()
        == f"tl: error: 2 of 4 sweep runs failed (jobs 2, 10); see {sweep_dir / 'summary.md'}"
    )
    sweep.SweepSummary(fail_on_error=False).on_multirun_end(config=cfg)  # no exit


def test_objective_for_sweepers():
    cfg = OmegaConf.create({"optimized_metric": "val/acc"})
    assert sweep.objective(cfg, {"val/acc": 0.5}) == 0.5
    assert sweep.objective(OmegaConf.create({}), {"val/acc": 0.5}) is None
    with pytest.raises(Exception, match="optimized_metric='val/acc' is not a metric"):
        sweep.objective(cfg, {"acc": 0.5})


def _tiny(tiny_data: Path) -> list[str]:
    return [*TINY, f"dataset.root={tiny_data}", "trainer.max_epochs=1"]


def test_multirun_grid_summary_and_a_failed_run(tiny_data, tmp_path):
    """strategy x gate threshold: 4 runs; the 2 with an impossible gate fail, the sweep goes on."""
    sweep_dir = tmp_path / "sweep"
    r = run_tl(
        "train",
        "-m",
        *_tiny(tiny_data),
        "optimizer.lr=0.05",
        "strategy=feature_extraction,finetune",
        "fail_under.val.acc=0.0,1.01",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("tl: error: 2 of 4 sweep runs failed (jobs 1, 3)")
    )
    with (sweep_dir / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(t["strategy"], t["fail_under.val.acc"], t["status"]) for t in table] == [
        ("feature_extraction", "0.0", "ok"),
        ("feature_extraction", "1.01", "failed"),
        ("finetune", "0.0", "ok"),
        ("finetune", "1.01", "failed"),
    ]
    assert "optimizer.lr" not in table[0]  # the same in every run: not a column
    for i, t in enumerate(table):
        m = json.loads(
            (sweep_dir / str(i) / "metrics.json").read_text()
        )  # failed runs keep outputs
        assert float(t["val/acc"]) == pytest.approx(m["val/acc"]) and m["strategy"] == t["strategy"]
    assert (
        "gate failed: val/acc" in table[1]["error"]
        and (sweep_dir / "1" / sweep.FAILED_FILE).is_file()
    )
    assert "sweep: 4 runs" in r.stdout and (sweep_dir / "summary.md").is_file()


def test_optuna_search(tiny_data, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna extra (in dev)")
    sweep_dir = tmp_path / "sweep"
    r = run_tl(
        "train",
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        *_tiny(tiny_data),
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert r.returncode == 0, r.stderr
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    vals = [
        json.loads((sweep_dir / str(i) / "metrics.json").read_text())["val/acc"] for i in range(2)
    ]
    assert best.best_value == pytest.approx(max(vals)) and "optimizer.lr" in best.best_params
    with (sweep_dir / "summary.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2


def test_hparams_search_without_multirun_is_one_line(tmp_path):
    r = run_tl("train", "hparams_search=optuna", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "tl: error: hparams_search=optuna searches only in multirun mode: add -m (tl train -m hparams_search=optuna)"
    )


# --------------------------------------------------------------------------- issue 23: reruns


def test_a_sweep_into_an_earlier_sweep_dir_is_refused_before_any_job(sweep_dir, tiny_data):
    """It used to refuse each job, then rewrite summary.csv/md with every job failed and leave
    failed.json in the earlier, successful job dirs."""
    (sweep_dir / "summary.csv").write_text("earlier summary\n")
    (sweep_dir / "summary.md").write_text("earlier summary\n")
    before = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    r = run_tl(
        "train",
        "-m",
        *_tiny(tiny_data),
        "strategy=feature_extraction,finetune",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "an earlier sweep" in lines[0] and "overwrite=true" in lines[0]
    after = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    assert after == before  # no summary rewritten, no failed.json, no .hydra rewritten
    (sweep_dir / "summary.csv").unlink()
    (sweep_dir / "summary.md").unlink()
    r = run_tl("train", "-m", *_tiny(tiny_data), "seed=1,2", f"hydra.sweep.dir={sweep_dir}")
    assert r.returncode == 2 and f"{sweep_dir / '0' / 'metrics.json'} already exists" in r.stderr


def test_a_refused_job_marks_nothing_and_the_summary_is_kept(sweep_dir, tmp_path, capsys):
    """Behind the up-front check: a job refused for an earlier run's dir writes no failed.json
    there, and the summary of an earlier sweep is not replaced without overwrite=true."""
    cfg = OmegaConf.create({"output_dir": str(sweep_dir / "0")})
    sweep._record_failure(cfg, "x already exists", 2)
    assert not (sweep_dir / "0" / sweep.FAILED_FILE).exists()
    fresh = OmegaConf.create({"output_dir": str(tmp_path / "fresh")})
    sweep._record_failure(fresh, "bad input", 2)  # a job's own dir: recorded
    assert (tmp_path / "fresh" / sweep.FAILED_FILE).is_file()
    (sweep_dir / "summary.md").write_text("earlier summary\n")
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    sweep.SweepSummary().on_multirun_end(config=cfg)
    assert (sweep_dir / "summary.md").read_text() == "earlier summary\n"
    assert "earlier sweep's summary: kept" in capsys.readouterr().err
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}, "overwrite": True})
    with pytest.raises(SystemExit):
        sweep.SweepSummary().on_multirun_end(config=cfg)
    assert (sweep_dir / "summary.md").read_text() != "earlier summary\n"
