"""The on-disk feature cache checks itself: damaged entries are named and rebuilt, stale temp
files of dead runs are removed, a full disk is a one-line error with no temp file left."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from tl_cli.commands.train import run
from tl_cli.core.errors import TLError
from tl_cli.data import features
from tl_cli.data.features import FeatureDataModule, check_entry
from tl_cli.run.training import build


def _entry(cache: Path, split: str) -> tuple[Path, Path, Path]:
    (fpath,) = cache.glob(f"{split}-*.features.npy")
    stem = fpath.name[: -len(".features.npy")]
    return fpath, cache / f"{stem}.labels.npy", cache / f"{stem}.meta.json"


def _temps(cache: Path) -> list[Path]:
    return sorted(cache.glob(".*tmp*"))


@pytest.fixture
def cached(tiny_cfg, tmp_path):
    """A run that fills the cache; returns (rerun, cache, first metrics)."""
    cache = tmp_path / "cache"

    def go(out: str) -> dict:
        cfg = tiny_cfg(
            "strategy=feature_extraction", f"strategy.cache_dir={cache}", "trainer.max_epochs=1"
        )
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / out)
        return run(cfg)

    first = go("first")
    for split in ("train", "val", "test"):
        fpath, ypath, meta = _entry(cache, split)
        assert meta.is_file() and check_entry(meta, fpath, ypath) is None
        doc = json.loads(meta.read_text())
        assert doc["rows"] == len(np.load(ypath)) and doc["dim"] == np.load(fpath).shape[1]
    return go, cache, first


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 40)


def _flip(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size - 100)
        chunk = bytearray(fh.read(8))
        fh.seek(size - 100)
        fh.write(bytes(b ^ 0xFF for b in chunk))
    assert path.stat().st_size == size


@pytest.mark.parametrize(
    ("which", "damage", "reason"),
    [
        ("features", _truncate, "bytes, expected"),
        ("labels", _truncate, "bytes, expected"),
        ("features", _flip, "checksum mismatch"),
        ("meta", lambda p: p.unlink(), "missing"),  # an entry from before manifests
        ("meta", lambda p: p.write_text("{not json"), "unreadable manifest"),
    ],
)
def test_damaged_entry_is_named_and_rebuilt(cached, capsys, which, damage, reason):
    go, cache, first = cached
    fpath, ypath, meta = _entry(cache, "train")
    victim = {"features": fpath, "labels": ypath, "meta": meta}[which]
    good = fpath.read_bytes(), ypath.read_bytes()
    damage(victim)
    capsys.readouterr()

    again = go("again")  # training still works

    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "damaged entry" in ln]
    assert len(lines) == 1 and str(victim) in lines[0] and reason in lines[0], lines
    assert "2 hit(s), 1 computed" in out
    assert check_entry(meta, fpath, ypath) is None  # rebuilt, with a fresh manifest
    assert (fpath.read_bytes(), ypath.read_bytes()) == good
    assert again["val/acc"] == first["val/acc"] and again["test/acc"] == first["test/acc"]
    assert not _temps(cache)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_dead_pids_removed_live_kept(tiny_cfg, tmp_path, capsys):
    cache = tmp_path / "c"
    cache.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        stale = [
            cache / f".train-abc.features.npy.{dead}.tmp",
            cache / f".train-abc.labels.npy.{dead}.tmp.npy",
            cache / f".train-abc.meta.json.{dead}.tmp",
        ]
        kept = [
            cache / f".train-abc.features.npy.{live.pid}.tmp",  # another run, still writing
            cache / "notes.tmp",  # not ours
        ]
        for p in stale + kept:
            p.write_bytes(b"\0" * 1000)
        cfg = tiny_cfg("strategy=feature_extraction", f"strategy.cache_dir={cache}")
        module, dm = build(cfg)
        FeatureDataModule(module.backbone, dm, cache_dir=str(cache)).setup("fit")
        out = capsys.readouterr().out
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in kept)
        assert all(str(p) in out for p in stale) and str(kept[0]) not in out
    finally:
        live.kill()
        live.wait()


def _fail_second_write(monkeypatch):
    real = features.RowWriter.__setitem__
    calls = []

    def setitem(self, sl, value):
        calls.append(1)
        if len(calls) == 2:  # part of the file is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, sl, value)

    monkeypatch.setattr(features.RowWriter, "__setitem__", setitem)


def _fail_labels(monkeypatch):
    def save(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features.np, "save", save)


@pytest.mark.parametrize(
    ("fail", "names"), [(_fail_second_write, "features.npy"), (_fail_labels, "labels.npy")]
)
def test_disk_full_is_one_line_error_naming_the_path(tiny_cfg, tmp_path, monkeypatch, fail, names):
    cache = tmp_path / "c"
    cfg = tiny_cfg("strategy=feature_extraction", f"strategy.cache_dir={cache}")
    module, dm = build(cfg)
    fail(monkeypatch)
    with pytest.raises(TLError, match="no space left") as e:
        FeatureDataModule(module.backbone, dm, cache_dir=str(cache)).setup("fit")
    msg = str(e.value)
    assert "\n" not in msg and str(cache) in msg and names in msg and "cache_dir" in msg
    assert e.value.exit_code == 1
    assert not _temps(cache)  # the partial temp file is gone
    assert not list(cache.glob("*.meta.json"))  # and nothing looks complete
    monkeypatch.undo()  # space again: the next run builds the cache
    fdm = FeatureDataModule(module.backbone, dm, cache_dir=str(cache))
    fdm.setup("fit")
    assert fdm.cache_misses == 3 and len(list(cache.glob("*.meta.json"))) == 3
