"""`tl train` / `tl finetune`: compose the run, fit, test the best checkpoint, write metrics.json."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tl_cli import gates as tl_gates
from tl_cli.backbones import count_params
from tl_cli.console import EpochLines, History, interactive, say, summary_table
from tl_cli.errors import TLError
from tl_cli.loggers import make_logger
from tl_cli.module import TransferModule
from tl_cli.outputs import claim_run_dir, release_run_dir, write_json
from tl_cli.report import train_report
from tl_cli.safety import (
    TrainingGuard,
    checkpoint_plugins,
    last_checkpoint_callback,
    read_untrusted_checkpoint,
    resume_command,
)
from tl_cli.safety import fit as safe_fit
from tl_cli.tuning import tune_lr

METRICS_SCHEMA_VERSION = 1


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def quiet_lightning() -> None:
    """Keep the console to what a user needs; everything still goes to the run's log file."""
    import logging

    for name in (
        "pytorch_lightning.utilities.rank_zero",
        "pytorch_lightning.accelerators.cuda",
        "lightning_fabric",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pat in (
        ".*does not have many workers.*",
        ".*The number of training batches.*",
        ".*LeafSpec.*",
        ".*`isinstance\\(treespec, LeafSpec\\)`.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*module\\(s\\) in eval mode at the start of training.*",
    ):
        warnings.filterwarnings("ignore", message=pat)


def _guard_output(out: Path, cfg: DictConfig) -> None:
    """Refuse a run dir holding an earlier run's outputs (unless overwrite or resuming from it); lock it."""
    # not created here: locked when training starts (TrainingGuard.on_fit_start), checked again then
    claim_run_dir(
        out,
        overwrite=bool(cfg.get("overwrite", False)),
        resume_from=cfg.get("ckpt_path"),
        create=False,
    )


def build(cfg: DictConfig) -> tuple[TransferModule, Any]:
    """The data module (scanned) and the model, from a composed config."""
    try:
        dm = instantiate(cfg.dataset, _convert_="all")
    except Exception as e:  # noqa: BLE001 - surface the constructor's own message
        cause = e.__cause__ or e
        if isinstance(cause, TLError):
            raise cause from None
        raise TLError(f"dataset: {str(cause).splitlines()[0]}") from None
    dm.prepare()
    module = TransferModule(
        backbone=_plain(cfg.backbone),
        head=_plain(cfg.head),
        strategy=_plain(cfg.strategy),
        optimizer=_plain(cfg.optimizer),
        scheduler=_plain(cfg.scheduler),
        class_names=dm.class_names,
        image_size=cfg.dataset.get("image_size"),
        label_smoothing=cfg.get("label_smoothing", 0.0),
    )
    module.dataset_config = _plain(cfg.dataset)
    dm.set_preprocessing(module.preprocessing)
    return module, dm


def run(cfg: DictConfig, callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Train from a composed config; returns the metrics written to metrics.json.

    Args:
        cfg: the composed train config.
        callbacks: extra Lightning callbacks (for programmatic use and tests).
    """
    quiet_lightning()
    out = Path(str(cfg.output_dir))
    _guard_output(out, cfg)
    gates = tl_gates.parse(
        cfg
    )  # fail_under.* / fail_over.*: a bad name or value fails before any work
    tl_gates.check_train_names(gates)
    logger = make_logger(cfg, out)  # the logger group; a missing package fails before any work
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        read_untrusted_checkpoint(
            ckpt_path
        )  # clear error for a missing/corrupt/untrusted file before any work
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    module, dm = build(cfg)
    if cfg.get("channels_last"):
        module = module.to(memory_format=torch.channels_last)
    say(
        f"[bold]data[/] {dm.describe()}\n"
        f"[bold]model[/] {module.backbone.name} ({module.backbone.source}, {count_params(module.backbone) / 1e6:.1f}M params, "
        f"{module.backbone.num_features} features) + {cfg.head.get('_target_', '').rsplit('.', 1)[-1]} head, "
        f"strategy {module.strategy.name}, input {module.preprocessing['input_size']}px"
    )

    data: Any = dm
    t_fit = time.time()
    trainer_extra: dict[str, Any] = {}
    strat = module.strategy
    if getattr(strat, "cache_features", False) and not strat.backbone_ever_trains:
        from tl_cli.features import FeatureDataModule

        # features are computed in setup(), inside fit: per rank under DDP, on the trainer's device
        data = FeatureDataModule(
            module.backbone, dm, cache_dir=strat.cache_dir, views=strat.cache_views
        )
        if strat.cache_views > 1:
            trainer_extra["reload_dataloaders_every_n_epochs"] = 1  # next augmented view each epoch
        if not strat.cache_views and dm.augment not in (None, "none"):
            say(
                "cached features use the eval transform (no augmentation); strategy.cache_views=K caches K augmented views"
            )

    history = History()
    ckpt_dir = out / "checkpoints"
    checkpoint_cb = pl.callbacks.ModelCheckpoint(
        dirpath=str(ckpt_dir),
        filename="best",
        monitor="val/acc",
        mode="max",
        save_last=False,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    guard = TrainingGuard(
        ckpt_dir / "last.ckpt"
    )  # NaN/inf stop, no bad checkpoint, last.ckpt on Ctrl-C
    # last.ckpt every epoch (save_last=True above would only refresh it when best.ckpt improves)
    callbacks = [
        history,
        guard,
        checkpoint_cb,
        last_checkpoint_callback(ckpt_dir),
        *(callbacks or []),
        *(instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values()),
    ]
    if interactive():
        callbacks.append(pl.callbacks.RichProgressBar(leave=False))
    else:
        callbacks.append(EpochLines(history))
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(out),
        enable_progress_bar=interactive(),
        plugins=checkpoint_plugins(),
        _convert_="all",
        **trainer_extra,
    )
    lr_find = tune_lr(cfg, module, data, out) if cfg.get("tune_lr") else None  # sets optimizer.lr
    # atomic checkpoint writes; Ctrl-C/SIGTERM -> one line naming the resume command (exit 130/143)
    safe_fit(
        trainer, guard, module, data, ckpt_path, resume_command(cfg, ckpt_dir / "last.ckpt", out)
    )
    fit_seconds = time.time() - t_fit

    metrics = collect_metrics(history, checkpoint_cb, trainer, fit_seconds)
    if dm.has_split("test"):
        res = trainer.test(
            module,
            datamodule=data,
            ckpt_path=checkpoint_cb.best_model_path or None,
            verbose=False,
            weights_only=True,
        )
        if res:
            metrics.update({k: float(v) for k, v in res[0].items()})
    metrics.update(
        {
            "schema_version": METRICS_SCHEMA_VERSION,
            "backbone": module.backbone.name,
            "strategy": module.strategy.name,
            "num_classes": dm.num_classes,
            "class_names": dm.class_names,
            "train_size": len(dm.splits["train"]),
            "val_size": len(dm.splits["val"]),
            "test_size": len(dm.splits.get("test", [])),
            "best_checkpoint": str(ckpt_dir / "best.ckpt"),
            # dataset.skip_corrupt=true: unreadable images left out of the run
            "skipped_corrupt": len(getattr(dm, "skipped_corrupt", [])),
            "skipped_corrupt_files": [b.path for b in getattr(dm, "skipped_corrupt", [])],
        }
    )
    if lr_find:
        metrics["lr_find"] = lr_find
    metrics["gates"] = [g.as_dict() for g in tl_gates.evaluate(gates, metrics, "train")]
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", metrics)  # strict JSON, written beside it and renamed
        train_report(out, cfg, metrics)  # curves.png + report.md
        release_run_dir(out)
        summary_table(
            f"tl {cfg.get('command', 'train')}: {out}",
            metrics,
            [
                "val/acc",
                "val/loss",
                "test/acc",
                "test/macro_f1",
                "test/loss",
                "best_epoch",
                "epochs",
                "fit_seconds",
            ],
        )
        say(
            f"val/acc {metrics['val/acc']:.4f} (best epoch {metrics['best_epoch']}), checkpoint {ckpt_dir / 'best.ckpt'}"
        )
        tl_gates.print_gates(gates)
    tl_gates.enforce(
        gates, str(out / "metrics.json")
    )  # exit 1 on a failed gate, after the outputs exist
    return metrics


def collect_metrics(
    history: History, ckpt: pl.callbacks.ModelCheckpoint, trainer: pl.Trainer, fit_seconds: float
) -> dict[str, Any]:
    rows = [r for r in history.epochs if "val/acc" in r]
    if not rows:
        raise TLError(
            "no validation epoch ran (check trainer.max_epochs and trainer.limit_val_batches)"
        )
    # ModelCheckpoint keeps the first epoch that reached the maximum; match it.
    best = max(rows, key=lambda r: (r["val/acc"], -r["epoch"]))
    return {
        "val/acc": best["val/acc"],
        "val/loss": best["val/loss"],
        "best_epoch": int(best["epoch"]) + 1,  # 1-based, as printed
        "epochs": len(history.epochs),
        "fit_seconds": round(fit_seconds, 2),
        "history": history.epochs,
    }
