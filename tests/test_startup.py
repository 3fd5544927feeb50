"""A fast first second (issue 29): help, listings and config/path errors never import torch, and a
command that writes nothing leaves no run dir behind. Speed itself is measured by
scripts/bench_startup.py (docs/benchmarks.md), never timed here."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import run_tl

HEAVY = ("torch", "pytorch_lightning", "timm", "torchvision", "transformers")


def _run_main(args: list[str], cwd: Path) -> tuple[int, list[str], str]:
    """``tl ARGS`` in a fresh interpreter: (exit code, heavy modules imported, stderr)."""
    code = (
        "import sys\n"
        "from tl_cli.cli import main\n"
        "try:\n"
        f"    main({args!r}); rc = 0\n"
        "except SystemExit as e:\n"
        "    rc = e.code if isinstance(e.code, int) else 1\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print('RESULT', rc, ','.join(heavy), file=sys.stderr)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    last = next(ln for ln in reversed(r.stderr.splitlines()) if ln.startswith("RESULT"))
    _, rc, heavy = (last.split(" ") + [""])[:3]
    return int(rc), [h for h in heavy.split(",") if h], r.stderr


def test_trainer_args_are_lightnings():
    """The Trainer's arguments are listed in tl (so a key typo needs no Lightning import): the
    list must be Lightning's, or a typo check would accept a key Lightning refuses."""
    import pytorch_lightning as pl

    from tl_cli.run.validate import TRAINER_ARGS

    params = [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]
    assert list(TRAINER_ARGS) == params


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--help"], None),
        (
            ["train", "trainer.max_epoch=1"],
            "trainer.max_epoch=1: trainer.max_epoch is not a key of trainer (did you mean "
            "trainer.max_epochs=1",
        ),
        (["train", "trainer.max_epochs=0"], "trainer.max_epochs=0 must be an integer >= 1 or auto"),
        (["train", "dataset.root=/no/such/folder"], "dataset.root=/no/such/folder does not exist"),
        (["train", "label_smoothing=2"], "label_smoothing=2 must be in [0, 1)"),
        (["eval", "checkpoint=/no/such.ckpt"], "checkpoint=/no/such.ckpt: file not found"),
        (["distill", "teacher=/no/such.ckpt"], "checkpoint=/no/such.ckpt: file not found"),
        (
            ["train", "dataset=imagefolder", "dataset.root=/no/such/folder"],
            "dataset.root=/no/such/folder does not exist",
        ),
    ],
)
def test_help_and_config_errors_import_no_torch(args, says, tmp_path):
    rc, heavy, err = _run_main(args, tmp_path)
    assert heavy == [], (args, heavy, err[-2000:])
    if says is None:
        assert rc == 0
    else:
        assert rc == 2 and f"tl: error: {says}" in err, err[-2000:]
        assert "Traceback" not in err
    assert not (tmp_path / "outputs").exists()  # a command that wrote nothing leaves no run dir


def test_a_csv_without_its_label_column_fails_before_torch(tmp_path: Path):
    (tmp_path / "reviews.csv").write_text("text\ngreat value\nbroke in a week\n")
    rc, heavy, err = _run_main(["train", "modality=text", "dataset.root=reviews.csv"], tmp_path)
    assert heavy == [], (heavy, err[-2000:])
    assert rc == 2 and "no column 'label' (columns: text); set dataset.label_column" in err, err
    assert "Traceback" not in err and not (tmp_path / "outputs").exists()


def test_help_into_a_closed_pipe_ends_quietly(tmp_path: Path):
    """``tl train --help | head -1``: the reader closes the pipe before tl has written."""
    p = subprocess.Popen(
        [sys.executable, "-m", "tl_cli", "train", "--help"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # nobody reads: tl's first write meets a closed pipe
    err = p.stderr.read()
    assert p.wait(timeout=300) == 141, err[-2000:]
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_a_failed_run_keeps_folders_that_were_there(tmp_path: Path):
    (tmp_path / "outputs" / "eval" / "earlier").mkdir(parents=True)
    r = run_tl("eval", "checkpoint=/no/such.ckpt", cwd=tmp_path)
    assert r.returncode == 2
    assert [p.name for p in (tmp_path / "outputs" / "eval").iterdir()] == ["earlier"]


def test_a_run_dir_with_anything_else_in_it_is_kept(tmp_path: Path):
    """Only what Hydra wrote at start-up (.hydra/, <job>.log), written by this run, is tidied."""
    import time

    from tl_cli.core.outputs import discard_if_untouched

    since = time.time() - 1
    d = tmp_path / "run"
    (d / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (d / ".hydra" / name).write_text("x")
    (d / "eval.log").write_text("")
    (d / "notes.md").write_text("mine")
    assert not discard_if_untouched(d, "eval", since) and (d / "notes.md").exists()
    (d / "notes.md").unlink()
    assert not discard_if_untouched(d, "eval", time.time() + 60)  # older than this run: kept
    assert discard_if_untouched(d, "eval", since) and not d.exists()


def test_predict_to_a_file_elsewhere_leaves_no_run_dir(tmp_path: Path, good_ckpt: Path, tiny_data):
    out = tmp_path / "preds.csv"
    r = run_tl(
        "predict",
        f"checkpoint={good_ckpt}",
        f"inputs={tiny_data / 'test' / 'cat'}",
        f"output={out}",
        "num_workers=0",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_file() and not (tmp_path / "outputs").exists()
    assert r.stdout.startswith(f"tl predict: {out}\n")  # not a run dir that is then removed


def test_every_command_logs_to_a_file_named_after_it():
    """One rule (docs/outputs.md): the console log is <command>.log, Hydra's job name."""
    from hydra import compose, initialize_config_dir

    from tl_cli.cli import COMMANDS, config_dir

    for command, (config, _, _) in COMMANDS.items():
        if config is None:  # tl backbones: a plain command, no run dir
            continue
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name=config, return_hydra_config=True)
        assert cfg.hydra.job.name == command, command
        assert cfg.hydra.run.dir.startswith(f"outputs/{command}/"), command


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("d.csv", "text,category\nhi,a\n", "d.csv: no column 'label' (columns: text, category)"),
        ("d.jsonl", '{"text": "hi", "lab": "a"}\n', "d.jsonl: line 1: no 'label' key"),
    ],
)
def test_a_table_without_its_label_column_fails_before_torch(name, content, says, tmp_path):
    (tmp_path / name).write_text(content)
    rc, heavy, err = _run_main(["train", "modality=text", f"dataset.root={name}"], tmp_path)
    assert heavy == [] and rc == 2, err[-2000:]
    assert f"tl: error: {says}" in err and "set dataset.label_column" in err
