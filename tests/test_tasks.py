"""The task and policy seams: a new objective is one class + one YAML; the policy serves any
backbone that has block groups, whatever its modality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torch import nn

from tests.conftest import TINY, compose_cfg, run_cfg
from tl_cli.core.errors import TLError
from tl_cli.core.outputs import write_text
from tl_cli.tasks.base import TASKS, Evaluation, ExportSpec, Predictor, TransferTask
from tl_cli.tasks.classification import ClassificationTask
from tl_cli.tasks.loading import load_module
from tl_cli.transfer.policy import TransferPolicy
from tl_cli.transfer.strategies import STRATEGIES

# --------------------------------------------------------------------------- a second task


class ScoresNet(nn.Module):
    """The exported graph of the test task: input tensors -> one sigmoid score per class."""

    def __init__(self, backbone: nn.Module, head: nn.Module, pack) -> None:
        super().__init__()
        self.backbone, self.head, self.pack = backbone, head, pack

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.backbone(self.pack(*xs))))


class ScoresPredictor(Predictor):
    """One JSON line per input: its score for every class."""

    formats = ("jsonl",)

    def nonfinite(self, outputs: torch.Tensor) -> int | None:
        bad = (~torch.isfinite(outputs)).any(1).nonzero()
        return int(bad[0]) if len(bad) else None

    def postprocess(self, outputs: torch.Tensor) -> list[dict[str, float]]:
        names = self.module.class_names
        return [dict(zip(names, row.tolist(), strict=True)) for row in torch.sigmoid(outputs)]

    def write(self, path: Path, rows: list[dict], fmt: str) -> None:
        lines = [
            json.dumps({"input": r["path"], "scores": r["result"], "error": r["error"]})
            for r in rows
        ]
        write_text(path, "\n".join(lines) + "\n")


class OneVsRestTask(TransferTask):
    """Each class scored independently with a sigmoid (multi-label style), trained with BCE.

    Written the way a user adds an objective (docs/architecture.md, "Recipe: add a task"): this
    class, its predictor and a YAML file, with its own metric names ("hit" rather than "acc"), its
    own evaluation, prediction rows and export outputs; no command and nothing in run/ changes.
    """

    monitor = ("val/hit", "max")
    epoch_metrics = ("train/loss", "val/loss", "val/hit")
    final_metrics = ("val/hit", "val/loss", "test/hit", "test/loss")
    gate_metrics = ("hit", "loss")
    eval_summary = ("hit", "mean_score", "num_samples")
    predictor_class = ScoresPredictor

    def loss(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out, F.one_hot(y, self.num_outputs).float())

    def update_metrics(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> None:
        hit = (out.argmax(1) == y).float().mean()
        self.log(f"{stage}/hit", hit, on_step=False, on_epoch=True)

    @torch.inference_mode()
    def evaluate(self, loader, device, desc) -> Evaluation:
        self.to(device).eval()
        scores, ys = [], []
        for x, y in loader:
            scores.append(torch.sigmoid(self(x)))
            ys.append(y)
        s, y = torch.cat(scores), torch.cat(ys)
        hit = float((s.argmax(1) == y).float().mean())
        return Evaluation({"hit": hit, "mean_score": float(s.max(1).values.mean())}, len(y))

    def export_spec(self, modality, prep) -> ExportSpec:
        return ExportSpec(
            net=ScoresNet(self.backbone, self.head, modality.pack).eval(),
            output_names=["scores"],
            output_axes={"scores": {0: "batch"}},
            sidecar={"class_names": list(self.class_names), "output": {"name": "scores"}},
        )


if "test_one_vs_rest" not in TASKS:
    TASKS.register("test_one_vs_rest", OneVsRestTask)


@pytest.fixture
def task_config_dir(tmp_path: Path) -> Path:
    d = tmp_path / "user_configs" / "task"
    d.mkdir(parents=True)
    (d / "one_vs_rest.yaml").write_text("# @package _global_\ntask:\n  name: test_one_vs_rest\n")
    return tmp_path / "user_configs"


def test_a_new_task_trains_evaluates_predicts_and_exports(task_config_dir, tiny_data, tmp_path):
    """The recipe of docs/architecture.md: a task defined here runs through every command."""
    from tl_cli.commands import evaluate, export, predict
    from tl_cli.commands.train import run

    cfg = compose_cfg(
        [
            *TINY,
            f"dataset.root={tiny_data}",
            f"hydra.searchpath=[file://{task_config_dir}]",
            "task=one_vs_rest",
            "optimizer.lr=0.05",
            "trainer.max_epochs=3",
            "fail_under.hit=0.5",
        ]
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    assert cfg.task.name == "test_one_vs_rest"
    metrics = run(cfg)
    assert metrics["task"] == "test_one_vs_rest"
    assert metrics["metric_names"]["final"] == list(OneVsRestTask.final_metrics)
    assert metrics["test/hit"] > 0.5  # 3 colour classes: learnable
    assert "test/acc" not in metrics and metrics["gates"][0]["key"] == "test/hit"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "test/hit" in report and "val/hit" in report  # the task's names, not accuracy's
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    module, meta = load_module(ckpt)
    assert isinstance(module, OneVsRestTask) and meta["tl"]["task"] == "test_one_vs_rest"

    res = evaluate.run(
        run_cfg([f"checkpoint={ckpt}", "fail_under.hit=0.5"], tmp_path / "ev", "eval")
    )
    assert res["hit"] > 0.5 and 0 < res["mean_score"] <= 1 and res["task"] == "test_one_vs_rest"
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["hit"] == res["hit"] and "acc" not in saved
    assert "mean_score" in (tmp_path / "ev" / "report.md").read_text()

    out = tmp_path / "preds.jsonl"
    predict.run(
        run_cfg(
            [f"checkpoint={ckpt}", f"inputs={tiny_data / 'test'}", f"output={out}"],
            tmp_path / "pr",
            "predict",
        )
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]["scores"]) == set(module.class_names)
    hits = sum(max(r["scores"], key=r["scores"].get) == Path(r["input"]).parent.name for r in rows)
    assert hits / len(rows) == pytest.approx(res["hit"])  # the same model, the same test split

    onnx = tmp_path / "m.onnx"
    got = export.run(
        run_cfg([f"checkpoint={ckpt}", "format=onnx", f"output={onnx}"], tmp_path / "ex", "export")
    )
    assert got["passed"] is True
    side = json.loads(onnx.with_suffix(".json").read_text())
    assert side["output"]["name"] == "scores" and side["task"] == "test_one_vs_rest"
    import onnxruntime as ort

    assert [o.name for o in ort.InferenceSession(str(onnx)).get_outputs()] == ["scores"]


def test_a_task_gate_must_name_its_own_metrics(task_config_dir, tiny_data, tmp_path):
    """fail_under.acc on a task that has no accuracy fails before training, naming its metrics."""
    from tl_cli.commands.train import run

    cfg = compose_cfg(
        [
            *TINY,
            f"dataset.root={tiny_data}",
            f"hydra.searchpath=[file://{task_config_dir}]",
            "task=one_vs_rest",
            "fail_under.acc=0.5",
        ]
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    with pytest.raises(TLError, match="tl train has no metric 'acc'; gate one of: hit, loss"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_default_task_is_classification():
    cfg = compose_cfg([])
    assert cfg.task.name == "classification" and TASKS.get("classification") is ClassificationTask


def test_an_unknown_task_is_one_clear_line(tiny_cfg):
    from tl_cli.run.training import build

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
