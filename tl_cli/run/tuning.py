"""`tl train tune_lr=true`: Lightning's learning-rate range test before fitting.

The finder runs on a throwaway Trainer (no callbacks, no logger, no checkpoints), so it leaves no
epoch in the run's history and no checkpoint behind; Lightning restores the weights afterwards.
It trains on whatever the real fit uses: cached features for feature extraction, images otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.markup import escape

from tl_cli.core.console import interactive, say
from tl_cli.core.errors import TLError

#: the curve must fall by at least this share of its starting loss to have a "falling part"
MIN_DROP = 0.05


def falling_slope(lrs: list[float], losses: list[float], suggestion: float) -> str | None:
    """None when `suggestion` lies on the falling part of the loss curve, else why not.

    Falling part: the loss drops overall (by MIN_DROP of its start), the suggestion comes before
    the minimum, the loss there is already below the start, and the curve still goes down around
    it (smoothed over a few points). Lightning's steepest-gradient pick can land on a flat stretch
    or past the minimum, where training diverges or never moves (a run ending at chance).
    """
    n = len(losses)
    vals = [float(v) for v in losses]
    if n < 4 or not all(math.isfinite(v) for v in vals[: max(1, n // 2)]):
        return f"only {n} usable points on the loss curve"
    finite = [i for i in range(n) if math.isfinite(vals[i])]
    i_min = min(finite, key=vals.__getitem__)
    start, low = vals[0], vals[i_min]
    if start - low < MIN_DROP * abs(start):
        return (
            f"the loss curve is flat (falls {start - low:.3g} from {start:.3g}, under "
            f"{MIN_DROP:.0%}): no falling part to pick from"
        )
    i_s = min(range(n), key=lambda i: abs(math.log(lrs[i]) - math.log(suggestion)))
    if i_s >= i_min:
        return f"it is at or past the loss minimum (at lr {lrs[i_min]:.3g})"
    k = max(1, n // 20)
    a, b = max(0, i_s - k), min(i_min, i_s + k)
    if not vals[b] < vals[a] or not vals[i_s] < start:
        return "the loss is not falling there (flat stretch of the curve)"
    return None


def tune_lr(cfg: DictConfig, module: pl.LightningModule, data: Any, out: Path) -> dict[str, Any]:
    """Run the range test, save ``lr_find.png``, and set ``optimizer.lr`` to the suggestion.

    Returns what metrics.json records under ``lr_find``: the suggestion (None when the loss curve
    had too few points), the LR the run trains with, the configured LR and the plot's file name.
    """
    from tl_cli.run.report import plot_lr_find

    configured = float(module.hparams.optimizer.get("lr", 1e-3))
    if module.strategy.head_fit == "lbfgs" and module.can_cache_features():
        say(
            "[bold]lr finder[/] skipped: the head is fitted by L-BFGS, which has no learning rate "
            "(strategy.head_fit=sgd trains it with optimizer.lr)"
        )
        return {
            "suggestion": None,
            "lr": configured,
            "configured_lr": configured,
            "used": False,
            "reason": "strategy.head_fit=lbfgs",
        }
    opts = finder_options(cfg)
    lrs, losses, suggestion = run_finder(cfg, module, data, out, opts)
    reason = (
        falling_slope(lrs, losses, float(suggestion))
        if suggestion is not None
        else f"no suggestion ({len(losses)} points)"
    )
    lr = float(suggestion) if reason is None else configured
    module.hparams.optimizer["lr"] = lr  # configure_optimizers reads it; the checkpoint records it
    plot = plot_lr_find(lrs, losses, out / "lr_find.png", suggestion)
    where = f"plot {escape(str(plot))}"
    if suggestion is None:
        say(
            f"[bold]lr finder[/] no suggestion ({len(losses)} points); keeping optimizer.lr={configured:g}; {where}"
        )
    elif reason is not None:
        say(
            f"[bold]lr finder[/] suggests {float(suggestion):.3g} but not using it: {reason}; "
            f"keeping optimizer.lr={configured:g}; {where}"
        )
    else:
        say(
            f"[bold]lr finder[/] suggests {lr:.3g} (configured {configured:g}), on the falling part of the curve; training with it; {where}"
        )
    return {
        "suggestion": float(suggestion) if suggestion is not None else None,
        "lr": lr,
        "configured_lr": configured,
        "used": reason is None,
        "reason": reason,
        "points": len(losses),
        "plot": plot.name,
    }


def finder_options(cfg: DictConfig) -> dict[str, Any]:
    """``lr_finder.*`` checked: 0 < min_lr < max_lr, at least 2 steps."""
    opts = dict(cfg.get("lr_finder") or {})
    min_lr, max_lr = float(opts.get("min_lr", 1e-6)), float(opts.get("max_lr", 1.0))
    num_training = int(opts.get("num_training", 100))
    if not 0 < min_lr < max_lr:
        raise TLError(
            f"lr_finder.min_lr={min_lr:g} and lr_finder.max_lr={max_lr:g}: need 0 < min_lr < max_lr"
        )
    if num_training < 2:
        raise TLError(f"lr_finder.num_training={num_training} must be at least 2")
    mode = str(opts.get("mode", "exponential"))
    return {"min_lr": min_lr, "max_lr": max_lr, "num_training": num_training, "mode": mode}


def run_finder(
    cfg: DictConfig, module: pl.LightningModule, data: Any, out: Path, opts: dict[str, Any]
) -> tuple[list[float], list[float], float | None]:
    """Lightning's LR range test on a throwaway Trainer: (lrs, losses, its suggestion or None)."""
    import functools

    from pytorch_lightning.tuner import Tuner
    from pytorch_lightning.tuner import lr_finder as pl_lr_finder

    work = out / "lr_find"
    work.mkdir(parents=True, exist_ok=True)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        max_epochs=-1,
        max_steps=opts["num_training"],
        default_root_dir=str(work),
        _convert_="all",
    )
    bar = getattr(pl_lr_finder, "tqdm", None)  # the finder draws a tqdm bar; none in logs/CI
    if bar is not None and not interactive():
        pl_lr_finder.tqdm = functools.partial(bar, disable=True)
    module.skip_head_fit = True  # the finder's throwaway fit must not pay for a head fit
    # the finder trains the head fine-tuning trains (tl finetune on images: the raw-feature head,
    # not the head-only epoch's L2 head; TransferTask.refit_head_for_finetuning)
    norm = getattr(module.head, "norm", None)
    if getattr(module, "finetune_norm", None) is not None:
        module.head.norm = module.finetune_norm
    try:
        finder = Tuner(trainer).lr_find(module, datamodule=data, update_attr=False, **opts)
    finally:
        module.skip_head_fit = False
        if norm is not None:
            module.head.norm = norm
        if bar is not None:
            pl_lr_finder.tqdm = bar
    try:
        work.rmdir()  # empty unless Lightning left something behind
    except OSError:
        pass
    if finder is None:
        raise TLError(
            "tune_lr: the learning-rate finder did not run (trainer.fast_dev_run is set?)"
        )
    lrs, losses = list(finder.results.get("lr", [])), list(finder.results.get("loss", []))
    suggestion = finder.suggestion() if len(losses) > 3 else None
    if suggestion is not None and not math.isfinite(float(suggestion)):
        suggestion = None
    return lrs, losses, suggestion
