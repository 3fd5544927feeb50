"""Tasks: what is learned. A task is a LightningModule built from plain configs by name.

`TransferTask` holds what every objective shares: a pretrained backbone, a new head, the
transfer policy (``tl_cli.transfer.policy``, which owns freezing, BatchNorm, LR groups, L2-SP and the DDP
sync) and the optimizer/scheduler wiring. A subclass adds its loss and metrics. To add a task,
write one subclass here (or in any module imported before training), register it in ``TASKS``,
and add ``configs/task/<name>.yaml``; ``tl_cli.commands.train`` and the policy do not change.

Batches are ``(input, target)``. ``input`` is whatever the backbone takes (images, token dicts,
waveforms), or ``{"features": tensor}`` when the data module serves cached backbone features.
Every argument is plain data, so a checkpoint holds names and values only and rebuilds the model
through tl's registries (``tl_cli.core.checkpoint``), never by importing or instantiating a string.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.optim.lr_scheduler import LambdaLR

from tl_cli import __version__
from tl_cli.core.errors import TLError
from tl_cli.core.metrics import DEFAULT_MONITOR
from tl_cli.core.registry import Registry
from tl_cli.modalities.backbones import build_backbone
from tl_cli.transfer.heads import HEADS
from tl_cli.transfer.optimizers import OPTIMIZERS
from tl_cli.transfer.policy import TransferPolicy
from tl_cli.transfer.schedulers import PlateauState, shape_fn, warmup_steps
from tl_cli.transfer.strategies import STRATEGIES, TransferStrategy

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

        layers = list(self.head) if isinstance(self.head, torch.nn.Sequential) else [self.head]
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
        feats, labels = self._train_features()
        self.fit_linear(linear, feats, labels)

    def fit_linear(self, linear: torch.nn.Linear, feats: Any, labels: Any) -> None:
        """Set ``linear`` to the L-BFGS probe on ``feats`` (L2 chosen by CV; class weights when
        ``dataset.balance`` asks), and record how it was chosen for the summary."""
        from tl_cli.core.console import say
        from tl_cli.transfer.probe import class_weights, fit_probe

        cw = None
        if getattr(self, "balance", None) in ("weights", "sampler"):
            cw = class_weights(labels, self.num_outputs)
        fit = fit_probe(feats, labels, self.num_outputs, class_weight=cw)
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
        }
        say(f"[bold]head[/] fitted by L-BFGS to convergence: {fit.describe()}")

    def _train_features(self) -> tuple[np.ndarray, np.ndarray]:
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
        if self.adapter is not None and self.adapter.trains:
            return self.adapter.training_step(self, batch)  # source + target batches
        x, y = batch
        if self.head_converged:
            # the head is at the optimum of its convex objective (L-BFGS) and the backbone never
            # trains: nothing to step. Log the train metrics of the fitted head and move on.
            with torch.no_grad():
                out = self.outputs(x)
                self.log("train/loss", self.loss(out, y, "train"), on_step=False, on_epoch=True)
                self.update_metrics(out, y, "train")
            if self.trainer.world_size > 1:
                # DDP cannot skip a step (training_step returning None): a zero loss through the
                # head gives every rank the same all-zero gradients
                return self.head(self.features(x).detach()).sum() * 0.0
            return None
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
        shape = shape_fn(sched, total, spe)
        self.budget_info = {
            "steps": 0 if self.head_converged else total,
            "steps_per_epoch": spe,
            "epochs": epochs,
            "lr": base_lr,
            "warmup_steps": warmup_steps(sched, total, spe),
        }
        w = self.budget_info["warmup_steps"]
        if w >= total and not self.head_converged and not self.skip_head_fit:
            from tl_cli.core.console import warn

            warn(
                f"the warm-up ({w} optimizer steps, scheduler.warmup_epochs="
                f"{sched.get('warmup_epochs')}) is as long as the whole run ({total} steps): the LR "
                "never reaches optimizer.lr; use scheduler.warmup_fraction (warmup_epochs=null) or more epochs"
            )
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

    @property
    def task_name(self) -> str:
        return next((n for n in TASKS.names() if TASKS.get(n) is type(self)), type(self).__name__)


def build_task(name: str, **kwargs: Any) -> TransferTask:
    """A task module by registry name (``task.name``)."""
    return TASKS.get(name)(**kwargs)
