"""Defaults that learn (#10): a converged head on few images, checkpoint tie-break, warnings, LR finder."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tl_cli.commands import train
from tl_cli.run import training
from tl_cli.run.callbacks import History
from tl_cli.run.tuning import falling_slope
from tl_cli.tasks.base import TransferTask
from tl_cli.tasks.classification import val_score

from .conftest import TINY, compose_cfg


def make_set(root: Path, train_counts: dict[str, int], test_per_class: int, noise: float = 30.0):
    """root/train + root/test of coloured noise images, `train_counts` images per class."""
    colors = {"a": (170, 90, 90), "b": (90, 170, 90), "c": (90, 90, 170)}
    rng = np.random.default_rng(0)
    for split, counts in (
        ("train", train_counts),
        ("test", dict.fromkeys(train_counts, test_per_class)),
    ):
        for cls, n in counts.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.array(colors[cls])[None, None, :] + rng.normal(0, noise, (24, 24, 3))
                Image.fromarray(np.clip(arr, 0, 255).astype("uint8")).save(d / f"{i:03d}.png")
    return root


def run_tiny(root: Path, out: Path, *extra: str) -> dict:
    cfg = compose_cfg([*TINY, f"dataset.root={root}", f"output_dir={out}", *extra])
    return train.run(cfg)


def test_small_imbalanced_set_trains_past_the_majority_rate(tmp_path):
    # 34 vs 9 images (31 vs 8 = 3.9:1 in train after the val carve), a balanced test split: predicting the majority scores 0.5
    root = make_set(tmp_path / "data", {"a": 34, "b": 9}, test_per_class=10)
    m = run_tiny(root, tmp_path / "run")
    assert m["test/acc"] >= 0.8 and m["test/balanced_acc"] >= 0.8, m
    assert m["defaults"]["head_fit"]["method"] == "lbfgs"
    assert m["defaults"]["optimizer_steps"] == 0  # converged head, frozen backbone: no steps
    assert any("imbalanced 3.9:1" in w for w in m["warnings"])
    assert not any("collapsed" in w for w in m["warnings"])
    # best.ckpt, best_epoch and the reported val metrics agree
    best = m["history"][m["best_epoch"] - 1]
    assert best["val/acc"] == m["val/acc"] and best["val/score"] == m["val/score"]


def test_no_warning_on_a_balanced_set_that_learns(tmp_path):
    root = make_set(tmp_path / "data", {"a": 14, "b": 14, "c": 14}, test_per_class=4)
    m = run_tiny(root, tmp_path / "run", "dataset.val_fraction=0.5")
    # 21 validation images is still under 30: that warning is expected, nothing else
    assert [w for w in m["warnings"] if "validation split has 21 images" not in w] == []
    assert m["test/acc"] > 0.9


def test_collapsed_predictions_are_reported(tmp_path):
    # every image identical: no model can tell the classes apart, all predictions are one class
    root = make_set(tmp_path / "data", {"a": 12, "b": 12}, test_per_class=4, noise=0.0)
    for p in (root / "train" / "b").glob("*.png"):
        Image.open(next((root / "train" / "a").glob("*.png"))).save(p)
    for p in (root / "test" / "b").glob("*.png"):
        Image.open(next((root / "test" / "a").glob("*.png"))).save(p)
    m = run_tiny(root, tmp_path / "run")
    assert any("collapsed" in w and "validation" in w for w in m["warnings"]), m["warnings"]
    assert any("collapsed" in w and "all 8 test images" in w for w in m["warnings"])
    assert not any("imbalanced" in w for w in m["warnings"])


def test_data_warnings_imbalance_and_small_val():
    def dm(counts, n_val, balance=None):
        train_items = [(f"{c}{i}", c) for c, n in enumerate(counts) for i in range(n)]
        return SimpleNamespace(
            num_classes=len(counts),
            class_names=[f"k{c}" for c in range(len(counts))],
            splits={"train": train_items, "val": [("v", 0)] * n_val},
            balance=balance,
        )

    assert training.data_warnings(dm([30, 10], 40)) == []  # exactly 3:1 is fine
    (w,) = training.data_warnings(dm([31, 10], 40))
    assert "imbalanced 3.1:1" in w and "dataset.balance=weights" in w
    assert training.data_warnings(dm([31, 10], 40, balance="weights")) == []  # already handled
    (w,) = training.data_warnings(dm([10, 10], 12))
    assert "validation split has 12 images" in w and "8.3 points" in w
    # the data module names its inputs (TextDataModule: texts, AudioFolderDataModule: recordings)
    from tl_cli.modalities.audio.data import AudioFolderDataModule
    from tl_cli.modalities.text.data import TextDataModule

    text_dm = dm([31, 10], 12)
    text_dm.item_noun = TextDataModule.item_noun
    text_dm.val_hint = TextDataModule.val_hint
    imb, small = training.data_warnings(text_dm)
    assert "'k0' 31 texts" in imb and "validation split has 12 texts" in small
    assert "add a val file (val.csv" in small and "val/ folder" not in small  # a CSV has no folders
    assert AudioFolderDataModule.item_noun == "recordings"


def test_collapse_warning_only_when_one_class_is_predicted():
    hist = [{"epoch": 0, "val/pred_classes": 1.0}, {"epoch": 1, "val/pred_classes": 2.0}]
    mod = SimpleNamespace(pred_counts={"test": torch.tensor([0, 5])}, class_names=["x", "y"])
    w = training.collapse_warnings({"history": hist, "best_epoch": 1}, mod, 2, "images")
    assert len(w) == 2 and "'y' for all 5 test images" in w[1]
    w = training.collapse_warnings({"history": hist, "best_epoch": 1}, mod, 2, "texts")
    assert "every validation text;" in w[0] and "'y' for all 5 test texts" in w[1]
    mod.pred_counts["test"] = torch.tensor([1, 4])
    assert training.collapse_warnings({"history": hist, "best_epoch": 2}, mod, 2) == []


def test_checkpoint_tie_break_picks_the_lower_loss():
    # equal val/acc: the later epoch with the lower val/loss wins; a higher acc always wins
    assert val_score(0.8, 0.3, 10) > val_score(0.8, 0.5, 10)
    assert val_score(0.8 + 1 / 10, 1e6, 10) > val_score(0.8, 0.0, 10)  # one image beats any loss
    assert val_score(0.8, math.nan, 10) < val_score(0.8, 100.0, 10)
    # float32 (Lightning's metrics) still orders a small loss difference on a small val split
    a, b = (torch.tensor(val_score(1 / 3, x, 3), dtype=torch.float32) for x in (1.0969, 1.0973))
    assert a > b
    h = History()
    for e, (acc, loss) in enumerate([(0.5, 0.9), (0.8, 0.7), (0.8, 0.4), (0.8, 0.6)]):
        h.epochs.append(
            {"epoch": e, "val/acc": acc, "val/loss": loss, "val/score": val_score(acc, loss, 10)}
        )
    m = training.collect_metrics(h, None, None, 1.0, "val/score", "max")
    assert m["best_epoch"] == 3 and m["val/loss"] == 0.4


def test_tie_break_in_a_real_run_matches_best_ckpt(tmp_path):
    root = make_set(tmp_path / "data", {"a": 12, "b": 12, "c": 12}, test_per_class=2)
    m = run_tiny(root, tmp_path / "run", "strategy.head_fit=sgd", "trainer.max_epochs=4")
    rows = m["history"]
    top = max(r["val/acc"] for r in rows)
    tied = [r for r in rows if r["val/acc"] == top]
    assert m["best_epoch"] - 1 == min(tied, key=lambda r: r["val/loss"])["epoch"]
    ck = torch.load(tmp_path / "run/checkpoints/best.ckpt", weights_only=False, map_location="cpu")
    assert ck["epoch"] + 1 == m["best_epoch"]


def test_lr_finder_refuses_a_suggestion_off_the_falling_slope():
    lrs = [10 ** (-6 + 6 * i / 49) for i in range(50)]
    # a good curve: flat, falls from lr 1e-4 to 1e-2, then blows up
    good = [
        2.3
        if lr < 1e-4
        else (2.3 - 0.9 * math.log10(lr / 1e-4) if lr < 1e-2 else 0.5 + 5 * math.log10(lr / 1e-2))
        for lr in lrs
    ]
    assert falling_slope(lrs, good, 1e-3) is None
    assert "past the loss minimum" in falling_slope(lrs, good, 0.1)
    assert "not falling" in falling_slope(lrs, good, 1e-5)  # the flat start
    flat = [2.30 + 0.001 * math.sin(i) for i in range(50)]
    assert "flat" in falling_slope(lrs, flat, 1e-3)


def test_finetune_default_keeps_batchnorm_frozen_while_the_backbone_trains(tiny_cfg):
    from .test_strategies import Spy

    spy = Spy()
    m = train.run(tiny_cfg("strategy=finetune", "scheduler=none"), callbacks=[spy])
    for r in spy.rows:
        assert r["backbone_grad"] == {True} and r["bn_training"] == {False}
    assert m["defaults"]["bn"] == "frozen" and m["defaults"]["head_fit"]["method"] == "lbfgs"


def test_resume_keeps_the_lbfgs_head_and_takes_no_steps(tiny_cfg, tmp_path):
    from omegaconf import open_dict

    from .test_resume import StopAfter, weights

    def cfg(out, ckpt=None):
        c = tiny_cfg("trainer.max_epochs=3", f"output_dir={out}")
        if ckpt:
            with open_dict(c):
                c.ckpt_path = str(ckpt)
        return c

    train.run(cfg(tmp_path / "part"), callbacks=[StopAfter(1)])
    resumed = train.run(cfg(tmp_path / "resumed", tmp_path / "part/checkpoints/last.ckpt"))
    assert resumed["defaults"]["optimizer_steps"] == 0
    assert resumed["defaults"]["head_fit"]["method"] == "lbfgs"
    a = weights(tmp_path / "part/checkpoints/last.ckpt")
    b = weights(tmp_path / "resumed/checkpoints/last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("head"))


def test_a_finetune_resumed_after_its_head_only_epoch_refits_the_fine_tuning_head(
    tiny_cfg, tmp_path, monkeypatch
):
    """Interrupted after the head-only epoch, last.ckpt holds tl train's head (head.norm=l2); the
    resumed run switches to the raw-feature head before its first fine-tuning epoch, as an
    uninterrupted one does (features from the pretrained backbone, which has not moved yet), and
    a run resumed after that epoch keeps its trained head as it is."""
    from omegaconf import open_dict

    from .test_resume import StopAfter, weights

    def cfg(out, ckpt=None):
        c = tiny_cfg("strategy=finetune", "trainer.max_epochs=2", f"output_dir={out}")
        if ckpt:
            with open_dict(c):
                c.ckpt_path = str(ckpt)
        return c

    def norm(ckpt):
        return torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["head"][
            "norm"
        ]

    train.run(cfg(tmp_path / "part"), callbacks=[StopAfter(1)])
    assert norm(tmp_path / "part/checkpoints/last.ckpt") == "l2"
    whole = train.run(cfg(tmp_path / "whole"))
    resumed = train.run(cfg(tmp_path / "resumed", tmp_path / "part/checkpoints/last.ckpt"))
    for m, run in ((whole, "whole"), (resumed, "resumed")):
        assert m["defaults"]["head_fit"]["finetune_start"]["norm"] == "none", run
        assert norm(tmp_path / run / "checkpoints/last.ckpt") == "none"
    a = whole["defaults"]["head_fit"]["finetune_start"]
    b = resumed["defaults"]["head_fit"]["finetune_start"]
    assert a["C"] == b["C"] and a["train_acc"] == b["train_acc"]  # the same refit
    train.run(cfg(tmp_path / "part2"), callbacks=[StopAfter(2)])  # one fine-tuning epoch done

    def refit(self):
        raise AssertionError("refitted a head that fine-tuning already trained")

    monkeypatch.setattr(TransferTask, "refit_head_for_finetuning", refit)
    done = train.run(cfg(tmp_path / "done", tmp_path / "part2/checkpoints/last.ckpt"))
    assert done["epochs"] == 3 and norm(tmp_path / "done/checkpoints/last.ckpt") == "none"
    assert not all(
        torch.equal(v, weights(tmp_path / "part2/checkpoints/last.ckpt")[k])
        for k, v in weights(tmp_path / "done/checkpoints/last.ckpt").items()
    )  # it trained on


# --------------------------------------------------------------------------- trainer.max_epochs=auto


def test_auto_budget_gives_small_sets_more_epochs_and_large_sets_the_base():
    from tl_cli.transfer import budget

    assert budget.steps_per_epoch(90, 32) == 3
    assert budget.steps_per_epoch(4194, 32) == 132
    assert budget.steps_per_epoch(4194, 32, world_size=2, accumulate=2) == 33
    assert budget.auto_epochs(3) == budget.MAX_EPOCHS  # 90 images: capped
    assert budget.auto_epochs(132) == budget.MIN_EPOCHS  # large set: the base epochs
    mid = budget.auto_epochs(9)  # ~280 images
    assert budget.MIN_EPOCHS < mid < budget.MAX_EPOCHS and mid * 9 >= budget.MIN_STEPS
    # monotone: fewer steps per epoch never get fewer epochs
    epochs = [budget.auto_epochs(s) for s in range(1, 200)]
    assert all(a >= b for a, b in zip(epochs, epochs[1:], strict=False))


def test_auto_budget_in_real_runs(tmp_path, monkeypatch):
    from tl_cli.transfer import budget

    # the real constants made small so the runs stay short: 12 steps, 2..8 epochs
    monkeypatch.setattr(budget, "MIN_STEPS", 12)
    monkeypatch.setattr(budget, "MIN_EPOCHS", 2)
    monkeypatch.setattr(budget, "MAX_EPOCHS", 8)

    root = make_set(tmp_path / "data", {"a": 12, "b": 12}, test_per_class=2)
    # feature extraction with the L-BFGS head: nothing to train after the fit -> one epoch
    m = run_tiny(root, tmp_path / "fe", "trainer.max_epochs=auto")
    assert m["epochs"] == 1 and m["defaults"]["optimizer_steps"] == 0
    # an SGD head takes steps: 21 train images at batch 8 = 3 steps/epoch -> the auto epochs
    m = run_tiny(
        root,
        tmp_path / "sgd",
        "trainer.max_epochs=auto",
        "strategy.head_fit=sgd",
        "dataset.batch_size=8",
    )
    spe = budget.steps_per_epoch(m["train_size"], 8)
    assert spe == 3 and m["epochs"] == budget.auto_epochs(spe) == 4
    assert m["defaults"]["optimizer_steps"] == m["epochs"] * spe
    # an explicit integer is kept as given
    m = run_tiny(root, tmp_path / "fixed", "trainer.max_epochs=3", "strategy.head_fit=sgd")
    assert m["epochs"] == 3


def test_early_stopping_patience_stops_when_val_stops_improving(tmp_path):
    root = make_set(tmp_path / "data", {"a": 12, "b": 12}, test_per_class=2)
    # the L-BFGS head takes no steps: val/score never improves after epoch 1 -> stop after 1 + 2
    m = run_tiny(root, tmp_path / "es", "trainer.max_epochs=8", "early_stopping_patience=2")
    assert m["epochs"] == 3 and m["best_epoch"] == 1
    import pytest

    from tl_cli.core.errors import TLError

    with pytest.raises(TLError, match="early_stopping_patience=0 must be an integer >= 1 or null"):
        run_tiny(root, tmp_path / "bad", "early_stopping_patience=0")


def test_epochs_of_a_converged_head_are_one_batch_each_with_the_same_metrics(tmp_path):
    """A frozen backbone with the L-BFGS head takes no step: each epoch is one whole batch of the
    cached train features (Lightning's per-step overhead was most of a cached epoch), and the
    train metrics are those of the whole train split, as with the usual batches."""
    import pytorch_lightning as pl

    class Count(pl.Callback):
        def __init__(self) -> None:
            self.batches: dict[int, int] = {}

        def on_train_batch_end(self, trainer, *args) -> None:
            self.batches[trainer.current_epoch] = self.batches.get(trainer.current_epoch, 0) + 1

    root = make_set(tmp_path / "data", {"a": 12, "b": 12}, test_per_class=2)
    fe, sgd = Count(), Count()
    cfg = compose_cfg(
        [*TINY, f"dataset.root={root}", f"output_dir={tmp_path / 'fe'}", "trainer.max_epochs=3"]
        + ["dataset.batch_size=8"]
    )
    m = train.run(cfg, callbacks=[fe])
    assert fe.batches == {0: 1, 1: 1, 2: 1} and m["defaults"]["optimizer_steps"] == 0
    accs = {h["train/acc"] for h in m["history"]}
    assert len(accs) == 1 and math.isclose(accs.pop(), m["defaults"]["head_fit"]["train_acc"])
    # an SGD head steps on the usual batches: 21 train images at batch 8
    cfg = compose_cfg(
        [*TINY, f"dataset.root={root}", f"output_dir={tmp_path / 'sgd'}", "trainer.max_epochs=2"]
        + ["dataset.batch_size=8", "strategy.head_fit=sgd"]
    )
    train.run(cfg, callbacks=[sgd])
    assert sgd.batches == {0: 3, 1: 3}


# --------------------------------------------------------------------------- head-only epoch (#24)


def test_finetune_that_gets_worse_keeps_the_head_only_weights_in_best_ckpt(tmp_path):
    """Fine-tuning from an L-BFGS head starts with a head-only epoch (no optimizer step) whose
    validation makes the head alone a best.ckpt candidate: a fine-tune that destroys the network
    (AdamW at LR 0.3 on everything) leaves best.ckpt holding the fitted head on the untouched backbone."""
    from .test_resume import weights

    root = make_set(tmp_path / "data", {"a": 16, "b": 16}, test_per_class=6)
    m = run_tiny(
        root,
        tmp_path / "run",
        "strategy=finetune",
        "strategy.backbone_lr_mult=1.0",
        "optimizer.lr=0.3",
        "scheduler=none",
        "dataset.val_fraction=0.25",
        "trainer.max_epochs=2",
    )
    assert m["epochs"] == 3  # the head-only epoch, then trainer.max_epochs=2 of fine-tuning
    head, tuned = m["stages"]
    assert (head["stage"], head["epoch"], tuned["stage"]) == ("head only", 1, "fine-tuned")
    assert head["val/acc"] == 1.0 and tuned["val/score"] < head["val/score"], m["stages"]
    assert m["best_epoch"] == 1 and head["in_best_ckpt"] and not tuned["in_best_ckpt"]
    assert m["defaults"]["optimizer_steps"] == 2 * m["defaults"]["steps_per_epoch"]
    assert m["defaults"]["epochs"] == 2
    best = weights(tmp_path / "run" / "checkpoints" / "best.ckpt")
    last = weights(tmp_path / "run" / "checkpoints" / "last.ckpt")
    # the backbone in best.ckpt is the initial one (no step in the head-only epoch); last moved
    moved = [k for k in best if k.startswith("backbone.") and not torch.equal(best[k], last[k])]
    assert moved
    assert m["test/acc"] >= 0.9  # tested from best.ckpt: the head-only model


def test_beats_head_only_needs_more_than_one_standard_deviation_of_the_paired_difference():
    from tl_cli.tasks.classification.task import beats_head_only

    # (gained, lost): val items right only after fine-tuning, right only with the head alone
    assert not beats_head_only(0, 0)  # a tie keeps the head alone
    assert not beats_head_only(1, 0)  # one item: 1 > sqrt(1) fails
    assert not beats_head_only(3, 2)  # a net gain of one item, however many disagree
    assert beats_head_only(2, 0)  # 2 > sqrt(2)
    assert not beats_head_only(3, 1)  # 2 > sqrt(4) fails: they disagree on more items
    assert beats_head_only(3, 0) and beats_head_only(5, 1)
    # the margin grows with the disagreement, not with the split's size
    assert not beats_head_only(60, 50) and beats_head_only(60, 40)  # 10 < 10.5, 20 > 10


def scripted_val(monkeypatch, script: dict[int, list[tuple[bool, float]]]) -> None:
    """Replace what the classifier outputs on val during fit: epoch -> per val item (right?,
    margin of its logit). Training, the head fit and the test split see the real network."""
    from tl_cli.tasks.classification import ClassificationTask

    real = ClassificationTask._eval_step
    seen = {"epoch": -1, "i": 0}

    def eval_step(self, batch, stage):
        if not self.trainer.validating:  # sanity check, test: the real outputs
            return real(self, batch, stage)
        x, y = batch
        if seen["epoch"] != self.current_epoch:
            seen.update(epoch=self.current_epoch, i=0)
        rows = script[self.current_epoch][seen["i"] : seen["i"] + len(y)]
        seen["i"] += len(y)
        out = torch.zeros(len(y), self.num_outputs)
        for j, (right, margin) in enumerate(rows):
            out[j, int(y[j]) if right else 1 - int(y[j])] = margin  # two classes
        self.log(f"{stage}/loss", self.loss(out, y, stage), on_epoch=True)
        self.update_metrics(out, y, stage)

    monkeypatch.setattr(ClassificationTask, "_eval_step", eval_step)


def finetune_scripted(tmp_path, monkeypatch, script):
    root = make_set(tmp_path / "data", {"a": 16, "b": 16}, test_per_class=4)
    scripted_val(monkeypatch, script)
    return run_tiny(
        root,
        tmp_path / "run",
        "strategy=finetune",
        "scheduler=none",
        "dataset.val_fraction=0.25",  # 8 val images
        "trainer.max_epochs=2",
    )


def test_a_finetuned_epoch_one_val_item_better_does_not_replace_the_head_only_state(
    tmp_path, monkeypatch
):
    """The miss of issue 24 (CIFAR 20/class seed 2): a fine-tuned epoch one val item better (and
    more confident: a lower val/loss) than the head alone, worse on test. best.ckpt keeps the
    head-only weights; under val/score alone the fine-tuned epoch would have won."""
    from .test_resume import weights

    head = [(True, 1.0)] * 5 + [(False, 1.0)] * 3  # 5 of 8
    plus_one = [(True, 9.0)] * 6 + [(False, 0.1)] * 2  # 6 of 8, gained 1, lost 0
    net_one = [(False, 9.0)] + [(True, 9.0)] * 6 + [(False, 0.1)]  # gained 2, lost 1
    m = finetune_scripted(tmp_path, monkeypatch, {0: head, 1: plus_one, 2: net_one})
    head_row, tuned = m["stages"]
    assert head_row["val/acc"] == 0.625 and tuned["val/acc"] == 0.75, m["stages"]
    assert tuned["val/score"] > head_row["val/score"]  # what picked best.ckpt before
    assert (tuned["val/gained"], tuned["val/lost"]) in ((1, 0), (2, 1))
    assert m["best_epoch"] == 1 and head_row["in_best_ckpt"] and not tuned["in_best_ckpt"]
    assert m["val/acc"] == 0.625  # the reported val metrics are best.ckpt's
    best = weights(tmp_path / "run" / "checkpoints" / "best.ckpt")
    last = weights(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert any(not torch.equal(best[k], last[k]) for k in best if k.startswith("backbone."))


def test_a_finetuned_epoch_clearly_better_replaces_the_head_only_state(tmp_path, monkeypatch):
    from .test_resume import weights

    head = [(True, 1.0)] * 5 + [(False, 1.0)] * 3  # 5 of 8
    plus_one = [(True, 1.0)] * 6 + [(False, 1.0)] * 2  # gained 1: not enough
    plus_three = [(True, 1.0)] * 8  # gained 3, lost 0: 3 > sqrt(3)
    m = finetune_scripted(tmp_path, monkeypatch, {0: head, 1: plus_one, 2: plus_three})
    head_row, tuned = m["stages"]
    assert (tuned["epoch"], tuned["val/gained"], tuned["val/lost"]) == (3, 3, 0), m["stages"]
    assert m["best_epoch"] == 3 and tuned["in_best_ckpt"] and not head_row["in_best_ckpt"]
    assert m["history"][1]["val/select"] < head_row["val/select"] < m["history"][2]["val/select"]
    best = weights(tmp_path / "run" / "checkpoints" / "best.ckpt")
    last = weights(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(best[k], last[k]) for k in best)  # epoch 3 is the last one


def test_head_only_epoch_takes_no_step_and_the_schedule_starts_after_it(tiny_cfg):
    from .test_strategies import Spy

    spy = Spy()
    m = train.run(
        tiny_cfg("strategy=finetune", "trainer.max_epochs=2", "scheduler.warmup_fraction=0.5"),
        callbacks=[spy],
    )
    by_epoch: dict[int, list] = {}
    for r in spy.rows:
        by_epoch.setdefault(r["epoch"], []).append(r)
    assert sorted(by_epoch) == [0, 1, 2]
    assert all(v == 0.0 for r in by_epoch[0] for v in r["lr"].values())  # nothing steps
    assert all(r["bn_training"] == {False} for r in by_epoch[0])
    first = by_epoch[1][0]["lr"]
    # cosine warm-up starts at the first fine-tuning step, not inside the head-only epoch
    warmup = m["defaults"]["warmup_steps"]
    assert warmup == m["defaults"]["optimizer_steps"] // 2 > 1
    # both start at an optimum: head at optimizer.lr x 0.1, backbone at optimizer.lr x 0.01
    assert first["head"] == pytest.approx(1e-4 / warmup)
    assert first["backbone"] == pytest.approx(first["head"] * 0.1)
    assert m["defaults"]["head_lr_mult"] == 0.1 and m["defaults"]["backbone_lr_mult"] == 0.01
    assert [s["stage"] for s in m["stages"]] == ["head only", "fine-tuned"]


def test_feature_extraction_has_no_head_only_epoch(tmp_path):
    root = make_set(tmp_path / "data", {"a": 8, "b": 8}, test_per_class=2)
    m = run_tiny(root, tmp_path / "run", "trainer.max_epochs=2")
    assert "stages" not in m and m["epochs"] == 2


def test_collapse_advice_never_names_the_setting_in_use():
    from tl_cli.transfer.strategies import Finetune

    def module(head_fit, balance=None, trains=True):
        return SimpleNamespace(
            strategy=Finetune(head_fit=head_fit),
            policy=SimpleNamespace(backbone_ever_trains=trains),
            balance=balance,
            supports_head_fit=lambda: True,
        )

    tip = training.collapse_advice(module("lbfgs"))
    assert "head_fit=lbfgs" not in tip and "strategy=feature_extraction" in tip
    assert "head_fit=lbfgs" in training.collapse_advice(module("sgd"))
    tip = training.collapse_advice(module("lbfgs", balance="weights", trains=False))
    assert "balance" not in tip and "feature_extraction" not in tip and "more data" in tip


def test_probe_scale_global_does_not_amplify_a_feature_that_is_flat_in_train():
    """Issue 24, point 5: per-feature standardisation gives a feature that barely varies in train
    a huge weight on the raw scale, so a shifted domain where it varies swamps the logits;
    ``scale="global"`` (one scale for all features, as a probe on raw features) does not."""
    from tl_cli.transfer.probe import fit_probe

    rng = np.random.default_rng(0)
    n = 60
    y = np.repeat([0, 1], n // 2)
    x = rng.normal(0, 1, (n, 8)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 2.0, -2.0)  # the real signal
    x[:, 1] = np.where(y == 1, 1e-3, -1e-3) + rng.normal(0, 1e-4, n)  # flat, but separable
    shifted = x.copy()
    shifted[:, 1] = rng.normal(0, 1.0, n)  # the flat feature varies in the new domain
    accs = {}
    for scale in ("dim", "global"):
        fit = fit_probe(x, y, 2, scale=scale)
        logits = torch.as_tensor(shifted) @ fit.weight.T + fit.bias
        accs[scale] = float((logits.argmax(1).numpy() == y).mean())
        assert fit.train_acc == 1.0
    assert accs["global"] >= 0.9 and accs["dim"] < accs["global"], accs
