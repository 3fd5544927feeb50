"""curves.png + report.md after tl train, confusion_matrix.png + report.md after tl eval, LR finder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from tl_cli.commands import evaluate, train
from tl_cli.core.checkpoint import read_checkpoint
from tl_cli.run import report
from tl_cli.tasks.classification import evaluation

from .conftest import compose_cfg
from .trained_run import trained_run

C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two colours: train, val


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    return trained_run(tmp_path_factory, tiny_data)


def _has_colour(
    img: Image.Image, rgb: tuple[int, int, int], tol: int = 12, min_pixels: int = 30
) -> bool:
    arr = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(arr - np.array(rgb)).max(axis=2) <= tol).sum()) >= min_pixels


def test_train_writes_curves_png_with_train_and_val_lines(trained):
    run_dir, metrics = trained
    img = Image.open(run_dir / "curves.png")
    assert img.format == "PNG" and img.size == (1000, 400)
    assert _has_colour(img, C0) and _has_colour(img, C1)  # both series drawn


def test_curves_figure_plots_every_epoch_of_each_series():
    hist = [
        {
            "epoch": e,
            "train/loss": 1.0 - 0.1 * e,
            "train/acc": 0.5 + 0.1 * e,
            "val/loss": 1.1 - 0.1 * e,
            "val/acc": 0.4 + 0.1 * e,
        }
        for e in range(3)
    ]
    fig = report.curves_figure(hist, "t", best_epoch=2)
    loss_ax, acc_ax = fig.axes
    lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
    assert set(lines) >= {"train/loss", "val/loss"}
    assert list(lines["val/loss"].get_xdata()) == [1, 2, 3]  # 1-based epochs
    assert np.allclose(lines["train/loss"].get_ydata(), [1.0, 0.9, 0.8])
    assert {ln.get_label() for ln in acc_ax.get_lines()} >= {"train/acc", "val/acc"}
    assert "best epoch (2)" in {ln.get_label() for ln in acc_ax.get_lines()}


def test_train_report_md_has_config_metrics_history_and_plot_link(trained):
    run_dir, metrics = trained
    md = (run_dir / "report.md").read_text()
    assert "![Loss and accuracy per epoch](curves.png)" in md
    assert f"| val/acc | {metrics['val/acc']:.4f} |" in md
    assert f"| test/acc | {metrics['test/acc']:.4f} |" in md
    history = md.split("## Per-epoch history")[1].split("##")[0]
    assert (
        sum(1 for ln in history.splitlines() if ln.startswith("| ") and ln[2].isdigit())
        == metrics["epochs"]
    )
    cfg_block = md.split("```yaml")[1].split("```")[0]
    assert (
        "name: test_efficientnet" in cfg_block and "lr: 0.05" in cfg_block and "${" not in cfg_block
    )


def test_confusion_figure_class_names_and_row_normalisation():
    names = ["cat", "dog", "fox"]
    cm = [[3, 1, 0], [0, 0, 0], [2, 2, 4]]
    fig = evaluation.confusion_figure(cm, names, normalize=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
    shown = np.asarray(ax.images[0].get_array())
    assert np.allclose(shown, [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])  # empty row stays 0
    raw = np.asarray(
        evaluation.confusion_figure(cm, names, normalize=False).axes[0].images[0].get_array()
    )
    assert np.array_equal(raw, np.asarray(cm, dtype=float))
    texts = {t.get_text() for t in ax.texts}
    assert "0.75\n(3)" in texts  # fraction and count in each cell


def test_eval_writes_confusion_matrix_png_and_per_class_report(trained, tmp_path):
    run_dir, _ = trained
    cfg = compose_cfg([f"checkpoint={run_dir / 'checkpoints/best.ckpt'}"], config_name="eval")
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "ev")
    res = evaluate.run(cfg)
    img = Image.open(tmp_path / "ev/confusion_matrix.png")
    assert img.format == "PNG" and min(img.size) >= 400
    assert _has_colour(img, (8, 48, 107), tol=20)  # Blues' darkest: the diagonal of a perfect model
    md = (tmp_path / "ev/report.md").read_text()
    assert "![Confusion matrix](confusion_matrix.png)" in md
    for c, r in res["per_class"].items():
        assert (
            f"| {c} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |"
            in md
        )


@pytest.mark.parametrize("strategy", ["feature_extraction", "finetune"])  # cached features / images
def test_tune_lr_runs_the_finder_saves_plot_and_trains_with_the_suggestion(tiny_cfg, strategy):
    cfg = tiny_cfg(
        "dataset.batch_size=4",
        "trainer.max_epochs=1",
        f"strategy={strategy}",
        "strategy.head_fit=sgd",  # an L-BFGS head has no LR to tune (the finder is skipped)
        "tune_lr=true",
        "lr_finder.num_training=30",
        "lr_finder.min_lr=1e-5",
        "lr_finder.max_lr=1.0",
    )
    m = train.run(cfg)
    out = Path(cfg.output_dir)
    info = m["lr_find"]
    assert info["points"] >= 10 and info["plot"] == "lr_find.png"
    assert info["suggestion"] is not None and 1e-5 <= info["suggestion"] <= 1.0
    # the suggestion is used only on the falling part of the curve (tests/test_defaults.py)
    if info["used"]:
        assert info["lr"] == info["suggestion"] != info["configured_lr"]
    else:
        assert info["lr"] == info["configured_lr"] and info["reason"]
    # the run trained with it: the checkpoint records it
    hp = read_checkpoint(out / "checkpoints/best.ckpt")["hyper_parameters"]
    assert hp["optimizer"]["lr"] == pytest.approx(info["lr"])
    assert m["epochs"] == 1 and len(m["history"]) == 1  # the finder left no epoch in the history
    assert not list(out.rglob(".lr_find*.ckpt")) and not (out / "lr_find").exists()
    img = Image.open(out / "lr_find.png")
    assert img.format == "PNG" and _has_colour(img, C0)
    assert "![Learning-rate finder](lr_find.png)" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["lr_find"] == info
    assert torch.isfinite(torch.tensor(m["val/loss"]))


def test_one_epoch_shows_its_numbers_and_the_head_fit_not_two_dots():
    """Issue 29: a one-epoch run's curves.png was two dots on a 0.96-1.04 axis."""
    hist = [{"epoch": 0, "train/loss": 0.2, "train/acc": 0.97, "val/loss": 0.1, "val/acc": 1.0}]
    head = {"method": "lbfgs", "C": 0.5, "folds": 5, "cv_acc": 0.95, "train_acc": 0.97}
    fig = report.curves_figure(hist, "t", best_epoch=1, head_fit=head)
    (ax,) = fig.axes
    assert not ax.get_lines()  # no curve
    texts = [c.get_text().get_text() for c in ax.tables[0].get_celld().values()]
    assert {"accuracy", "0.9700", "1.0000", "loss", "0.2000", "0.1000"} <= set(texts)
    assert "C=0.5" in ax.get_title("left") and "5-fold CV accuracy 0.950" in ax.get_title("left")


def test_a_smoothed_objective_is_drawn_beside_the_comparable_cross_entropy():
    """Issue 29: train/loss with label smoothing (0.77 at train acc 1.0) beside val/loss 0.04."""
    hist = [
        {
            "epoch": e,
            "train/loss": 0.8,
            "train/ce": 0.05,
            "train/acc": 1.0,
            "val/loss": 0.04,
            "val/acc": 1.0,
        }
        for e in range(2)
    ]
    loss_ax, _ = report.curves_figure(hist, "t").axes
    labels = {ln.get_label(): ln for ln in loss_ax.get_lines()}
    assert np.allclose(labels["train cross-entropy (comparable with val/loss)"].get_ydata(), 0.05)
    assert any(k.startswith("train/loss (the objective") for k in labels)


def test_epoch_line_names_the_objective_and_gives_the_cross_entropy(capsys):
    from types import SimpleNamespace

    from tl_cli.run.callbacks import EpochLines, History

    h = History()
    h.epochs.append(
        {
            "epoch": 0,
            "train/loss": 0.77,
            "train/ce": 0.04,
            "val/loss": 0.04,
            "seconds": 1.0,
            "steps": 3,
            "lr": 1e-3,
        }
    )
    trainer = SimpleNamespace(is_global_zero=True, max_epochs=1, progress_bar_callback=None)
    EpochLines(h, ("train/loss", "val/loss")).on_train_epoch_end(trainer, None)
    out = capsys.readouterr().out
    assert "train/loss 0.7700 (objective; cross-entropy 0.0400)" in out and "lr 1.00e-03" in out
    h.epochs.append({"epoch": 1, "train/loss": 0.5, "val/loss": 0.04, "seconds": 1.0, "steps": 0})
    EpochLines(h, ("train/loss", "val/loss")).on_train_epoch_end(trainer, None)
    out = capsys.readouterr().out
    assert "lr" not in out and "no optimizer step" in out  # no LR when nothing stepped


def test_a_smoothed_run_records_the_comparable_train_loss(trained):
    run_dir, metrics = trained
    assert metrics["item_noun"] == "images"
    assert all("train/ce" in r for r in metrics["history"])  # label_smoothing 0.1 (the default)
    md = (run_dir / "report.md").read_text()
    assert "`train/ce`, the plain cross-entropy, is the one comparable with `val/loss`" in md
    assert "- images: train" in md


def test_lr_finder_of_an_image_finetune_trains_the_head_fine_tuning_starts_from(
    tiny_cfg, monkeypatch
):
    """tl finetune on images scores tl train's L2 head in its head-only epoch and fine-tunes from
    a raw-feature head: the LR range test trains the latter (head.norm=none), and the run still
    fits the L2 head first (the finder leaves the head as it was)."""
    from pytorch_lightning.tuner import Tuner

    seen = []
    real = Tuner.lr_find

    def spy(self, model, *args, **kwargs):
        seen.append(model.head.norm)
        return real(self, model, *args, **kwargs)

    monkeypatch.setattr(Tuner, "lr_find", spy)
    m = train.run(
        tiny_cfg(
            "strategy=finetune",
            "dataset.batch_size=4",
            "trainer.max_epochs=1",
            "tune_lr=true",
            "lr_finder.num_training=20",
        )
    )
    assert seen == ["none"]
    assert m["defaults"]["head_fit"]["norm"] == "l2"
    assert m["defaults"]["head_fit"]["finetune_start"]["norm"] == "none"
