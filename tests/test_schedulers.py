"""Strategy x scheduler matrix: the LR of every param group at every step.

Param groups never change mid-run (frozen groups sit at LR 0), so every scheduler, including
plateau and onecycle, survives strategies that bring parameters in late (Lightning #8720,
Flash #1321).
"""

from __future__ import annotations

import pytest

from tl_cli.commands.train import run
from tl_cli.transfer.schedulers import shape_fn

from .test_strategies import Spy

LR = 0.02
STRATEGIES = {
    "finetune": (
        ["strategy=finetune", "strategy.backbone_lr_mult=0.1"],
        lambda e: 0,
        0.1,
        lambda e: 1.0,
    ),
    "freeze_unfreeze": (
        [
            "strategy=freeze_unfreeze",
            "strategy.unfreeze_at_epoch=1",
            "strategy.backbone_lr_mult=0.1",
        ],
        lambda e: 1,
        0.1,
        lambda e: 1.0,
    ),
    "lp_ft": (
        ["strategy=lp_ft", "strategy.probe_epochs=1", "strategy.ft_lr_mult=0.2"],
        lambda e: 1,
        1.0,
        lambda e: 1.0 if e < 1 else 0.2,
    ),
    "gradual_unfreeze": (
        ["strategy=gradual_unfreeze", "strategy.milestones=[1,2]", "strategy.backbone_lr_mult=0.1"],
        None,
        0.1,
        lambda e: 1.0,
    ),
}
SCHEDULERS = ["none", "cosine", "onecycle", "step", "plateau"]


@pytest.mark.parametrize("sched", SCHEDULERS)
@pytest.mark.parametrize("strat", list(STRATEGIES))
def test_lr_per_group_per_step(tiny_cfg, strat, sched):
    overrides, _, mult, phase = STRATEGIES[strat]
    extra = ["scheduler.step_epochs=1", "scheduler.gamma=0.5"] if sched == "step" else []
    spy = Spy()
    m = run(
        tiny_cfg(
            *overrides, f"scheduler={sched}", *extra, f"optimizer.lr={LR}", "trainer.max_epochs=3"
        ),
        callbacks=[spy],
    )
    assert m["epochs"] == 3
    rows = spy.rows
    steps_per_epoch = sum(r["epoch"] == 0 for r in rows)
    total = len(rows)
    assert len({r["n_groups"] for r in rows}) == 1  # groups are fixed for the whole run
    from omegaconf import OmegaConf

    from tests.conftest import compose_cfg

    scfg = OmegaConf.to_container(compose_cfg([f"scheduler={sched}", *extra]).scheduler)
    shape = None if sched == "plateau" else shape_fn(scfg, total, steps_per_epoch)
    for r in rows:
        head = r["lr"]["head"]
        assert head > 0
        if shape is not None:
            assert head == pytest.approx(LR * shape(r["step"]) * phase(r["epoch"]), rel=1e-6)
        else:
            assert head <= LR * phase(r["epoch"]) + 1e-12
        for name, lr in r["lr"].items():
            if not name.startswith("backbone"):
                continue
            if lr == 0.0:
                continue  # a frozen group
            assert lr == pytest.approx(head * mult, rel=1e-6), (name, r)
        trainable = r["backbone_grad"] == {True} or r["backbone_grad"] == {True, False}
        active = any(lr > 0 for n, lr in r["lr"].items() if n.startswith("backbone"))
        assert trainable == active, r  # a group trains exactly when its LR is non-zero
    # the backbone joins when the strategy says so
    first_active = min(
        (
            r["epoch"]
            for r in rows
            if any(lr > 0 for n, lr in r["lr"].items() if n.startswith("backbone"))
        ),
        default=None,
    )
    assert first_active == (0 if strat == "finetune" else 1)
