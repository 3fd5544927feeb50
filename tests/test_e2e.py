"""End to end: train -> checkpoint -> eval, in-process and through the real `tl` executable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from tl_cli.commands import evaluate, train

from .conftest import TINY, cifar_slice, compose_cfg, make_image_folder, run_tl

METRICS_KEYS = {
    "val/acc",
    "val/loss",
    "test/acc",
    "test/loss",
    "test/macro_f1",
    "best_epoch",
    "epochs",
    "fit_seconds",
    "history",
    "class_names",
    "schema_version",
}


def eval_cfg(ckpt: Path, out: Path, *extra: str):
    cfg = compose_cfg([f"checkpoint={ckpt}", *extra], config_name="eval")
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


@pytest.mark.parametrize("strategy", ["feature_extraction", "finetune", "freeze_unfreeze"])
def test_train_then_eval_in_process(tiny_cfg, tmp_path, strategy):
    cfg = tiny_cfg(
        f"strategy={strategy}",
        "strategy.cache_features=false" if strategy == "feature_extraction" else "seed=1",
    )
    m = train.run(cfg)
    run_dir = Path(cfg.output_dir)
    assert METRICS_KEYS <= set(m)
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    # tl finetune from an L-BFGS head: a head-only epoch first, then trainer.max_epochs
    epochs = 3 if strategy == "finetune" else 2
    assert (
        on_disk["val/acc"] == m["val/acc"]
        and on_disk["epochs"] == epochs
        and 1 <= on_disk["best_epoch"] <= epochs
    )
    assert (run_dir / "checkpoints/best.ckpt").is_file() and (
        run_dir / "checkpoints/last.ckpt"
    ).is_file()
    assert (run_dir / "csv/metrics.csv").is_file()
    # best epoch's val/acc is the max over the history
    assert m["val/acc"] == max(r["val/acc"] for r in m["history"])

    res = evaluate.run(eval_cfg(run_dir / "checkpoints/best.ckpt", tmp_path / "eval"))
    saved = json.loads((tmp_path / "eval/eval.json").read_text())
    assert saved["split"] == "test" and saved["num_samples"] == 12
    assert set(saved["per_class"]) == {"cat", "dog", "fox"}
    assert {"precision", "recall", "f1", "support"} <= set(saved["per_class"]["cat"])
    assert "top5_acc" not in saved  # fewer than 5 classes
    # the checkpoint alone reproduces the test score computed during training
    assert res["acc"] == pytest.approx(m["test/acc"], abs=1e-6)


def test_eval_on_another_root_and_class_mismatch(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_epochs=1")
    train.run(cfg)
    ckpt = Path(cfg.output_dir) / "checkpoints/best.ckpt"
    other = make_image_folder(
        tmp_path / "other", {"": 3}, seed=5
    )  # bare class folders: score all of it
    res = evaluate.run(eval_cfg(ckpt, tmp_path / "e1", f"dataset.root={other}"))
    assert res["split"] == "all" and res["num_samples"] == 9
    (other / "cat").rename(other / "lynx")
    from tl_cli.core.errors import TLError

    with pytest.raises(TLError, match="missing cat.*unknown to the model lynx"):
        evaluate.run(eval_cfg(ckpt, tmp_path / "e2", f"dataset.root={other}"))


def test_real_tl_executable_train_and_eval(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    r = run_tl(
        "train", *TINY, f"dataset.root={tiny_data}", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "val/acc" in r.stdout and "epoch 2/2" in r.stdout
    )  # one plain line per epoch when not a TTY
    assert (run_dir / "metrics.json").is_file() and (run_dir / ".hydra/config.yaml").is_file()
    r = run_tl(
        "eval",
        f"checkpoint={run_dir}/checkpoints/best.ckpt",
        f"hydra.run.dir={tmp_path / 'ev'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "ev/eval.json").read_text())["num_samples"] == 12
    assert "macro_f1" in r.stdout


def test_cli_help_and_cfg(tmp_path):
    r = run_tl("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "finetune", "eval"))
    r = run_tl("train", "--help")
    assert (
        r.returncode == 0
        and "backbone: " in r.stdout
        and "efficientnet_lite0" in r.stdout
        and "strategy: " in r.stdout
    )
    r = run_tl("finetune", "--cfg", "job")
    assert r.returncode == 0 and "strategy:\n  name: finetune" in r.stdout
    r = run_tl("bogus")
    assert r.returncode == 2 and "unknown command" in r.stderr


def _one_line_error(r, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert any(all(n in line for n in needles) for line in err), r.stderr


def test_bad_input_exits_with_one_line(tmp_path):
    r = run_tl(
        "train", *TINY, f"dataset.root={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    _one_line_error(r, 2, "does not exist", str(tmp_path / "nope"))
    root = make_image_folder(tmp_path / "one", {"": 3})
    for cls in ("dog", "fox"):
        for p in (root / cls).glob("*"):
            p.unlink()
        (root / cls).rmdir()
    r = run_tl("train", *TINY, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r2'}")
    _one_line_error(r, 2, "at least 2", str(root))
    r = run_tl("eval", f"checkpoint={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path / 'e'}")
    _one_line_error(r, 2, "missing.ckpt", "not found")
    r = run_tl("train", "backbone=nope")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "efficientnet_lite0" in r.stderr


def test_full_traceback_with_hydra_full_error(tmp_path):
    r = run_tl(
        "train",
        *TINY,
        f"dataset.root={tmp_path / 'nope'}",
        f"hydra.run.dir={tmp_path / 'r'}",
        env={"HYDRA_FULL_ERROR": "1"},
    )
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.slow
def test_real_weights_feature_extraction_on_cifar(tmp_path):
    """efficientnet_lite0 (bundled ImageNet weights) + linear probe on real CIFAR-10 images.

    30 train images per class (27 after the val carve), 20 test per class, 96 px, 15 epochs on cached
    features. Measured test/acc 0.68 (chance 0.10); the threshold leaves a margin for seeds.
    """
    root = cifar_slice(tmp_path / "cifar", 30, 20)
    cfg = compose_cfg(
        [
            "dataset=imagefolder",
            f"dataset.root={root}",
            "dataset.image_size=96",
            "dataset.num_workers=0",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.max_epochs=15",
        ]
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    m = train.run(cfg)
    print("real-weights test/acc", m["test/acc"])
    assert m["test/acc"] >= 0.55


class _LayoutProbe(pl.Callback):
    """Records, after every training step, the memory layout of the backbone's 4-D conv weights."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []  # (all channels_last, any not plain-contiguous)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ws = [p for p in pl_module.backbone.parameters() if p.dim() == 4]
        assert ws, "the tiny backbone has conv weights"
        self.seen.append(
            (
                all(p.is_contiguous(memory_format=torch.channels_last) for p in ws),
                # a 3x3 conv with >1 input channel is channels_last only if it was converted
                any(not p.is_contiguous() for p in ws),
            )
        )


def test_channels_last_option_trains(tiny_cfg):
    probe = _LayoutProbe()
    m = train.run(
        tiny_cfg("channels_last=true", "strategy=finetune", "trainer.max_epochs=1"),
        callbacks=[probe],
    )
    # trainer.max_epochs counts the fine-tuning epochs; the head-only epoch comes first
    assert m["epochs"] == 2 and m["stages"][0]["stage"] == "head only"
    assert 0.0 <= m["val/acc"] <= 1.0
    assert probe.seen and all(a and b for a, b in probe.seen), probe.seen
