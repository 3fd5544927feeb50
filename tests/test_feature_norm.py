"""Feature extraction above the probe (issue 24): the head's feature normalisation and scaling
defaults, stored in the checkpoint and reproduced by eval/predict/export, and flip TTA."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from tl_cli.commands import evaluate, predict
from tl_cli.core.errors import TLError
from tl_cli.tasks.classification import ClassificationTask
from tl_cli.tasks.loading import load_module

from .conftest import TINY, compose_cfg
from .trained_run import trained_run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_data) -> Path:
    return trained_run(tmp_path_factory, tiny_data)[0] / "checkpoints/best.ckpt"


def cfg_for(name: str, ckpt: Path, out_dir: Path, *extra: str):
    cfg = compose_cfg([f"checkpoint={ckpt}", *extra], config_name=name)
    with open_dict(cfg):
        cfg.output_dir = str(out_dir)
    return cfg


def task_from_config(*extra: str) -> ClassificationTask:
    """The classification task `tl train` would build from its composed config (tiny backbone)."""
    cfg = compose_cfg([*TINY, *extra])
    return ClassificationTask(
        dict(cfg.backbone),
        dict(cfg.head),
        dict(cfg.strategy),
        dict(cfg.optimizer),
        dict(cfg.scheduler),
        ["a", "b"],
        pretrained=False,
    )


def flat_feature_set(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train features where one feature separates the classes but is nearly flat, and a shifted
    domain where that feature varies a lot; the real signal is in feature 0."""
    rng = np.random.default_rng(0)
    n = 80
    y = np.repeat([0, 1], n // 2)
    x = rng.normal(0, 1, (n, dim)).astype(np.float32) + 5.0  # positive, like pooled activations
    x[:, 0] += np.where(y == 1, 2.5, -2.5)
    x[:, 1] = 5.0 + np.where(y == 1, 1e-3, -1e-3) + rng.normal(0, 1e-4, n)
    shifted = x.copy()
    shifted[:, 1] = 5.0 + rng.normal(0, 1.0, n)
    return x, y, shifted


def test_train_defaults_l2_head_and_global_scale_keep_a_flat_feature_from_dominating():
    """`tl train`'s composed defaults on an image backbone: head.norm resolves to l2 (stored so),
    strategy.head_scale is global; a feature that is flat in train does not swing the prediction
    when it moves. With the old per-feature scaling it does (the contrast proves the test bites)."""
    new = task_from_config()
    assert new.head.norm == "l2" and new.hparams["head"]["norm"] == "l2"
    assert new.strategy.head_scale == "global"
    dim = new.backbone.num_features
    x, y, shifted = flat_feature_set(dim)
    accs = {}
    for name, task in (
        ("default", new),
        ("old", task_from_config("head.norm=none", "strategy.head_scale=dim")),
    ):
        task.fit_linear(task.head[-1], task.head_input(x), y)
        with torch.no_grad():
            pred = task.head(torch.from_numpy(shifted)).argmax(1).numpy()
        accs[name] = float((pred == y).mean())
        assert task.head_fit_info["train_acc"] == 1.0
    assert accs["default"] >= 0.9 and accs["old"] < accs["default"] - 0.2, accs


def test_finetune_resolves_auto_to_the_l2_head_then_a_raw_feature_start():
    """head.norm=auto under fine-tuning: the head-only epoch reads L2-normalised features (tl
    train's head), fine-tuning starts from raw features scaled per dimension; an explicit norm
    keeps one head throughout."""
    task = task_from_config("strategy=finetune")
    assert task.head.norm == "l2" and task.hparams["head"]["norm"] == "l2"
    assert task.finetune_norm == "none" and task.strategy.head_scale == "dim"
    for norm in ("none", "l2"):
        fixed = task_from_config("strategy=finetune", f"head.norm={norm}")
        assert fixed.head.norm == norm and fixed.finetune_norm is None
    assert task_from_config().finetune_norm is None  # feature extraction: nothing to switch to
    sgd = task_from_config("strategy=finetune", "strategy.head_fit=sgd")
    assert sgd.head.norm == "none" and sgd.finetune_norm is None


def test_finetune_keeps_the_l2_head_as_its_head_only_candidate_and_refits_for_fine_tuning(
    tmp_path, tiny_cfg
):
    """End to end: the head-only epoch is scored with tl train's head (l2, one global scale), the
    first fine-tuning epoch starts from a head fitted again on raw features (none, dim). Each
    checkpoint stores the norm its weights were fitted with: best.ckpt (the head-only state:
    fine-tuning at LR 0.3 destroys the network) says l2, last.ckpt none; the run's test split,
    scored from best.ckpt, gives what the reloaded best.ckpt gives (the norm was restored)."""
    from tl_cli.commands import train

    out = tmp_path / "run"
    cfg = tiny_cfg(
        "strategy=finetune",
        "strategy.backbone_lr_mult=1.0",
        "optimizer.lr=0.3",
        "scheduler=none",
        "trainer.max_epochs=1",
        f"output_dir={out}",
    )
    m = train.run(cfg)
    fit = m["defaults"]["head_fit"]
    assert (fit["norm"], fit["scale"]) == ("l2", "global"), fit
    assert (fit["finetune_start"]["norm"], fit["finetune_start"]["scale"]) == ("none", "dim")
    best = torch.load(out / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(out / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert m["best_epoch"] == 1  # the head-only state
    assert best["hyper_parameters"]["head"]["norm"] == "l2"
    assert last["hyper_parameters"]["head"]["norm"] == "none"
    res = evaluate.run(cfg_for("eval", out / "checkpoints/best.ckpt", tmp_path / "e", "split=test"))
    assert res["acc"] == pytest.approx(m["test/acc"]) and res["loss"] == pytest.approx(
        m["test/loss"], rel=1e-4
    )


def test_bad_norm_and_scale_are_one_line_errors(tmp_path, tiny_data):
    from tl_cli.commands import train

    for bad, word in (("head.norm=l1", "head.norm"), ("strategy.head_scale=max", "head_scale")):
        cfg = compose_cfg([*TINY, f"dataset.root={tiny_data}", bad])
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / bad)
        with pytest.raises(TLError) as e:
            train.run(cfg)
        assert word in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_stores_the_normalisation_and_reload_reproduces_the_head(ckpt, tmp_path):
    """The checkpoint holds head.norm=l2 (resolved, not auto); the reloaded model's logits are
    W * normalize(backbone(x)) + b from the stored tensors, and a checkpoint that says none
    (as tl 0.2 wrote) is read as none: the stored value decides, nothing is re-resolved."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["head"]["norm"] == "l2"
    assert raw["tl_head_fit"]["norm"] == "l2" and raw["tl_head_fit"]["scale"] == "global"
    module, _ = load_module(ckpt)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        f = module.backbone(x)
        want = (
            torch.nn.functional.normalize(f, dim=1) @ raw["state_dict"]["head.0.weight"].T
            + raw["state_dict"]["head.0.bias"]
        )
        got = module(x)
        again = load_module(ckpt)[0](x)
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(got, again)
    del raw["hyper_parameters"]["head"]["norm"]  # a checkpoint from before the option
    old = tmp_path / "old.ckpt"
    torch.save(raw, old)
    with torch.no_grad():
        plain = load_module(old)[0](x)
        unnormed = f @ raw["state_dict"]["head.0.weight"].T + raw["state_dict"]["head.0.bias"]
    assert torch.allclose(plain, unnormed, atol=1e-5) and not torch.allclose(plain, got)


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(ckpt):
    module, _ = load_module(ckpt)
    x = torch.rand(3, 3, 32, 32)
    x[:, :, :, :8] = 1.0  # not mirror-symmetric
    with torch.no_grad():
        plain = module.tta_forward(x)
        module.set_tta("flip")
        tta = module.tta_forward(x)
        want = (module(x) + module(torch.flip(x, dims=[-1]))) / 2
    assert torch.allclose(plain, module(x)) and torch.allclose(tta, want, atol=1e-6)
    assert not torch.allclose(tta, plain, atol=1e-4)
    with pytest.raises(TLError, match="tta=rotate") as e:
        module.set_tta("rotate")
    assert "flip" in str(e.value) and "\n" not in str(e.value)


def test_predict_and_eval_apply_tta_flip(ckpt, tiny_data, tmp_path):
    module, _ = load_module(ckpt)
    files = sorted((tiny_data / "test").rglob("*.png"))[:4]
    out = tmp_path / "p.csv"
    predict.run(
        cfg_for("predict", ckpt, tmp_path / "p", f"inputs={tiny_data / 'test'}", f"output={out}")
    )
    out_tta = tmp_path / "p_tta.csv"
    predict.run(
        cfg_for(
            "predict",
            ckpt,
            tmp_path / "pt",
            f"inputs={tiny_data / 'test'}",
            f"output={out_tta}",
            "tta=flip",
        )
    )
    rows = {r["path"]: r for r in csv.DictReader(out_tta.open())}
    plain = {r["path"]: r for r in csv.DictReader(out.open())}
    from tl_cli.modalities.base import modality_of

    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["tl"]
    load = modality_of(meta).loader(meta["preprocessing"])
    x = torch.stack([load(str(f)) for f in files])
    module.set_tta("flip")
    with torch.no_grad():
        probs = module.tta_forward(x).softmax(1)
    for f, p in zip(files, probs, strict=True):
        r = next(v for k, v in rows.items() if k.endswith(f.name) and f.parent.name in k)
        top = int(p.argmax())
        assert r["label_1"] == module.class_names[top]
        assert abs(float(r["prob_1"]) - float(p[top])) < 1e-4
    assert any(rows[k]["prob_1"] != plain[k]["prob_1"] for k in rows)  # it did change something
    res = evaluate.run(cfg_for("eval", ckpt, tmp_path / "e", "tta=flip"))
    saved = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert saved["tta"] == "flip" and res["tta"] == "flip"
    with pytest.raises(TLError, match="tta=mirror"):
        evaluate.run(cfg_for("eval", ckpt, tmp_path / "bad", "tta=mirror"))
    assert not (tmp_path / "bad" / "eval.json").exists()


def test_exported_torchscript_applies_the_l2_normalisation(ckpt, tmp_path):
    """The exported graph is backbone -> normalise -> linear: it matches the hand-computed
    normalised logits, not the logits of the raw features."""
    import warnings

    from tl_cli.commands import export

    export.run(cfg_for("export", ckpt, tmp_path / "x", "format=torchscript"))
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    module, _ = load_module(ckpt)
    x = torch.rand(2, 3, 32, 32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        got = torch.jit.load(str(tmp_path / "x" / "model.pt"))(x)
        f = module.backbone(x)
    w, b = raw["head.0.weight"], raw["head.0.bias"]
    assert torch.allclose(got, torch.nn.functional.normalize(f, dim=1) @ w.T + b, atol=1e-4)
    assert not torch.allclose(got, f @ w.T + b, atol=1e-3)
