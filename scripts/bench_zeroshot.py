#!/usr/bin/env python
"""Zero-shot (ConSE) on classes that ImageNet-1k does not name, and what the text side can do.

    python scripts/bench_zeroshot.py [--sets absent,cifar10] [--variants] [--cli]

Data (offline, under build/bench/zeroshot/data as symlinks):

* ``absent``: three classes with no ImageNet-1k class: **deer** and **horse** (CIFAR-10 test
  images, 32 px upscaled; ImageNet-1k has no deer at all and one horse colour, ``sorrel``) and
  **raccoon** (the 200 photos of ``detection-raccoon``; ImageNet-1k has no raccoon).
* ``cifar10``: the CIFAR-10 subset's test split (846 images, 10 classes), the control: most of
  its classes are ImageNet classes under other names (``airliner``, ``tabby cat``, breeds).

The image side is computed once per set (the bundled efficientnet_lite0 at its 224 px, its own
ImageNet classifier): ``--variants`` then scores ConSE with other text on both sides, other
``top_t`` and other templates, in-process, on those logits; ``--cli`` runs the real
``tl zeroshot`` with the defaults (its eval.json is the row in docs/benchmarks.md).

Text variants (MiniLM sentence embeddings, as ``tl zeroshot``):

* ImageNet side: ``lemmas`` (timm's description: ``goldfish, Carassius auratus``, tl's default
  before issue 24), ``first`` (the first lemma), ``gloss`` (lemmas and the WordNet definition,
  timm's ``detailed=True``: ``goldfish, Carassius auratus: small golden or orange-red ...``).
* class side: ``name`` (the folder name as words), ``gloss21k`` (the name looked up among the
  21,843 ImageNet-21k WordNet synsets that timm ships: lemmas and definition of the sense
  closest to the ImageNet-1k classes, or the name when none matches).
* templates: ``{}`` or a few photo prompts, averaged, on both sides.

Writes build/bench/zeroshot/results.json; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from _bench_util import ROOT, display_cmd, machine, run_tl, save_json

SHARED = (ROOT.parent / "shared" / "data").resolve()
OUT = ROOT / "build" / "bench" / "zeroshot"

PHOTO_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
)


def build_sets() -> dict[str, tuple[Path, str]]:
    """name -> (root, split scored)."""
    absent = OUT / "data" / "absent"
    for cls in ("deer", "horse"):
        d = absent / cls
        d.mkdir(parents=True, exist_ok=True)
        for f in sorted((SHARED / "cifar10-subset" / "test" / cls).glob("*.png")):
            if not (d / f.name).exists():
                (d / f.name).symlink_to(f)
    d = absent / "raccoon"
    d.mkdir(parents=True, exist_ok=True)
    for f in sorted((SHARED / "detection-raccoon" / "images").glob("*.jpg")):
        if not (d / f.name).exists():
            (d / f.name).symlink_to(f)
    return {"absent": (absent, "train"), "cifar10": (SHARED / "cifar10-subset", "test")}


def image_logits(name: str, root: Path, split: str) -> dict:
    """ImageNet logits of every scored image (cached in OUT/logits-NAME.npz)."""
    f = OUT / f"logits-{name}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=False)
        return {"logits": z["logits"], "labels": z["labels"], "classes": list(z["classes"])}
    import torch

    import tl_cli.modalities.image.data  # noqa: F401  (registers imagefolder)
    from tl_cli.data.base import DATASETS
    from tl_cli.data.features import extract
    from tl_cli.modalities.backbones import build_backbone
    from tl_cli.modalities.image.backbones import imagenet_classifier

    cfg = {"name": "efficientnet_lite0"}
    bb = build_backbone(cfg).eval()
    w, b = imagenet_classifier(cfg)
    dm = DATASETS.build(
        {"name": "imagefolder", "root": str(root), "num_workers": 0, "batch_size": 64}
    )
    dm.carve = False
    dm.prepare()
    dm.set_preprocessing(bb.effective_preprocessing(dm.preprocessing_overrides()))
    t0 = time.perf_counter()
    with torch.inference_mode():
        feats, labels = extract(
            bb, dm.dataset(split, train_aug=False), dm, torch.device("cpu"), name
        )
    logits = (torch.from_numpy(feats) @ w.T + b).numpy()
    print(f"[{name}] {len(labels)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(f, logits=logits, labels=labels, classes=np.array(dm.class_names))
    return {"logits": logits, "labels": labels, "classes": list(dm.class_names)}


class Text:
    """MiniLM embeddings with a cache (texts are embedded once per process)."""

    def __init__(self) -> None:
        from tl_cli.transfer.zeroshot import TextEncoder

        self.enc = TextEncoder({"name": "minilm"})
        self.memo: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            for t, e in zip(todo, self.enc.embed(todo).numpy(), strict=True):
                self.memo[t] = e
        return np.stack([self.memo[t] for t in texts])

    def templated(self, names: list[str], templates: tuple[str, ...]) -> np.ndarray:
        e = self.embed([t.format(n) for n in names for t in templates])
        e = e.reshape(len(names), len(templates), -1).mean(1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)


def imagenet_side(kind: str) -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    if kind == "lemmas":
        return [info.index_to_description(i) for i in range(1000)]
    if kind == "first":
        return [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]
    if kind == "gloss":
        return [info.index_to_description(i, detailed=True) for i in range(1000)]
    raise ValueError(kind)


def synsets21k() -> list[tuple[str, str, str]]:
    """(synset, lemmas, definition) of the ImageNet-21k WordNet synsets timm ships."""
    import timm.data

    d = Path(timm.data.__file__).parent / "_info"
    lemmas = dict(
        line.split("\t", 1)
        for line in (d / "imagenet_synset_to_lemma.txt").read_text().splitlines()
    )
    gloss = dict(
        line.split("\t", 1)
        for line in (d / "imagenet_synset_to_definition.txt").read_text().splitlines()
    )
    return [(s, lemmas[s], gloss.get(s, "")) for s in lemmas]


def class_side(names: list[str], kind: str, text: Text, src_emb: np.ndarray) -> list[str]:
    from tl_cli.transfer.zeroshot import describe_class

    words = [describe_class(n) for n in names]
    if kind == "name":
        return words
    if kind != "gloss21k":
        raise ValueError(kind)
    rows = synsets21k()
    out = []
    for w in words:
        cands = [
            f"{lem}: {g}"
            for _, lem, g in rows
            if w.lower() in [x.strip().lower() for x in lem.split(",")]
        ]
        if not cands:
            out.append(w)
            continue
        # the sense closest to the ImageNet-1k classes (a photographed thing, not the verb)
        e = text.embed(cands)
        out.append(cands[int((e @ src_emb.T).max(1).argmax())])
    return out


def conse(logits: np.ndarray, src: np.ndarray, cls: np.ndarray, top_t: int) -> np.ndarray:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if 0 < top_t < p.shape[1]:
        kth = -np.sort(-p, axis=1)[:, top_t - 1 : top_t]
        p = p * (p >= kth)
    e = p @ src
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return (e @ cls.T).argmax(1)


def variants(sets: dict[str, dict], res: dict) -> None:
    text = Text()
    grid = []
    for src_kind in ("lemmas", "first", "gloss"):
        for cls_kind in ("name", "gloss21k"):
            for tname, templates in (("{}", ("{}",)), ("photo x4", PHOTO_TEMPLATES)):
                grid.append((src_kind, cls_kind, tname, templates))
    out = res.setdefault("variants", {})
    for src_kind, cls_kind, tname, templates in grid:
        src_names = imagenet_side(src_kind)
        src = text.templated(src_names, templates)
        for set_name, s in sets.items():
            words = class_side(s["classes"], cls_kind, text, text.templated(src_names, ("{}",)))
            cls = text.templated(words, templates)
            for t in (1, 3, 5, 10, 20, 50, 0):
                acc = float((conse(s["logits"], src, cls, t) == s["labels"]).mean())
                key = f"{src_kind} | {cls_kind} | {tname} | T={t}"
                out.setdefault(key, {})[set_name] = round(acc, 4)
            res.setdefault("class_text", {})[f"{set_name} {cls_kind}"] = words
        k10 = f"{src_kind} | {cls_kind} | {tname} | T=10"
        print(k10, out[k10], flush=True)
    save_json(OUT / "results.json", res)


def cli(sets: dict[str, tuple[Path, str]], res: dict) -> None:
    for name, (root, _) in sets.items():
        overrides = [f"dataset.root={root}", "dataset.num_workers=0", "device=cpu"]
        r = run_tl(
            "zeroshot", [*overrides, "overwrite=true"], OUT / "runs" / name, result="eval.json"
        )
        res.setdefault("cli", {})[name] = {
            "cmd": display_cmd("zeroshot", overrides),
            "acc": r["metrics"].get("acc"),
            "macro_f1": r["metrics"].get("macro_f1"),
            "n": r["metrics"].get("num_samples"),
            "wall_seconds": r["wall_seconds"],
        }
        print(f"[{name}] tl zeroshot acc {r['metrics'].get('acc')}", flush=True)
    save_json(OUT / "results.json", res)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sets", default="absent,cifar10")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--cli", action="store_true")
    args = ap.parse_args()
    res_file = OUT / "results.json"
    res = json.loads(res_file.read_text()) if res_file.exists() else {}
    res["machine"] = machine()
    res["load"] = os.getloadavg()[0]
    built = {k: v for k, v in build_sets().items() if k in args.sets.split(",")}
    if args.variants:
        variants({k: image_logits(k, *v) for k, v in built.items()}, res)
    if args.cli:
        cli(built, res)
    save_json(res_file, res)


if __name__ == "__main__":
    main()
