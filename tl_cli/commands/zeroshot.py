"""`tl zeroshot`: a classifier from class names alone, written as an ordinary tl checkpoint
(the methods: ``tl_cli.transfer.zeroshot``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from tl_cli.core.checkpoint import save_module
from tl_cli.core.console import say
from tl_cli.core.errors import TLError
from tl_cli.modalities.image.backbones import imagenet_classifier
from tl_cli.transfer.zeroshot import (
    IMAGE_TEMPLATES,
    SCALE,
    TEXT_TEMPLATES,
    TOP_T,
    TextEncoder,
    class_descriptions,
    imagenet_names,
)

# --------------------------------------------------------------------------- text encoder


# --------------------------------------------------------------------------- ConSE


# --------------------------------------------------------------------------- building


def _task_module(cfg: DictConfig, head: dict[str, Any], class_names: list[str], overrides: dict):
    from tl_cli.core.registry import plain
    from tl_cli.tasks.base import TASKS

    return TASKS.build(
        {"name": "classification"},
        backbone=plain(cfg.backbone),
        head=head,
        strategy={"name": "feature_extraction"},
        optimizer={"name": "adamw", "lr": 1.0e-3},
        scheduler={"name": "none"},
        class_names=list(class_names),
        preprocessing_overrides=overrides,
        label_smoothing=0.0,
    )


def _templates(cfg: DictConfig, default: Sequence[str]) -> list[str]:
    t = cfg.get("templates")
    if t is None:
        return list(default)
    vals = [str(v) for v in (t if isinstance(t, list | ListConfig) else [t])]
    bad = [v for v in vals if v.count("{}") != 1]
    if not vals or bad:
        raise TLError(
            "templates: each template holds one {} for the class name, e.g. 'a photo of a {}.'"
            + (f" (got {bad[0]!r})" if bad else "")
        )
    return vals


def build_image(
    cfg: DictConfig, class_names: list[str], descriptions: list[str], overrides, device
):
    """The ConSE task module for an image backbone."""
    from tl_cli.core.registry import plain

    w, b = imagenet_classifier(plain(cfg.backbone))
    enc = TextEncoder(plain(cfg.get("text_backbone")) or {"name": "minilm"}, device)
    templates = _templates(cfg, IMAGE_TEMPLATES)
    say(f"[bold]text[/] embedding 1000 ImageNet class names and {len(class_names)} class names")
    src = enc.embed_templated(imagenet_names(), templates)
    cls = enc.embed_templated(descriptions, templates)
    top_t = int(cfg.get("top_t", TOP_T))
    head = {
        "name": "conse",
        "num_source": 1000,
        "text_dim": int(src.shape[1]),
        "top_t": top_t,
        "scale": float(cfg.get("scale") or SCALE),
    }
    module = _task_module(cfg, head, class_names, overrides)
    with torch.no_grad():
        module.head.source.weight.copy_(w)
        module.head.source.bias.copy_(b)
        module.head.source_emb.copy_(src)
        module.head.classes.weight.copy_(cls)
    return module


def build_text(cfg: DictConfig, class_names: list[str], descriptions: list[str], overrides, device):
    """The text zero-shot task module: prototypes = template-averaged label embeddings."""
    templates = _templates(cfg, TEXT_TEMPLATES)
    head = {"name": "prototype", "scale": float(cfg.get("scale") or SCALE)}
    module = _task_module(cfg, head, class_names, overrides)
    # the task's own backbone encodes the labels
    enc = TextEncoder.from_backbone(module.backbone, module.preprocessing, device)
    protos = enc.embed_templated(descriptions, templates)
    module.backbone.to("cpu")
    module.head.set_prototypes(torch.zeros(protos.shape[1]), protos, head["scale"])
    return module


# --------------------------------------------------------------------------- tl zeroshot


def run(cfg: DictConfig) -> dict[str, Any]:
    """`tl zeroshot`: build the classifier, save ``checkpoints/zeroshot.ckpt``, score it if the
    data has labels (``eval.json``, as ``tl eval``)."""
    import tl_cli.tasks.components  # noqa: F401 - every registry complete
    from tl_cli.core.device import pick_device
    from tl_cli.core.outputs import check_output, claim_run_dir, earlier_outputs, release_run_dir
    from tl_cli.modalities.backbones import build_backbone  # noqa: F401 - registries
    from tl_cli.run import gates as tl_gates
    from tl_cli.run.training import stored_dataset_config

    gates = tl_gates.parse(cfg)  # fail_under.* / fail_over.*: a bad value fails before any work
    out = Path(str(cfg.output_dir))
    overwrite = bool(cfg.get("overwrite", False))
    ckpt_path = out / "checkpoints" / "zeroshot.ckpt"
    check_output(ckpt_path, overwrite=overwrite)
    found = earlier_outputs(out)
    if found and not overwrite:
        raise TLError(
            f"{found[0]} already exists: choose another hydra.run.dir, or pass overwrite=true"
        )
    device = pick_device(cfg.get("device", "auto"))
    dm, class_names, classes, overrides = _classes(cfg)
    has_root = dm is not None
    descriptions = class_descriptions(class_names, classes)
    module = _build_classifier(cfg, class_names, descriptions, overrides, device)
    module.dataset_config = stored_dataset_config(cfg.dataset) if has_root else None
    claim_run_dir(out, overwrite=overwrite)
    save_module(module.cpu(), ckpt_path)
    say(f"checkpoint: {ckpt_path}")
    result: dict[str, Any] = {
        "checkpoint": str(ckpt_path),
        "class_names": class_names,
        "descriptions": descriptions,
    }
    if dm is None:
        release_run_dir(out)
        say(f"next: tl eval checkpoint={ckpt_path} dataset.root=DIR")
        return result
    # scored as `tl eval` scores it, from the checkpoint just written, on the data module built
    # from the user's own dataset options (skip_corrupt, batch_size, ...)
    from tl_cli.run.evaluation import evaluate_module, pick_split
    from tl_cli.tasks.loading import load_module

    scored, ckpt = load_module(ckpt_path)
    dm.set_preprocessing(ckpt["tl"]["preprocessing"])
    split = pick_split(dm, str(cfg.get("split", "auto")), new_root=True)
    result.update(evaluate_module(scored, ckpt_path, dm, split, cfg, gates))
    return result


def _classes(cfg: DictConfig) -> tuple[Any, list[str], Any, dict[str, Any]]:
    """The data module (None without ``dataset.root``), the class names, the user's
    ``classes`` (a dict of descriptions, or None) and the preprocessing overrides."""
    from tl_cli.core.registry import plain
    from tl_cli.data.base import DATASETS

    classes = cfg.get("classes")
    classes = (
        OmegaConf.to_container(classes) if isinstance(classes, DictConfig | ListConfig) else classes
    )
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    has_root = not OmegaConf.is_missing(cfg.dataset, "root") and bool(cfg.dataset.get("root"))
    dm = None
    if has_root:
        dm = DATASETS.build(plain(cfg.dataset))
        dm.carve = False  # class names and scoring only: nothing is held out
        dm.prepare()
        class_names = list(dm.class_names)
        overrides = dm.preprocessing_overrides()
    elif classes is not None and not isinstance(classes, dict):
        class_names = [str(c) for c in classes]
        if len(class_names) < 2 or len(set(class_names)) != len(class_names):
            raise TLError(f"classes={class_names}: give 2 or more distinct class names")
        classes = None  # the names are the classes
        img = plain(cfg.dataset).get("image_size")
        overrides = {"image_size": int(img)} if img else {}
    else:
        raise TLError(
            "tl zeroshot needs class names: dataset.root=DIR (its class folders or labels) "
            "or classes=[name,name,...]"
        )
    return dm, class_names, classes, overrides


def _build_classifier(
    cfg: DictConfig,
    class_names: list[str],
    descriptions: list[str],
    overrides: dict[str, Any],
    device: Any,
) -> Any:
    """ConSE on an image backbone's ImageNet head, or the text encoder's class embeddings."""
    from tl_cli.modalities.backbones import get_spec

    spec = get_spec(str(cfg.backbone.get("name")))
    source = str(cfg.backbone.get("source", "auto"))
    text_task = source in ("minilm", "hf") or (spec is not None and spec.modality == "text")
    say(
        "[bold]classes[/] "
        + ", ".join(
            c if c == d else f"{c} ({d!r})" for c, d in zip(class_names, descriptions, strict=True)
        )
    )
    kind = source if source != "auto" else (spec.source if spec is not None else "auto")
    if not text_task and kind not in ("auto", "bundled", "torchvision", "timm"):
        raise TLError(
            f"tl zeroshot reads images (ConSE) or text (modality=text); backbone={cfg.backbone.get('name')} "
            f"reads another modality, with no offline text-aligned classifier"
        )
    build = build_text if text_task else build_image
    module = build(cfg, class_names, descriptions, overrides, device)
    if module.backbone.modality not in ("image", "text"):
        raise TLError(f"tl zeroshot reads images or text, not {module.backbone.modality}")
    return module
