"""Cached features: reuse, invalidation, memory-mapped storage, augmented views."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import open_dict

from tl_cli.commands.train import run
from tl_cli.data.features import FeatureDataModule
from tl_cli.run.training import build


def _files(cache: Path) -> dict[str, float]:
    return {f.name: f.stat().st_mtime_ns for f in cache.glob("*.features.npy")}


def test_disk_cache_reused_and_invalidated(tiny_cfg, tiny_data, tmp_path):
    cache = tmp_path / "cache"

    def go(*extra: str, out: str) -> dict:
        cfg = tiny_cfg("strategy=feature_extraction", f"strategy.cache_dir={cache}", *extra)
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / out)
        return run(cfg)

    m1 = go(out="a")
    first = _files(cache)
    assert len(first) == 3 and not list(
        cache.glob(".*tmp*")
    )  # train, val, test; no temp files left
    m2 = go(out="b")
    assert _files(cache) == first  # all three reused, nothing rewritten
    assert m2["val/acc"] == m1["val/acc"] and m2["test/acc"] == m1["test/acc"]

    go("dataset.image_size=24", out="c")  # preprocessing changes every key
    assert len(_files(cache)) == 6
    go("seed=5", out="d")  # other random-init weights: a new digest
    assert len(_files(cache)) == 9

    # a file changes (size and mtime): the keys of the splits holding it change, the others do not
    victim = sorted((tiny_data / "test" / "cat").glob("*.png"))[0]
    stat = victim.stat()
    try:
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        before = _files(cache)
        go(out="e")
        after = _files(cache)
        new = set(after) - set(before)
        assert len(new) == 1 and next(iter(new)).startswith("test-")
    finally:
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_disk_cache_is_memory_mapped(tiny_cfg, tmp_path):
    cfg = tiny_cfg("strategy=feature_extraction", f"strategy.cache_dir={tmp_path / 'c'}")
    module, dm = build(cfg)
    fdm = FeatureDataModule(module.backbone, dm, cache_dir=str(tmp_path / "c"))
    fdm.setup("fit")
    assert isinstance(fdm.splits["train"][0].feats, np.memmap)
    # the cached features are what the backbone computes on eval-transformed images
    x, y = dm.dataset("val", train_aug=False)[0]
    with torch.no_grad():
        ref = module.backbone.eval()(x[None])[0]
    f, label = fdm.splits["val"][0][0]
    f = f["features"]
    assert label == y and torch.allclose(f, ref, atol=1e-5)


def test_cache_views_precompute_augmented_views(tiny_cfg, tmp_path):
    cfg = tiny_cfg("strategy=feature_extraction", "strategy.cache_views=2")
    module, dm = build(cfg)
    fdm = FeatureDataModule(module.backbone, dm, views=2)
    fdm.setup("fit")
    v0, v1 = fdm.splits["train"]
    assert len(fdm.splits["val"]) == 1 and len(v0) == len(v1) == len(dm.splits["train"])
    assert not torch.allclose(
        v0[0][0]["features"], v1[0][0]["features"]
    )  # two different random crops/flips
    m = run(cfg)  # and a run with views trains end to end
    assert m["epochs"] == 2
