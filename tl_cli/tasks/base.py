"""Tasks: what is learned. A task is a LightningModule built from plain configs by name, and it
owns everything that depends on the objective.

`TransferTask` holds what every objective shares: a pretrained backbone, a new head, the transfer
policy (``tl_cli.transfer.policy``: freezing, BatchNorm, LR groups, L2-SP, the DDP sync) and the
optimizer/scheduler wiring. A task subclass adds, in the spirit of Hugging Face's ``pipelines``
(one entry per task: preprocess, forward, postprocess) and torchvision's weights API (metadata
travels with the model):

* **training**: what a batch holds, ``loss`` and ``update_metrics``, with the metric names it
  logs declared as class attributes (``epoch_metrics``, ``final_metrics``, ``gate_metrics``,
  ``eval_summary``, ``monitor``) so reports, gates, sweeps and the console read them from the task;
* **tl eval**: ``evaluate`` (the numbers of eval.json) and ``evaluation_outputs`` (its plots,
  report sections and error analysis) and ``show_evaluation`` (the console tables);
* **tl predict**: ``predictor`` (a :class:`Predictor`: inputs -> batches -> rows -> a file);
* **tl export**: ``export_spec`` (the network to trace, its output names and free axes, what the
  sidecar must hold);
* **the checkpoint**: ``checkpoint_meta`` (the task's fields of the ``tl`` metadata, written and
  validated by ``tl_cli.core.checkpoint``, the only reader and writer of checkpoints).

Commands ask the task; they never test which task or modality they run. To add a task, subclass
`TransferTask` (or a task close to yours), register it in ``TASKS``, import its module in
``tl_cli/tasks/components.py`` and add ``configs/task/<name>.yaml``: docs/architecture.md has
the recipe, and ``tests/test_tasks.py`` proves it with a task defined in the test file.

Batches are ``(input, target)``. ``input`` is whatever the backbone takes (images, token dicts,
waveforms), or ``{"features": tensor}`` when the data module serves cached backbone features.
Every argument is plain data, so a checkpoint holds names and values only and rebuilds the model
through tl's registries, never by importing or instantiating a string.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.optim.lr_scheduler import LambdaLR

from tl_cli.core.checkpoint import register_task_fields, tl_section
from tl_cli.core.errors import TLError
from tl_cli.core.metrics import DEFAULT_MONITOR, EPOCH_METRICS, EVAL_SUMMARY, FINAL_METRICS
from tl_cli.core.registry import Registry
from tl_cli.modalities.backbones import build_backbone
from tl_cli.transfer.heads import HEADS
from tl_cli.transfer.optimizers import OPTIMIZERS
from tl_cli.transfer.policy import TransferPolicy
from tl_cli.transfer.schedulers import PlateauState, shape_fn, warmup_steps
from tl_cli.transfer.strategies import AUTO, STRATEGIES, TransferStrategy


class TaskRegistry(Registry):
    """``TASKS``: registering a task also registers its checkpoint fields with the schema."""

    def register(self, name: str, builder: Any = None) -> Any:
        def add(cls: Any) -> Any:
            super(TaskRegistry, self).register(name, cls)
            register_task_fields(name, getattr(cls, "checkpoint_fields", {}) or {})
            return cls

        return add(builder) if builder is not None else add


#: task.name -> TransferTask subclass.
TASKS: TaskRegistry = TaskRegistry("task")


def cached(x: Any) -> torch.Tensor | None:
    """The cached features of a batch input, or None for raw inputs."""
    if isinstance(x, dict) and "features" in x:
        return x["features"]
    return None


@dataclass
class Evaluation:
    """What a task's ``evaluate`` measured.

    Args:
        metrics: the numbers and tables of eval.json (un-prefixed: ``acc``, ``per_class``, ...).
        num_samples: how many inputs were scored (in the summary and the report).
        details: what ``evaluation_outputs`` needs and eval.json does not hold (logits, labels).
    """

    metrics: dict[str, Any]
    num_samples: int
    details: dict[str, Any] = field(default_factory=dict)
    #: inputs whose outputs were NaN/inf: the model is unusable, whatever the scores say
    nonfinite: int = 0


@dataclass
class EvalOutputs:
    """What a task's ``evaluation_outputs`` wrote: report.md sections, lines to print, files."""

    report: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class ExportSpec:
    """What ``tl export`` traces and describes for a task.

    Args:
        net: graph inputs (the modality's input tensors) -> the task's outputs, eval mode.
        output_names: names of the graph's outputs, in order.
        output_axes: the free axes of each output (``{"logits": {0: "batch"}}``).
        sidecar: the task's entries of the JSON sidecar (``output``, ``class_names``, ...).
    """

    net: torch.nn.Module
    output_names: list[str]
    output_axes: dict[str, dict[int, str]]
    sidecar: dict[str, Any]


class Predictor:
    """`tl predict` for one task, as a Hugging Face pipeline: find inputs, read each one
    (``load``), batch them (``collate``), run the model (``forward``), turn outputs into rows
    (``postprocess``), write the rows (``write``).

    The default reads inputs through the checkpoint's modality (images, texts, clips); a task
    whose inputs differ (sentences with character offsets, images with their original size)
    overrides the reading methods too.
    """

    #: the file formats ``output=`` / ``format=`` may name (the first is the default)
    formats: tuple[str, ...] = ("csv", "json")

    def __init__(self, module: TransferTask, modality: Any, prep: dict[str, Any], cfg: Any) -> None:
        self.module = module
        self.modality = modality
        self.prep = prep
        self.cfg = cfg

    @property
    def noun(self) -> str:
        """What one input is called in messages (``images``, ``texts``, ``clips``)."""
        return self.modality.noun

    def find(self, inputs: Any) -> list[Any]:
        return self.modality.find(inputs)

    def item_name(self, item: Any) -> str:
        return self.modality.item_name(item)

    def protected(self, inputs: Any, items: list[Any]) -> list[str]:
        """Files an output must never replace (the inputs themselves)."""
        return self.modality.protected(inputs, items)

    def load(self) -> Callable[[Any], Any]:
        """item -> one model input, raising on a bad item (it becomes an error row)."""
        return self.modality.loader(self.prep)

    def collate(self, inputs: list[Any]) -> Any:
        return self.modality.collate(inputs, self.prep)

    def forward(self, batch: Any) -> Any:
        return self.module(batch)

    def nonfinite(self, outputs: Any) -> int | None:
        """The batch position of the first input whose outputs are NaN/inf, else None."""
        raise NotImplementedError  # pragma: no cover

    def postprocess(self, outputs: Any) -> list[Any]:
        """One result per input of the batch (what ``write`` puts in a row)."""
        raise NotImplementedError  # pragma: no cover

    def write(self, path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
        """Write every row (``{"path", "result", "error"}``) to ``path`` (a temp file, renamed)."""
        raise NotImplementedError  # pragma: no cover

    def show(self, rows: list[dict[str, Any]], limit: int = 20) -> None:
        """A table of the first rows on the console."""


class TransferTask(pl.LightningModule):
    """A pretrained backbone with a new head, trained under a transfer policy.

    Args:
        backbone, head, strategy, optimizer, scheduler: ``{"name": ..., options...}`` dicts.
        class_names: index -> name; the head's width.
        preprocessing_overrides: dataset-level changes to the backbone's preprocessing (for
            images ``{"image_size": 128}``).
        label_smoothing: label smoothing of the training loss.
        pretrained: False when rebuilding from a checkpoint (no weights are loaded or fetched).
    """

    #: top-level submodules that never train (a distillation teacher)
    frozen: tuple[str, ...] = ()
    #: the validation metric that picks best.ckpt, and its direction
    monitor: tuple[str, str] = DEFAULT_MONITOR
    #: per-epoch numbers (history rows in metrics.json, console lines, curves.png)
    epoch_metrics: tuple[str, ...] = EPOCH_METRICS
    #: the final numbers of a train run (summary table, report.md, sweep tables, train gates)
    final_metrics: tuple[str, ...] = FINAL_METRICS
    #: bare gate names of a train run (``fail_under.acc``): test/<name>, else val/<name>
    gate_metrics: tuple[str, ...] = ("acc", "loss", "macro_f1")
    #: eval.json keys shown in the summary and the report of ``tl eval``
    eval_summary: tuple[str, ...] = EVAL_SUMMARY
    #: the `Predictor` of ``tl predict``
    predictor_class: type[Predictor] = Predictor
    #: hyper-parameters the task adds to ``__init__`` beyond every task's (name -> a
    #: ``tl_cli.core.checkpoint`` Rule: type and bounds); a checkpoint may hold only these
    checkpoint_fields: dict[str, Any] = {}
    #: domain adaptation (``tl_cli.transfer.adapt``, set by tl_cli.commands.train): not a submodule, never saved
    adapter: Any = None

    def __init__(
        self,
        backbone: dict[str, Any],
        head: dict[str, Any],
        strategy: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        class_names: list[str],
        preprocessing_overrides: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pretrained"])
        if len(class_names) < 2 or len(set(class_names)) != len(class_names):
            raise TLError(
                f"class_names must be 2 or more distinct names, got {list(class_names)[:5]}"
            )
        try:
            label_smoothing = float(label_smoothing)
        except (TypeError, ValueError):
            raise TLError(
                f"label_smoothing={label_smoothing!r} must be a number in [0, 1)"
            ) from None
        if not 0.0 <= label_smoothing < 1.0:
            raise TLError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        self.class_names = [str(c) for c in class_names]
        self.backbone = build_backbone(backbone, pretrained=pretrained)
        # what the checkpoint needs to rebuild this backbone offline (e.g. a text model's config
        # and tokenizer as plain data): kept in the saved hyper_parameters, not in the loggers'
        extra = getattr(self.backbone, "stored_options", None)
        if extra:
            self.hparams["backbone"] = {**dict(self.hparams["backbone"]), **extra}
        self.strategy: TransferStrategy = STRATEGIES.build(strategy)
        #: ``head.norm`` fine-tuning starts from when it is not the head-only epoch's (None: one
        #: head throughout; :meth:`auto_finetune_norm`)
        self.finetune_norm: str | None = None
        self._head_fit_data: tuple[Any, Any] | None = None
        self.head = self.build_head(head)
        self.make_optimizer = OPTIMIZERS.build(optimizer)  # bad options fail here, before any work
        self.preprocessing = self.backbone.effective_preprocessing(preprocessing_overrides or {})
        self.label_smoothing = float(label_smoothing)
        self.build_extra()
        self.strategy.resolve_auto(*self.auto_lr_mults())  # after build_extra settled head_fit
        self.policy = TransferPolicy(self.strategy, self, frozen=self.frozen)
        sched = dict(scheduler)
        self.plateau = (
            PlateauState(
                **{k: sched[k] for k in ("mode", "factor", "patience", "threshold") if k in sched}
            )
            if sched.get("name") == "plateau"
            else None
        )
        self.policy.apply(0)
        #: per-class weights of the training loss (dataset.balance=weights); set by tl_cli.commands.train
        self.class_weight: torch.Tensor | None = None
        #: how the head was fitted before training (``strategy.head_fit=lbfgs``), for the summary
        self.head_fit_info: dict[str, Any] | None = None
        #: the head was fitted by L-BFGS and the backbone never trains: epochs take no steps
        self.head_converged = False
        #: tl_cli.run.tuning sets this while the LR finder runs (no head fit there)
        self.skip_head_fit = False
        #: what the run's schedule came to (steps, warm-up), for the summary
        self.budget_info: dict[str, Any] = {}
        #: trainer.max_epochs=auto (tl_cli.transfer.budget): a converged head cuts the run to one epoch
        self.auto_epochs = False
        #: the head-only epoch was added to trainer.max_epochs (once per module)
        self._head_epochs_added = False

    # ------------------------------------------------------------------ for subclasses
    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    def build_head(self, head: dict[str, Any]) -> torch.nn.Module:
        """The new head from its config (``HEADS``); a task whose head reads more than pooled
        features (detection: the backbone's multi-scale maps) builds its own.

        ``head.norm=auto`` becomes :meth:`auto_head_norm`'s answer, and the answer is what the
        checkpoint stores (a checkpoint never re-decides how its head reads features)."""
        head = dict(head)
        if head.get("norm") == AUTO:
            head["norm"] = self.auto_head_norm()
            self.finetune_norm = self.auto_finetune_norm(head["norm"])
            self.hparams["head"] = {**dict(self.hparams["head"]), "norm": head["norm"]}
        return HEADS.build(
            head, in_features=self.backbone.num_features, num_classes=self.num_outputs
        )

    def auto_head_norm(self) -> str:
        """What ``head.norm=auto`` comes to for this task: ``none`` (features as they are)
        unless a task measured better (``ClassificationTask``: ``l2`` for feature extraction on
        images)."""
        return "none"

    def auto_finetune_norm(self, norm: str) -> str | None:
        """``head.norm=auto`` when the backbone trains after an L-BFGS head: the ``head.norm``
        fine-tuning starts from, if it is not ``norm`` (the head-only epoch's, a ``best.ckpt``
        candidate), else None. At the first fine-tuning epoch the head is fitted again by L-BFGS,
        on the same train features, with that norm and ``strategy.head_scale``
        (:meth:`refit_head_for_finetuning`). None here: one head throughout."""
        return None

    def build_extra(self) -> None:
        """Add objective-specific submodules (they train from epoch 0 unless in ``frozen``)."""

    def auto_lr_mults(self) -> tuple[float, float, str]:
        """What ``strategy.backbone_lr_mult=auto`` and ``strategy.head_lr_mult=auto`` (the
        ``tl finetune`` defaults) come to for this task: (backbone, head, where from).

        The LRs that suit fine-tuning depend on where training starts and on the backbone, so
        each task answers with what was measured for it. By default: the backbone at
        ``optimizer.lr x 0.1`` and the head at ``optimizer.lr``, the multipliers that text
        classification, NER, audio and detection were measured with (docs/benchmarks.md "Text",
        "Audio", docs/ner.md, docs/detection.md).
        """
        return 0.1, 1.0, "tl's measured default"

    def loss(
        self, out: torch.Tensor, y: torch.Tensor, stage: str
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def update_metrics(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> None:
        """Update and log the stage's metrics (``train``, ``val``, ``test``)."""

    def supports_head_fit(self) -> bool:
        """Whether ``strategy.head_fit=lbfgs`` can fit this task's head (a linear classifier)."""
        return False

    # ------------------------------------------------------------------ forward
    def forward(self, x: Any) -> torch.Tensor:
        """Raw inputs -> outputs (logits): what eval, predict and export run."""
        return self.head(self.backbone(x))

    def features(self, x: Any) -> torch.Tensor:
        f = cached(x)
        return self.backbone(x) if f is None else f

    def outputs(self, x: Any) -> torch.Tensor:
        """Raw inputs or cached features -> outputs."""
        return self.head(self.features(x))

    def can_cache_features(self) -> bool:
        return self.policy.can_cache_features

    def cache_extractor(self) -> torch.nn.Module:
        """What the feature cache runs once over the inputs (a task may cache more: tl distill
        stores the teacher's logits beside the student's features)."""
        return self.backbone

    def uncached_data(self, dm: Any) -> Any:
        """The data to fit when the backbone trains (no feature cache); a task may still cache
        what never changes (tl distill: the teacher's logits)."""
        return dm

    # ------------------------------------------------------------------ policy hooks
    def train(self, mode: bool = True) -> TransferTask:
        super().train(mode)
        if mode and hasattr(self, "policy"):
            self.policy.fix_bn()  # frozen BN stays in eval mode
        return self

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.policy.apply(0)
            shift = self.policy.head_only_epochs
            loop = self.trainer.fit_loop
            if shift and not self.skip_head_fit and not self._head_epochs_added:
                # trainer.max_epochs counts the fine-tuning epochs; the head-only epoch comes first
                # (before configure_optimizers, which sizes the schedule from max_epochs)
                if loop.max_epochs is not None and loop.max_epochs >= 0:
                    loop.max_epochs += shift
                self._head_epochs_added = True

    def scores_only(self) -> bool:
        """This epoch takes no optimizer step: the converged head of a frozen backbone, or the
        head-only epoch before fine-tuning (``TransferPolicy.head_only``)."""
        return self.head_converged or (
            not self.skip_head_fit and self.policy.head_only(self.current_epoch)
        )

    def on_train_epoch_start(self) -> None:
        self.policy.apply(self.current_epoch)
        if (
            self.finetune_norm is not None
            and not self.skip_head_fit
            and not self.policy.head_only(self.current_epoch)
            and getattr(self.head, "norm", None) != self.finetune_norm
        ):
            self.refit_head_for_finetuning()

    def on_fit_start(self) -> None:
        self.policy.on_fit_start(self.trainer.world_size)
        if (
            self.strategy.head_fit != "sgd"  # lbfgs, or a strategy's own fit (prototypes)
            and not self.skip_head_fit
            and self.trainer.ckpt_path is None  # a resumed run keeps its trained head
        ):
            self.fit_head()
        if self.adapter is not None:
            self.adapter.on_fit_start(self)
        dm = getattr(self.trainer, "datamodule", None)
        if (
            self.head_converged
            and self.trainer.world_size == 1
            and hasattr(dm, "whole_train_batch")
        ):
            # nothing steps (training_step returns None): an epoch only measures the fitted head
            # on the cached train features, the same mean whatever the batching, so one batch per
            # epoch saves Lightning's per-step overhead (most of a cached epoch on a small set)
            dm.whole_train_batch = True
            # configure_optimizers (estimated_stepping_batches) built the train loader already:
            # drop it so the fit loop asks the data module again (Lightning's own reload path)
            if getattr(self.trainer.fit_loop, "_combined_loader", None) is not None:
                self.trainer.fit_loop._combined_loader = None
        if self.auto_epochs and self.head_converged:
            # trainer.max_epochs=auto and nothing left to train: one epoch scores the fitted head
            self.trainer.fit_loop.max_epochs = 1
            self.budget_info["epochs"] = 1

    def fit_head(self) -> None:
        """Fit the linear head to convergence on frozen features (``tl_cli.transfer.probe``)."""
        if hasattr(self.strategy, "fit_head"):  # e.g. prototypes (tl_cli.commands.fewshot)
            return self.strategy.fit_head(self)
        from tl_cli.core.console import say

        layers = self._head_layers()
        linear = layers[-1]
        plain_linear = isinstance(linear, torch.nn.Linear) and all(
            isinstance(m, torch.nn.Dropout | torch.nn.Identity) for m in layers[:-1]
        )  # an MLP head is not a convex problem on the features: it trains by SGD
        if not self.supports_head_fit() or not plain_linear:
            say(
                "strategy.head_fit=lbfgs fits a linear classification head only: "
                "the head trains by SGD (strategy.head_fit=sgd)"
            )
            return
        feats, labels = self.train_features()
        scale = None  # strategy.head_scale
        if self.finetune_norm is not None:
            # the head-only epoch scores tl train's head (one global scale); fine-tuning starts
            # from another fitted on the same features (refit_head_for_finetuning)
            self._head_fit_data = (feats, labels)
            scale = "global"
        self.fit_linear(linear, self.head_input(feats), labels, scale=scale)

    def _head_layers(self) -> list[torch.nn.Module]:
        """The head's layers in order (a one-layer head: itself); the last is what L-BFGS fits."""
        return list(self.head) if isinstance(self.head, torch.nn.Sequential) else [self.head]

    def refit_head_for_finetuning(self) -> None:
        """Before the first fine-tuning epoch: switch the head to :attr:`finetune_norm` and fit it
        again by L-BFGS on the pretrained backbone's train features (``strategy.head_scale``).

        The head-only epoch's head (``head.norm=l2``, one global scale: ``tl train``'s, the best
        head on frozen features) stays the ``best.ckpt`` candidate; fine-tuning from it degraded
        test accuracy (CIFAR 20/class at 96 px: .60-.65 after fine-tuning against .68-.70 before),
        while from the per-dimension head on raw features it never fell below its start
        (docs/benchmarks.md "Fine-tuning against the new feature-extraction head"). Checkpoints
        store the norm their weights were fitted with (the saved hyper-parameters are read at
        every save), and loading one restores it (:meth:`on_load_checkpoint`).
        """
        from tl_cli.core.console import say

        linear = self._head_layers()[-1]
        data, self._head_fit_data = self._head_fit_data, None
        feats, labels = data if data is not None else self.train_features()  # resumed run
        before = dict(self.head_fit_info or {})
        self.set_head_norm(str(self.finetune_norm))
        self.fit_linear(linear, self.head_input(feats), labels)
        after, self.head_fit_info = self.head_fit_info, before
        self.head_fit_info["finetune_start"] = after
        say(
            "[bold]head[/] for fine-tuning: fitted again on the features as they are "
            f"(head.norm={self.finetune_norm}, strategy.head_scale="
            f"{getattr(self.strategy, 'head_scale', 'dim')}); the head-only epoch's head stays "
            "the best.ckpt candidate"
        )

    def set_head_norm(self, norm: str) -> None:
        """Make the head read features with ``norm`` and the saved hyper-parameters say so."""
        self.head.norm = norm
        self.hparams["head"] = {**dict(self.hparams["head"]), "norm": norm}

    def head_input(self, feats: Any) -> np.ndarray:
        """Backbone features as the head's layers read them: L2-normalised when the head has
        ``norm=l2`` (``LinearHead.prepare``), else as they are. The L-BFGS fit fits the head's
        last layer on these, so the fitted head is exactly what ``forward`` runs."""
        prepare = getattr(self.head, "prepare", None)
        x = np.asarray(feats, dtype=np.float32)
        if prepare is None:
            return x
        with torch.no_grad():
            return prepare(torch.from_numpy(x)).numpy()

    def fit_linear(
        self, linear: torch.nn.Linear, feats: Any, labels: Any, scale: str | None = None
    ) -> None:
        """Set ``linear`` to the L-BFGS probe on ``feats`` (L2 chosen by CV; class weights when
        ``dataset.balance`` asks; features scaled by ``scale``, default ``strategy.head_scale``),
        and record how it was chosen for the summary."""
        from tl_cli.core.console import say
        from tl_cli.transfer.probe import class_weights, fit_probe

        cw = None
        if getattr(self, "balance", None) in ("weights", "sampler"):
            cw = class_weights(labels, self.num_outputs)
        scale = scale or getattr(self.strategy, "head_scale", "dim")
        fit = fit_probe(feats, labels, self.num_outputs, class_weight=cw, scale=scale)
        with torch.no_grad():
            linear.weight.copy_(fit.weight.to(linear.weight))
            linear.bias.copy_(fit.bias.to(linear.bias))
        self.head_converged = not self.policy.backbone_ever_trains
        self.head_fit_info = {
            "method": "lbfgs",
            "C": fit.C,
            "folds": fit.folds,
            "cv_acc": fit.cv_acc,
            "train_acc": fit.train_acc,
            "seconds": round(fit.seconds, 2),
            "scale": scale,
            "norm": getattr(self.head, "norm", "none"),
        }
        say(f"[bold]head[/] fitted by L-BFGS to convergence: {fit.describe()}")

    def train_features(self) -> tuple[np.ndarray, np.ndarray]:
        """Train-split features: from the feature cache, else one eval-mode pass of the backbone."""
        from tl_cli.data.features import extract

        dm = self.trainer.datamodule
        views = getattr(dm, "splits", {}).get("train")
        if views and all(
            hasattr(v, "feats") for v in views
        ):  # tl_cli.data.features.FeatureDataModule
            return (
                np.concatenate([np.asarray(v.feats, dtype=np.float32) for v in views]),
                np.concatenate([np.asarray(v.labels) for v in views]),
            )
        was = self.backbone.training
        self.backbone.eval()
        try:
            ds = dm.dataset("train", train_aug=False)
            return extract(self.backbone, ds, dm, self.device, "head fit: train features")
        finally:
            self.backbone.train(was)
            self.policy.fix_bn()

    def on_after_backward(self) -> None:
        self.policy.sync_late_grads()

    def on_train_start(self) -> None:
        if self.head_converged and self.trainer.world_size > 1:
            # DDP steps on every batch (see training_step): with no weight decay, a zero gradient
            # leaves the fitted head exactly as it is (SGD, Adam and AdamW alike)
            for opt in self.trainer.optimizers:
                for group in opt.param_groups:
                    group["weight_decay"] = 0.0

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        scores_only = self.scores_only()
        if self.adapter is not None and self.adapter.trains and not scores_only:
            return self.adapter.training_step(self, batch)  # source + target batches
        if scores_only and self.adapter is not None and self.adapter.trains:
            batch = batch["source"] if isinstance(batch, dict) and "source" in batch else batch
        x, y = batch
        if scores_only:
            # the head is at the optimum of its convex objective (L-BFGS) and, in this epoch, the
            # backbone does not train: nothing to step. Log the fitted head's train metrics.
            return self.score_without_step(x, y)
        out = self.outputs(x)
        loss = self.loss(out, y, "train")
        if self.policy.l2sp_alpha:
            penalty = self.policy.l2sp_penalty()
            self.log("train/l2sp", penalty, on_step=False, on_epoch=True)
            loss = loss + self.policy.l2sp_alpha * penalty
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.update_metrics(out, y, "train")
        return loss

    def score_without_step(self, x: Any, y: Any) -> torch.Tensor | None:
        """Log the train metrics of the current model on a batch and take no optimizer step
        (None), or, under DDP, which cannot skip a step, a zero loss through every trainable
        parameter: every rank gets the same all-zero gradients."""
        with torch.no_grad():
            out = self.outputs(x)
            self.log(
                "train/loss",
                self.loss(out, y, "train"),
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                sync_dist=True,
            )  # the same arguments as a training step's log (Lightning requires it)
            self.update_metrics(out, y, "train")
        if self.trainer.world_size > 1:
            live = [p for p in self.parameters() if p.requires_grad]
            return sum(p.sum() for p in live) * 0.0
        return None

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = batch
        out = self.outputs(x)
        self.log(
            f"{stage}/loss",
            self.loss(out, y, stage),
            on_epoch=True,
            prog_bar=stage == "val",
            sync_dist=True,
        )
        self.update_metrics(out, y, stage)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if self.plateau is not None and not self.trainer.sanity_checking:
            monitor = dict(self.hparams.scheduler).get("monitor", "val/loss")
            if monitor not in self.trainer.callback_metrics:
                raise TLError(
                    f"scheduler.monitor={monitor!r} is not a logged metric (try val/loss or val/acc)"
                )
            self.plateau.update(float(self.trainer.callback_metrics[monitor]))
        if self.adapter is not None and not self.trainer.sanity_checking:
            self.adapter.on_validation_epoch_end(self)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer)
        base_lr = float(opt_cfg.get("lr", 1e-3))
        wd = float(opt_cfg.get("weight_decay", 0.0))
        groups = self.policy.param_groups(base_lr, wd)
        if self.adapter is not None:  # e.g. DANN's domain discriminator
            groups += self.adapter.param_groups(base_lr, wd)
        if not groups:
            raise TLError("nothing to train: the strategy freezes every parameter")
        optimizer = self.make_optimizer(groups)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, int(self.trainer.max_epochs or 1))
        spe = max(1, total // epochs)
        sched = {**dict(self.hparams.scheduler), "_state": self.plateau}
        skipped = self.policy.head_only_epochs * spe if not self.skip_head_fit else 0
        # the schedule covers the steps that train (after the head-only epoch, which takes none)
        shape = shape_fn(sched, max(1, total - skipped), spe)
        self.budget_info = {
            "steps": 0 if self.head_converged else total - skipped,
            "steps_per_epoch": spe,
            "epochs": epochs - skipped // spe,  # the epochs that train
            "lr": base_lr,
            "warmup_steps": warmup_steps(sched, total - skipped, spe),
            "head_only_epochs": self.policy.head_only_epochs if not self.skip_head_fit else 0,
        }
        w = self.budget_info["warmup_steps"]
        if w >= total - skipped and not self.head_converged and not self.skip_head_fit:
            from tl_cli.core.console import warn

            warn(
                f"the warm-up ({w} optimizer steps, scheduler.warmup_epochs="
                f"{sched.get('warmup_epochs')}) is as long as the whole run ({total - skipped} steps): the LR "
                "never reaches optimizer.lr; use scheduler.warmup_fraction (warmup_epochs=null) or more epochs"
            )
        scheduler = LambdaLR(optimizer, self.policy.lr_lambdas(optimizer, shape, spe))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ tl eval / predict / export
    def check_classes(self, got: list[str], where: str) -> None:
        """Data to score must name the checkpoint's classes, in its order."""
        if list(self.class_names) != list(got):
            missing = sorted(set(self.class_names) - set(got))
            extra = sorted(set(got) - set(self.class_names))
            parts = [
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown to the model {', '.join(extra)}" if extra else "",
            ]
            detail = "; ".join(p for p in parts if p) or "same names in another order"
            raise TLError(f"{where}: classes differ from the checkpoint's ({detail})")

    def evaluate(self, loader: Any, device: torch.device, desc: str) -> Evaluation:
        """Score the model on ``loader`` (eval mode, no gradients): eval.json's numbers."""
        raise NotImplementedError  # pragma: no cover

    def evaluation_outputs(
        self, ev: Evaluation, out: Path, dataset: Any, cfg: Any, split: str, noun: str
    ) -> EvalOutputs:
        """Write the task's plots and error analysis into ``out``; the report.md sections."""
        return EvalOutputs()

    def show_evaluation(self, ev: Evaluation, split: str, noun: str) -> None:
        """The task's tables on the console (the summary table is the command's)."""

    def predictor(self, modality: Any, prep: dict[str, Any], cfg: Any) -> Predictor:
        return self.predictor_class(self, modality, prep, cfg)

    # ------------------------------------------------------------------ test-time augmentation
    #: ``tta=`` of ``tl eval`` / ``tl predict`` (:meth:`set_tta`); never saved in a checkpoint
    tta: str = "none"
    #: what ``tta=`` may name for this task (``none``: the inputs as they are)
    tta_modes: tuple[str, ...] = ("none",)

    def set_tta(self, mode: Any) -> None:
        """Test-time augmentation for ``tl eval`` and ``tl predict`` (``tta=none|flip``); a task
        or modality that cannot average its outputs over views refuses in one line."""
        mode = str(mode)
        if mode not in self.tta_modes:
            allowed = " or ".join(self.tta_modes)
            raise TLError(
                f"tta={mode}: a {self.task_name} model on "
                f"{getattr(self.backbone, 'modality', 'image')} inputs takes tta={allowed}"
            )
        self.tta = mode

    def export_spec(self, modality: Any, prep: dict[str, Any]) -> ExportSpec:
        """The network ``tl export`` writes, its outputs and the task's sidecar entries."""
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tl"] = tl_section(
            task=self.task_name,
            modality=self.backbone.modality,
            class_names=list(self.class_names),
            preprocessing=dict(self.preprocessing),
            backbone=self.backbone.name,
            strategy=self.strategy.name,
            dataset=getattr(self, "dataset_config", None),
        )
        if self.plateau is not None:
            checkpoint["tl_plateau"] = self.plateau.state_dict()
        if self.head_fit_info is not None:
            # a resumed run keeps the fitted head and, with a frozen backbone, takes no steps
            checkpoint["tl_head_fit"] = dict(self.head_fit_info)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.plateau is not None and "tl_plateau" in checkpoint:
            self.plateau.load_state_dict(checkpoint["tl_plateau"])
        info = checkpoint.get("tl_head_fit")
        if isinstance(info, dict):
            self.head_fit_info = dict(info)
            self.head_converged = not self.policy.backbone_ever_trains
        # the norm the stored head was fitted with: a fine-tune's best.ckpt may hold the head-only
        # epoch's head (l2) while this module already switched (refit_head_for_finetuning)
        stored = (checkpoint.get("hyper_parameters") or {}).get("head") or {}
        norm = stored.get("norm") if hasattr(stored, "get") else None
        if norm in ("none", "l2") and getattr(self.head, "norm", norm) != norm:
            self.set_head_norm(norm)

    @property
    def task_name(self) -> str:
        return next((n for n in TASKS.names() if TASKS.get(n) is type(self)), type(self).__name__)
