"""Every value of a train config checked before any work: one line naming the key and the range.

The registries already refuse unknown options and most bad values of the components they build
(head, strategy, optimizer, dataset constructor); this module builds those that are cheap to
build up front (so their errors come before the data scan, not after), and checks what no
registry sees: top-level values, the scheduler, and the Lightning Trainer's keys and values
(a bad ``trainer.*`` key or ``trainer.accelerator=gpu`` on a CPU machine used to surface after
the data scan as Hydra's ``InstantiationException``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tl_cli.core.errors import TLError
from tl_cli.core.registry import did_you_mean, plain
from tl_cli.core.values import integer, number

#: scheduler name -> option -> (check, allowed range as said in the error line)
_SCHED: dict[str, dict[str, tuple[Any, str]]] = {
    "none": {},
    "cosine": {
        "warmup_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "warmup_epochs": (lambda v: v >= 0, ">= 0 (or null: warmup_fraction decides)"),
        "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    },
    "onecycle": {
        "pct_start": (lambda v: 0 < v < 1, "in (0, 1)"),
        "div_factor": (lambda v: v > 0, "> 0"),
        "final_div_factor": (lambda v: v > 0, "> 0"),
    },
    "step": {
        "step_epochs": (lambda v: v > 0, "> 0"),
        "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    },
    "plateau": {
        "monitor": (None, ""),
        "mode": (None, ""),
        "factor": (lambda v: 0 < v < 1, "in (0, 1)"),
        "patience": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
        "threshold": (lambda v: v >= 0, ">= 0"),
    },
}


def check_scheduler(sched: dict[str, Any]) -> None:
    from tl_cli.transfer.schedulers import SCHEDULES

    sched = dict(sched or {})
    name = sched.pop("name", "none")
    if name not in _SCHED:
        raise TLError(
            f"scheduler.name={name!r} is not a known scheduler{did_you_mean(str(name), SCHEDULES)}; "
            f"known: {', '.join(SCHEDULES)}"
        )
    opts = _SCHED[name]
    for k, v in sched.items():
        if k not in opts:
            raise TLError(
                f"scheduler.{k} is not an option of scheduler={name}{did_you_mean(k, list(opts))}; "
                f"options: {', '.join(opts) or 'none'}"
            )
        check, allowed = opts[k]
        if v is None and k == "warmup_epochs":
            continue
        if check is not None and not check(number(f"scheduler.{k}", v, allowed)):
            raise TLError(f"scheduler.{k}={v!r} must be {allowed}")
    if name == "plateau" and sched.get("mode", "min") not in ("min", "max"):
        raise TLError(f"scheduler.mode={sched.get('mode')!r} must be min or max")


#: ``pytorch_lightning.Trainer``'s arguments (the pinned version's; tests/test_config.py checks
#: them against its signature): config keys are checked without importing Lightning, so a typo
#: in ``trainer.*`` is one line in about a second, not after torch loads
TRAINER_ARGS = (
    "accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks",
    "fast_dev_run", "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time",
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
    "overfit_batches", "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps",
    "log_every_n_steps", "enable_checkpointing", "enable_progress_bar", "enable_model_summary",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "deterministic",
    "benchmark", "inference_mode", "use_distributed_sampler", "profiler", "detect_anomaly",
    "barebones", "plugins", "sync_batchnorm", "reload_dataloaders_every_n_epochs",
    "default_root_dir", "enable_autolog_hparams", "model_registry",
)  # fmt: skip


def trainer_kwargs(trainer: dict[str, Any]) -> dict[str, Any]:
    """``cfg.trainer`` minus ``_target_``, its keys checked against ``pytorch_lightning.Trainer``."""
    params = list(TRAINER_ARGS)
    out = {k: v for k, v in trainer.items() if k != "_target_"}
    for k in out:
        if k not in params:
            raise TLError(
                f"trainer.{k} is not an argument of pytorch_lightning.Trainer"
                f"{did_you_mean(k, params)}"
            )
    return out


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_trainer_values(trainer: dict[str, Any]) -> dict[str, Any]:
    """Keys and epochs (no Lightning import); returns the Trainer's keyword arguments."""
    kw = trainer_kwargs(trainer)
    for key in ("max_epochs", "min_epochs"):
        if key == "max_epochs" and kw.get(key) == "auto":  # tl_cli.transfer.budget
            continue
        if kw.get(key) is not None:
            allowed = ">= 1 or auto" if key == "max_epochs" else ">= 1"
            v = integer(f"trainer.{key}", kw[key], allowed)
            if v < 1:
                raise TLError(f"trainer.{key}={kw[key]!r} must be an integer {allowed}")
    return kw


def check_trainer(trainer: dict[str, Any]) -> None:
    """Keys, epochs, and what Lightning itself checks (accelerator, devices, precision, strategy)."""
    import warnings

    import pytorch_lightning as pl

    kw = check_trainer_values(trainer)
    if os.environ.get("LOCAL_RANK") not in (None, "0"):
        return
    probe = {
        k: kw[k]
        for k in ("accelerator", "devices", "num_nodes", "strategy", "precision")
        if k in kw
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(
                **probe,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
    except Exception as e:  # noqa: BLE001 - Lightning's MisconfigurationException, ValueError, ...
        reason = _reason(e)
        low = reason.lower()
        key = (
            next((k for k in probe if f"{k}={probe[k]}".lower() in low), None)
            or next(
                (
                    k
                    for k in probe
                    if str(probe[k]).lower() not in ("auto", "1") and str(probe[k]).lower() in low
                ),
                None,
            )
            or next((k for k in probe if k in low), None)
        )
        what = f"trainer.{key}={probe[key]!r}" if key else "trainer"
        raise TLError(f"{what}: {reason}") from None


def check_train_values(cfg: Any) -> None:
    """What a train config can be checked for without torch (`tl_cli.run.early` runs this before
    the command loads Lightning): seed, label smoothing, trainer keys and epochs, early stopping,
    the scheduler, the weights file."""
    seed = cfg.get("seed")
    try:
        int(str(seed))
    except (TypeError, ValueError):
        raise TLError(f"seed={seed!r} must be an integer") from None
    ls = number("label_smoothing", cfg.get("label_smoothing", 0.0), "in [0, 1)")
    if not 0.0 <= ls < 1.0:
        raise TLError(f"label_smoothing={cfg.get('label_smoothing')!r} must be in [0, 1)")
    check_trainer_values(plain(cfg.trainer) or {})
    patience = cfg.get("early_stopping_patience")
    if patience is not None and integer("early_stopping_patience", patience, ">= 1 or null") < 1:
        raise TLError(f"early_stopping_patience={patience!r} must be an integer >= 1 or null")
    check_scheduler(plain(cfg.get("scheduler")) or {})
    wp = (plain(cfg.backbone) or {}).get("weights_path")
    if wp and not Path(os.path.expanduser(str(wp))).is_file():
        raise TLError(f"backbone.weights_path={wp}: file not found")


def check_train_config(cfg: Any) -> None:
    """Check a composed train config before any data is scanned or weight loaded."""
    import tl_cli.tasks.components  # noqa: F401 - every registry complete
    from tl_cli.data.base import DATASETS
    from tl_cli.transfer.heads import HEADS
    from tl_cli.transfer.optimizers import OPTIMIZERS
    from tl_cli.transfer.strategies import STRATEGIES

    check_train_values(cfg)
    check_trainer(plain(cfg.trainer) or {})  # what Lightning itself checks (devices, precision)
    OPTIMIZERS.build(plain(cfg.optimizer))
    STRATEGIES.build(plain(cfg.strategy))
    HEADS.build(plain(cfg.head), in_features=8, num_classes=2)
    DATASETS.build(plain(cfg.dataset))  # the constructor checks every value; nothing is scanned
