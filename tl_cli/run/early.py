"""The checks a command can make before it imports torch and Lightning (several seconds on a busy
machine): a missing data folder, a missing or broken checkpoint file, a train value out of range,
a data file's own mistakes (a CSV without its label column: `tl_cli.data.checks`).

`tl_cli.cli` calls `check_before_imports` once Hydra has composed the config and before the
command's module is imported, so these mistakes are one line in about a second. Each check is the
one the command itself makes later (the same helpers, the same words); nothing here decides
anything the command would not.
"""

from __future__ import annotations

from typing import Any

from tl_cli.core.paths import is_set, require_checkpoint_file, require_exists

#: data paths that must exist when set (folder datasets, CSV files, adaptation targets, ...)
DATA_PATHS = ("root", "target_root", "unlabeled_root")
#: command -> the key naming the checkpoint it reads
CHECKPOINT_KEYS = {
    "eval": "checkpoint",
    "predict": "checkpoint",
    "export": "checkpoint",
    "distill": "teacher",
    "train": "ckpt_path",
    "finetune": "ckpt_path",
}
#: commands whose config is a train config (`tl_cli.run.validate.check_train_values`)
TRAINS = ("train", "finetune", "distill")


def _value(node: Any, key: str) -> Any:
    """``node.key``, or None when absent or Hydra's mandatory ``???`` (the command says so)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig) or key not in node or OmegaConf.is_missing(node, key):
        return None
    return node.get(key)


def check_before_imports(command: str, cfg: Any) -> None:
    """Raise the command's own one-line TLError for what can be seen without torch."""
    key = CHECKPOINT_KEYS.get(command)
    if key and is_set(_value(cfg, key)):
        require_checkpoint_file(_value(cfg, key))
    dataset = _value(cfg, "dataset")
    if dataset is not None and not _value(dataset, "download"):  # cifar: a root it downloads into
        for name in DATA_PATHS:
            if is_set(_value(dataset, name)):
                require_exists(f"dataset.{name}", _value(dataset, name))
        # the dataset's own torch-free checks (a CSV's text and label columns)
        from omegaconf import OmegaConf

        from tl_cli.data.checks import check_dataset

        try:
            plain = OmegaConf.to_container(dataset, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation only the command resolves
            plain = None
        if isinstance(plain, dict):
            check_dataset(plain)
    if command in TRAINS and "trainer" in cfg:
        from tl_cli.run.validate import check_train_values

        check_train_values(cfg)
