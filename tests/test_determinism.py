"""Same seed on CPU -> the same metrics.json numbers (issue 5), timings excluded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, run_tl
from tl_cli.commands.train import run
from tl_cli.core.checkpoint import read_checkpoint

#: Wall-clock numbers and paths: the only keys allowed to differ between two identical runs.
TIMING_KEYS = {"fit_seconds", "best_checkpoint", "seconds"}


def comparable(metrics: dict) -> dict:
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMING_KEYS}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(metrics)


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = read_checkpoint(a)["state_dict"], read_checkpoint(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _twice(tiny_cfg, tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    out = []
    for i in (1, 2):
        run(tiny_cfg(*extra, f"output_dir={tmp_path / f'run{i}'}"))
        out.append(json.loads((tmp_path / f"run{i}" / "metrics.json").read_text()))
    return out[0], out[1]


@pytest.mark.parametrize("strategy", ["feature_extraction", "finetune", "freeze_unfreeze"])
def test_same_seed_same_metrics(tiny_cfg, tmp_path: Path, strategy: str) -> None:
    extra = [f"strategy={strategy}", "trainer.max_epochs=3", "seed=3"]
    if strategy == "freeze_unfreeze":
        extra.append("strategy.unfreeze_at_epoch=1")
    a, b = _twice(tiny_cfg, tmp_path, *extra)
    epochs = 4 if strategy == "finetune" else 3  # finetune: the head-only epoch first
    assert a["epochs"] == epochs and len(a["history"]) == epochs
    assert comparable(a) == comparable(b)  # exact equality, every float
    assert same_weights(
        tmp_path / "run1/checkpoints/best.ckpt", tmp_path / "run2/checkpoints/best.ckpt"
    )
    assert same_weights(
        tmp_path / "run1/checkpoints/last.ckpt", tmp_path / "run2/checkpoints/last.ckpt"
    )


def test_another_seed_changes_the_numbers(tiny_cfg, tmp_path: Path) -> None:
    # the comparison above is not vacuous: the seed reaches the numbers it compares
    a = run(
        tiny_cfg(
            "strategy=finetune", "trainer.max_epochs=2", "seed=1", f"output_dir={tmp_path / 'a'}"
        )
    )
    b = run(
        tiny_cfg(
            "strategy=finetune", "trainer.max_epochs=2", "seed=2", f"output_dir={tmp_path / 'b'}"
        )
    )
    assert comparable(a)["history"] != comparable(b)["history"]


@pytest.mark.slow
def test_same_seed_same_metrics_across_processes_with_loader_workers(
    tmp_path: Path, tiny_data: Path
) -> None:
    # separate processes (nothing shared in memory) and two DataLoader worker processes
    # (augmentation randomness lives in the workers, seeded by seed_everything(workers=True))
    args = [
        *TINY,
        f"dataset.root={tiny_data}",
        "strategy=finetune",
        "dataset.num_workers=2",
        "seed=11",
    ]
    metrics = []
    for i in (1, 2):
        r = run_tl("train", *args, f"hydra.run.dir={tmp_path / f'run{i}'}")
        assert r.returncode == 0, r.stderr[-3000:]
        metrics.append(json.loads((tmp_path / f"run{i}" / "metrics.json").read_text()))
    assert comparable(metrics[0]) == comparable(metrics[1])
    assert same_weights(
        tmp_path / "run1/checkpoints/best.ckpt", tmp_path / "run2/checkpoints/best.ckpt"
    )
