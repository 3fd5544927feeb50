"""Training a task: build the data module and the task from a config, fit, test the best checkpoint.

`train` is what `tl train`, `tl finetune` and `tl distill` share (checkpoints only: no reports,
no gates); the commands write the outputs around it."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import tl_cli.tasks.components  # noqa: F401 - every registry complete
from tl_cli.core.checkpoint import read_checkpoint
from tl_cli.core.console import interactive, say, warn
from tl_cli.core.errors import TLError
from tl_cli.core.metrics import DEFAULT_MONITOR, METRICS_SCHEMA_VERSION
from tl_cli.core.outputs import claim_pending, claim_run_dir
from tl_cli.core.registry import plain
from tl_cli.data.base import DATASETS
from tl_cli.modalities.backbones import count_params
from tl_cli.run.callbacks import (
    BudgetLine,
    EpochBar,
    EpochLines,
    History,
    SteppedLRMonitor,
    UnfreezeLines,
)
from tl_cli.run.safety import (
    RunCheckpoint,
    TrainingGuard,
    checkpoint_plugins,
    last_checkpoint_callback,
    resume_command,
)
from tl_cli.run.safety import fit as safe_fit
from tl_cli.run.tuning import tune_lr
from tl_cli.run.validate import check_train_config
from tl_cli.tasks.base import TASKS, TransferTask
from tl_cli.transfer import adapt
from tl_cli.transfer.strategies import STRATEGIES


def task_class(cfg: DictConfig) -> type[TransferTask]:
    """The task class ``task.name`` names (its declared metric names, before anything is built)."""
    name = (plain(cfg.get("task")) or {}).get("name", "classification")
    return TASKS.get(name)


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
        # the L-BFGS head: epochs after the fit take no optimizer step on purpose
        ".*`training_step` returned `None`.*",
        # strategy.head_fit=lbfgs with a frozen backbone: epochs take no optimizer steps
        ".*Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`.*",
        ".*training_step returned `None`.*",
    ):
        warnings.filterwarnings("ignore", message=pat)


def stored_dataset_config(dataset: Any) -> dict[str, Any]:
    """The dataset config as the checkpoint keeps it: plain values, paths made absolute."""
    d = dict(plain(dataset))
    for key in ("root", "target_root", "unlabeled_root"):
        if d.get(key):
            d[key] = str(Path(os.path.expanduser(str(d[key]))).resolve())
    return d


def build(cfg: DictConfig) -> tuple[TransferTask, Any]:
    """The data module (scanned) and the task module, from a composed config, via the registries."""
    dm = DATASETS.build(cfg.dataset)
    strategy_cls = STRATEGIES.get(plain(cfg.strategy).get("name"))
    strategy_cls = getattr(strategy_cls, "func", strategy_cls)  # a functools.partial: its class
    strategy_cls.before_scan(dm)  # prototypes: no val carve
    dm.prepare()
    strategy_cls.after_scan(dm)
    # dataset.target_root + adapt=NAME: the target scanned into dm.splits["target"] (tl_cli.transfer.adapt)
    adapter = adapt.setup(cfg, dm)
    head, strategy = plain(cfg.head), plain(cfg.strategy)
    if adapter is not None:
        head, strategy = adapter.configure(head, strategy)
    task = plain(cfg.get("task")) or {"name": "classification"}
    module = TASKS.build(
        task,
        backbone=plain(cfg.backbone),
        head=head,
        strategy=strategy,
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        class_names=dm.class_names,
        preprocessing_overrides=dm.preprocessing_overrides(),
        label_smoothing=cfg.get("label_smoothing", 0.0),
    )
    module.dataset_config = stored_dataset_config(cfg.dataset)
    if adapter is not None:
        adapter.bind(module)
        module.adapter = adapter
    dm.set_preprocessing(module.preprocessing)  # the backbone owns preprocessing; data follows it
    balance = getattr(dm, "balance", None)
    module.balance = balance
    if balance == "weights":
        import numpy as np

        from tl_cli.transfer.probe import class_weights

        labels = np.asarray([y for _, y in dm.splits["train"]])
        module.class_weight = torch.as_tensor(
            class_weights(labels, dm.num_classes), dtype=torch.float32
        )
    return module, dm


def _on_cpu(trainer: pl.Trainer) -> bool:
    try:
        return trainer.strategy.root_device.type == "cpu"
    except Exception:  # noqa: BLE001 - a strategy without a root device yet: assume not
        return False


def _on_command_line(key: str) -> bool | None:
    """Whether the user's command line set ``key`` (None outside a Hydra run: tests compose)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = HydraConfig.get().overrides.task
    except Exception:  # noqa: BLE001
        return None
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in task)


def _sweep_cache() -> str | None:
    """In a multirun, an on-disk feature cache shared by the sweep's jobs (keyed and verified by
    tl_cli.data.features, so jobs with another backbone, preprocessing or data do not collide)."""
    from tl_cli.run.sweep import in_multirun

    if not in_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    return str(Path(str(HydraConfig.get().sweep.dir)) / "feature_cache")


#: classes more imbalanced than this (largest / smallest train class) get a warning
IMBALANCE_RATIO = 3.0
#: a validation split smaller than this is too small to pick a checkpoint reliably
MIN_VAL_IMAGES = 30


def data_warnings(dm: Any) -> list[str]:
    """One line per problem a practitioner would point out before training."""
    out = []
    noun = getattr(dm, "item_noun", "images")
    counts = [0] * dm.num_classes
    for _, y in dm.splits["train"]:
        if y >= 0:  # -1: an unlabelled input (tl distill dataset.unlabeled_root)
            counts[y] += 1
    lo = min(counts)
    hi = max(counts)
    if lo > 0 and hi / lo > IMBALANCE_RATIO and not getattr(dm, "balance", None):
        big, small = dm.class_names[counts.index(hi)], dm.class_names[counts.index(lo)]
        out.append(
            f"classes are imbalanced {hi / lo:.1f}:1 in train ({big!r} {hi} {noun}, {small!r} {lo}): "
            "dataset.balance=weights (class-weighted loss) or dataset.balance=sampler (balanced "
            "batches); metrics.json reports balanced accuracy and macro-F1"
        )
    n_val = len(dm.splits.get("val", []))
    if 0 < n_val < MIN_VAL_IMAGES and not getattr(dm, "val_is_train", False):
        out.append(
            f"the validation split has {n_val} {noun} (one = {100 / n_val:.1f} points of "
            f"val/acc): too few to pick a checkpoint reliably; add {getattr(dm, 'val_hint', 'a val split')} or raise "
            "dataset.val_fraction"
        )
    return out


def collapse_warnings(
    metrics: dict[str, Any], module: Any, num_classes: int, noun: str = "inputs"
) -> list[str]:
    """Predictions of the chosen checkpoint that all fall in one class (val at the best epoch, test)."""
    out = []
    best = next(
        (r for r in metrics.get("history", []) if int(r["epoch"]) + 1 == metrics.get("best_epoch")),
        {},
    )
    if best.get("val/pred_classes") == 1 and num_classes > 1:
        out.append(
            f"predictions collapsed: the best checkpoint (epoch {metrics['best_epoch']}) predicts one "
            f"class for every validation {noun[:-1] if noun.endswith('s') else noun}; the head has "
            f"not learned the task (try "
            f"{collapse_advice(module)})"
        )
    counts = getattr(module, "pred_counts", {}).get("test")
    if counts is not None and int((counts > 0).sum()) == 1 and int(counts.sum()) > 1:
        name = module.class_names[int(counts.argmax())]
        out.append(
            f"predictions collapsed: the best checkpoint predicts {name!r} for all "
            f"{int(counts.sum())} test {noun}"
        )
    return out


def collapse_advice(module: Any) -> str:
    """What to try after a collapse: only settings that differ from the run's own."""
    tips = []
    strat = getattr(module, "strategy", None)
    if getattr(strat, "head_fit", None) == "sgd" and module.supports_head_fit():
        tips.append("strategy.head_fit=lbfgs")
    if getattr(module, "policy", None) is not None and module.policy.backbone_ever_trains:
        tips.append("strategy=feature_extraction")
    if not getattr(module, "balance", None):
        tips.append("dataset.balance=weights")
    tips.append("more data")
    return ", ".join(tips[:-1]) + (" or " if len(tips) > 1 else "") + tips[-1]


def _cached_features(module: TransferTask, dm: Any) -> tuple[Any, dict[str, Any]]:
    """Wrap the data in a feature cache when the policy says the backbone never trains."""
    if not module.can_cache_features():
        # a task may still cache what never changes (tl distill: the teacher's logits)
        return module.uncached_data(dm), {}
    from tl_cli.data.features import FeatureDataModule

    strat = module.strategy
    views = int(getattr(strat, "cache_views", 0))
    # features are computed in setup(), inside fit: per rank under DDP, on the trainer's device
    # a task may cache more than the backbone's features (tl distill: the teacher's logits too)
    data = FeatureDataModule(
        module.cache_extractor(),
        dm,
        cache_dir=getattr(strat, "cache_dir", None) or _sweep_cache(),
        views=views,
    )
    if not views and dm.augment not in (None, "none"):
        say(
            "cached features use the eval transform (no augmentation); strategy.cache_views=K caches K augmented views"
        )
    # next augmented view each epoch
    return data, ({"reload_dataloaders_every_n_epochs": 1} if views > 1 else {})


def train(
    cfg: DictConfig,
    callbacks: list[pl.Callback] | None = None,
    logger: Any = None,
    build_fn: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build, fit, test the best checkpoint. Writes checkpoints only (no reports, no gates).

    ``build_fn(cfg) -> (module, datamodule)`` replaces :func:`build` (``tl distill``).

    Returns:
        (metrics, objects): the metrics dict and ``module``, ``datamodule``, ``data`` (what was
        fitted: the feature cache or the data module), ``trainer`` and ``checkpoint``.
    """
    out = Path(str(cfg.output_dir))
    ckpt_path, resumed = prepare_run(cfg)
    module, dm = (build_fn or build)(cfg)
    check_resume_fits(module, resumed, ckpt_path)
    if cfg.get("channels_last"):
        module = module.to(memory_format=torch.channels_last)
    announce(module, dm, cfg)
    t_fit = time.time()
    data, trainer_extra = _cached_features(module, dm)
    data = adapt.wrap(data, dm, module.adapter)  # + target batches when the adapter trains
    history, guard, checkpoint_cb, all_callbacks = make_callbacks(
        cfg, module, out, callbacks, logger
    )
    trainer = make_trainer(cfg, dm, module, all_callbacks, logger, out, trainer_extra, history)
    lr_find = None
    if cfg.get("tune_lr"):
        claim_pending(out)  # the finder writes lr_find.png: this run holds its dir from here on
        lr_find = tune_lr(cfg, module, data, out)  # sets optimizer.lr
    # atomic checkpoint writes; Ctrl-C/SIGTERM -> one line naming the resume command (exit 130/143)
    last = out / "checkpoints" / "last.ckpt"
    safe_fit(trainer, guard, module, data, ckpt_path, resume_command(cfg, last, out))
    metrics = final_metrics(
        cfg, module, dm, data, trainer, history, checkpoint_cb, time.time() - t_fit, out
    )
    if lr_find:
        metrics["lr_find"] = lr_find
    objects = {
        "module": module,
        "datamodule": dm,
        "data": data,
        "trainer": trainer,
        "checkpoint": checkpoint_cb,
    }
    return metrics, objects


def prepare_run(cfg: DictConfig) -> tuple[str | None, dict[str, Any] | None]:
    """Before any work: ``init=RUN`` resolved, every config value checked, the checkpoint to
    resume from read (a missing, corrupt or crafted file fails here), the seed set. Returns
    ``ckpt_path`` and that checkpoint (validated), or None."""
    if cfg.get("init"):  # init=RUN: a tl pretrain run's weights, checked against backbone.name
        from tl_cli.transfer.simclr import apply_init

        apply_init(cfg)
    check_train_config(cfg)  # every value, the Trainer's included, before any work
    ckpt_path = cfg.get("ckpt_path")
    resumed = None
    if ckpt_path:
        # a missing, corrupt or crafted file fails before any work
        resumed = read_checkpoint(ckpt_path)
    try:
        seed = int(cfg.seed)
    except (TypeError, ValueError):
        raise TLError(f"seed={cfg.seed!r} must be an integer") from None
    pl.seed_everything(seed, workers=True, verbose=False)
    return ckpt_path, resumed


def check_resume_fits(module: TransferTask, resumed: dict[str, Any] | None, ckpt_path: Any) -> None:
    """The checkpoint to resume from holds this run's model: bad input (exit 2) before any work,
    not Lightning's load error (exit 1) in the middle of fit."""
    if resumed is None:
        return
    from tl_cli.core.checkpoint import weights_misfit

    own = {k: v for k, v in module.state_dict().items() if k.split(".", 1)[0] not in module.frozen}
    misfit = weights_misfit(own, resumed["state_dict"])
    if misfit:
        raise TLError(
            f"ckpt_path={ckpt_path}: its weights do not fit this run's model ({misfit}); "
            "resume with the overrides of the run that wrote it"
        )


def announce(module: TransferTask, dm: Any, cfg: DictConfig) -> None:
    """What will train on what, and what a practitioner would point out about the data."""
    bb = module.backbone
    say(
        f"[bold]data[/] {dm.describe()}\n"
        f"[bold]model[/] {bb.name} ({bb.source}, {count_params(bb) / 1e6:.1f}M params, "
        f"{bb.num_features} features) + {cfg.head.get('name')} head, "
        f"strategy {module.strategy.name}, task {module.task_name}"
    )
    for line in data_warnings(dm):
        warn(line)


def make_callbacks(
    cfg: DictConfig,
    module: TransferTask,
    out: Path,
    extra: list[pl.Callback] | None,
    logger: Any,
) -> tuple[History, TrainingGuard, RunCheckpoint, list[pl.Callback]]:
    """The run's callbacks: history, the fault guard, best.ckpt on the task's monitor, last.ckpt
    every epoch, the caller's and the config's callbacks, early stopping, console lines."""
    history = History()
    ckpt_dir = out / "checkpoints"
    monitor, mode = module.monitor
    checkpoint_cb = RunCheckpoint(
        dirpath=str(ckpt_dir),
        filename="best",
        monitor=monitor,
        mode=mode,
        save_last=False,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # NaN/inf stop, no bad checkpoint, last.ckpt on Ctrl-C
    guard = TrainingGuard(ckpt_dir / "last.ckpt")
    # last.ckpt every epoch (save_last=True above would only refresh it when best.ckpt improves)
    callbacks = [
        history,
        guard,
        checkpoint_cb,
        last_checkpoint_callback(ckpt_dir),
        *(extra or []),
        *(instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values()),
    ]
    if cfg.get("early_stopping_patience"):
        callbacks.append(
            pl.callbacks.EarlyStopping(
                monitor=monitor, mode=mode, patience=int(cfg.early_stopping_patience)
            )
        )
    # one line per finished epoch (numbered from 1) everywhere; a live bar on a terminal
    callbacks += [EpochLines(history, module.epoch_metrics), UnfreezeLines()]
    if interactive():
        callbacks.append(EpochBar())
    if logger:  # an lr column per param group in metrics.csv (and the other loggers)
        callbacks.append(SteppedLRMonitor(logging_interval="epoch"))
    return history, guard, checkpoint_cb, callbacks


def make_trainer(
    cfg: DictConfig,
    dm: Any,
    module: TransferTask,
    callbacks: list[pl.Callback],
    logger: Any,
    out: Path,
    extra: dict[str, Any],
    history: History,
) -> pl.Trainer:
    """Lightning's Trainer from ``cfg.trainer`` (``max_epochs=auto``: from the data's size)."""
    from tl_cli.transfer import budget

    auto = budget.is_auto(cfg.trainer)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        **({"max_epochs": budget.PLACEHOLDER} if auto else {}),
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        default_root_dir=str(out),
        enable_progress_bar=interactive(),
        plugins=checkpoint_plugins(),
        _convert_="all",
        **extra,
    )
    if auto:  # trainer.max_epochs=auto (the default): epochs from the data's size
        budget.resolve(trainer, dm, module)
    # after the first epoch that trains: when the run ends, what chose its length, and a cut to
    # trainer.max_time (or auto's limit on CPU)
    cap_s, cap_why = budget.wall_cap(cfg.trainer, auto, _on_cpu(trainer))
    spe = budget.steps_per_epoch(
        len(dm.splits["train"]), int(getattr(dm, "batch_size", None) or 32), trainer.world_size
    )
    trainer.callbacks.append(
        BudgetLine(
            history,
            budget.reason(
                cfg.trainer,
                int(trainer.max_epochs or 1),
                spe,
                _on_command_line("trainer.max_epochs"),
            ),
            cap_s,
            cap_why,
        )
    )
    return trainer


def final_metrics(
    cfg: DictConfig,
    module: TransferTask,
    dm: Any,
    data: Any,
    trainer: pl.Trainer,
    history: History,
    checkpoint_cb: RunCheckpoint,
    fit_seconds: float,
    out: Path,
) -> dict[str, Any]:
    """metrics.json's content: the best epoch, the test split scored with best.ckpt, the
    adaptation's target scores, the run's facts and the warnings."""
    monitor, mode = module.monitor
    ckpt_dir = out / "checkpoints"
    metrics = collect_metrics(history, checkpoint_cb, trainer, fit_seconds, monitor, mode)
    metrics["defaults"] = chosen_defaults(module, cfg)
    if getattr(dm, "val_is_train", False):
        # no val split (prototypes): val/* is measured on the training items; the leave-one-out
        # accuracy is the honest estimate, and the headline (and a bare fail_under.acc) use it
        metrics["val_is_train"] = True
        loo = (module.head_fit_info or {}).get("loo_acc")
        if loo is not None:
            metrics["loo/acc"] = float(loo)
    stages = stage_rows(metrics, module.policy.head_only_epochs, monitor, mode)
    if stages:
        metrics["stages"] = stages
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
    if module.adapter is not None:  # target/acc, source/val/acc, domains.png
        metrics.update(
            adapt.finish(
                module.adapter,
                module,
                dm,
                data,
                trainer,
                checkpoint_cb.best_model_path,
                out,
                metrics,
            )
        )
    metrics.update(
        {
            "schema_version": METRICS_SCHEMA_VERSION,
            "task": module.task_name,
            # the task's declared names: summaries, report.md, curves.png and sweeps read them
            "metric_names": {
                "epoch": list(module.epoch_metrics),
                "final": list(module.final_metrics),
                "monitor": module.monitor[0],
            },
            "backbone": module.backbone.name,
            "strategy": module.strategy.name,
            "num_classes": dm.num_classes,
            "class_names": dm.class_names,
            "item_noun": getattr(dm, "item_noun", "inputs"),  # images, texts, recordings
            "train_size": len(dm.splits["train"]),
            "val_size": len(dm.splits["val"]),
            "test_size": len(dm.splits.get("test", [])),
            "best_checkpoint": str(ckpt_dir / "best.ckpt"),
            # dataset.skip_corrupt=true: unreadable inputs left out of the run
            "skipped_corrupt": len(getattr(dm, "skipped_corrupt", [])),
            "skipped_corrupt_files": [b.path for b in getattr(dm, "skipped_corrupt", [])],
        }
    )
    # the epochs (1-based) at which backbone block groups joined training (for curves.png)
    # (metrics["history"]: trainer.test(ckpt_path=best) restores History to the best epoch's)
    metrics["unfreeze_epochs"] = [
        {"epoch": int(r["epoch"]) + 1, "groups": r["unfrozen"]}
        for r in metrics["history"]
        if r.get("unfrozen")
    ]
    noun = getattr(dm, "item_noun", "inputs")
    collapsed = collapse_warnings(metrics, module, dm.num_classes, noun)
    metrics["warnings"] = data_warnings(dm) + collapsed
    for line in collapsed:
        warn(line)
    return metrics


def chosen_defaults(module: Any, cfg: DictConfig) -> dict[str, Any]:
    """What the run's settings came to: how the head was fitted, steps, LR, warm-up, BN policy."""
    b = dict(module.budget_info)
    if module.head_converged:  # fitted at fit start, after the optimizer was configured
        b["steps"] = 0
    strat = module.strategy
    out: dict[str, Any] = {
        "head_fit": module.head_fit_info or {"method": "sgd"},
        "optimizer_steps": b.get("steps"),
        "epochs": b.get("epochs"),
        "steps_per_epoch": b.get("steps_per_epoch"),
        "lr": b.get("lr"),
        "warmup_steps": b.get("warmup_steps") if b.get("steps") else 0,
        "bn": "frozen (backbone frozen)"
        if not module.policy.backbone_ever_trains
        else ("train" if strat.train_bn else getattr(strat, "bn", "train")),
        "backbone_lr_mult": None
        if not module.policy.backbone_ever_trains
        else strat.backbone_lr_mult,
        "balance": getattr(module, "balance", None),
        "head_lr_mult": getattr(strat, "head_lr_factor", 1.0),
    }
    if getattr(strat, "auto", None) and module.policy.backbone_ever_trains:
        out["lr_mults_auto"] = strat.auto_reason  # strategy.*_lr_mult=auto: where they came from
    return out


def describe_defaults(d: dict[str, Any]) -> str:
    """One line for the summary."""
    h = d["head_fit"]
    head = (
        f"head L-BFGS (C={h['C']:.3g}, {h['folds']}-fold CV"
        + (", L2-normalised features" if h.get("norm") == "l2" else "")
        + (", one global feature scale" if h.get("scale") == "global" else "")
        + ")"
        if h.get("method") == "lbfgs"
        else h.get("summary", "head SGD")
    )
    start = h.get("finetune_start")
    if isinstance(start, dict) and start.get("method") == "lbfgs":
        head += (
            f", fine-tuning from a head fitted again on the features as they are "
            f"(C={start['C']:.3g}, {'one global scale' if start.get('scale') == 'global' else 'per-feature scale'})"
        )
    steps = (
        "0 optimizer steps (head at its optimum, backbone frozen)"
        if not d["optimizer_steps"]
        else f"{d['optimizer_steps']} optimizer steps ({d['epochs']} epoch{'' if d['epochs'] == 1 else 's'} x {d['steps_per_epoch']}), "
        f"LR {d['lr']:.3g}, warm-up {d['warmup_steps']} steps"
    )
    bb = f", backbone LR x{d['backbone_lr_mult']:g}" if d["backbone_lr_mult"] is not None else ""
    if d["backbone_lr_mult"] is not None and d.get("head_lr_mult", 1.0) != 1.0:
        bb += f", head LR x{d['head_lr_mult']:g}"
    if bb and d.get("lr_mults_auto"):
        bb += f" (auto: {d['lr_mults_auto']})"
    bal = f", balance {d['balance']}" if d["balance"] else ""
    return f"{head}; {steps}; BN {d['bn']}{bb}{bal}"


def collect_metrics(
    history: History,
    ckpt: pl.callbacks.ModelCheckpoint,
    trainer: pl.Trainer,
    fit_seconds: float,
    monitor: str = DEFAULT_MONITOR[0],
    mode: str = DEFAULT_MONITOR[1],
) -> dict[str, Any]:
    # a resume whose old best.ckpt is gone tracks the best from the resumed epoch on
    first = int(getattr(ckpt, "first_epoch", 0))
    rows = [r for r in history.epochs if monitor in r and r["epoch"] >= first]
    if not rows:
        raise TLError(
            "no validation epoch ran (check trainer.max_epochs and trainer.limit_val_batches)"
        )
    # ModelCheckpoint keeps the first epoch that reached the maximum of `monitor` (val/score:
    # val/acc, ties broken by the lower val/loss; val/select after a head-only epoch); match it.
    sign = 1.0 if mode == "max" else -1.0
    best = max(rows, key=lambda r: (sign * r[monitor], -r["epoch"]))
    return {
        **{k: v for k, v in best.items() if k.startswith("val/")},
        "best_epoch": int(best["epoch"]) + 1,  # 1-based, as printed
        "epochs": len(history.epochs),
        "fit_seconds": round(fit_seconds, 2),
        "history": history.epochs,
    }


def guard_run_dir(out: Path, cfg: DictConfig) -> None:
    """Refuse a run dir holding an earlier run's outputs (unless overwrite or resuming from it); lock it."""
    # not created here: locked when training starts (TrainingGuard.on_fit_start), checked again then
    claim_run_dir(
        out,
        overwrite=bool(cfg.get("overwrite", False)),
        resume_from=cfg.get("ckpt_path"),
        create=False,
    )


def stage_rows(
    metrics: dict[str, Any], head_only_epochs: int, monitor: str, mode: str
) -> list[dict[str, Any]]:
    """``head only`` (the L-BFGS head before fine-tuning) and ``fine-tuned`` (the best epoch after
    it), as fastai's ``fine_tune`` shows its frozen epoch; empty when there is no head-only epoch.

    Each row: its best epoch (1-based) by the run's monitor, its train and val metrics (for a
    classifier, val/gained and val/lost: val items right where the head alone was wrong and the
    reverse, which decide whether a fine-tuned epoch may replace it), and whether best.ckpt holds it.
    """
    if not head_only_epochs:
        return []
    sign = 1.0 if mode == "max" else -1.0
    rows = [r for r in metrics.get("history", []) if monitor in r]
    out = []
    for name, part in (
        ("head only", [r for r in rows if r["epoch"] < head_only_epochs]),
        ("fine-tuned", [r for r in rows if r["epoch"] >= head_only_epochs]),
    ):
        if not part:
            continue
        best = max(part, key=lambda r: (sign * r[monitor], -r["epoch"]))
        out.append(
            {
                "stage": name,
                "epoch": int(best["epoch"]) + 1,
                **{k: v for k, v in best.items() if k.startswith(("train/", "val/"))},
                "in_best_ckpt": int(best["epoch"]) + 1 == metrics.get("best_epoch"),
            }
        )
    return out
