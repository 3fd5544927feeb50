"""Issue #11: a newcomer's first hour (wrong results, raw errors, lost information)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from .conftest import TINY, compose_cfg, run_tl


class ConstantPredictions(pl.Callback):
    """Before every validation: a head that always predicts the last class (worst-case val/acc)."""

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        lin = pl_module.head[-1]
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.zero_()
            lin.bias[-1] = 1.0


def _cfg(tiny_data: Path, out: Path, *extra: str):
    cfg = compose_cfg([*TINY, f"dataset.root={tiny_data}", *extra])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


# ----------------------------------------------------------------------------- wrong results


def test_resume_into_new_dir_reports_the_weights_of_best_ckpt(tiny_data: Path, tmp_path: Path):
    """best.ckpt, best_epoch, val/acc and test/* describe the same weights after a resume."""
    from tl_cli.evaluate import run as evaluate
    from tl_cli.train import run as train

    train(_cfg(tiny_data, tmp_path / "r1", "strategy=finetune"))
    # the resumed epoch can only tie or lose against the first run's best
    m = train(
        _cfg(
            tiny_data,
            tmp_path / "r2",
            "strategy=finetune",
            "trainer.max_epochs=3",
            f"ckpt_path={tmp_path / 'r1/checkpoints/last.ckpt'}",
        ),
        callbacks=[ConstantPredictions()],
    )
    best = tmp_path / "r2/checkpoints/best.ckpt"
    assert m["best_checkpoint"] == str(best)
    saved = torch.load(best, weights_only=True)
    assert saved["epoch"] + 1 == m["best_epoch"]
    ecfg = compose_cfg([f"checkpoint={best}", "split=val"], "eval")
    with open_dict(ecfg):
        ecfg.output_dir = str(tmp_path / "ev")
    res = evaluate(ecfg)
    assert res["acc"] == pytest.approx(m["val/acc"], abs=1e-6)
    assert res["loss"] == pytest.approx(m["val/loss"], abs=1e-4)
