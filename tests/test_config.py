"""Every option of every config group composes and instantiates (Hydra compose API)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tl_cli.cli import config_dir
from tl_cli.core.errors import TLError
from tl_cli.data.base import DATASETS, TransferDataModule
from tl_cli.modalities.backbones import build_backbone
from tl_cli.modalities.image.backbones import Backbone
from tl_cli.transfer.heads import HEADS
from tl_cli.transfer.optimizers import OPTIMIZERS
from tl_cli.transfer.schedulers import PlateauState, shape_fn
from tl_cli.transfer.strategies import STRATEGIES, TransferStrategy

from .conftest import compose_cfg

CONFIGS = Path(config_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_groups_required_by_design_card_exist():
    for g in (
        "backbone",
        "strategy",
        "dataset",
        "optimizer",
        "head",
        "scheduler",
        "trainer",
        "experiment",
    ):
        assert options(g), g


# Generic configs need a name; big torchvision nets are built without weights (nothing downloads).
BACKBONE_EXTRA = {"torchvision": ["backbone.name=resnet18"], "timm": ["backbone.name=test_vit"]}


# Eval input size of each backbone option (from its weights' transforms or timm's pretrained cfg).
INPUT_SIZE = {"efficientnet_lite1": 240, "efficientnet_lite2": 260, "timm": 160}  # timm: test_vit


# text backbones (minilm, hf) read tokens and the speech backbone waveforms, not images:
# tests/test_text.py and tests/test_audio.py build and check them
TEXT_BACKBONES = ("minilm", "hf", "speech_embedding")


@pytest.mark.parametrize("name", [n for n in options("backbone") if n not in TEXT_BACKBONES])
def test_backbone_options_instantiate(name: str):
    extra = BACKBONE_EXTRA.get(name, [])
    if not name.startswith(
        "efficientnet_lite"
    ):  # bundled weights load offline; others would download
        extra = [*extra, "backbone.weights=none"]
    cfg = compose_cfg([f"backbone={name}", *extra])
    bb = build_backbone(cfg.backbone)
    assert isinstance(bb, Backbone) and bb.name == cfg.backbone.name
    size = bb.preprocessing["input_size"]
    assert size == INPUT_SIZE.get(name, 224)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        f = bb.eval()(x)
    assert f.shape == (1, bb.num_features)
    groups = bb.block_groups()
    named = {n for n, _ in bb.named_parameters()}
    assert sorted(n for g in groups for n in g) == sorted(named), (
        "block groups must cover every parameter once"
    )
    assert len(groups) >= 3


@pytest.mark.parametrize("name", options("strategy"))
def test_strategy_options_instantiate(name: str):
    import tl_cli.tasks.components  # noqa: F401 - every strategy registered (prototypes)

    s = STRATEGIES.build(compose_cfg([f"strategy={name}"]).strategy)
    assert isinstance(s, TransferStrategy) and s.name == name
    plans = s.group_plans(4)
    assert len(plans) == 4


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options_instantiate(name: str, tiny_data: Path):
    import tl_cli.tasks.components  # noqa: F401 - every dataset registered (text)

    extra = {
        "imagefolder": [f"dataset.root={tiny_data}"],
        "text": ["dataset.root=x.csv"],
        "audiofolder": ["dataset.root=clips"],
    }
    cfg = compose_cfg([f"dataset={name}", *extra.get(name, [])]).dataset
    dm = DATASETS.build(cfg)
    assert isinstance(dm, TransferDataModule)
    for key in ("batch_size", "val_fraction", "split_seed", "augment", "image_size"):
        if key in cfg or name not in ("text", "audiofolder", "ner"):  # no image_size there
            assert getattr(dm, key) == cfg[key], key  # the options reach the data module
    if name.startswith("cifar"):  # cifar would download on prepare()
        assert dm.name == name and dm.download is True
    if name in ("imagefolder", "sample"):  # cifar would download on prepare()
        dm.prepare()
        assert dm.num_classes >= 3 and dm.splits["val"]


@pytest.mark.parametrize("name", options("head"))
def test_head_options_instantiate(name: str):
    head = HEADS.build(compose_cfg([f"head={name}"]).head, in_features=16, num_classes=5)
    if name in ("fcos", "retinanet", "fasterrcnn"):  # task=detection's heads: not classifiers
        with pytest.raises(TLError, match="detection heads: use task=detection"):
            head(torch.randn(2, 16))
        return
    assert head(torch.randn(2, 16)).shape == (2, 5)


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_options_instantiate(name: str):
    cfg = compose_cfg([f"optimizer={name}"]).optimizer
    p = torch.nn.Parameter(torch.zeros(3))
    opt = OPTIMIZERS.build(cfg)([{"params": [p], "lr": 0.5}])
    assert opt.param_groups[0]["lr"] == 0.5  # the group's LR wins over the default
    assert type(opt).__name__.lower() == name  # adam -> Adam, adamw -> AdamW, sgd -> SGD


@pytest.mark.parametrize("name", options("scheduler"))
def test_scheduler_options_build(name: str):
    cfg = OmegaConf.to_container(compose_cfg([f"scheduler={name}"]).scheduler)
    cfg["_state"] = PlateauState()  # the module provides it for scheduler=plateau
    f = shape_fn(cfg, total_steps=100, steps_per_epoch=10)
    vals = [f(s) for s in range(100)]
    assert all(0 <= v <= 1.0 + 1e-9 for v in vals)
    peak = max(range(100), key=vals.__getitem__)
    if name == "cosine":  # 1 warmup epoch (10 steps) to 1.0, then decay to min_lr_ratio 0.01
        assert peak == 9 and vals[9] == pytest.approx(1.0) and vals[0] < vals[9]
        assert all(a >= b for a, b in zip(vals[9:], vals[10:], strict=False))
        assert vals[-1] == pytest.approx(0.01, abs=0.005)
    elif name == "onecycle":  # from 1/div_factor up to 1.0 at pct_start=0.3, then down
        assert vals[0] == pytest.approx(1 / 25) and peak == 30 and vals[-1] < 1e-3
    elif name == "step":  # x0.1 every 3 epochs
        for start, v in ((0, 1.0), (30, 0.1), (60, 0.01), (90, 0.001)):
            assert vals[start : start + 10] == pytest.approx([v] * 10), start
    else:  # none; plateau without a plateau reported yet
        assert name in ("none", "plateau") and vals == [1.0] * 100


# What each trainer option sets (the rest comes from trainer/default.yaml).
TRAINERS = {
    "default": {
        "accelerator": "auto",
        "devices": "auto",
        "strategy": "auto",
        "precision": "32-true",
    },
    "cpu": {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"},
    "ddp": {"accelerator": "auto", "devices": 2, "strategy": "ddp", "precision": "32-true"},
    "gpu": {"accelerator": "gpu", "devices": "auto", "strategy": "auto", "precision": "bf16-mixed"},
}


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_compose_to_their_settings(name: str):
    assert name in TRAINERS, f"add what configs/trainer/{name}.yaml sets to TRAINERS"
    cfg = compose_cfg([f"trainer={name}"]).trainer
    assert {k: cfg[k] for k in TRAINERS[name]} == TRAINERS[name]
    assert cfg.max_epochs == "auto" and cfg.num_sanity_val_steps == 0  # tl_cli.transfer.budget


@pytest.mark.parametrize("name", ["default", "cpu", "ddp"])
def test_trainer_options_instantiate(name: str, tmp_path: Path):
    from pytorch_lightning.accelerators import CPUAccelerator
    from pytorch_lightning.strategies import DDPStrategy

    # ddp on CPU processes is what the tests and CPU-only machines run (accelerator=auto picks a GPU)
    extra = ["trainer.accelerator=cpu"] if name == "ddp" else []
    cfg = compose_cfg([f"trainer={name}", *extra]).trainer
    from tl_cli.transfer import budget

    # max_epochs=auto: train.py gives Lightning a placeholder, replaced once the data is scanned
    assert budget.is_auto(cfg)
    t = instantiate(
        cfg,
        max_epochs=budget.PLACEHOLDER,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
    )
    assert t.max_epochs == budget.PLACEHOLDER and t.precision == "32-true"
    if name == "ddp":
        assert isinstance(t.strategy, DDPStrategy) and t.num_devices == 2
        assert isinstance(t.accelerator, CPUAccelerator)
    if name == "cpu":
        assert isinstance(t.accelerator, CPUAccelerator) and t.num_devices == 1
        assert not isinstance(t.strategy, DDPStrategy)


def test_gpu_trainer_uses_cuda_with_bf16_or_fails_clearly_without(tmp_path: Path):
    cfg = compose_cfg(["trainer=gpu"]).trainer

    def make():
        return instantiate(
            cfg, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False
        )

    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="No supported gpu backend found"):
            make()
        return
    from pytorch_lightning.accelerators import CUDAAccelerator

    t = make()
    assert isinstance(t.accelerator, CUDAAccelerator) and t.precision == "bf16-mixed"
    assert t.num_devices == torch.cuda.device_count()


def _flat(cfg, prefix: str = "") -> dict:
    """Dotted keys -> values of a composed config (interpolations left as written)."""
    out = {}
    for k, v in OmegaConf.to_container(cfg, resolve=False).items():
        if isinstance(v, dict) and v:
            out |= _flat(OmegaConf.create(v), f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


# What each experiment changes relative to the default train config (and the strategy it selects).
EXPERIMENTS = {
    "quick": (None, {"trainer.max_epochs": 2}),
    "finetune_lowres": (
        "freeze_unfreeze",
        {"dataset.image_size": 128, "strategy.unfreeze_at_epoch": 1, "trainer.max_epochs": 6},
    ),
}


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_change_exactly_what_they_say(name: str):
    assert name in EXPERIMENTS, f"add what configs/experiment/{name}.yaml changes to EXPERIMENTS"
    strategy, expected = EXPERIMENTS[name]
    # the baseline with the same strategy option: a wrong strategy shows up as a diff of its keys
    # dataset=cifar10: its image_size is null, so an experiment's image_size shows (sample's is 128)
    common = ["dataset=cifar10"]
    base = _flat(compose_cfg([*common, *([f"strategy={strategy}"] if strategy else [])]))
    exp = _flat(compose_cfg([*common, f"experiment={name}"]))
    diff = {k: exp.get(k) for k in base.keys() | exp.keys() if base.get(k) != exp.get(k)}
    assert diff == expected


def test_finetune_config_defaults_to_finetune_strategy():
    cfg = compose_cfg([], config_name="finetune")
    assert cfg.strategy.name == "finetune" and cfg.command == "finetune"


def test_task_defaults_label_smoothing_per_modality():
    """Images smooth labels (0.1); text and audio do not (measured: docs/benchmarks.md); the
    command line still wins, and tl distill never smooths (its soft targets do)."""
    assert compose_cfg([]).label_smoothing == 0.1
    assert compose_cfg(["modality=text"], "finetune").label_smoothing == 0.0
    assert compose_cfg(["modality=audio"], "finetune").label_smoothing == 0.0
    assert compose_cfg(["modality=text", "label_smoothing=0.2"], "finetune").label_smoothing == 0.2
    assert compose_cfg(["modality=image", "teacher=x"], "distill").label_smoothing == 0.0


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["backbone=nope"])
    assert "efficientnet_lite0" in str(e.value) and "resnet18" in str(e.value)


def test_user_overrides_keep_their_names():
    cfg = compose_cfg(
        [
            "seed=7",
            "ckpt_path=x.ckpt",
            "dataset.root=/d",
            "dataset.image_size=96",
            "dataset.batch_size=4",
            "dataset.num_workers=0",
            "dataset.val_fraction=0.2",
            "optimizer.lr=0.5",
            "strategy=freeze_unfreeze",
            "strategy.backbone_lr_mult=0.3",
            "strategy.unfreeze_at_epoch=4",
            "trainer.max_epochs=3",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.strategy=ddp",
            "trainer.precision=bf16-mixed",
        ]
    )
    assert cfg.seed == 7 and cfg.strategy.unfreeze_at_epoch == 4 and cfg.trainer.strategy == "ddp"
    assert (
        compose_cfg(["checkpoint=a.ckpt", "dataset.root=/x"], config_name="eval").checkpoint
        == "a.ckpt"
    )
