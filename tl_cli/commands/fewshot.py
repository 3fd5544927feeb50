"""`tl fewshot`: episodic evaluation of the SimpleShot classifier (``tl_cli.transfer.prototypes``).

* ``tl fewshot dataset.root=DIR n_way=5 n_shot=[1,5] n_query=15 episodes=600``: the standard
  episodic evaluation of that classifier: features are extracted once, then seeded episodes of
  ``n_way`` classes, ``n_shot`` support and ``n_query`` query items per class; mean accuracy
  with a 95% confidence interval (``1.96 * std / sqrt(episodes)``) in ``fewshot.json``.

Nearest prototype by Euclidean distance on normalised features is a linear classifier:
``-|z - p|^2 / 2 = z.p - |p|^2 / 2 - 1/2``, so the head is ``Linear(weight=P, bias=-|p|^2/2)``
after the centring and normalisation, times a scale (the softmax temperature).
"""

from __future__ import annotations

import math
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from tl_cli.core.console import say, show, warn
from tl_cli.core.device import pick_device
from tl_cli.core.errors import TLError
from tl_cli.transfer.prototypes import normalize, proto_logits, prototypes

#: fewshot.json layout version
FEWSHOT_SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- the head


# --------------------------------------------------------------------------- SimpleShot maths


# --------------------------------------------------------------------------- data: every item


# --------------------------------------------------------------------------- the strategy


# --------------------------------------------------------------------------- episodes


def sample_episode(
    rng: np.random.Generator,
    by_class: Sequence[np.ndarray],
    n_way: int,
    n_shot: int,
    n_query: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, support, query): ``n_way`` classes drawn uniformly without replacement, then per
    class ``n_shot + n_query`` distinct items; support ``(n_way, n_shot)`` and query
    ``(n_way, n_query)`` hold item indices and never share one."""
    classes = rng.choice(len(by_class), size=n_way, replace=False)
    support = np.empty((n_way, n_shot), dtype=np.int64)
    query = np.empty((n_way, n_query), dtype=np.int64)
    for j, c in enumerate(classes):
        pick = rng.choice(by_class[c], size=n_shot + n_query, replace=False)
        support[j], query[j] = pick[:n_shot], pick[n_shot:]
    return classes, support, query


def episode_accuracy(
    feats: np.ndarray, support: np.ndarray, query: np.ndarray, center: str = "none"
) -> float:
    """SimpleShot on one episode: the accuracy of nearest prototype on the query items."""
    n_way, n_shot = support.shape
    s = feats[support.reshape(-1)]
    q = feats[query.reshape(-1)]
    c = s.mean(0) if center == "support" else np.zeros(feats.shape[1])
    y_s = np.repeat(np.arange(n_way), n_shot)
    _, protos = prototypes(s, y_s, n_way, center=c)
    pred = proto_logits(normalize(q - c), protos).argmax(1)
    return float((pred == np.repeat(np.arange(n_way), query.shape[1])).mean())


#: the most episodes a run may ask for (each costs a few ms; 600 is the standard)
MAX_EPISODES = 100_000


def _ints(value: Any, key: str) -> list[int]:
    vals = list(value) if isinstance(value, list | tuple | ListConfig) else [value]
    out = []
    for v in vals:
        try:
            iv = int(v)
        except (TypeError, ValueError):
            raise TLError(f"{key}={value!r} must be a positive integer or a list of them") from None
        if isinstance(v, bool) or iv != v or iv < 1:
            raise TLError(f"{key}={value!r} must be a positive integer or a list of them")
        out.append(iv)
    if not out:
        raise TLError(f"{key}=[] is empty: give one value or a list, e.g. {key}=[1,5]")
    return sorted(set(out))


def check_episodes(
    counts: dict[str, int], n_way: int, shots: list[int], n_query: Any, where: str
) -> int:
    """The query count per class (``auto``: as many as the smallest class allows, at most 15),
    or one line naming the class or setting at fault."""
    if n_way < 2:
        raise TLError(f"n_way={n_way}: an episode needs at least 2 classes")
    if n_way > len(counts):
        raise TLError(
            f"n_way={n_way} exceeds the {len(counts)} classes in {where}: lower n_way "
            f"(at most {len(counts)})"
        )
    small, low = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    top = max(shots)
    if n_query in (None, "auto"):
        q = min(15, low - top)
        if q < 1:
            raise TLError(
                f"class {small!r} in {where} has {low} items; n_shot={top} needs at least "
                f"{top + 1} per class ({top} support + 1 query): lower n_shot"
            )
        return q
    q = _ints(n_query, "n_query")
    if len(q) != 1:
        raise TLError(f"n_query={n_query!r} must be one integer (or auto)")
    need = top + q[0]
    if low < need:
        raise TLError(
            f"class {small!r} in {where} has {low} items; n_shot={top} + n_query={q[0]} needs "
            f"{need} per class: lower n_query or n_shot (n_query=auto fits the smallest class)"
        )
    return q[0]


def run_episodes(
    feats: np.ndarray,
    labels: np.ndarray,
    n_way: int,
    shots: list[int],
    n_query: int,
    episodes: int,
    seed: int,
    center: str = "none",
) -> dict[str, dict[str, float]]:
    """``{"<shot>": {"acc", "ci95", "std"}}``: seeded episodes per shot count."""
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    out = {}
    for k in shots:
        rng = np.random.default_rng([seed, k])
        accs = np.array(
            [
                episode_accuracy(
                    feats, *sample_episode(rng, by_class, n_way, k, n_query)[1:], center
                )
                for _ in range(episodes)
            ]
        )
        std = float(accs.std(ddof=1)) if episodes > 1 else 0.0
        out[str(k)] = {
            "acc": float(accs.mean()),
            "ci95": 1.96 * std / math.sqrt(episodes),
            "std": std,
        }
    return out


# --------------------------------------------------------------------------- features


def pooled_items(dm: Any, split: str) -> list[tuple[Any, int]]:
    """The items episodes draw from: ``all`` (every split pooled) or one split."""
    if split == "all":
        seen: set[int] = set()
        items = []
        for name in ("train", "val", "test"):
            for item in dm.splits.get(name, []):
                if id(item) not in seen:  # val = train (no carve) holds the same tuples
                    seen.add(id(item))
                    items.append(item)
        return items
    if split not in dm.splits or not dm.splits[split]:
        raise TLError(
            f"split={split}: the dataset has {', '.join(k for k, v in dm.splits.items() if v)} "
            "(or split=all)"
        )
    return list(dm.splits[split])


def features(
    backbone: nn.Module, dm: Any, split: str, device: torch.device, cache_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-transform features of ``dm.splits[split]`` (``tl_cli.data.features``: on disk if cache_dir)."""
    from tl_cli.data.features import FeatureDataModule, extract

    backbone.to(device).eval()
    if not cache_dir:
        return extract(backbone, dm.dataset(split, train_aug=False), dm, device, "features")
    keep = dm.splits
    dm.splits = {split: keep[split]}
    try:
        fdm = FeatureDataModule(backbone, dm, cache_dir=cache_dir)
        fdm.trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=device))
        fdm.setup("fit")
        view = fdm.splits[split][0]
        return np.asarray(view.feats, dtype=np.float32), np.asarray(view.labels)
    finally:
        dm.splits = keep


# --------------------------------------------------------------------------- tl fewshot


def run(cfg: DictConfig) -> dict[str, Any]:
    """`tl fewshot`: episodic N-way K-shot evaluation of SimpleShot on frozen features."""
    import tl_cli.tasks.components  # noqa: F401 - every registry complete
    from tl_cli.core.outputs import check_output, claim_run_dir, release_run_dir, write_json
    from tl_cli.core.registry import plain
    from tl_cli.data.base import DATASETS
    from tl_cli.modalities.backbones import build_backbone

    out = Path(str(cfg.output_dir))
    overwrite = bool(cfg.get("overwrite", False))
    n_way, shots, episodes, seed, center, split = _episode_options(cfg)
    device = pick_device(cfg.get("device", "auto"))
    check_output(out / "fewshot.json", overwrite=overwrite)

    dcfg = plain(cfg.dataset)
    if OmegaConf.is_missing(cfg.dataset, "root") or not dcfg.get("root"):
        raise TLError("dataset.root is not set: pass dataset.root=DIR (a folder of class folders)")
    dm = DATASETS.build(dcfg)
    dm.carve = False  # every item is a support or query candidate
    dm.prepare()
    items = pooled_items(dm, split)
    names = dm.class_names
    counts = {c: 0 for c in names}
    for _, y in items:
        counts[names[y]] += 1
    counts = {c: n for c, n in counts.items() if n > 0}
    where = f"{getattr(dm, 'root', dm.name)} ({'every split' if split == 'all' else split})"
    n_query = check_episodes(counts, n_way, shots, cfg.get("n_query", "auto"), where)

    backbone = build_backbone(plain(cfg.backbone), pretrained=True)
    dm.set_preprocessing(backbone.effective_preprocessing(dm.preprocessing_overrides()))
    dm.splits["fewshot"] = items
    say(
        f"[bold]data[/] {where}: {len(counts)} classes, {len(items)} items; "
        f"[bold]model[/] {backbone.name} ({backbone.num_features} features, frozen)"
    )
    claim_run_dir(out, overwrite=overwrite)
    t0 = time.time()
    feats, labels = features(backbone, dm, "fewshot", device, cfg.get("cache_dir"))
    feat_s = time.time() - t0
    t1 = time.time()
    results = run_episodes(feats, labels, n_way, shots, n_query, episodes, seed, center)
    doc = {
        "schema_version": FEWSHOT_SCHEMA_VERSION,
        "n_way": n_way,
        "episodes": episodes,
        "results": results,
        "n_query": n_query,
        "n_shot": shots,
        "seed": seed,
        "center": center,
        "method": "SimpleShot (L2-normalised nearest class mean"
        + (", centred on the support mean)" if center == "support" else ")"),
        "backbone": backbone.name,
        "preprocessing": dict(dm.preprocessing or {}),
        "dataset": str(getattr(dm, "root", dm.name)),
        "split": split,
        "num_classes": len(counts),
        "num_items": len(items),
        "feature_seconds": round(feat_s, 2),
        "episode_seconds": round(time.time() - t1, 2),
    }
    write_json(out / "fewshot.json", doc)
    release_run_dir(out)
    _show(results, n_way, n_query, episodes)
    if len(counts) == n_way:
        warn(f"only {len(counts)} classes: every episode uses the same classes")
    say(f"results: {out / 'fewshot.json'}")
    return doc


def _episode_options(cfg: DictConfig) -> tuple[int, list[int], int, int, str, str]:
    """``n_way``, ``n_shot``, ``episodes``, ``seed``, ``center``, ``split``, checked."""
    n_way = _ints(cfg.get("n_way", 5), "n_way")
    if len(n_way) != 1:
        raise TLError(f"n_way={cfg.n_way!r} must be one integer")
    n_way = n_way[0]
    shots = _ints(cfg.get("n_shot", [1, 5]), "n_shot")
    episodes = _ints(cfg.get("episodes", 600), "episodes")
    if len(episodes) != 1:
        raise TLError(f"episodes={cfg.episodes!r} must be one integer")
    episodes = episodes[0]
    if episodes > MAX_EPISODES:
        raise TLError(
            f"episodes={episodes} must be at most {MAX_EPISODES} (the 95% interval is "
            f"already +-{1.96 * 0.5 / MAX_EPISODES**0.5:.4f} at most)"
        )
    try:
        seed = int(cfg.get("seed", 0))
    except (TypeError, ValueError):
        raise TLError(f"seed={cfg.get('seed')!r} must be an integer") from None
    center = str(cfg.get("center", "none"))
    if center not in ("support", "none"):
        raise TLError(f"center={center!r} must be support or none")
    split = str(cfg.get("split", "all"))
    return n_way, shots, episodes, seed, center, split


def _show(results: dict[str, Any], n_way: int, n_query: int, episodes: int) -> None:
    """The accuracy table: one row per shot count, with its 95% interval."""
    from rich.table import Table

    t = Table(
        title=f"tl fewshot: {n_way}-way, {n_query} queries per class, {episodes} episodes",
        header_style="bold",
    )
    for col in ("shots", "accuracy", "95% CI"):
        t.add_column(col, justify="right")
    for k, r in results.items():
        t.add_row(k, f"{r['acc']:.4f}", f"± {r['ci95']:.4f}")
    show(t)
