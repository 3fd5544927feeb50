"""A linear head fitted to convergence on frozen features (``strategy.head_fit=lbfgs``).

CLIP's linear-probe protocol (Radford et al., 2021, appendix A.3): multinomial logistic regression
on the frozen features, fitted full-batch by L-BFGS, with the L2 strength swept on a log grid.
Here the strength is chosen by stratified k-fold cross-validation on the *train* split only
(accuracy, ties broken by the lower log-loss; the same grid as scikit-learn's
``LogisticRegressionCV(Cs=10)``), so the validation split stays an honest check that picks the
checkpoint. The head is then refitted on the whole train split with the chosen strength.

Features are standardised for the fit (it conditions L-BFGS), and the scaling is folded back into
the weights, so the result is a plain ``nn.Linear`` on raw features: eval, predict and export do
not change. The optimum does not depend on the dataset size, the batch size or an LR: a head
fitted this way converges on 20 images as on 20,000.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tl_cli.core.errors import TLError

#: scikit-learn's LogisticRegressionCV default grid: C in logspace(-4, 4, 10)
C_GRID = tuple(float(c) for c in np.logspace(-4, 4, 10))


@dataclass
class ProbeFit:
    """The fitted head (on raw features) and how it was chosen."""

    weight: torch.Tensor  # (classes, dim)
    bias: torch.Tensor  # (classes,)
    C: float
    folds: int
    cv_acc: float | None
    cv_loss: float | None
    train_acc: float
    seconds: float
    grid: list[dict[str, float]] = field(default_factory=list)

    def describe(self) -> str:
        cv = (
            f"{self.folds}-fold CV acc {self.cv_acc:.3f}"
            if self.cv_acc is not None
            else "no CV (a class has < 2 training items)"
        )
        return f"L2 C={self.C:.3g} ({cv}), train acc {self.train_acc:.3f}, {self.seconds:.1f}s"


def _lbfgs(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    C: float,
    cw: torch.Tensor | None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 300,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin mean CE + ||W||^2 / (2 C n) (scikit-learn's objective divided by C n)."""
    n, d = x.shape
    w = torch.zeros(k, d, dtype=x.dtype) if init is None else init[0].clone()
    b = torch.zeros(k, dtype=x.dtype) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )
    lam = 1.0 / (C * n)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y, weight=cw) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Stratified fold ids: each class's (shuffled) indices dealt round-robin into k folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # spread the classes' remainders over the folds
    return [np.flatnonzero(fold == i) for i in range(k)]


def fit_probe(
    feats: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    num_classes: int,
    class_weight: np.ndarray | None = None,
    folds: int = 5,
    grid: tuple[float, ...] = C_GRID,
    seed: int = 0,
    scale: str = "dim",
) -> ProbeFit:
    """Fit a multinomial logistic-regression head, L2 strength chosen by k-fold CV on (feats, labels).

    ``scale``: how features are scaled for the fit: ``dim`` (each feature standardised) or
    ``global`` (centred, divided by one scale for all features).
    """
    # L-BFGS on a few hundred rows is many small, sequential ops: one thread. With several, a busy
    # machine made it 10x slower (threads spinning on each tiny matmul: 250 s vs 29 s measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_probe(feats, labels, num_classes, class_weight, folds, grid, seed, scale)
    finally:
        torch.set_num_threads(threads)


def _fit_probe(
    feats: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    num_classes: int,
    class_weight: np.ndarray | None,
    folds: int,
    grid: tuple[float, ...],
    seed: int,
    scale: str = "dim",
) -> ProbeFit:
    t0 = time.time()
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float32)
    y_np = np.asarray(labels).astype(np.int64)
    y = torch.as_tensor(y_np)
    bad = ~torch.isfinite(x).all(dim=1) if x.ndim == 2 else ~torch.isfinite(x)
    if bool(bad.any()):
        raise TLError(
            f"the backbone's features are NaN/inf for {int(bad.sum())} of {len(x)} training "
            "inputs, so no head can be fitted: its weights are not finite (init=RUN or "
            "backbone.weights_path from a diverged run?)"
        )
    if len(y_np) and (y_np.min() < 0 or y_np.max() >= num_classes):
        raise TLError(
            f"a training label is {int(y_np.min() if y_np.min() < 0 else y_np.max())}, outside "
            f"the {num_classes} classes (0-{num_classes - 1})"
        )
    mu = x.mean(0)
    sd = x.std(0, unbiased=False).clamp_min(1e-6)
    if scale == "global":
        sd = torch.full_like(
            sd, float(x.std(0, unbiased=False).pow(2).mean().sqrt().clamp_min(1e-6))
        )
    elif scale != "dim":
        raise ValueError(f"scale={scale!r} must be dim or global")
    z = (x - mu) / sd
    cw = torch.as_tensor(class_weight, dtype=torch.float32) if class_weight is not None else None
    counts = np.bincount(y_np, minlength=num_classes)
    k = int(min(folds, counts[counts > 0].min())) if len(y_np) else 0
    rows: list[dict[str, float]] = []
    best_C, cv_acc, cv_loss = 1.0, None, None
    if k >= 2 and len(grid) > 1:
        parts = _folds(y_np, k, seed)
        acc = np.zeros(len(grid))
        loss = np.zeros(len(grid))
        for held in parts:
            keep = np.setdiff1d(np.arange(len(y_np)), held)
            init = None
            for gi, C in enumerate(grid):  # strongest regularisation first, warm-started
                # 100 iterations settle the held-out accuracy; the final refit runs longer
                init = _lbfgs(z[keep], y[keep], num_classes, C, cw, init, max_iter=100)
                logits = z[held] @ init[0].T + init[1]
                acc[gi] += (logits.argmax(1) == y[held]).double().sum().item()
                loss[gi] += F.cross_entropy(logits, y[held], reduction="sum").item()
        acc /= len(y_np)
        loss /= len(y_np)
        rows = [
            {"C": C, "cv_acc": float(a), "cv_loss": float(lo)}
            for C, a, lo in zip(grid, acc, loss, strict=True)
        ]
        # best CV accuracy; ties (within one image) go to the lower CV log-loss
        top = acc.max() - 0.5 / len(y_np)
        cands = [i for i in range(len(grid)) if acc[i] >= top and math.isfinite(loss[i])]
        bi = min(cands, key=lambda i: loss[i]) if cands else int(acc.argmax())
        best_C, cv_acc, cv_loss = grid[bi], float(acc[bi]), float(loss[bi])
    elif len(grid) == 1:
        best_C = grid[0]
    w, b = _lbfgs(z, y, num_classes, best_C, cw)
    train_acc = float(((z @ w.T + b).argmax(1) == y).double().mean())
    # fold the standardisation into the weights: W z + b = (W / sd) x + (b - W mu / sd)
    w_raw = w / sd
    b_raw = b - (w_raw * mu).sum(1)
    return ProbeFit(
        weight=w_raw.float(),
        bias=b_raw.float(),
        C=best_C,
        folds=k if k >= 2 else 0,
        cv_acc=cv_acc,
        cv_loss=cv_loss,
        train_acc=train_acc,
        seconds=time.time() - t0,
        grid=rows,
    )


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency weights n / (k n_c), as scikit-learn's ``class_weight="balanced"``."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w
