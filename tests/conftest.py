"""Fixtures: tiny generated image folders, Hydra compose, the shared CIFAR subset."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

from tl_cli.cli import config_dir

from .tiny_config import TINY, TINY_FEATURES  # noqa: F401 - re-exported: tests import them from conftest

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-subset"
TL = Path(sys.executable).with_name("tl")

COLORS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}


def make_image_folder(root: Path, per_class: dict[str, int], size: int = 24, seed: int = 0) -> Path:
    """Solid-ish colour images with noise: learnable in a couple of epochs by a tiny net."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for cls, rgb in COLORS.items():
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(
                    np.array(rgb)[None, None, :] + rng.normal(0, 30, (size, size, 3)), 0, 255
                )
                Image.fromarray(arr.astype("uint8")).save(d / f"{cls}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/train (12 per class) + root/test (4 per class), 3 classes."""
    return make_image_folder(tmp_path_factory.mktemp("tiny"), {"train": 12, "test": 4})


def compose_cfg(overrides: list[str], config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def run_cfg(overrides: list[str], out: Path, name: str) -> DictConfig:
    """A composed config of command ``name`` writing into ``out``."""
    cfg = compose_cfg(overrides, config_name=name)
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


@pytest.fixture(scope="session")
def good_ckpt(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.ckpt of a real 1-epoch tiny run (tests read or copy it; none modifies it)."""
    from tl_cli.commands.train import run

    out = tmp_path_factory.mktemp("good")
    cfg = compose_cfg([*TINY, f"dataset.root={tiny_data}", "trainer.max_epochs=1"])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    run(cfg)
    return out / "checkpoints" / "best.ckpt"


@pytest.fixture
def tiny_cfg(tiny_data: Path, tmp_path: Path):
    """Factory: a composed tiny train config writing into tmp_path/run."""

    def make(*extra: str, config_name: str = "train") -> DictConfig:
        cfg = compose_cfg([*TINY, f"dataset.root={tiny_data}", *extra], config_name)
        with open_dict(cfg):
            if "output_dir=" not in " ".join(extra):
                cfg.output_dir = str(tmp_path / "run")
        return cfg

    return make


def shared_cifar() -> Path:
    """The shared CIFAR-10 subset; skip if absent, fail under TL_REQUIRE_SHARED=1 (CI)."""
    if SHARED_CIFAR.is_dir():
        return SHARED_CIFAR
    if os.environ.get("TL_REQUIRE_SHARED") == "1":
        pytest.fail(f"TL_REQUIRE_SHARED=1 but {SHARED_CIFAR} is missing")
    pytest.skip(f"{SHARED_CIFAR} not present")


def cifar_slice(dst: Path, train_per_class: int, test_per_class: int) -> Path:
    """A class-balanced slice of the shared subset (first files by name), as root/train + root/test."""
    src = shared_cifar()
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            out = dst / split / cls.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.glob("*.png"))[:n]:
                shutil.copy2(f, out / f.name)
    return dst


def run_tl(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run the real `tl` executable of this environment."""
    e = {**os.environ, "CI": "1", **(env or {})}
    e.pop("HYDRA_FULL_ERROR", None) if env is None or "HYDRA_FULL_ERROR" not in env else None
    return subprocess.run(
        [str(TL), *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(autouse=True)
def _seed_python():
    random.seed(0)


@pytest.fixture(autouse=True)
def _no_hydra_runtime_left_behind():
    """A test that runs the ``tl`` app in-process (test_readme) leaves Hydra's HydraConfig set;
    a later test in the same process would then read that run's overrides and choices (a resume
    hint, a logger's name). Each test starts without it, as a fresh ``tl`` process does."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
