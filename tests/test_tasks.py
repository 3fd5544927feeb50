"""The task and policy seams: a new objective is one class + one YAML; the policy serves any
backbone that has block groups, whatever its modality."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torch import nn

from tests.conftest import TINY, compose_cfg
from tl_cli.core.checkpoint import load_module
from tl_cli.core.errors import TLError
from tl_cli.tasks.base import TASKS, TransferTask
from tl_cli.tasks.classification import ClassificationTask
from tl_cli.transfer.policy import TransferPolicy
from tl_cli.transfer.strategies import STRATEGIES

# --------------------------------------------------------------------------- a second task


class OneVsRestTask(TransferTask):
    """Each class scored independently with a sigmoid (multi-label style), trained with BCE.

    Written the way a user would add an objective: this class and a YAML file; train.py and the
    policy are untouched.
    """

    def loss(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out, F.one_hot(y, self.num_outputs).float())

    def update_metrics(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> None:
        acc = (out.argmax(1) == y).float().mean()
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True)


if "test_one_vs_rest" not in TASKS:
    TASKS.register("test_one_vs_rest", OneVsRestTask)


@pytest.fixture
def task_config_dir(tmp_path: Path) -> Path:
    d = tmp_path / "user_configs" / "task"
    d.mkdir(parents=True)
    (d / "one_vs_rest.yaml").write_text("# @package _global_\ntask:\n  name: test_one_vs_rest\n")
    return tmp_path / "user_configs"


def test_a_new_task_is_one_class_and_one_yaml(task_config_dir, tiny_data, tmp_path):
    from tl_cli.commands.train import run

    cfg = compose_cfg(
        [
            *TINY,
            f"dataset.root={tiny_data}",
            f"hydra.searchpath=[file://{task_config_dir}]",
            "task=one_vs_rest",
            "optimizer.lr=0.05",
            "trainer.max_epochs=3",
        ]
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    assert cfg.task.name == "test_one_vs_rest"
    metrics = run(cfg)
    assert metrics["task"] == "test_one_vs_rest"
    assert metrics["test/acc"] > 0.5  # 3 colour classes: learnable
    module, ckpt = load_module(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert isinstance(module, OneVsRestTask) and ckpt["tl"]["task"] == "test_one_vs_rest"


def test_the_default_task_is_classification():
    cfg = compose_cfg([])
    assert cfg.task.name == "classification" and TASKS.get("classification") is ClassificationTask


def test_an_unknown_task_is_one_clear_line(tiny_cfg):
    from tl_cli.commands.train import build

    cfg = tiny_cfg()
    with open_dict(cfg):
        cfg.task.name = "segmentation"
    with pytest.raises(TLError, match=r"task.name='segmentation' is not a known task"):
        build(cfg)


# --------------------------------------------------------------------------- the policy, modality-free


class ToyBackbone(nn.Module):
    """Not an image model: a stack of (Linear, BatchNorm1d) blocks on vectors."""

    modality = "vector"

    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width)) for _ in range(depth)
        )
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.relu(b(x))
        return x

    def block_groups(self) -> list[list[str]]:
        return [
            [f"blocks.{i}.{n}" for n, _ in b.named_parameters()] for i, b in enumerate(self.blocks)
        ]


class ToyTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = ToyBackbone()
        self.head = nn.Linear(8, 3)
        self.discriminator = nn.Linear(8, 2)  # an objective's extra module: trains from epoch 0
        self.teacher = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))  # frozen


def test_policy_plans_any_backbone_with_block_groups():
    task = ToyTask()
    strategy = STRATEGIES.build({"name": "gradual_unfreeze", "milestones": [1, 2], "bn": "train"})
    policy = TransferPolicy(strategy, task, frozen=("teacher",))
    task.train()
    policy.apply(0)
    grads = {n for n, p in task.named_parameters() if p.requires_grad}
    assert grads == {
        n for n, _ in task.named_parameters() if n.startswith(("head.", "discriminator."))
    }
    # frozen BN (backbone and teacher) runs in eval mode even though the module trains
    bns = [m for m in task.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(not m.training for m in bns)
    policy.apply(1)  # top half of the backbone joins, deepest first
    live = {
        n.split(".")[2]
        for n, p in task.backbone.named_parameters(prefix="backbone")
        if p.requires_grad
    }
    assert live == {"2", "3"}
    assert task.backbone.blocks[3][1].training and not task.backbone.blocks[0][1].training
    policy.apply(2)
    assert all(p.requires_grad for p in task.backbone.parameters())
    assert not any(p.requires_grad for p in task.teacher.parameters())
    assert not task.teacher[1].training
    groups = policy.param_groups(1e-3, 0.01)
    in_groups = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for n, p in task.named_parameters() if not n.startswith("teacher.")]
    assert sorted(in_groups) == sorted(trainable)  # every trainable param once, the teacher never
    assert not policy.can_cache_features


def test_bn_frozen_keeps_running_stats_while_its_affine_params_train():
    task = ToyTask()
    policy = TransferPolicy(STRATEGIES.build({"name": "finetune"}), task)  # bn=frozen (default)
    task.train()
    policy.apply(0)
    bn = task.backbone.blocks[0][1]
    assert bn.weight.requires_grad and not bn.training  # scale/shift learn, statistics do not move
    before = bn.running_mean.clone()
    task.backbone(torch.randn(16, 8) * 5 + 3)
    assert torch.equal(bn.running_mean, before)


def test_policy_answers_whether_features_can_be_cached():
    fe = STRATEGIES.build({"name": "feature_extraction"})
    assert TransferPolicy(fe, ToyTask()).can_cache_features
    no_cache = STRATEGIES.build({"name": "feature_extraction", "cache_features": False})
    assert not TransferPolicy(no_cache, ToyTask()).can_cache_features
    bn = STRATEGIES.build({"name": "feature_extraction", "train_bn": True})
    assert not TransferPolicy(bn, ToyTask()).can_cache_features  # BN trains: features move


def test_policy_refuses_backbone_params_outside_every_group():
    task = ToyTask()
    task.backbone.block_groups = lambda: [["blocks.0.0.weight"]]  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="outside any block group"):
        TransferPolicy(STRATEGIES.build({"name": "finetune"}), task)
