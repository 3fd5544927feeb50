"""tl distill: the KD loss, the frozen teacher, backbone.depth, unlabelled inputs, the student checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from tl_cli.modalities.backbones import build_backbone
from tl_cli.tasks.distill import kd_loss
from tl_cli.tasks.loading import load_module

from .conftest import COLORS, compose_cfg, make_image_folder, run_tl

TINY_TRAINER = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.log_every_n_steps=1"]


# --------------------------------------------------------------------------- the loss


def test_kd_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g) * 3
    y = torch.tensor([0, 2, -1, 1])  # row 2 is unlabelled
    T, a = 4.0, 0.7

    def softmax(row, temp):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for i in range(4):
        pt, ps = softmax(t[i].tolist(), T), softmax(s[i].tolist(), T)
        kl += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps, strict=True))
    kl /= 4  # every row, labelled or not
    ce = 0.0
    for i in (0, 1, 3):  # labelled rows only
        ce -= math.log(softmax(s[i].tolist(), 1.0)[int(y[i])])
    ce /= 3
    total, kl_t, ce_t = kd_loss(s, t, y, T, a)
    assert kl_t.item() == pytest.approx(kl, rel=1e-5)
    assert ce_t.item() == pytest.approx(ce, rel=1e-5)
    assert total.item() == pytest.approx(a * T * T * kl + (1 - a) * ce, rel=1e-5)


def test_unlabelled_rows_only_feed_the_kd_term():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4)
    y = torch.tensor([1, -1, -1])
    # alpha = 0: cross-entropy only -> the unlabelled rows get no gradient at all
    kd_loss(s, t, y, 4.0, 0.0)[0].backward()
    assert s.grad[1:].abs().sum() == 0 and s.grad[0].abs().sum() > 0
    s.grad = None
    # alpha = 1: KD only -> every row gets a gradient
    kd_loss(s, t, y, 4.0, 1.0)[0].backward()
    assert (s.grad.abs().sum(1) > 0).all()
    # a batch of unlabelled inputs only: CE term is zero, not NaN
    total, _, ce = kd_loss(s.detach(), t, torch.tensor([-1, -1, -1]), 2.0, 0.5)
    assert ce.item() == 0.0 and math.isfinite(total.item())


def test_kd_settings_auto_follows_the_teachers_modality_and_explicit_values_win():
    from tl_cli.commands.distill import _check_kd
    from tl_cli.core.errors import TLError
    from tl_cli.tasks.distill import kd_settings

    assert _check_kd({"distill": {"temperature": "auto", "alpha": "auto"}}) == (None, None)
    assert _check_kd({"distill": {"temperature": "3", "alpha": 0.25}}) == (3.0, 0.25)
    assert kd_settings(None, None, "image") == (4.0, 0.9)
    assert kd_settings(None, None, "audio") == (4.0, 0.9)
    assert kd_settings(None, None, "text") == (2.0, 0.5)
    assert kd_settings(3.0, None, "text") == (3.0, 0.5)
    assert kd_settings(None, 0.0, "image") == (4.0, 0.0)
    for bad, what in (
        ({"temperature": "hot"}, "distill.temperature='hot'"),
        ({"alpha": 2}, "alpha=2.0"),
    ):
        with pytest.raises(TLError) as e:
            _check_kd({"distill": bad})
        assert what in str(e.value) and "\n" not in str(e.value)


def test_a_teacher_trained_with_label_smoothing_gets_one_warning_line():
    from tl_cli.commands.distill import teacher_warnings

    ft = {"name": "finetune", "head_fit": "lbfgs"}
    fe = {"name": "feature_extraction", "head_fit": "lbfgs"}
    lin = {"name": "linear"}

    def hp(ls, strategy, head=lin):
        return {"hyper_parameters": {"label_smoothing": ls, "strategy": strategy, "head": head}}

    (w,) = teacher_warnings(hp(0.1, ft))
    assert "label_smoothing=0.1" in w and "label_smoothing=0" in w and "\n" not in w
    assert teacher_warnings(hp(0.0, ft)) == []
    assert teacher_warnings(hp(0.1, fe)) == []  # L-BFGS head on frozen features: no smoothed step
    assert len(teacher_warnings(hp(0.1, {**fe, "head_fit": "sgd"}))) == 1
    assert len(teacher_warnings(hp(0.1, fe, {"name": "mlp"}))) == 1
    assert teacher_warnings({"hyper_parameters": {}}) == []


# --------------------------------------------------------------------------- backbone.depth


def test_depth_keeps_the_first_blocks_with_their_weights():
    torch.manual_seed(0)
    full = build_backbone({"name": "test_efficientnet", "source": "timm", "weights": "none"})
    n_blocks = sum(len(s) for s in full.model.blocks)
    cut = build_backbone(
        {"name": "test_efficientnet", "source": "timm", "weights": "none", "depth": 2},
        pretrained=False,
    )
    assert len(cut.block_groups()) == 3 < len(full.block_groups())  # stem + 2 blocks
    fsd, csd = full.state_dict(), cut.state_dict()
    assert set(csd) < set(fsd) and not any("conv_head" in k for k in csd)
    # stem + the first two blocks, in forward order, are exactly the kept ones
    first = [g for g in full.block_groups()[:3]]
    assert sorted(n for g in first for n in g) == sorted(n for g in cut.block_groups() for n in g)
    cut.load_state_dict({k: fsd[k] for k in csd})
    x = torch.randn(2, 3, 32, 32)
    full.eval(), cut.eval()
    out = cut(x)
    assert out.shape == (2, cut.num_features)
    # the same as pooling the full model's second-block output
    m = full.model
    with torch.no_grad():
        h = m.bn1(m.conv_stem(x))
        flat = [b for s in m.blocks for b in s]
        for b in flat[:2]:
            h = b(h)
    assert torch.allclose(out, h.mean((2, 3)), atol=1e-5)
    with pytest.raises(Exception, match=f"between 1 and {n_blocks}"):
        build_backbone(
            {"name": "test_efficientnet", "source": "timm", "weights": "none", "depth": 99}
        )


def test_depth_cuts_a_transformer_to_its_first_layers():
    import tl_cli.tasks.components  # noqa: F401 - the text sources registered

    bb = build_backbone({"name": "minilm", "source": "minilm", "depth": 2}, pretrained=False)
    assert len(bb.model.encoder.layer) == 2
    assert len(bb.block_groups()) == 3  # embeddings + 2 layers
    assert all(".layer.2." not in n for g in bb.block_groups() for n in g)
    ids = torch.tensor([[101, 2023, 102]])
    assert bb({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).shape == (1, 384)


def test_depth_on_a_backbone_that_cannot_be_cut_is_one_line():
    from tl_cli.core.errors import TLError

    with pytest.raises(TLError) as e:
        build_backbone({"name": "resnet18", "weights": "none", "depth": 2}, pretrained=False)
    msg = str(e.value)
    assert "backbone.depth" in msg and "resnet18" in msg and "\n" not in msg
    for bad in (0, "two", True):
        with pytest.raises(TLError, match="positive integer"):
            build_backbone({"name": "test_efficientnet", "source": "timm", "depth": bad}, False)


# --------------------------------------------------------------------------- the run


class Spy(pl.Callback):
    """Records the teacher's gradients after every backward, and the module."""

    def __init__(self) -> None:
        self.teacher_grads: list[bool] = []
        self.teacher_training: list[bool] = []
        self.module = None

    def on_after_backward(self, trainer, pl_module):
        self.module = pl_module
        self.teacher_grads.append(any(p.grad is not None for p in pl_module.teacher.parameters()))
        self.teacher_training.append(any(m.training for m in pl_module.teacher.modules()))


def distill_cfg(teacher: Path, out: Path, *extra: str):
    overrides = [f"teacher={teacher}", *TINY_TRAINER, "trainer.max_epochs=1", *extra]
    cfg = compose_cfg(overrides, config_name="distill")
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg, overrides


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> Path:
    """A flat folder of 9 images (no class folders)."""
    d = tmp_path_factory.mktemp("unlab")
    make_image_folder(d, {"": 3}, seed=5)
    for cls in COLORS:
        for f in (d / cls).iterdir():
            f.rename(d / f"{cls}_{f.name}")
        (d / cls).rmdir()
    return d


@pytest.fixture(scope="module")
def distilled(good_ckpt, unlabeled, tmp_path_factory):
    from tl_cli.commands.distill import run

    out = tmp_path_factory.mktemp("distill") / "run"
    teacher_before = {k: v.clone() for k, v in load_module(good_ckpt)[0].state_dict().items()}
    cfg, overrides = distill_cfg(good_ckpt, out, f"dataset.unlabeled_root={unlabeled}")
    spy = Spy()
    metrics = run(cfg, callbacks=[spy], overrides=overrides)
    return {"metrics": metrics, "out": out, "spy": spy, "teacher_before": teacher_before}


def test_teacher_gets_no_gradient_and_stays_unchanged(distilled):
    spy = distilled["spy"]
    assert spy.teacher_grads and not any(spy.teacher_grads)
    assert not any(spy.teacher_training)  # eval mode throughout training
    after = spy.module.teacher.state_dict()
    before = distilled["teacher_before"]
    keys = [k for k in before if k.startswith(("backbone.", "head."))]
    assert keys and all(torch.equal(before[k], after[k]) for k in keys)


def test_metrics_json_has_the_distillation_keys(distilled):
    m = json.loads((distilled["out"] / "metrics.json").read_text())
    for k in (
        "test/acc",
        "val/acc",
        "teacher/test/acc",
        "student_params",
        "teacher_params",
        "student_latency_ms_b1",
        "student_latency_ms_b32",
        "teacher_latency_ms_b1",
        "teacher_latency_ms_b32",
        "speedup_b1",
        "speedup_b32",
        "param_ratio",
    ):
        assert k in m, k
    assert 0.0 <= m["teacher/test/acc"] <= 1.0
    assert m["student_params"] < m["teacher_params"]
    assert m["distill"]["unlabeled_size"] == 9 and m["distill"]["student_init"] == "teacher"
    # a tl train teacher (frozen, L-BFGS head) took no smoothed step: no label-smoothing warning
    assert not any("label_smoothing" in w for w in m["warnings"])
    # distill.temperature/alpha=auto on an image teacher: Hinton's T 4, alpha 0.9
    assert (m["distill"]["temperature"], m["distill"]["alpha"]) == (4.0, 0.9)
    assert m["train_size"] == 33  # the labelled inputs; the 9 unlabelled ones are extra
    assert m["task"] == "classification"


def test_student_checkpoint_is_an_ordinary_tl_checkpoint(distilled, tmp_path):
    from tl_cli.commands.evaluate import run as evaluate
    from tl_cli.commands.predict import run as predict

    ckpt = distilled["out"] / "checkpoints" / "best.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not any(k.startswith(("teacher.", "teacher_input.")) for k in raw["state_dict"])
    module, meta = load_module(ckpt)
    assert type(module).__name__ == "ClassificationTask" and meta["tl"]["task"] == "classification"
    depth = meta["hyper_parameters"]["backbone"]["depth"]
    assert depth == len(module.backbone.block_groups()) - 1 == 2
    cfg = compose_cfg([f"checkpoint={ckpt}"], config_name="eval")
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "eval")
    res = evaluate(cfg)
    assert res["acc"] == pytest.approx(distilled["metrics"]["test/acc"], abs=1e-6)
    test_dir = Path(raw["tl"]["dataset"]["root"]) / "test"  # the teacher's dataset, stored
    cfg = compose_cfg(
        [f"checkpoint={ckpt}", f"inputs={test_dir}", f"output={tmp_path / 'p.csv'}"],
        config_name="predict",
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "pred")
    predict(cfg)
    assert len((tmp_path / "p.csv").read_text().strip().splitlines()) == 1 + 12


def test_student_starts_from_the_teachers_first_blocks(good_ckpt, tmp_path):
    from tl_cli.commands.distill import _make_build, load_teacher, resolve_dataset, resolve_student

    cfg, overrides = distill_cfg(good_ckpt, tmp_path / "r", "backbone.depth=1")
    keys = {o.split("=", 1)[0] for o in overrides}
    teacher, tckpt = load_teacher(good_ckpt)
    ds = resolve_dataset(cfg, tckpt["tl"]["dataset"], keys)
    ds.pop("unlabeled_root")
    bb, from_teacher = resolve_student(cfg, teacher, tckpt["hyper_parameters"], keys)
    assert from_teacher and bb["depth"] == 1
    task, dm = _make_build(cfg, teacher, tckpt, bb, True, ds, None)(cfg)
    tsd = teacher.backbone.state_dict()
    ssd = task.backbone.state_dict()
    assert set(ssd) < set(tsd) and all(torch.equal(ssd[k], tsd[k]) for k in ssd)
    # the teacher is a never-trained submodule: not in the optimizer's plan
    assert all(ue is None for n, (ue, _, _) in task.policy.plan.items() if n.startswith("teacher."))


def test_class_name_mismatch_is_one_line(good_ckpt, tmp_path):
    other = tmp_path / "other"
    for cls in ("ant", "bee"):
        (other / cls).mkdir(parents=True)
    make_image_folder(tmp_path / "src", {"": 4})
    for i, f in enumerate(sorted((tmp_path / "src").rglob("*.png"))):
        f.rename(other / ("ant", "bee")[i % 2] / f.name)
    r = run_tl(
        "distill",
        f"teacher={good_ckpt}",
        f"dataset.root={other}",
        *TINY_TRAINER,
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "differ from the teacher's" in lines[0], r.stderr
    assert "missing cat, dog, fox" in lines[0] and "extra ant, bee" in lines[0]


# --------------------------------------------------------------------------- latency


class _FakeData:
    """What size_and_speed reads from a data module: a test split and a loader's collate."""

    def has_split(self, split: str) -> bool:
        return split == "test"

    def dataset(self, split: str, train_aug: bool = False):
        return [(torch.full((3, 8, 8), float(i)), i % 2) for i in range(5)]

    def make_loader(self, ds, shuffle: bool = False):
        return torch.utils.data.DataLoader(ds, batch_size=2)


def _fake_module():
    from types import SimpleNamespace

    backbone, head = torch.nn.Flatten(), torch.nn.Linear(192, 2)
    return SimpleNamespace(
        student_net=lambda: torch.nn.Sequential(backbone, head),
        teacher=torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(192, 64), torch.nn.Linear(64, 2)
        ),
        teacher_input=torch.nn.Identity(),
    )


def test_latency_is_short_by_default_with_units_and_can_be_off(capsys):
    """Issue 29: tl distill went silent for minutes after its last epoch (the latency timing);
    it now shows progress, says the figures with units, and distill.latency=off skips it."""
    from tl_cli.commands.distill import LATENCY_PASSES, latency_mode, size_and_speed

    assert latency_mode(compose_cfg([], "distill")) == "short"
    assert sum(n for _, n in LATENCY_PASSES["short"].values()) < sum(
        n for _, n in LATENCY_PASSES["full"].values()
    )
    out = size_and_speed(_fake_module(), _FakeData(), "short")
    for k in ("student_latency_ms_b1", "teacher_latency_ms_b32", "speedup_b32"):
        assert out[k] > 0, k
    said = capsys.readouterr().out
    assert "latency on CPU, ms per input: student" in said and "ms (batch 32)" in said
    assert "CPU latency of student and teacher" in said  # the progress line's description
    off = size_and_speed(_fake_module(), _FakeData(), "off")
    assert not any("latency" in k or "speedup" in k for k in off) and off["param_ratio"] > 1
    from tl_cli.core.errors import TLError

    with pytest.raises(TLError, match="distill.latency='slow' must be one of short, full, off"):
        latency_mode(compose_cfg(["distill.latency=slow"], "distill"))
