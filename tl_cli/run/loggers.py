"""The ``logger`` config group: csv (default), tensorboard, mlflow, wandb.

Every logger writes under the run dir and works offline (mlflow: a local file store unless
MLFLOW_TRACKING_URI is set; wandb: offline mode unless ``logger.offline=false``). A logger whose
package is missing fails before any work with one line saying what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tl_cli.core.errors import TLError

#: Lightning logger class -> (the packages it can use, what to pip install)
REQUIREMENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
    "MLFlowLogger": (("mlflow",), "mlflow"),
    "WandbLogger": (("wandb",), "wandb"),
    "CometLogger": (("comet_ml",), "comet-ml"),
    "NeptuneLogger": (("neptune",), "neptune"),
}


def available(module: str) -> bool:
    """Whether a package can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_requirements(target: str, name: str) -> None:
    cls = target.rsplit(".", 1)[-1]
    mods, pip_name = REQUIREMENTS.get(cls, ((), ""))
    if mods and not any(available(m) for m in mods):
        raise TLError(
            f"logger={name} needs the {pip_name} package, which is not installed: pip install {pip_name} (or logger=csv)"
        )


def make_logger(cfg: DictConfig, out: Path) -> Any:
    """The Lightning logger from ``cfg.logger``; no logger group means the CSV logger."""
    import pytorch_lightning as pl

    lcfg = cfg.get("logger")
    if lcfg is None:
        return pl.loggers.CSVLogger(save_dir=str(out), name="csv", version="")
    if lcfg is False or (isinstance(lcfg, DictConfig) and not lcfg.get("_target_")):
        return False
    name = _choice(cfg)
    check_requirements(str(lcfg._target_), name)
    try:
        return instantiate(lcfg, _convert_="all")
    except Exception as e:  # noqa: BLE001 - Hydra wraps the constructor's error
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, TLError):
            raise cause from None
        raise TLError(
            f"logger={name}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        ) from None


def _choice(cfg: DictConfig) -> str:
    """The logger option's name (from Hydra's choices when available, else the class name)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("logger")
    except Exception:  # noqa: BLE001 - no Hydra runtime (tests compose the config directly)
        choice = None
    if choice:  # None: a Hydra runtime of another run in this process (tests), or no group
        return str(choice)
    target = str(OmegaConf.select(cfg, "logger._target_", default=""))
    return target.rsplit(".", 1)[-1].replace("Logger", "").lower() or "?"
