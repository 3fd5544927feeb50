"""The non-editable install finds its configs and sample data from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_runs_from_another_directory(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("tl_cli-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert (
        "tl_cli/configs/train.yaml" in names
        and "tl_cli/configs/backbone/efficientnet_lite0.yaml" in names
    )
    assert sum(n.startswith("tl_cli/sample_data/train/") for n in names) == 600

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    subprocess.run(
        [
            str(bin_dir / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
        # no PYTHONPATH: a source tree on it (with the egg-info the build above leaves there)
        # makes pip think tl-cli is installed already and skip the wheel
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    # dependencies come from this test environment (a path entry only: its editable finder of
    # tl_cli is not activated, so the installed wheel is what runs)
    site = next((env_dir / "lib").glob("python*/site-packages"))
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "CI": "1"}
    env.pop("PYTHONPATH", None)

    def tl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(bin_dir / "tl"), *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    r = tl("--help")
    assert r.returncode == 0 and "finetune" in r.stdout
    r = tl("train", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert "efficientnet_lite0" in r.stdout and "name: sample" in r.stdout
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import tl_cli; print(tl_cli.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert str(site) in where.stdout, where.stdout  # the wheel, not the source tree
    r = tl("train", "trainer.max_epochs=1", "dataset.image_size=64", "hydra.run.dir=run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (elsewhere / "run/metrics.json").is_file()
