"""The wall-clock side of the training budget (issue 29): after the first epoch that trains, tl
says when the run ends and what chose its length; trainer.max_time and max_epochs=auto on a CPU
cut the epochs and re-fit the LR schedule. No timed assertions: the cuts are forced."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from tl_cli.commands import train
from tl_cli.transfer import budget

from .conftest import TINY, compose_cfg, make_image_folder


def test_max_time_in_lightnings_forms():
    assert budget.max_time_seconds("00:01:30:00") == 5400
    assert budget.max_time_seconds({"minutes": 2, "seconds": 5}) == 125
    assert budget.max_time_seconds(datetime.timedelta(hours=1)) == 3600
    assert budget.max_time_seconds(None) is None and budget.max_time_seconds("soon") is None


def test_wall_cap_is_max_time_else_auto_on_cpu_only():
    assert budget.wall_cap({"max_time": "00:00:10:00"}, auto=False, on_cpu=False) == (
        600.0,
        "trainer.max_time=00:00:10:00",
    )
    cap, why = budget.wall_cap({"max_time": None}, auto=True, on_cpu=True)
    assert cap == budget.CPU_WALL_S and "on CPU" in why
    assert budget.wall_cap({"max_time": None}, auto=True, on_cpu=False) == (None, "")
    assert budget.wall_cap({"max_time": None}, auto=False, on_cpu=True) == (None, "")


def test_epochs_within_a_limit():
    # 20 epochs of 60 s with 600 s left after the first: 1 + 10
    assert budget.epochs_within(600, 60, done=1, total=20) == 11
    assert budget.epochs_within(10_000, 60, done=1, total=20) == 20  # never more than planned
    # already over the limit: at least MIN_EPOCHS_AFTER_CUT (the schedule needs room)
    assert budget.epochs_within(-5, 60, done=1, total=20) == budget.MIN_EPOCHS_AFTER_CUT
    assert budget.epochs_within(-5, 60, done=1, total=2) == 2


def test_reason_names_what_chose_the_epochs():
    assert budget.reason({"max_epochs": "auto"}, 20, 5, None).startswith(
        "trainer.max_epochs=auto chose 20 epochs (5 optimizer steps each"
    )
    assert (
        budget.reason({"max_epochs": 7}, 7, 5, True) == "trainer.max_epochs=7 (on the command line)"
    )
    assert (
        budget.reason({"max_epochs": 7}, 7, 5, False) == "trainer.max_epochs=7 (a config default)"
    )


def test_auto_on_cpu_is_cut_to_its_limit_and_the_schedule_still_decays(
    tmp_path: Path, monkeypatch, capsys
):
    """The first training epoch measures the cost; auto on CPU fits the rest into CPU_WALL_S.
    A limit of 0 s forces the cut to MIN_EPOCHS_AFTER_CUT whatever the machine's speed."""
    monkeypatch.setattr(budget, "CPU_WALL_S", 0)
    root = make_image_folder(tmp_path / "data", {"train": 8, "test": 2})
    cfg = compose_cfg(
        [
            *TINY,
            f"dataset.root={root}",
            f"output_dir={tmp_path / 'run'}",
            "trainer.max_epochs=auto",
            "strategy.head_fit=sgd",  # steps to take, so the budget applies
        ]
    )
    m = train.run(cfg)
    out = capsys.readouterr().out
    assert m["epochs"] == budget.MIN_EPOCHS_AFTER_CUT, m["epochs"]
    assert "[bold]" not in out and "budget trainer.max_epochs=auto chose" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("budget "))
    planned = budget.auto_epochs(budget.steps_per_epoch(m["train_size"], 8))
    assert (
        f"cut from {planned} to {budget.MIN_EPOCHS_AFTER_CUT} epochs to fit max_epochs=auto's"
        in line
    )
    assert "the LR schedule now ends at epoch 3" in line and "end at about" in line
    assert m["defaults"]["epochs"] == budget.MIN_EPOCHS_AFTER_CUT
    lrs = [r["lr"] for r in m["history"]]
    # re-fitted cosine: the last epoch ends near zero, far below the first epoch's LR
    assert lrs[-1] < 0.2 * lrs[0], lrs


@pytest.mark.parametrize("epochs", ["trainer.max_epochs=3"])
def test_an_explicit_count_without_a_limit_is_kept(tmp_path: Path, epochs: str):
    root = make_image_folder(tmp_path / "data", {"train": 8, "test": 2})
    cfg = compose_cfg(
        [
            *TINY,
            f"dataset.root={root}",
            f"output_dir={tmp_path / 'run'}",
            epochs,
            "strategy.head_fit=sgd",
        ]
    )
    assert train.run(cfg)["epochs"] == 3


def test_every_modality_leaves_the_epochs_to_auto():
    """Audio fixed 20 epochs: with the L-BFGS head it ran 20 identical epochs of 0 steps (images
    and text ran one); each modality's default now follows trainer.max_epochs=auto."""
    for modality in ("image", "text", "audio"):
        assert compose_cfg([f"modality={modality}"]).trainer.max_epochs == "auto", modality


def test_an_explicit_count_on_a_converged_head_says_the_epochs_do_not_train(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", {"train": 8, "test": 2})
    cfg = compose_cfg(
        [*TINY, f"dataset.root={root}", f"output_dir={tmp_path / 'run'}", "trainer.max_epochs=2"]
    )
    m = train.run(cfg)
    out = capsys.readouterr().out
    assert m["epochs"] == 2 and m["defaults"]["optimizer_steps"] == 0
    assert "so the 2 epochs take no optimizer step and score the same head" in out
    assert all("lr" not in r and r["steps"] == 0 for r in m["history"])
    assert out.count("no optimizer step  ") + out.count("no optimizer step ") >= 2
    # nor in metrics.csv (Lightning's LR monitor logs at each epoch's start, stepped or not)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    assert rows and not [r for r in rows for k, v in r.items() if k.startswith("lr-") and v]


def test_metrics_csv_has_an_lr_for_the_epochs_that_step_only(tmp_path):
    """tl finetune: the head-only epoch takes no step, so it logs no lr; the 2 epochs after do."""
    import csv

    root = make_image_folder(tmp_path / "data", {"train": 8, "test": 2})
    cfg = compose_cfg(
        [
            *TINY,
            f"dataset.root={root}",
            f"output_dir={tmp_path / 'run'}",
            "strategy=finetune",
            "trainer.max_epochs=2",
        ],
        "finetune",
    )
    m = train.run(cfg)
    assert m["epochs"] == 3 and [r["steps"] > 0 for r in m["history"]] == [False, True, True]
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    lr_rows = [r for r in rows if any(k.startswith("lr-") and v for k, v in r.items())]
    assert len(lr_rows) == 2, lr_rows
