"""DDP on CPU (gloo, 2 processes) through the real `tl` executable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import ROOT, TINY, run_tl

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def _tiny_no_devices() -> list[str]:
    return [o for o in TINY if not o.startswith(("trainer.devices", "trainer.accelerator"))]


@pytest.mark.slow
def test_ddp_freeze_unfreeze_keeps_ranks_identical(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    probe = tmp_path / "probe.json"
    r = run_tl(
        "train",
        *_tiny_no_devices(),
        *DDP,
        f"dataset.root={tiny_data}",
        f"hydra.run.dir={run_dir}",
        "strategy=freeze_unfreeze",
        "strategy.unfreeze_at_epoch=1",
        "strategy.backbone_lr_mult=1.0",
        "optimizer.lr=0.01",
        "trainer.max_epochs=3",
        "+callbacks.probe._target_=tests.ddp_probe.WeightSyncProbe",
        f"+callbacks.probe.out={probe}",
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(probe.read_text())
    assert [row["epoch"] for row in rows] == [0, 1, 2] and all(row["world"] == 2 for row in rows)
    assert rows[0]["moved_from_start"] == 0.0  # frozen during epoch 0
    assert rows[-1]["moved_from_start"] > 1e-4  # the backbone really trained after the unfreeze
    assert all(row["max_rank_diff"] == 0.0 for row in rows), rows  # ranks hold identical weights
    # one run dir, one metrics.json; no stray per-rank run dirs
    assert (run_dir / "metrics.json").is_file()
    assert not (tmp_path / "outputs").exists()
    assert len(list(run_dir.rglob("metrics.json"))) == 1


@pytest.mark.slow
def test_ddp_cached_features_equal_single_process(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    r = run_tl(
        "train",
        *_tiny_no_devices(),
        *DDP,
        f"dataset.root={tiny_data}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "strategy=feature_extraction",
        f"strategy.cache_dir={cache}",
        "trainer.max_epochs=2",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run/metrics.json").read_text())["epochs"] == 2
    ddp_files = sorted(cache.glob("*.features.npy"))
    assert len(ddp_files) == 3  # train, val, test
    ddp = {f.name.split("-")[0]: np.load(f) for f in ddp_files}
    # the same cache computed in one process: identical keys, identical features
    cache1 = tmp_path / "cache1"
    r = run_tl(
        "train",
        *TINY,
        f"dataset.root={tiny_data}",
        f"hydra.run.dir={tmp_path / 'run1'}",
        "strategy=feature_extraction",
        f"strategy.cache_dir={cache1}",
        "trainer.max_epochs=1",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    single = {f.name.split("-")[0]: np.load(f) for f in sorted(cache1.glob("*.features.npy"))}
    assert sorted(f.name for f in ddp_files) == sorted(
        f.name for f in cache1.glob("*.features.npy")
    )
    for split in ("train", "val", "test"):
        np.testing.assert_allclose(ddp[split], single[split], rtol=0, atol=1e-5)
