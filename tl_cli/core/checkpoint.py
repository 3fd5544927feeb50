"""Checkpoints are data: validated, then rebuilt only through tl's registries.

A tl checkpoint (``best.ckpt``, ``last.ckpt``, ``zeroshot.ckpt``, ...) is loaded with
``torch.load(weights_only=True)`` (no pickled code runs: ``tl_cli.run.safety``) and then treated as
untrusted plain data:

* every string in its stored configs is checked: anything that looks like an OmegaConf
  interpolation (``${...}``, escaped or nested, e.g. ``${oc.create:...}``, ``${oc.env:TOKEN}``)
  is refused with one line naming the key, and so is any ``_target_`` key that the legacy
  upgrade below does not know;
* the stored configs are validated against a schema (known sections, types, class names);
* objects are built by registry name (``TASKS``, ``SOURCES``, ``HEADS``, ``STRATEGIES``,
  ``OPTIMIZERS``, ``DATASETS``), never by ``instantiate`` and never through OmegaConf, so nothing
  is resolved, imported or called from a string.

Format 1 checkpoints (tl 0.1, configs with Hydra ``_target_`` strings) are upgraded in memory
when every target is one of tl 0.1's own classes; anything else is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tl_cli.core.errors import TLError

#: format-1 ``_target_`` strings -> (section, registry name)
LEGACY_TARGETS = {
    "tl_cli.backbones.create_backbone": ("backbone", None),
    "tl_cli.heads.LinearHead": ("head", "linear"),
    "tl_cli.heads.MLPHead": ("head", "mlp"),
    "tl_cli.strategies.FeatureExtraction": ("strategy", "feature_extraction"),
    "tl_cli.strategies.Finetune": ("strategy", "finetune"),
    "tl_cli.strategies.FreezeUnfreeze": ("strategy", "freeze_unfreeze"),
    "tl_cli.strategies.GradualUnfreeze": ("strategy", "gradual_unfreeze"),
    "tl_cli.strategies.LPFT": ("strategy", "lp_ft"),
    "torch.optim.AdamW": ("optimizer", "adamw"),
    "torch.optim.Adam": ("optimizer", "adam"),
    "torch.optim.SGD": ("optimizer", "sgd"),
    "tl_cli.data.ImageFolderDataModule": ("dataset", "imagefolder"),
    "tl_cli.data.SampleDataModule": ("dataset", "sample"),
    "tl_cli.data.TorchvisionDataModule": ("dataset", None),  # its own `name` is cifar10/cifar100
}

#: hyper_parameters sections that are component configs ({"name": ..., options})
COMPONENTS = ("backbone", "head", "strategy", "optimizer", "scheduler")
HPARAM_KEYS = {*COMPONENTS, "class_names", "preprocessing_overrides", "label_smoothing"}
PLAIN = (str, int, float, bool, type(None))


def _walk(obj: Any, where: str, path: Any) -> None:
    """Refuse interpolation-looking strings and non-plain values anywhere in ``obj``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TLError(f"checkpoint={path}: refused: {where} has a non-string key {k!r}")
            key = f"{where}.{k}" if where else k
            if k == "_target_":
                raise TLError(
                    f"checkpoint={path}: refused: {key}={v!r}: a checkpoint may not name code to call"
                )
            _walk(v, key, path)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _walk(v, f"{where}[{i}]", path)
    elif isinstance(obj, str):
        if "${" in obj or "$\\{" in obj or "\\${" in obj:
            raise TLError(
                f"checkpoint={path}: refused: {where}={obj[:60]!r} looks like an interpolation; "
                f"stored values are plain data and are never resolved"
            )
    elif not isinstance(obj, PLAIN):
        raise TLError(
            f"checkpoint={path}: refused: {where} holds a {type(obj).__name__}, not plain data"
        )


def _upgrade_component(section: str, cfg: Any, path: Any) -> dict[str, Any]:
    cfg = dict(cfg)
    target = cfg.pop("_target_", None)
    if target is None:
        return cfg
    known = LEGACY_TARGETS.get(target) if isinstance(target, str) else None
    if known is None or known[0] != section:
        raise TLError(
            f"checkpoint={path}: refused: {section}._target_={target!r} is not one of tl's own "
            f"components; a checkpoint may not name code to call"
        )
    cfg.pop("_partial_", None)
    if known[1] is not None:
        cfg["name"] = known[1]
    return cfg


def upgrade(ckpt: dict[str, Any], path: Any) -> dict[str, Any]:
    """Format 1 (``_target_`` strings, ``image_size``) -> format 2, in memory."""
    hp = dict(ckpt["hyper_parameters"])
    meta = dict(ckpt["tl"])
    if meta.get("format", 1) >= 2:
        return ckpt
    for section in COMPONENTS:
        if isinstance(hp.get(section), dict):
            hp[section] = _upgrade_component(section, hp[section], path)
    if "image_size" in hp:
        size = hp.pop("image_size")
        hp["preprocessing_overrides"] = {"image_size": size} if size else {}
    if isinstance(meta.get("dataset"), dict):
        meta["dataset"] = _upgrade_component("dataset", meta["dataset"], path)
    meta.setdefault("task", "classification")
    meta.setdefault("modality", "image")
    meta["format"] = 2
    return {**ckpt, "hyper_parameters": hp, "tl": meta}


def validate(ckpt: dict[str, Any], path: Any) -> dict[str, Any]:
    """The checkpoint's configs as validated plain data (upgraded to the current format)."""
    if not isinstance(ckpt.get("hyper_parameters"), dict) or not isinstance(ckpt.get("tl"), dict):
        raise TLError(
            f"checkpoint={path}: not a tl checkpoint (hyper_parameters or tl metadata missing)"
        )
    # interpolations first, in every field (the legacy _target_ keys are checked by upgrade)
    for key in ("hyper_parameters", "tl"):
        _walk(_without_legacy_targets(ckpt[key]), key, path)
    ckpt = upgrade(ckpt, path)
    hp, meta = ckpt["hyper_parameters"], ckpt["tl"]
    _walk(hp, "hyper_parameters", path)
    _walk(meta, "tl", path)
    unknown = sorted(set(hp) - HPARAM_KEYS)
    if unknown:
        raise TLError(f"checkpoint={path}: hyper_parameters.{unknown[0]} is not a key tl writes")
    for section in COMPONENTS:
        if not isinstance(hp.get(section), dict):
            raise TLError(
                f"checkpoint={path}: hyper_parameters.{section} is missing or not a mapping"
            )
    names = hp.get("class_names")
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(c, str) and c for c in names)
        or len(set(names)) != len(names)
    ):
        raise TLError(
            f"checkpoint={path}: hyper_parameters.class_names must be 2 or more distinct names"
        )
    if meta.get("class_names") is not None and list(meta["class_names"]) != names:
        raise TLError(
            f"checkpoint={path}: tl.class_names and hyper_parameters.class_names disagree"
        )
    prep = meta.get("preprocessing")
    if not isinstance(prep, dict) or not prep:
        raise TLError(f"checkpoint={path}: tl.preprocessing is missing")
    if meta.get("modality", "image") == "image":
        _check_image_preprocessing(prep, path)
    if not isinstance(meta.get("task"), str):
        raise TLError(f"checkpoint={path}: tl.task is missing")
    return ckpt


def _check_image_preprocessing(prep: dict[str, Any], path: Any) -> None:
    """What the image transforms read: input_size, mean, std (3 numbers each), interpolation."""
    for key in ("input_size", "mean", "std", "interpolation"):
        if key not in prep:
            raise TLError(f"checkpoint={path}: tl.preprocessing.{key} is missing")
    size = prep["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TLError(f"checkpoint={path}: tl.preprocessing.input_size={size!r} is not a size")
    for key in ("mean", "std"):
        v = prep[key]
        if (
            not isinstance(v, list | tuple)
            or len(v) != 3
            or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        ):
            raise TLError(f"checkpoint={path}: tl.preprocessing.{key}={v!r} is not 3 numbers")


def _without_legacy_targets(obj: Any) -> Any:
    """``obj`` minus the top-level ``_target_`` of each component (checked by ``upgrade``)."""
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict) and "_target_" in v and isinstance(v["_target_"], str):
            v = {kk: vv for kk, vv in v.items() if kk != "_target_"}
        out[k] = v
    return out


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate a tl checkpoint (see the module docstring)."""
    from tl_cli.run.safety import read_untrusted_checkpoint

    return read_untrusted_checkpoint(path)


def load_module(path: str | os.PathLike[str]):
    """Rebuild the trained model from a checkpoint alone (no network, no original config).

    Returns:
        (task module in eval mode, the validated checkpoint dict).
    """
    import tl_cli.components  # noqa: F401 - every registry complete
    from tl_cli.tasks.base import TASKS

    ckpt = read_checkpoint(path)
    meta = ckpt["tl"]
    cls = TASKS.get(meta["task"])
    try:
        module = cls(**ckpt["hyper_parameters"], pretrained=False)
    except TLError as e:
        raise TLError(f"checkpoint={path}: {e}") from None
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise TLError(
            f"checkpoint={path}: weights do not fit the model it describes ({detail[:300]})"
        ) from None
    module.eval()
    return module, ckpt


def stored_path(value: Any, key: str, path: Any) -> str | None:
    """A dataset path stored in a checkpoint: absolute, and said to be missing when it is."""
    if value is None:
        return None
    p = Path(str(value)).expanduser()
    if not p.is_absolute():
        raise TLError(
            f"checkpoint={path}: {key}={value} was stored as a relative path; pass dataset.root=DIR"
        )
    if not p.exists():
        raise TLError(
            f"checkpoint={path}: its {key} {p} does not exist here; pass dataset.root=DIR to score another folder"
        )
    return str(p)
