"""The layers are a test: import contracts (import-linter), packaging, one word per concept."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from .conftest import compose_cfg, run_tl

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    """cli > commands > run > tasks > transfer > modalities > data > core; commands never import
    each other; text and audio are independent (pyproject.toml [tool.importlinter])."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a dev dependency (pip install -e '.[dev]')"
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "BROKEN" not in r.stdout and r.stdout.count("KEPT") >= 3


def test_every_package_ships_in_the_wheel():
    """A sub-package missing from pyproject's explicit list would be absent from a real install."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tl_cli").rglob("__init__.py")
    }
    assert found <= listed, sorted(found - listed)
    folders = {
        ".".join(d.relative_to(ROOT).parts)
        for d in (ROOT / "tl_cli").rglob("*")
        if d.is_dir() and any(d.glob("*.py")) and "__pycache__" not in d.parts
    }
    assert folders <= found, f"folders with modules but no __init__.py: {sorted(folders - found)}"


@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_modality_and_task_are_two_groups(modality):
    cfg = compose_cfg([f"modality={modality}"])
    assert cfg.task.name == "classification"
    want = {"image": "efficientnet_lite0", "text": "minilm", "audio": "speech_embedding"}
    assert cfg.backbone.name == want[modality]


def test_the_old_task_spelling_still_works_with_one_notice(tmp_path):
    r = run_tl("train", "task=text", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "task=text is now spelled modality=text" in r.stdout + r.stderr
    assert "name: minilm" in r.stdout and "name: classification" in r.stdout
