"""Resume in the middle of a schedule: the result equals the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from tl_cli.commands.train import run

# Deterministic data (no augmentation): the shuffle is a function of (seed, epoch), see EpochShuffle.
COMMON = ["dataset.augment=none", "scheduler=cosine", "trainer.max_epochs=4", "optimizer.lr=0.01"]
TOL = 1e-6  # CPU, float32: measured bit-identical; the tolerance only absorbs summation order


class StopAfter(pl.Callback):
    """Ends the fit after `epochs` epochs, as an interrupted job would."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _cfg(tiny_cfg, out: Path, *extra: str):
    cfg = tiny_cfg(*COMMON, *extra)
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=freeze_unfreeze", "strategy.unfreeze_at_epoch=2"],
        ["strategy=gradual_unfreeze", "strategy.milestones=[1,2]"],
        ["strategy=lp_ft", "strategy.probe_epochs=2"],
        ["strategy=finetune", "scheduler=plateau", "scheduler.patience=0"],
        # an SGD head, so the weights move after the interruption (the default L-BFGS head is
        # fitted once and then fixed: a resume keeps it, tests/test_defaults.py)
        ["strategy=feature_extraction", "strategy.head_fit=sgd"],
    ],
    ids=["freeze_unfreeze", "gradual_unfreeze", "lp_ft", "finetune-plateau", "feature_extraction"],
)
@pytest.mark.parametrize("stop_after", [1, 3], ids=["before-unfreeze", "after-unfreeze"])
def test_resume_matches_uninterrupted(tiny_cfg, tmp_path, strategy, stop_after):
    full = run(_cfg(tiny_cfg, tmp_path / "full", *strategy))
    part = run(_cfg(tiny_cfg, tmp_path / "part", *strategy), callbacks=[StopAfter(stop_after)])
    assert part["epochs"] == stop_after
    resumed_cfg = _cfg(tiny_cfg, tmp_path / "resumed", *strategy)
    with open_dict(resumed_cfg):
        resumed_cfg.ckpt_path = str(tmp_path / "part/checkpoints/last.ckpt")
    resumed = run(resumed_cfg)
    # the callback state travels: the history covers all epochs exactly once (a fine-tune from
    # an L-BFGS head has its head-only epoch first)
    assert [r["epoch"] for r in resumed["history"]] == [r["epoch"] for r in full["history"]]
    assert len(full["history"]) == (5 if "strategy=finetune" in strategy else 4)
    a = weights(tmp_path / "full/checkpoints/last.ckpt")
    b = weights(tmp_path / "resumed/checkpoints/last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=TOL, rtol=0), k
    assert resumed["val/acc"] == pytest.approx(full["val/acc"], abs=TOL)
    if "strategy=finetune" in strategy:
        # every fine-tuned epoch is compared with the head-only state's val items (they travel
        # in the checkpoint), so a resumed run picks best.ckpt as the uninterrupted one does
        def paired(m):
            return [(r.get("val/gained"), r.get("val/lost")) for r in m["history"][1:]]

        assert paired(resumed) == paired(full) and (None, None) not in paired(full)
        assert resumed["best_epoch"] == full["best_epoch"]
    # a schedule that moves: the weights at the end differ from those at the interruption
    mid = weights(tmp_path / "part/checkpoints/last.ckpt")
    assert any(not torch.equal(mid[k], b[k]) for k in b if "head" in k)
