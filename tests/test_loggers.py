"""The logger group: csv (default), tensorboard, mlflow, wandb; offline, or one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import open_dict

from tl_cli.cli import config_dir
from tl_cli.commands import train
from tl_cli.core.errors import TLError
from tl_cli.run import loggers

from .conftest import compose_cfg

OPTIONS = sorted(p.stem for p in (Path(config_dir()) / "logger").glob("*.yaml"))


def test_logger_group_options_and_default():
    assert set(OPTIONS) >= {"csv", "tensorboard", "mlflow", "wandb"}
    assert compose_cfg([]).logger._target_ == "pytorch_lightning.loggers.CSVLogger"


@pytest.mark.parametrize("name", OPTIONS)
def test_each_logger_targets_a_lightning_logger_writing_under_the_run_dir(
    name, tmp_path, monkeypatch
):
    cfg = compose_cfg([f"logger={name}"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    cls = get_class(cfg.logger._target_)
    assert cls.__module__.startswith("pytorch_lightning.loggers")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dirs = [
        str(v).removeprefix("sqlite:///")
        for k, v in cfg.logger.items()
        if k in ("save_dir", "tracking_uri", "artifact_location") and v
    ]
    assert dirs and all(
        d.startswith(str(tmp_path / "run")) for d in dirs
    )  # nothing outside the run dir
    if name == "wandb":
        assert cfg.logger.offline is True


def test_csv_logger_writes_metrics_csv(tiny_cfg):
    cfg = tiny_cfg("trainer.max_epochs=1")
    train.run(cfg)
    lines = (Path(cfg.output_dir) / "csv/metrics.csv").read_text().splitlines()
    assert "val/acc" in lines[0] and len(lines) >= 2


def test_tensorboard_logger_writes_event_files(tiny_cfg):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (in dev)")
    cfg = tiny_cfg("logger=tensorboard", "trainer.max_epochs=2")
    m = train.run(cfg)
    out = Path(cfg.output_dir)
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and not (out / "csv").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    vals = [e.value for e in acc.Scalars("val/acc")]
    assert len(vals) == 2 and max(vals) == pytest.approx(m["val/acc"])


@pytest.mark.parametrize(
    ("name", "pip"), [("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "tensorboard")]
)
def test_missing_logger_package_is_one_line_before_any_work(tiny_cfg, monkeypatch, name, pip):
    monkeypatch.setattr(loggers, "available", lambda module: False)
    cfg = tiny_cfg(f"logger={name}")
    with pytest.raises(
        TLError, match=f"logger={name} needs the {pip} package.*pip install {pip}"
    ) as e:
        train.run(cfg)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert not Path(cfg.output_dir).exists()  # failed before training


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_installed_optional_logger_runs_offline(tiny_cfg, name, monkeypatch):
    pytest.importorskip(name, reason=f"{name} is not installed (optional extra)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_cfg(f"logger={name}", "trainer.max_epochs=1")
    train.run(cfg)
    out = Path(cfg.output_dir)
    assert (out / "mlflow.db").is_file() if name == "mlflow" else (out / "wandb").is_dir()
