"""Reading a composed command config: keys a command cannot run without."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from tl_cli.core.errors import TLError


def required_key(cfg: DictConfig, key: str, usage: str) -> Any:
    if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
        raise TLError(f"{key} is required: {usage}")
    return cfg.get(key)
