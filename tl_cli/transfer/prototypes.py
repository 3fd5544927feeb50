"""Few-shot classification on frozen features: SimpleShot prototypes (``strategy=prototypes``).

``tl train strategy=prototypes dataset.root=DIR``: a nearest-prototype classifier (SimpleShot,
Wang et al. 2019, "SimpleShot: Revisiting Nearest-Neighbor Classification for Few-Shot
Learning"): backbone features are centred on the mean training feature, L2-normalised, and each
class is the mean of its normalised features. One pass over the data (the feature cache), no
optimizer steps, works from one item per class. The classifier is the registered head
``prototype`` (:class:`PrototypeHead`), so the checkpoint is an ordinary tl checkpoint.

Nearest prototype by Euclidean distance on normalised features is a linear classifier:
``-|z - p|^2 / 2 = z.p - |p|^2 / 2 - 1/2``, so the head is ``Linear(weight=P, bias=-|p|^2/2)``
after the centring and normalisation, times a scale (the softmax temperature).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl_cli.core.console import say
from tl_cli.core.errors import TLError
from tl_cli.transfer.heads import HEADS
from tl_cli.transfer.strategies import STRATEGIES, FeatureExtraction

#: the softmax scale when leave-one-out cannot fit one (a class with one item)
DEFAULT_SCALE = 10.0


#: scales tried when fitting the temperature by leave-one-out cross-entropy
SCALE_GRID = np.geomspace(1.0, 100.0, 41)


@HEADS.register("prototype")
class PrototypeHead(nn.Module):
    """Nearest class prototype on centred, L2-normalised features, as a linear layer.

    ``logits = scale * (normalize(f - center) @ P.T - |p|^2 / 2)``: the class with the highest
    logit is the nearest prototype (Euclidean). ``center``, the prototypes ``P`` (``linear.weight``)
    and ``scale`` are tensors in the state dict; nothing else is stored.

    Args:
        scale: initial softmax scale (the prototypes strategy fits it by leave-one-out when it can).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = DEFAULT_SCALE) -> None:
        super().__init__()
        if not float(scale) > 0:
            raise ValueError(f"scale={scale} must be > 0")
        self.register_buffer("center", torch.zeros(in_features))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = F.normalize(f - self.center, dim=-1)
        return self.scale * self.linear(z)

    @torch.no_grad()
    def set_prototypes(self, center: torch.Tensor, protos: torch.Tensor, scale: float) -> None:
        self.center.copy_(center.to(self.center))
        self.linear.weight.copy_(protos.to(self.linear.weight))
        self.linear.bias.copy_((-0.5 * (protos * protos).sum(1)).to(self.linear.bias))
        self.scale.fill_(float(scale))


def normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def prototypes(
    feats: np.ndarray, labels: np.ndarray, num_classes: int, center: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(center, prototypes): the mean feature (or ``center``), and per class the mean of the
    centred, L2-normalised features. A class without items gets a zero prototype."""
    feats = np.asarray(feats, dtype=np.float64)
    c = feats.mean(0) if center is None else np.asarray(center, dtype=np.float64)
    z = normalize(feats - c)
    protos = np.zeros((num_classes, feats.shape[1]))
    np.add.at(protos, labels, z)
    counts = np.bincount(labels, minlength=num_classes)
    protos /= np.maximum(counts, 1)[:, None]
    return c, protos


def proto_logits(z: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """Logits at scale 1 of normalised features ``z``: ``z.p - |p|^2 / 2``."""
    return z @ protos.T - 0.5 * (protos * protos).sum(1)


def leave_one_out(
    feats: np.ndarray, labels: np.ndarray, num_classes: int, center: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Logits (scale 1) of each item against prototypes built without it, and the items' labels,
    for items whose class has 2 or more items (the centre stays: it uses no labels). None if none."""
    c, protos = prototypes(feats, labels, num_classes, center)
    z = normalize(np.asarray(feats, dtype=np.float64) - c)
    counts = np.bincount(labels, minlength=num_classes)
    keep = counts[labels] >= 2
    if not keep.any():
        return None
    z, y = z[keep], labels[keep]
    logits = proto_logits(z, protos)
    n = counts[y][:, None]
    own = (protos[y] * n - z) / (n - 1)  # the item's class prototype without the item
    logits[np.arange(len(y)), y] = (z * own).sum(1) - 0.5 * (own * own).sum(1)
    return logits, y


def fit_scale(logits: np.ndarray, y: np.ndarray) -> float:
    """The softmax scale with the lowest cross-entropy on (leave-one-out) logits."""
    best, best_s = math.inf, DEFAULT_SCALE
    for s in SCALE_GRID:
        a = s * logits
        a = a - a.max(1, keepdims=True)
        nll = float(np.mean(np.log(np.exp(a).sum(1)) - a[np.arange(len(y)), y]))
        if nll < best:
            best, best_s = nll, float(s)
    return best_s


def after_prepare(dm: Any) -> bool:
    """Drop empty splits; without a val split, validate on the training items. True if so."""
    dm.splits = {k: v for k, v in dm.splits.items() if v or k == "train"}
    if dm.splits.get("val"):
        return False
    dm.splits["val"] = list(dm.splits["train"])
    layout = re.sub(r",?\s*val( \+ test)? carved( from train)?", "", dm.layout or "")
    dm.layout = f"{layout}, no carve: val = train" if layout else "no carve: val = train"
    return True


@STRATEGIES.register("prototypes")
class Prototypes(FeatureExtraction):
    """SimpleShot: a frozen backbone, and the ``prototype`` head set from class means in one pass.

    No validation carve (every labelled item builds the prototypes; without a val split, val is
    the training items and the leave-one-out accuracy is the honest estimate). The softmax scale
    is fitted by leave-one-out cross-entropy when every class has 2 or more items.

    Args:
        cache_dir: keep the features on disk (as ``strategy=feature_extraction``).
        fit_scale: fit the softmax scale by leave-one-out (else keep ``head.scale``).
        center: subtract the mean training feature before normalising (SimpleShot's CL2N).
            Off by default: SimpleShot centres on the mean of a large base-class set; centring on
            a few-shot training set's own mean cost 1-4 points in every setting measured
            (docs/fewshot.md). The head holds the centre either way (zeros when off).
    """

    name = "prototypes"

    def __init__(
        self, cache_dir: str | None = None, fit_scale: bool = True, center: bool = False
    ) -> None:
        super().__init__(cache_features=True, cache_dir=cache_dir, head_fit="sgd")
        self.head_fit = "prototypes"
        self.fit_scale = bool(fit_scale)
        self.center = bool(center)

    @staticmethod
    def before_scan(dm: Any) -> None:
        """No validation carve: every item is a support item."""
        dm.carve = False

    @staticmethod
    def after_scan(dm: Any) -> None:
        """Without a val split, validation runs on the train items (said in the summary)."""
        dm.val_is_train = after_prepare(dm)

    def fit_head(self, module: Any) -> None:
        """Set the prototype head from the training features (the feature cache)."""
        if not isinstance(module.head, PrototypeHead):
            raise TLError(
                f"strategy=prototypes sets a head=prototype; head={module.hparams.head.get('name')} "
                "cannot hold prototypes (drop head=...)"
            )
        t0 = time.time()
        feats, labels = module.train_features()
        labels = np.asarray(labels, dtype=np.int64)
        n = module.num_outputs
        counts = np.bincount(labels, minlength=n)
        missing = [module.class_names[i] for i in np.flatnonzero(counts == 0)]
        if missing:
            raise TLError(f"class {missing[0]!r} has no training items: no prototype")
        c0 = None if self.center else np.zeros(np.asarray(feats).shape[1])
        center, protos = prototypes(feats, labels, n, c0)
        loo = leave_one_out(feats, labels, n, center)
        scale = float(module.head.scale)
        loo_acc = None
        if loo is not None:
            loo_acc = float((loo[0].argmax(1) == loo[1]).mean())
            if self.fit_scale:
                scale = fit_scale(*loo)
        module.head.set_prototypes(torch.from_numpy(center), torch.from_numpy(protos), scale)
        module.head_converged = True  # the backbone never trains: epochs take no steps
        dm = getattr(module.trainer, "datamodule", None)
        images = getattr(dm, "images", dm)
        val_is_train = bool(getattr(images, "val_is_train", False))
        module.head_fit_info = {
            "method": "prototypes",
            "items": int(len(labels)),
            "per_class_min": int(counts.min()),
            "loo_acc": loo_acc,
            "scale": round(scale, 4),
            "center": self.center,
            "val_is_train": val_is_train,
            "seconds": round(time.time() - t0, 2),
            "summary": f"head = {n} class prototypes (SimpleShot, {len(labels)} items)",
        }
        est = (
            f"leave-one-out accuracy {loo_acc:.4f}"
            if loo_acc is not None
            else "no leave-one-out estimate (a class has 1 item)"
        )
        say(
            f"[bold]head[/] {n} prototypes from {len(labels)} items ("
            f"{'centred, ' if self.center else ''}L2-normalised class means; scale {scale:.3g}); {est}"
        )
        if val_is_train:
            say(
                "no val split: val/acc is measured on the training items (prototypes are not "
                "selected on it); the leave-one-out accuracy above is the honest estimate"
            )
