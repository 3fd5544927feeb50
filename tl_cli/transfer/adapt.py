"""Transductive domain adaptation: train on a labelled source, adapt to an unlabelled target.

``tl train dataset.root=SOURCE dataset.target_root=TARGET adapt=NAME``. The target folder is read
by the same reader as the source (class folders, or a flat folder of unlabelled files). Target
labels, when the target has class folders, are **never** used for training: the target's
training batches are served as inputs only (:class:`AdaptData` drops their labels before the
task sees them) and the labels are used after training, to score the target
(``target/acc``, ``target/macro_f1`` in metrics.json).

Adapters (``configs/adapt/<name>.yaml``, built by name through ``ADAPTERS``, never instantiated
from a string):

* ``none``: source-only training; the target is only scored (the domain gap made visible).
* ``adabn``: AdaBN (Li et al., 2016): after training, every BatchNorm layer's running statistics
  are re-estimated on the target; nothing else changes. The saved checkpoint carries the target
  statistics (it is a target-domain model).
* ``dann``: DANN (Ganin et al., JMLR 2016): a bottleneck layer (the head's first layer, so the
  checkpoint stays an ordinary classification checkpoint), a domain discriminator on the
  bottleneck features behind a gradient reversal layer whose coefficient ramps as
  ``2 / (1 + exp(-10 p)) - 1`` over training progress ``p``. Works on cached (frozen) features.
* ``self_training``: confidence-thresholded pseudo-labels on the target (FixMatch's threshold
  rule, Sohn et al., 2020; on cached features there is no strong augmentation, so it is
  pseudo-labelling in the sense of Lee, 2013), optionally with SHOT's information maximisation.

The discriminator is not a submodule of the task: it trains with the task's optimizer (an extra
param group) but is not saved, so eval, predict and export load the checkpoint unchanged.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from tl_cli.core.console import say, warn
from tl_cli.core.errors import TLError
from tl_cli.core.registry import Registry, plain
from tl_cli.transfer.heads import HEADS

#: adapt.name -> adapter class
ADAPTERS: Registry[Any] = Registry("adapt")
#: at most this many points per domain in domains.png
PLOT_POINTS = 600


# --------------------------------------------------------------------------- gradient reversal


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = float(coeff)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity forward; the backward pass multiplies the gradient by ``-coeff`` (Ganin et al.)."""
    return _GradReverse.apply(x, coeff)


def dann_coefficient(progress: float, gamma: float = 10.0) -> float:
    """Ganin et al.'s schedule ``2 / (1 + exp(-gamma p)) - 1``: 0 at the start, ~1 at the end."""
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class DomainDiscriminator(nn.Sequential):
    """Source-vs-target classifier on bottleneck features (TLlib's: two hidden layers, BN, ReLU)."""

    def __init__(self, in_features: int, hidden: int = 1024) -> None:
        super().__init__(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )


@HEADS.register("bottleneck")
class BottleneckHead(nn.Sequential):
    """Linear -> BatchNorm -> ReLU (the bottleneck) -> linear: DANN's head (TLlib's layout)."""

    def __init__(
        self, in_features: int, num_classes: int, dim: int = 256, dropout: float = 0.0
    ) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim={dim} must be >= 1")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        layers: list[nn.Module] = [
            nn.Linear(in_features, int(dim)),
            nn.BatchNorm1d(int(dim)),
            nn.ReLU(),
        ]
        if float(dropout) > 0:
            layers.append(nn.Dropout(float(dropout)))
        layers.append(nn.Linear(int(dim), num_classes))
        super().__init__(*layers)


def embed(head: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """What the head's last linear layer sees (the bottleneck features; for a linear head the input)."""
    if isinstance(head, nn.Sequential) and len(head) > 1:
        for layer in list(head)[:-1]:  # (slicing would rebuild the head's class)
            feats = layer(feats)
    return feats


def classify(head: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return head[-1](z) if isinstance(head, nn.Sequential) and len(head) > 1 else head(z)


# --------------------------------------------------------------------------- adapters


class Adapter:
    """Source-only (``adapt=none``): nothing is adapted; the target is scored after training."""

    #: takes optimizer steps on source + target batches (its own training_step)
    trains = False
    #: needs dataset.target_root
    needs_target = False

    def __init__(self) -> None:
        self.name = next(n for n in ADAPTERS.names() if ADAPTERS.get(n) is type(self))

    def configure(self, head: dict[str, Any], strategy: dict[str, Any]) -> tuple[dict, dict]:
        """The head and strategy configs this adapter trains with."""
        return head, strategy

    def bind(self, module: Any) -> None:
        """Called once the task module is built."""
        if self.trains:
            # no target labels to pick a checkpoint with, and source val/acc is a poor proxy for
            # target accuracy (it rewards stopping before adaptation starts): the schedule runs
            # to its end and best.ckpt is the last epoch (tracked by val/epoch)
            module.monitor = ("val/epoch", "max")

    def on_validation_epoch_end(self, module: Any) -> None:
        if self.trains:  # val/epoch: what picks best.ckpt (the last epoch)
            module.log("val/epoch", float(module.current_epoch))

    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return []

    def on_fit_start(self, module: Any) -> None:
        pass

    def training_step(self, module: Any, batch: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def after_fit(
        self, module: Any, dm: Any, device: torch.device, target_feats: np.ndarray
    ) -> np.ndarray | None:
        """Change the trained model for the target after fitting (``target_feats``: its backbone
        features); the target's new backbone features, or None when nothing changed."""
        return None

    def plots(
        self,
        module: Any,
        out: Path,
        src: np.ndarray,
        tgt: np.ndarray,
        src_labels: np.ndarray,
        tgt_labels: np.ndarray,
    ) -> None:
        """Plots of the method's own beside domains.png (``src``/``tgt``: backbone features)."""

    def describe(self) -> str:
        return "source-only (no adaptation)"


ADAPTERS.register("none", Adapter)


class FeatureNorm(nn.BatchNorm1d):
    """A BatchNorm over backbone features that always normalises with its running statistics
    (set from a whole domain: the source's for training, the target's after AdaBN)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps, momentum=None, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps
        )

    @torch.no_grad()
    def set_statistics(self, feats: np.ndarray | torch.Tensor) -> None:
        f = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
        self.running_mean.copy_(f.mean(0).to(self.running_mean))
        self.running_var.copy_(f.var(0, unbiased=False).to(self.running_var))
        self.num_batches_tracked.fill_(1)


@HEADS.register("normed_linear")
class NormedLinearHead(nn.Sequential):
    """Feature normalisation (fixed statistics) -> dropout (optional) -> linear: AdaBN's head on a
    frozen backbone (the statistics the classifier was trained with can be swapped for a target's)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        layers: list[nn.Module] = [FeatureNorm(in_features)]
        if float(dropout) > 0:
            layers.append(nn.Dropout(float(dropout)))
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)


@ADAPTERS.register("adabn")
class AdaBN(Adapter):
    """AdaBN (Li et al., 2016): after training on the source, every BatchNorm layer's statistics
    are re-estimated on the target; no weight changes.

    A frozen pretrained backbone's BatchNorm layers hold its *pretraining* data's statistics, not
    the source's, so swapping them for the target's would feed the head features it never saw.
    AdaBN is therefore applied where the source statistics live: a BatchNorm at the head's input
    (``normed_linear`` head: features standardised with the source's statistics while the
    classifier trains, with the target's after adaptation). ``layers=all`` also re-estimates the
    backbone's BatchNorm layers: for a backbone whose BatchNorm trained on the source
    (``strategy=finetune``).

    Args:
        layers: ``head`` (the feature-level BatchNorm) or ``all`` (head + backbone).
    """

    needs_target = True

    def __init__(self, layers: str = "head") -> None:
        super().__init__()
        if layers not in ("head", "all"):
            raise ValueError(f"layers={layers!r} must be head or all")
        self.layers = layers
        self.lbfgs = False

    def configure(self, head: dict[str, Any], strategy: dict[str, Any]) -> tuple[dict, dict]:
        head, strategy = dict(head), dict(strategy)
        if head.get("name") != "linear":
            raise TLError(
                f"adapt=adabn uses a linear head (head=linear), got head={head.get('name')}"
            )
        head = {"name": "normed_linear", "dropout": head.get("dropout", 0.0)}
        # the L-BFGS fit happens here (on normalised features), not in the task
        self.lbfgs = strategy.get("head_fit") == "lbfgs"
        if "head_fit" in strategy:
            strategy["head_fit"] = "sgd"
        return head, strategy

    def bind(self, module: Any) -> None:
        if self.layers == "all" and not bn_layers(module.backbone):
            # a transformer (text) normalises each input with LayerNorm: nothing to re-estimate
            raise TLError(
                f"adapt.layers=all re-estimates backbone BatchNorm statistics, and backbone "
                f"{module.backbone.name} has no BatchNorm layers (LayerNorm normalises each input "
                "on its own); adapt.layers=head (the default) adapts the feature statistics at "
                "the head's input, and adapt=dann, self_training or dsn adapt the features"
            )
        if self.layers == "all" and not module.policy.backbone_ever_trains:
            warn(
                "adapt.layers=all with a frozen backbone: its BatchNorm statistics are its "
                "pretraining data's, not the source's; re-estimating them on the target changes "
                "the features the head was trained on (adapt.layers=head is the safe choice)"
            )

    def on_fit_start(self, module: Any) -> None:
        if module.trainer.ckpt_path is not None:
            return  # a resumed run keeps its statistics and head
        from tl_cli.core.console import say as _say

        feats, labels = module.train_features()
        norm = module.head[0]
        norm.set_statistics(feats)
        _say(
            f"[bold]adabn[/] head normalises features with the source's statistics ({len(feats)} train inputs)"
        )
        if not self.lbfgs:
            return
        with torch.no_grad():
            z = norm(
                torch.as_tensor(np.asarray(feats), dtype=torch.float32).to(norm.running_mean.device)
            )
        module.fit_linear(module.head[-1], z.cpu().numpy(), labels)

    def after_fit(
        self, module: Any, dm: Any, device: torch.device, target_feats: np.ndarray
    ) -> np.ndarray | None:
        if self.layers == "all":
            n = adabn(module.backbone, dm, device, "target")
            if n:
                say(f"[bold]adabn[/] re-estimated {n} backbone BatchNorm layers on the target")
                target_feats = _features(
                    module, None, dm, "target", np.arange(len(dm.splits["target"])), device
                )
            else:
                warn(
                    "adapt=adabn: the backbone has no BatchNorm layers; only the head's was adapted"
                )
        module.head[0].set_statistics(target_feats)
        say(
            f"[bold]adabn[/] head normalises features with the target's statistics ({len(target_feats)} inputs)"
        )
        return target_feats

    def describe(self) -> str:
        where = "the head's input" if self.layers == "head" else "the head's input and the backbone"
        return f"AdaBN (BatchNorm statistics at {where} re-estimated on the target)"


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adabn(backbone: nn.Module, dm: Any, device: torch.device, split: str = "target") -> int:
    """``split``'s statistics in every BatchNorm layer of ``backbone`` (a cumulative average over
    the whole split, eval transform); parameters and every other buffer are untouched. Returns
    the number of BatchNorm layers."""
    from tl_cli.core.console import progress
    from tl_cli.data.features import move_data_to_device

    bns = [m for m in bn_layers(backbone) if m.track_running_stats]
    if not bns:
        return 0
    modes = [
        (m, m.training) for m in backbone.modules()
    ]  # restored one by one (frozen BN stays eval)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every target batch counts equally
    backbone.eval()
    for m in bns:
        m.train()
    loader = dm.make_loader(dm.dataset(split, train_aug=False), shuffle=False)
    was_device = next(backbone.parameters()).device
    backbone.to(device)
    try:
        with progress(f"adabn: {split} BatchNorm statistics", total=len(loader)) as advance:
            for x, _ in loader:
                backbone(move_data_to_device(x, device))
                advance()
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        for m, mode in modes:
            m.training = mode
        backbone.to(was_device)
    return len(bns)


@ADAPTERS.register("dann")
class DANN(Adapter):
    """Domain-adversarial training (Ganin et al., JMLR 2016).

    Args:
        bottleneck: width of the bottleneck layer (the head becomes bottleneck -> classifier when
            the configured head is linear; an mlp head's hidden layer is used as is).
        hidden: width of the discriminator's two hidden layers.
        trade_off: weight of the domain loss.
        gamma: steepness of the coefficient ramp ``2 / (1 + exp(-gamma p)) - 1``.
    """

    trains = True
    needs_target = True

    def __init__(
        self, bottleneck: int = 256, hidden: int = 1024, trade_off: float = 1.0, gamma: float = 10.0
    ) -> None:
        super().__init__()
        if int(bottleneck) < 1 or int(hidden) < 1:
            raise ValueError("bottleneck and hidden must be >= 1")
        if float(trade_off) < 0 or float(gamma) <= 0:
            raise ValueError("trade_off must be >= 0 and gamma > 0")
        self.bottleneck, self.hidden = int(bottleneck), int(hidden)
        self.trade_off, self.gamma = float(trade_off), float(gamma)
        self.discriminator: nn.Module | None = None

    def configure(self, head: dict[str, Any], strategy: dict[str, Any]) -> tuple[dict, dict]:
        head = dict(head)
        if head.get("name") == "linear":
            say(
                f"adapt={self.name}: the head is bottleneck ({self.bottleneck}) -> linear; the "
                "domain similarity loss sees the bottleneck features"
            )
            head = {"name": "bottleneck", "dim": self.bottleneck, "dropout": head.get("dropout", 0)}
        strategy = dict(strategy)
        if strategy.get("head_fit") == "lbfgs":
            strategy["head_fit"] = (
                "sgd"  # a bottleneck head is not a convex problem: SGD/Adam steps
            )
        return head, strategy

    def bind(self, module: Any) -> None:
        super().bind(module)
        if not isinstance(module.head, nn.Sequential) or len(module.head) < 2:
            raise TLError(
                f"adapt={self.name} needs a head with a hidden layer (head=linear becomes a bottleneck head; "
                f"head={module.hparams['head'].get('name')} has none)"
            )
        dim = module.head[-1].in_features
        self.discriminator = DomainDiscriminator(dim, self.hidden)

    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        assert self.discriminator is not None
        return [
            {
                "params": list(self.discriminator.parameters()),
                "lr": base_lr,
                "weight_decay": weight_decay,
                "name": "domain_discriminator",
                "unfreeze_epoch": 0,
                "lr_mult": 1.0,
            }
        ]

    def on_fit_start(self, module: Any) -> None:
        self.discriminator.to(module.device)
        self.discriminator.train()

    def training_step(self, module: Any, batch: Any) -> torch.Tensor:
        (xs, ys), xt = batch["source"], batch["target"]
        fs, ft = module.features(xs), module.features(xt)
        ns = fs.shape[0]
        z = embed(module.head, torch.cat([fs, ft]))  # one batch: the bottleneck's BN sees both
        out = classify(module.head, z[:ns])
        cls = module.loss(out, ys, "train")
        coeff = dann_coefficient(progress(module), self.gamma)
        self.discriminator.train()
        d = self.discriminator(grad_reverse(z, coeff)).squeeze(1)
        dy = torch.cat([torch.ones(ns, device=d.device), torch.zeros(len(d) - ns, device=d.device)])
        dloss = F.binary_cross_entropy_with_logits(d, dy)
        loss = cls + self.trade_off * dloss
        log = {"on_step": False, "on_epoch": True, "batch_size": ns}
        module.log("train/loss", cls, prog_bar=True, **log)
        module.log("train/domain_loss", dloss, **log)
        module.log("train/domain_acc", ((d > 0).float() == dy).float().mean(), **log)
        module.log("train/grl_coeff", coeff, **log)
        module.update_metrics(out, ys, "train")
        return loss

    def describe(self) -> str:
        return f"DANN (bottleneck {self.bottleneck}, discriminator {self.hidden}x2, trade-off {self.trade_off:g})"


@ADAPTERS.register("self_training")
class SelfTraining(Adapter):
    """Pseudo-labels on the target: source cross-entropy + ``weight`` x cross-entropy on the target
    predictions whose confidence is at least ``threshold`` (FixMatch's rule), plus optionally
    ``im_weight`` x SHOT's information maximisation (mean entropy minus the entropy of the mean
    prediction). Pseudo-labels come from the model being trained, recomputed every step.

    With a linear head fitted by L-BFGS on a frozen backbone (the default), the head is instead
    refitted ``rounds`` times by L-BFGS on the source plus the confident target pseudo-labels of
    the previous fit, and the epochs take no steps (``weight`` and ``im_weight`` are SGD options)."""

    trains = True
    needs_target = True

    def __init__(
        self, threshold: float = 0.95, weight: float = 1.0, im_weight: float = 0.0, rounds: int = 3
    ) -> None:
        super().__init__()
        if int(rounds) < 1:
            raise ValueError(f"rounds={rounds} must be >= 1")
        self.rounds = int(rounds)
        #: the head was refitted by L-BFGS on source + pseudo-labels: the epochs take no steps
        self.refit = False
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold={threshold} must be in (0, 1]")
        if float(weight) < 0 or float(im_weight) < 0:
            raise ValueError("weight and im_weight must be >= 0")
        self.threshold, self.weight, self.im_weight = (
            float(threshold),
            float(weight),
            float(im_weight),
        )

    def on_fit_start(self, module: Any) -> None:
        if module.head_converged:
            # a linear head fitted by L-BFGS on frozen features: self-training as convex refits
            # (source + confident target pseudo-labels, `rounds` times); no SGD steps, which
            # would only move the head off its optimum (measured: -3 points on COIL)
            self.refit = True
            if module.trainer.ckpt_path is None:
                self._refit_rounds(module)
            return
        module.head_converged = False  # SGD/Adam steps on source + pseudo-labelled target batches

    def _refit_rounds(self, module: Any) -> None:
        from tl_cli.transfer.probe import fit_probe

        feats, labels = module.train_features()
        tf = _target_features(module)
        linear = module.head[-1]
        for r in range(self.rounds):
            with torch.no_grad():
                prob = module.head(torch.as_tensor(tf, device=linear.weight.device)).softmax(1)
            conf, pseudo = (t.cpu().numpy() for t in prob.max(1))
            keep = conf >= self.threshold
            fit = fit_probe(  # on what the head's last layer reads (head.norm), scaled as the task
                module.head_input(np.concatenate([feats, tf[keep]])),
                np.concatenate([labels, pseudo[keep]]),
                module.num_outputs,
                scale=getattr(module.strategy, "head_scale", "dim"),
            )
            with torch.no_grad():
                linear.weight.copy_(fit.weight.to(linear.weight))
                linear.bias.copy_(fit.bias.to(linear.bias))
            say(
                f"[bold]self-training[/] round {r + 1}/{self.rounds}: {int(keep.sum())}/{len(tf)} "
                f"target pseudo-labels at confidence >= {self.threshold:g}; refit {fit.describe()}"
            )
        module.head_fit_info = {**(module.head_fit_info or {}), "self_training_rounds": self.rounds}

    def training_step(self, module: Any, batch: Any) -> torch.Tensor | None:
        (xs, ys), xt = batch["source"], batch["target"]
        if self.refit:  # the head is at its optimum: log the source metrics, take no step
            return module.score_without_step(xs, ys)
        fs, ft = module.features(xs), module.features(xt)
        ns = fs.shape[0]
        out = module.head(torch.cat([fs, ft]))
        out_s, out_t = out[:ns], out[ns:]
        cls = module.loss(out_s, ys, "train")
        prob = out_t.detach().float().softmax(1)
        conf, pseudo = prob.max(1)
        mask = (conf >= self.threshold).float()
        st = (F.cross_entropy(out_t, pseudo, reduction="none") * mask).mean()
        loss = cls + self.weight * st
        if self.im_weight:
            p = out_t.float().softmax(1)
            ent = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
            pm = p.mean(0)
            div = -(pm * pm.clamp_min(1e-8).log()).sum()
            loss = loss + self.im_weight * (ent - div)
        log = {"on_step": False, "on_epoch": True, "batch_size": ns}
        module.log("train/loss", cls, prog_bar=True, **log)
        module.log("train/pseudo_loss", st, **log)
        module.log("train/pseudo_fraction", mask.mean(), **log)
        module.update_metrics(out_s, ys, "train")
        return loss

    def describe(self) -> str:
        im = f", information maximisation x{self.im_weight:g}" if self.im_weight else ""
        im += f", {self.rounds} L-BFGS refit rounds with an L-BFGS head"
        return f"self-training (pseudo-labels at confidence >= {self.threshold:g}, weight {self.weight:g}{im})"


def _target_features(module: Any) -> np.ndarray:
    """The target's backbone features: from the feature cache, else one eval pass."""
    data = module.trainer.datamodule
    cached_t = getattr(data, "splits", {}).get("target")
    if cached_t and hasattr(cached_t[0], "feats"):
        return np.asarray(cached_t[0].feats, dtype=np.float32)
    dm = getattr(data, "dm", data)
    return _features(module, None, dm, "target", np.arange(len(dm.splits["target"])), module.device)


def progress(module: Any) -> float:
    total = max(1, int(module.trainer.estimated_stepping_batches))
    return module.global_step / total


# --------------------------------------------------------------------------- the target domain


def scan_target(dataset_cfg: dict[str, Any], dm: Any) -> tuple[list[tuple[Any, int]], bool]:
    """The target's items ``(input, label)`` with labels as source class indices (-1: unlabelled),
    read by the source's own reader (``dm.read_target``: class folders or a flat folder of images
    or clips; a table, lines or folders of texts), and whether the target has labels."""
    raw = dataset_cfg.get("target_root")
    root = Path(os.path.expanduser(str(raw)))
    if not root.exists():
        raise TLError(f"dataset.target_root={root} does not exist")
    try:
        found = dm.read_target(root)
    except TLError as e:
        msg = str(e)
        raise TLError(msg if "target_root" in msg else f"dataset.target_root: {msg}") from None
    named = [c for _, c in found if c is not None]
    if named and len(named) != len(found):  # a reader labels all of a target or none of it
        raise TLError(f"dataset.target_root={root}: some inputs have labels and some do not")
    unknown = sorted({c for c in named if c not in dm.class_names})
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise TLError(
            f"dataset.target_root={root}: label(s) {shown} are not classes of the source "
            f"({', '.join(dm.class_names[:5])}{' ...' if len(dm.class_names) > 5 else ''}); target "
            "labels must use the source's class names (or give the target without labels)"
        )
    idx = {c: i for i, c in enumerate(dm.class_names)}
    return [(item, idx[c] if c is not None else -1) for item, c in found], bool(named)


def setup(cfg: Any, dm: Any) -> Adapter | None:
    """The run's adapter (None: no target and adapt=none); scans the target into
    ``dm.splits["target"]``."""
    acfg = plain(cfg.get("adapt")) or {"name": "none"}
    adapter = ADAPTERS.build(acfg)
    dcfg = plain(cfg.dataset) or {}
    if not dcfg.get("target_root"):
        if adapter.needs_target:
            raise TLError(
                f"adapt={adapter.name} needs the target domain: pass dataset.target_root=DIR"
            )
        return None
    items, labelled = scan_target(dcfg, dm)
    if not items:
        raise TLError(f"dataset.target_root={dcfg['target_root']}: no inputs found")
    dm.splits["target"] = items
    adapter.target_labelled = labelled
    if not labelled:
        say(
            f"target: {len(items)} unlabelled inputs: target accuracy cannot be reported; watch "
            "source/val/acc and target/entropy"
        )
    else:
        say(
            f"target: {len(items)} labelled inputs: labels are used only to score the target, "
            "never for training"
        )
    say(f"[bold]adapt[/] {adapter.describe()}")
    return adapter


# --------------------------------------------------------------------------- data


class _NoLabels(torch.utils.data.Dataset):
    """A dataset's inputs without their labels: what the task sees of the target in training."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        return self.ds[i][0]


class AdaptData(pl.LightningDataModule):
    """The run's data (a feature cache or a data module) plus target batches in training:
    train batches are ``{"source": (x, y), "target": x}`` (target labels dropped)."""

    def __init__(self, inner: Any, dm: Any, adapter: Adapter) -> None:
        super().__init__()
        self.inner = inner
        self.dm = dm
        self.adapter = adapter

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def setup(self, stage: str | None = None) -> None:
        self.inner.trainer = self.trainer
        self.inner.setup(stage)

    def _target_loader(self) -> DataLoader:
        from tl_cli.data.base import EpochShuffle

        cached_target = getattr(self.inner, "splits", {}).get("target")
        if self.inner is not self.dm and cached_target:  # FeatureDataModule
            ds: Any = cached_target[0]
            workers, collate = 0, None
        else:
            ds = self.dm.dataset("target", train_aug=True)
            workers, collate = self.dm.num_workers, self.dm.collate_fn(None)
        n = len(ds)
        bs = self.dm.batch_size
        # its own shuffle (a pure function of seed and epoch, like the source's), another stream
        sampler = EpochShuffle(n, seed=torch.initial_seed() + 7919)
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.current_epoch)
        base = collate or torch.utils.data.default_collate
        return DataLoader(
            _NoLabels(ds),
            batch_size=bs,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=(lambda b: base([(x, 0) for x in b])[0]) if collate else None,
            drop_last=n > bs and n % bs == 1,
        )

    def train_dataloader(self) -> Any:
        from pytorch_lightning.utilities.combined_loader import CombinedLoader

        return CombinedLoader(
            {"source": self.inner.train_dataloader(), "target": self._target_loader()},
            mode="max_size_cycle",
        )

    def val_dataloader(self) -> Any:
        return self.inner.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.inner.test_dataloader()


def wrap(data: Any, dm: Any, adapter: Adapter | None) -> Any:
    """The data the trainer fits: target batches alongside the source's when the adapter trains."""
    if adapter is None or not adapter.trains:
        return data
    return AdaptData(data, dm, adapter)


# --------------------------------------------------------------------------- after training


def _subset(n: int, k: int, seed: int = 0) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def _features(module: Any, data: Any, dm: Any, split: str, idx: np.ndarray, device) -> np.ndarray:
    """Backbone features of ``split`` rows ``idx``: from the feature cache, else one eval pass."""
    from tl_cli.data.features import extract

    cached = getattr(data, "splits", {}).get(split)
    if cached and hasattr(cached[0], "feats"):
        return np.asarray(cached[0].feats[idx], dtype=np.float32)
    ds = Subset(dm.dataset(split, train_aug=False), idx.tolist())
    was = module.backbone.training
    module.backbone.eval()
    try:
        f, _ = extract(module.backbone, ds, dm, device, f"{split} features")
    finally:
        module.backbone.train(was)
    return f


@torch.no_grad()
def _head(module: Any, feats: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
    """(logits, the features the classifier layer sees) of ``feats`` through the head."""
    module.head.eval()
    x = torch.as_tensor(feats, device=device)
    z = embed(module.head, x)
    return classify(module.head, z).float().cpu().numpy(), z.float().cpu().numpy()


def finish(
    adapter: Adapter,
    module: Any,
    dm: Any,
    data: Any,
    trainer: Any,
    best_path: str | None,
    out: Path,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """Score the target with the best checkpoint (after AdaBN, if chosen), draw domains.png,
    and return the metrics to add (``source/val/acc``, ``target/...``)."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    from tl_cli.core.checkpoint import read_checkpoint

    if best_path and Path(best_path).exists():
        module.load_state_dict(read_checkpoint(best_path)["state_dict"], strict=True)
    device = trainer.strategy.root_device
    module.to(device).eval()
    target = dm.splits["target"]
    labels = np.asarray([y for _, y in target], dtype=np.int64)
    n_t = len(target)
    all_t = np.arange(n_t)
    src_idx = _subset(len(dm.splits["train"]), PLOT_POINTS)
    tgt_idx = _subset(n_t, PLOT_POINTS)
    src_before = _features(module, data, dm, "train", src_idx, device)
    tgt_before = _features(module, data, dm, "target", all_t, device)
    _, z_src_before = _head(module, src_before, device)
    adapted = adapter.after_fit(module, dm, device, tgt_before)
    if adapted is not None:
        tgt_after = adapted
        if best_path and trainer.is_global_zero:
            _store_buffers(module, best_path)
            say(f"[bold]{adapter.name}[/] {best_path} carries the target's statistics")
    else:
        tgt_after = tgt_before
    logits, z_t = _head(module, tgt_after, device)
    z_src = z_src_before  # the source as the classifier saw it in training
    p = torch.softmax(torch.as_tensor(logits), 1)
    ent = float((-(p * p.clamp_min(1e-12).log()).sum(1)).mean() / math.log(p.shape[1]))
    res: dict[str, Any] = {
        "adapt": adapter.name,
        "source/val/acc": metrics.get("val/acc"),
        "target_size": n_t,
        "target_labelled": bool(getattr(adapter, "target_labelled", False)),
        # mean prediction entropy on the target, / log(classes): 0 = confident, 1 = uniform
        "target/entropy": round(ent, 6),
        "target/pred_classes": int(len(np.unique(p.argmax(1).numpy()))),
    }
    if res["target_labelled"]:
        y = torch.as_tensor(labels)
        lt = torch.as_tensor(logits)
        k = module.num_outputs
        res["target/acc"] = float(multiclass_accuracy(lt, y, k, average="micro"))
        res["target/macro_f1"] = float(multiclass_f1_score(lt, y, k, average="macro"))
    if trainer.is_global_zero:
        from tl_cli.transfer.domains import plot_domains

        src_labels = np.asarray([y for _, y in dm.splits["train"]])[src_idx]
        try:
            plot_domains(
                out / "domains.png",
                before=(src_before, tgt_before[tgt_idx]),
                after=(z_src, z_t[tgt_idx]) if (adapter.name != "none") else None,
                src_labels=src_labels,
                tgt_labels=labels[tgt_idx],
                title=f"adapt={adapter.name}",
                after_title=_after_title(adapter, module),
                class_names=list(module.class_names),
            )
        except Exception as e:  # a plot never fails a finished run
            warn(f"domains.png not written: {type(e).__name__}: {e}")
        try:
            adapter.plots(module, out, src_before, tgt_before[tgt_idx], src_labels, labels[tgt_idx])
        except Exception as e:  # a plot never fails a finished run
            warn(f"{adapter.name} plots not written: {type(e).__name__}: {e}")
    module.cpu()
    return res


def _after_title(adapter: Adapter, module: Any) -> str:
    if adapter.name == "adabn":
        return "after AdaBN: features normalised with each domain's statistics"
    if isinstance(module.head, nn.Sequential) and len(module.head) > 1:
        return f"after {adapter.name}: bottleneck features"
    return f"after {adapter.name}: backbone features (the head adapted)"


def _store_buffers(module: Any, path: str) -> None:
    """Write the module's BatchNorm buffers (AdaBN's statistics) into the checkpoint at ``path``."""
    from tl_cli.core.outputs import atomic_path

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    for m_name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for b_name, buf in m.named_buffers(recurse=False):
                key = f"{m_name}.{b_name}"
                if key in sd:
                    sd[key] = buf.detach().cpu().clone()
    ckpt.setdefault("tl", {})["adapt"] = "adabn"
    with atomic_path(Path(path)) as tmp:
        torch.save(ckpt, tmp)
