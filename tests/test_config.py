"""Every option of every config group composes and instantiates (Hydra compose API)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tl_cli.backbones import Backbone
from tl_cli.cli import config_dir
from tl_cli.data import TransferDataModule
from tl_cli.schedulers import PlateauState, shape_fn
from tl_cli.strategies import TransferStrategy

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


@pytest.mark.parametrize("name", options("backbone"))
def test_backbone_options_instantiate(name: str):
    extra = BACKBONE_EXTRA.get(name, [])
    if name != "efficientnet_lite0":
        extra = [*extra, "backbone.weights=none"]
    cfg = compose_cfg([f"backbone={name}", *extra])
    bb = instantiate(cfg.backbone)
    assert isinstance(bb, Backbone)
    size = bb.preprocessing["input_size"]
    assert size in (160, 224)
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
    s = instantiate(compose_cfg([f"strategy={name}"]).strategy)
    assert isinstance(s, TransferStrategy) and s.name == name
    plans = s.group_plans(4)
    assert len(plans) == 4


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options_instantiate(name: str, tiny_data: Path):
    extra = [f"dataset.root={tiny_data}"] if name == "imagefolder" else []
    dm = instantiate(compose_cfg([f"dataset={name}", *extra]).dataset)
    assert isinstance(dm, TransferDataModule)
    if name in ("imagefolder", "sample"):  # cifar would download on prepare()
        dm.prepare()
        assert dm.num_classes >= 3 and dm.splits["val"]


@pytest.mark.parametrize("name", options("head"))
def test_head_options_instantiate(name: str):
    head = instantiate(compose_cfg([f"head={name}"]).head, in_features=16, num_classes=5)
    assert head(torch.randn(2, 16)).shape == (2, 5)


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_options_instantiate(name: str):
    cfg = compose_cfg([f"optimizer={name}"]).optimizer
    p = torch.nn.Parameter(torch.zeros(3))
    opt = instantiate(cfg, _partial_=True)([{"params": [p], "lr": 0.5}])
    assert opt.param_groups[0]["lr"] == 0.5  # the group's LR wins over the default


@pytest.mark.parametrize("name", options("scheduler"))
def test_scheduler_options_build(name: str):
    cfg = OmegaConf.to_container(compose_cfg([f"scheduler={name}"]).scheduler)
    cfg["_state"] = PlateauState()  # the module provides it for scheduler=plateau
    f = shape_fn(cfg, total_steps=100, steps_per_epoch=10)
    vals = [f(s) for s in range(100)]
    assert all(0 <= v <= 1.0 + 1e-9 for v in vals)
    if name == "cosine":
        assert vals[0] < vals[9] and vals[-1] < 0.05  # warmup, then decay


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_instantiate(name: str, tmp_path: Path):
    cfg = compose_cfg([f"trainer={name}", "trainer.accelerator=cpu"]).trainer
    t = instantiate(cfg, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    assert t.max_epochs >= 1


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_compose(name: str):
    cfg = compose_cfg([f"experiment={name}"])
    assert cfg.trainer.max_epochs >= 1


def test_finetune_config_defaults_to_finetune_strategy():
    cfg = compose_cfg([], config_name="finetune")
    assert cfg.strategy._target_.endswith("Finetune") and cfg.command == "finetune"


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
