"""Strategy behaviour, observed during real (tiny) training: grads, LRs per group, BatchNorm."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from tl_cli.commands.train import run


class Spy(pl.Callback):
    """Records, at every training batch: LR per param group, which params train, BN modes."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0]
        bns = [m for m in pl_module.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "n_groups": len(opt.param_groups),
                "lr": {g["name"]: g["lr"] for g in opt.param_groups},
                "backbone_grad": {p.requires_grad for p in pl_module.backbone.parameters()},
                "head_grad": {p.requires_grad for p in pl_module.head.parameters()},
                "bn_training": {m.training for m in bns},
                "features_batch": isinstance(batch[0], dict) and "features" in batch[0],
            }
        )


def bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in module.state_dict().items()
        if "running_" in k or "num_batches" in k
    }


@pytest.mark.parametrize("cache", [False, True])
def test_feature_extraction_freezes_backbone_and_bn_stats(tiny_cfg, cache):
    cfg = tiny_cfg(
        "strategy=feature_extraction",
        f"strategy.cache_features={str(cache).lower()}",
        "scheduler=none",
    )
    spy = Spy()
    from tl_cli.run import training as train_mod

    built = {}
    orig_build = train_mod.build

    def capture(c):
        module, dm = orig_build(c)
        built["bn"] = bn_state(module.backbone)
        built["weights"] = {k: v.clone() for k, v in module.backbone.state_dict().items()}
        built["head"] = {k: v.clone() for k, v in module.head.state_dict().items()}
        built["module"] = module
        return module, dm

    train_mod.build = capture
    try:
        run(cfg, callbacks=[spy])
    finally:
        train_mod.build = orig_build
    module = built["module"]
    assert built["bn"], "the tiny backbone must have BatchNorm for this test to mean anything"
    for k, v in bn_state(module.backbone).items():
        assert torch.equal(v, built["bn"][k]), f"BN buffer {k} moved"
    for k, v in module.backbone.state_dict().items():
        assert torch.equal(v, built["weights"][k]), f"backbone weight {k} changed"
    assert any(not torch.equal(v, built["head"][k]) for k, v in module.head.state_dict().items())
    assert spy.rows and all(
        r["backbone_grad"] == {False} and r["head_grad"] == {True} for r in spy.rows
    )
    assert all(
        set(r["lr"]) == {"head", "head/no_decay"} for r in spy.rows
    )  # frozen params are not in the optimizer
    if cache:
        assert all(r["features_batch"] for r in spy.rows)
    else:
        assert all(r["bn_training"] == {False} and not r["features_batch"] for r in spy.rows)


def test_finetune_trains_everything_with_lower_backbone_lr(tiny_cfg):
    spy = Spy()
    run(
        tiny_cfg(
            "strategy=finetune",
            "strategy.bn=train",  # BatchNorm in train mode (the default, bn=frozen: test_defaults)
            "strategy.backbone_lr_mult=0.1",
            "strategy.head_lr_mult=1.0",  # the L-BFGS head's default is the backbone's LR
            "optimizer.lr=0.01",
            "scheduler=none",
        ),
        callbacks=[spy],
    )
    # epoch 0 only scores the L-BFGS head (no step, BN in eval mode): test_defaults
    rows = [r for r in spy.rows if r["epoch"] >= 1]
    assert rows
    for r in rows:
        assert r["backbone_grad"] == {True} and r["bn_training"] == {True}
        assert r["lr"]["head"] == pytest.approx(0.01)
        assert r["lr"]["backbone"] == pytest.approx(0.001)
        assert r["lr"]["backbone/no_decay"] == pytest.approx(0.001)


@pytest.mark.parametrize("scheduler", ["none", "cosine"])
def test_freeze_unfreeze_schedule_per_epoch(tiny_cfg, scheduler):
    spy = Spy()
    run(
        tiny_cfg(
            "strategy=freeze_unfreeze",
            "strategy.bn=train",
            "strategy.unfreeze_at_epoch=1",
            "strategy.backbone_lr_mult=0.05",
            "optimizer.lr=0.02",
            f"scheduler={scheduler}",
            "trainer.max_epochs=3",
        ),
        callbacks=[spy],
    )
    epochs = {r["epoch"] for r in spy.rows}
    assert epochs == {0, 1, 2}
    for r in spy.rows:
        head, bb = r["lr"]["head"], r["lr"]["backbone"]
        assert head > 0
        if r["epoch"] == 0:
            assert r["backbone_grad"] == {False} and bb == 0.0
            assert r["bn_training"] == {False}  # frozen BN normalises with its running stats
        else:
            assert r["backbone_grad"] == {True} and r["bn_training"] == {True}
            assert bb == pytest.approx(head * 0.05)  # the ratio holds at every step of any schedule
    if scheduler == "none":
        assert all(r["lr"]["head"] == pytest.approx(0.02) for r in spy.rows)
    else:
        heads = [r["lr"]["head"] for r in spy.rows]
        assert max(heads) <= 0.02 + 1e-12 and heads[-1] < heads[len(heads) // 2]


def test_layer_decay_scales_deeper_to_shallower_groups(tiny_cfg):
    spy = Spy()
    run(
        tiny_cfg(
            "strategy=finetune",
            "strategy.layer_decay=0.5",
            "strategy.backbone_lr_mult=1.0",
            "optimizer.lr=0.01",
            "scheduler=none",
            "trainer.max_epochs=1",
        ),
        callbacks=[spy],
    )
    lrs = next(r for r in spy.rows if r["epoch"] == 1)["lr"]  # after the head-only epoch
    bb = sorted(
        (int(k.split(".")[1].split("/")[0]), v)
        for k, v in lrs.items()
        if k.startswith("backbone.") and "/" not in k
    )
    assert len(bb) >= 3
    top = bb[-1][0]
    for gi, lr in bb:
        assert lr == pytest.approx(0.01 * 0.5 ** (top - gi))


def test_gradual_unfreeze_plan_is_top_down_in_chunks():
    from tl_cli.transfer.strategies import GradualUnfreeze

    plans = GradualUnfreeze(milestones=[1, 2, 3]).group_plans(18)
    assert [p.unfreeze_epoch for p in plans] == [3] * 6 + [2] * 6 + [
        1
    ] * 6  # stem first, deepest last
    assert [p.unfreeze_epoch for p in GradualUnfreeze(milestones=[2, 5]).group_plans(3)] == [
        5,
        2,
        2,
    ]
    with pytest.raises(ValueError, match="milestones"):
        GradualUnfreeze(milestones=[3, 1])


def test_gradual_unfreeze_during_training(tiny_cfg):
    spy = Spy()
    captured = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                groups = pl_module.backbone.block_groups()
                params = dict(pl_module.backbone.named_parameters())
                captured[trainer.current_epoch] = [
                    all(params[n].requires_grad for n in g) for g in groups
                ]

    run(
        tiny_cfg(
            "strategy=gradual_unfreeze",
            "strategy.milestones=[1,2]",
            "scheduler=none",
            "trainer.max_epochs=3",
            "optimizer.lr=0.01",
        ),
        callbacks=[spy, Probe()],
    )
    n = len(captured[0])
    assert captured[0] == [False] * n
    assert captured[1][-1] and not captured[1][0]  # deepest group first, stem still frozen
    assert captured[2] == [True] * n
    names = set(spy.rows[0]["lr"])
    assert {"head", "backbone@e1", "backbone@e2"} <= names
    for r in spy.rows:
        assert (r["lr"]["backbone@e1"] > 0) == (r["epoch"] >= 1)
        assert (r["lr"]["backbone@e2"] > 0) == (r["epoch"] >= 2)


def test_l2sp_penalises_distance_from_pretrained_instead_of_decay(tiny_cfg):
    spy = Spy()
    m = run(
        tiny_cfg("strategy=finetune", "strategy.l2sp_alpha=0.01", "scheduler=none"), callbacks=[spy]
    )
    # backbone groups carry no weight decay; the penalty was logged and is positive once weights move
    assert "backbone/no_decay" in spy.rows[0]["lr"] and "backbone" not in spy.rows[0]["lr"]
    assert m["history"][-1].get("train/l2sp", 0) > 0


# --------------------------------------------------------------------------- lr_mult=auto (#24)


def _plan_mults(module) -> tuple[set[float], set[float]]:
    """The LR multipliers the policy planned for the backbone's and the head's parameters."""
    plan = module.policy.plan
    bb = {m for n, (_, m, _) in plan.items() if n.startswith("backbone.")}
    head = {m for n, (_, m, _) in plan.items() if n.startswith("head.")}
    return bb, head


@pytest.mark.parametrize(
    ("extra", "backbone", "head"),
    [
        ([], 0.01, 0.1),  # an image classifier from an L-BFGS head: the issue-24 LRs
        (["strategy.head_fit=sgd"], 0.1, 1.0),  # a random head: the measured tl default
        (["strategy.backbone_lr_mult=0.3", "strategy.head_lr_mult=0.5"], 0.3, 0.5),  # as given
        (["strategy.backbone_lr_mult=0.3"], 0.3, 0.1),  # one given, the other auto
    ],
)
def test_finetune_lr_mults_auto_follow_the_task(tiny_cfg, extra, backbone, head):
    from tl_cli.run.training import build

    module, _ = build(tiny_cfg("strategy=finetune", *extra))
    assert module.strategy.backbone_lr_mult == backbone
    assert module.strategy.head_lr_factor == head
    assert _plan_mults(module) == ({backbone}, {head})


def test_distill_student_keeps_the_measured_lr_mults(tiny_cfg):
    from tl_cli.run.training import build
    from tl_cli.tasks.distill import DistillTask

    module, _ = build(tiny_cfg("strategy=finetune"))
    student = DistillTask(**dict(module.hparams), pretrained=False)
    assert student.strategy.head_fit == "lbfgs"  # an image student from an L-BFGS head ...
    assert (student.strategy.backbone_lr_mult, student.strategy.head_lr_factor) == (0.1, 1.0)


def test_lr_mult_words_other_than_auto_are_refused(tiny_cfg):
    from tl_cli.core.errors import TLError
    from tl_cli.run.training import build

    with pytest.raises((TLError, ValueError), match="backbone_lr_mult='fast'"):
        build(tiny_cfg("strategy=finetune", "strategy.backbone_lr_mult=fast"))
