"""Tasks: what is learned. A task is a LightningModule built from plain configs by name.

`TransferTask` holds what every objective shares: a pretrained backbone, a new head, the
transfer policy (``tl_cli.policy``, which owns freezing, BatchNorm, LR groups, L2-SP and the DDP
sync) and the optimizer/scheduler wiring. A subclass adds its loss and metrics. To add a task,
write one subclass here (or in any module imported before training), register it in ``TASKS``,
and add ``configs/task/<name>.yaml``; ``tl_cli.train`` and the policy do not change.

Batches are ``(input, target)``. ``input`` is whatever the backbone takes (images, token dicts,
waveforms), or ``{"features": tensor}`` when the data module serves cached backbone features.
Every argument is plain data, so a checkpoint holds names and values only and rebuilds the model
through tl's registries (``tl_cli.checkpoint``), never by importing or instantiating a string.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from tl_cli import __version__
from tl_cli.backbones import build_backbone
from tl_cli.errors import TLError
from tl_cli.heads import HEADS
from tl_cli.metrics import DEFAULT_MONITOR
from tl_cli.optimizers import OPTIMIZERS
from tl_cli.policy import TransferPolicy
from tl_cli.registry import Registry
from tl_cli.schedulers import PlateauState, shape_fn
from tl_cli.strategies import STRATEGIES, TransferStrategy

#: task.name -> TransferTask subclass.
TASKS: Registry[pl.LightningModule] = Registry("task")

#: Checkpoint format: 2 = registry names and plain values (1 = Hydra ``_target_`` strings).
CHECKPOINT_FORMAT = 2


def cached(x: Any) -> torch.Tensor | None:
    """The cached features of a batch input, or None for raw inputs."""
    if isinstance(x, dict) and "features" in x:
        return x["features"]
    return None


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
        self.head = HEADS.build(
            head, in_features=self.backbone.num_features, num_classes=self.num_outputs
        )
        self.strategy: TransferStrategy = STRATEGIES.build(strategy)
        self.make_optimizer = OPTIMIZERS.build(optimizer)  # bad options fail here, before any work
        self.preprocessing = self.backbone.effective_preprocessing(preprocessing_overrides or {})
        self.label_smoothing = float(label_smoothing)
        self.build_extra()
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

    # ------------------------------------------------------------------ for subclasses
    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    def build_extra(self) -> None:
        """Add objective-specific submodules (they train from epoch 0 unless in ``frozen``)."""

    def loss(
        self, out: torch.Tensor, y: torch.Tensor, stage: str
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def update_metrics(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> None:
        """Update and log the stage's metrics (``train``, ``val``, ``test``)."""

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

    # ------------------------------------------------------------------ policy hooks
    def train(self, mode: bool = True) -> TransferTask:
        super().train(mode)
        if mode and hasattr(self, "policy"):
            self.policy.fix_bn()  # frozen BN stays in eval mode
        return self

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.policy.apply(0)

    def on_train_epoch_start(self) -> None:
        self.policy.apply(self.current_epoch)

    def on_fit_start(self) -> None:
        self.policy.on_fit_start(self.trainer.world_size)

    def on_after_backward(self) -> None:
        self.policy.sync_late_grads()

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.outputs(x)
        loss = self.loss(out, y, "train")
        if self.policy.l2sp_alpha:
            penalty = self.policy.l2sp_penalty()
            self.log("train/l2sp", penalty, on_step=False, on_epoch=True)
            loss = loss + self.policy.l2sp_alpha * penalty
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.update_metrics(out, y, "train")
        return loss

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

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer)
        base_lr = float(opt_cfg.get("lr", 1e-3))
        wd = float(opt_cfg.get("weight_decay", 0.0))
        groups = self.policy.param_groups(base_lr, wd)
        if not groups:
            raise TLError("nothing to train: the strategy freezes every parameter")
        optimizer = self.make_optimizer(groups)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, int(self.trainer.max_epochs or 1))
        spe = max(1, total // epochs)
        shape = shape_fn({**dict(self.hparams.scheduler), "_state": self.plateau}, total, spe)
        scheduler = LambdaLR(optimizer, self.policy.lr_lambdas(optimizer, shape, spe))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tl"] = {
            "version": __version__,
            "format": CHECKPOINT_FORMAT,
            "task": self.task_name,
            "modality": self.backbone.modality,
            "class_names": list(self.class_names),
            "preprocessing": dict(self.preprocessing),
            "backbone": self.backbone.name,
            "strategy": self.strategy.name,
            "dataset": getattr(self, "dataset_config", None),
        }
        if self.plateau is not None:
            checkpoint["tl_plateau"] = self.plateau.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.plateau is not None and "tl_plateau" in checkpoint:
            self.plateau.load_state_dict(checkpoint["tl_plateau"])

    @property
    def task_name(self) -> str:
        return next((n for n in TASKS.names() if TASKS.get(n) is type(self)), type(self).__name__)


@TASKS.register("classification")
class ClassificationTask(TransferTask):
    """Single-label classification: cross-entropy (label smoothing in training), accuracy, macro-F1."""

    def build_extra(self) -> None:
        n = self.num_outputs
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.test_acc = MulticlassAccuracy(n, average="micro")
        self.test_f1 = MulticlassF1Score(n, average="macro")

    def loss(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        smoothing = self.label_smoothing if stage == "train" else 0.0
        return F.cross_entropy(out, y, label_smoothing=smoothing)

    def update_metrics(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> None:
        acc = getattr(self, f"{stage}_acc")
        acc(out, y)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val")
        if stage == "test":
            self.test_f1(out, y)
            self.log("test/macro_f1", self.test_f1, on_epoch=True)


def build_task(name: str, **kwargs: Any) -> TransferTask:
    """A task module by registry name (``task.name``)."""
    return TASKS.get(name)(**kwargs)
