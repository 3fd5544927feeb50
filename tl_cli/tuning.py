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

from tl_cli.console import interactive, say
from tl_cli.errors import TLError


def tune_lr(cfg: DictConfig, module: pl.LightningModule, data: Any, out: Path) -> dict[str, Any]:
    """Run the range test, save ``lr_find.png``, and set ``optimizer.lr`` to the suggestion.

    Returns what metrics.json records under ``lr_find``: the suggestion (None when the loss curve
    had too few points), the LR the run trains with, the configured LR and the plot's file name.
    """
    from pytorch_lightning.tuner import Tuner

    from tl_cli.report import plot_lr_find

    opts = dict(cfg.get("lr_finder") or {})
    min_lr, max_lr = float(opts.get("min_lr", 1e-6)), float(opts.get("max_lr", 1.0))
    num_training = int(opts.get("num_training", 100))
    if not 0 < min_lr < max_lr:
        raise TLError(
            f"lr_finder.min_lr={min_lr:g} and lr_finder.max_lr={max_lr:g}: need 0 < min_lr < max_lr"
        )
    if num_training < 2:
        raise TLError(f"lr_finder.num_training={num_training} must be at least 2")
    work = out / "lr_find"
    work.mkdir(parents=True, exist_ok=True)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        max_epochs=-1,
        max_steps=num_training,
        default_root_dir=str(work),
        _convert_="all",
    )
    configured = float(module.hparams.optimizer.get("lr", 1e-3))
    import functools

    from pytorch_lightning.tuner import lr_finder as pl_lr_finder

    bar = getattr(pl_lr_finder, "tqdm", None)  # the finder draws a tqdm bar; none in logs/CI
    if bar is not None and not interactive():
        pl_lr_finder.tqdm = functools.partial(bar, disable=True)
    try:
        finder = Tuner(trainer).lr_find(
            module,
            datamodule=data,
            min_lr=min_lr,
            max_lr=max_lr,
            num_training=num_training,
            mode=str(opts.get("mode", "exponential")),
            update_attr=False,
        )
    finally:
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
    lr = float(suggestion) if suggestion is not None else configured
    module.hparams.optimizer["lr"] = lr  # configure_optimizers reads it; the checkpoint records it
    plot = plot_lr_find(lrs, losses, out / "lr_find.png", suggestion)
    if suggestion is None:
        say(
            f"[bold]lr finder[/] no suggestion ({len(losses)} points); keeping optimizer.lr={configured:g}; plot {escape(str(plot))}"
        )
    else:
        say(
            f"[bold]lr finder[/] suggests {lr:.3g} (configured {configured:g}); training with it; plot {escape(str(plot))}"
        )
    return {
        "suggestion": float(suggestion) if suggestion is not None else None,
        "lr": lr,
        "configured_lr": configured,
        "points": len(losses),
        "plot": plot.name,
    }
