"""Few-shot classification on frozen features: SimpleShot prototypes and episodic evaluation.

* ``tl train strategy=prototypes dataset.root=DIR``: a nearest-prototype classifier (SimpleShot,
  Wang et al. 2019, "SimpleShot: Revisiting Nearest-Neighbor Classification for Few-Shot
  Learning"): backbone features are centred on the mean training feature, L2-normalised, and
  each class is the mean of its normalised features. One pass over the data (the feature cache),
  no optimizer steps, works from one item per class. The classifier is the registered head
  ``prototype`` (:class:`PrototypeHead`), so the checkpoint is an ordinary tl checkpoint.
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
import re
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from tl_cli.core.console import say, show, warn
from tl_cli.core.errors import TLError
from tl_cli.transfer.heads import HEADS
from tl_cli.transfer.strategies import STRATEGIES, FeatureExtraction

#: fewshot.json layout version
FEWSHOT_SCHEMA_VERSION = 1
#: the softmax scale when leave-one-out cannot fit one (a class with one item)
DEFAULT_SCALE = 10.0
#: scales tried when fitting the temperature by leave-one-out cross-entropy
SCALE_GRID = np.geomspace(1.0, 100.0, 41)


# --------------------------------------------------------------------------- the head


@HEADS.register("prototype")
class PrototypeHead(nn.Module):
    """Nearest class prototype on centred, L2-normalised features, as a linear layer.

    ``logits = scale * (normalize(f - center) @ P.T - |p|^2 / 2)``: the class with the highest
    logit is the nearest prototype (Euclidean). ``center``, the prototypes ``P`` (``linear.weight``)
    and ``scale`` are tensors in the state dict; nothing else is stored.

    Args:
        scale: initial softmax scale (the prototypes strategy fits it by leave-one-out when it can).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = DEFAULT_SCALE) -> None:
        super().__init__()
        if not float(scale) > 0:
            raise ValueError(f"scale={scale} must be > 0")
        self.register_buffer("center", torch.zeros(in_features))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = F.normalize(f - self.center, dim=-1)
        return self.scale * self.linear(z)

    @torch.no_grad()
    def set_prototypes(self, center: torch.Tensor, protos: torch.Tensor, scale: float) -> None:
        self.center.copy_(center.to(self.center))
        self.linear.weight.copy_(protos.to(self.linear.weight))
        self.linear.bias.copy_((-0.5 * (protos * protos).sum(1)).to(self.linear.bias))
        self.scale.fill_(float(scale))


# --------------------------------------------------------------------------- SimpleShot maths


def normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def prototypes(
    feats: np.ndarray, labels: np.ndarray, num_classes: int, center: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(center, prototypes): the mean feature (or ``center``), and per class the mean of the
    centred, L2-normalised features. A class without items gets a zero prototype."""
    feats = np.asarray(feats, dtype=np.float64)
    c = feats.mean(0) if center is None else np.asarray(center, dtype=np.float64)
    z = normalize(feats - c)
    protos = np.zeros((num_classes, feats.shape[1]))
    np.add.at(protos, labels, z)
    counts = np.bincount(labels, minlength=num_classes)
    protos /= np.maximum(counts, 1)[:, None]
    return c, protos


def proto_logits(z: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """Logits at scale 1 of normalised features ``z``: ``z.p - |p|^2 / 2``."""
    return z @ protos.T - 0.5 * (protos * protos).sum(1)


def leave_one_out(
    feats: np.ndarray, labels: np.ndarray, num_classes: int, center: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Logits (scale 1) of each item against prototypes built without it, and the items' labels,
    for items whose class has 2 or more items (the centre stays: it uses no labels). None if none."""
    c, protos = prototypes(feats, labels, num_classes, center)
    z = normalize(np.asarray(feats, dtype=np.float64) - c)
    counts = np.bincount(labels, minlength=num_classes)
    keep = counts[labels] >= 2
    if not keep.any():
        return None
    z, y = z[keep], labels[keep]
    logits = proto_logits(z, protos)
    n = counts[y][:, None]
    own = (protos[y] * n - z) / (n - 1)  # the item's class prototype without the item
    logits[np.arange(len(y)), y] = (z * own).sum(1) - 0.5 * (own * own).sum(1)
    return logits, y


def fit_scale(logits: np.ndarray, y: np.ndarray) -> float:
    """The softmax scale with the lowest cross-entropy on (leave-one-out) logits."""
    best, best_s = math.inf, DEFAULT_SCALE
    for s in SCALE_GRID:
        a = s * logits
        a = a - a.max(1, keepdims=True)
        nll = float(np.mean(np.log(np.exp(a).sum(1)) - a[np.arange(len(y)), y]))
        if nll < best:
            best, best_s = nll, float(s)
    return best_s


# --------------------------------------------------------------------------- data: every item


def use_every_item(dm: Any) -> None:
    """Before ``dm.prepare()``: no validation (or test) carve; every labelled item of the data
    stays in train. Prototypes select nothing on held-out data, and a user with three images per
    class wants all three used. Folders the user split (val/, test/, val.csv) are kept."""

    def keep_all(items: Sequence[Any], *args: Any, **kwargs: Any) -> tuple[list, list]:
        return list(items), []

    dm._carve = keep_all  # folder datasets (images, audio, text): val/test carve
    if hasattr(dm, "_check_counts"):
        dm._check_counts = lambda *a, **k: None  # text: minimum rows per class for a carve


def after_prepare(dm: Any) -> bool:
    """Drop empty splits; without a val split, validate on the training items. True if so."""
    dm.splits = {k: v for k, v in dm.splits.items() if v or k == "train"}
    if dm.splits.get("val"):
        return False
    dm.splits["val"] = list(dm.splits["train"])
    layout = re.sub(r",?\s*val( \+ test)? carved( from train)?", "", dm.layout or "")
    dm.layout = f"{layout}, no carve: val = train" if layout else "no carve: val = train"
    return True


# --------------------------------------------------------------------------- the strategy


@STRATEGIES.register("prototypes")
class Prototypes(FeatureExtraction):
    """SimpleShot: a frozen backbone, and the ``prototype`` head set from class means in one pass.

    No validation carve (every labelled item builds the prototypes; without a val split, val is
    the training items and the leave-one-out accuracy is the honest estimate). The softmax scale
    is fitted by leave-one-out cross-entropy when every class has 2 or more items.

    Args:
        cache_dir: keep the features on disk (as ``strategy=feature_extraction``).
        fit_scale: fit the softmax scale by leave-one-out (else keep ``head.scale``).
        center: subtract the mean training feature before normalising (SimpleShot's CL2N).
            Off by default: SimpleShot centres on the mean of a large base-class set; centring on
            a few-shot training set's own mean cost 1-4 points in every setting measured
            (docs/fewshot.md). The head holds the centre either way (zeros when off).
    """

    name = "prototypes"

    def __init__(
        self, cache_dir: str | None = None, fit_scale: bool = True, center: bool = False
    ) -> None:
        super().__init__(cache_features=True, cache_dir=cache_dir, head_fit="sgd")
        self.head_fit = "prototypes"
        self.fit_scale = bool(fit_scale)
        self.center = bool(center)

    @staticmethod
    def before_scan(dm: Any) -> None:
        """No validation carve: every item is a support item."""
        use_every_item(dm)

    @staticmethod
    def after_scan(dm: Any) -> None:
        """Without a val split, validation runs on the train items (said in the summary)."""
        dm.val_is_train = after_prepare(dm)

    def fit_head(self, module: Any) -> None:
        """Set the prototype head from the training features (the feature cache)."""
        if not isinstance(module.head, PrototypeHead):
            raise TLError(
                f"strategy=prototypes sets a head=prototype; head={module.hparams.head.get('name')} "
                "cannot hold prototypes (drop head=...)"
            )
        t0 = time.time()
        feats, labels = module._train_features()
        labels = np.asarray(labels, dtype=np.int64)
        n = module.num_outputs
        counts = np.bincount(labels, minlength=n)
        missing = [module.class_names[i] for i in np.flatnonzero(counts == 0)]
        if missing:
            raise TLError(f"class {missing[0]!r} has no training items: no prototype")
        c0 = None if self.center else np.zeros(np.asarray(feats).shape[1])
        center, protos = prototypes(feats, labels, n, c0)
        loo = leave_one_out(feats, labels, n, center)
        scale = float(module.head.scale)
        loo_acc = None
        if loo is not None:
            loo_acc = float((loo[0].argmax(1) == loo[1]).mean())
            if self.fit_scale:
                scale = fit_scale(*loo)
        module.head.set_prototypes(torch.from_numpy(center), torch.from_numpy(protos), scale)
        module.head_converged = True  # the backbone never trains: epochs take no steps
        dm = getattr(module.trainer, "datamodule", None)
        images = getattr(dm, "images", dm)
        val_is_train = bool(getattr(images, "val_is_train", False))
        module.head_fit_info = {
            "method": "prototypes",
            "items": int(len(labels)),
            "per_class_min": int(counts.min()),
            "loo_acc": loo_acc,
            "scale": round(scale, 4),
            "center": self.center,
            "val_is_train": val_is_train,
            "seconds": round(time.time() - t0, 2),
            "summary": f"head = {n} class prototypes (SimpleShot, {len(labels)} items)",
        }
        est = (
            f"leave-one-out accuracy {loo_acc:.4f}"
            if loo_acc is not None
            else "no leave-one-out estimate (a class has 1 item)"
        )
        say(
            f"[bold]head[/] {n} prototypes from {len(labels)} items ("
            f"{'centred, ' if self.center else ''}L2-normalised class means; scale {scale:.3g}); {est}"
        )
        if val_is_train:
            say(
                "no val split: val/acc is measured on the training items (prototypes are not "
                "selected on it); the leave-one-out accuracy above is the honest estimate"
            )


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


def pick_device(want: str) -> torch.device:
    want = str(want)
    if want not in ("auto", "cpu", "cuda", "gpu"):
        raise TLError(f"device={want!r} must be auto, cpu or cuda")
    if want in ("cuda", "gpu") and not torch.cuda.is_available():
        raise TLError(f"device={want}: no CUDA device here")
    use_cuda = want != "cpu" and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


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
    import tl_cli.components  # noqa: F401 - every registry complete
    from tl_cli.core.outputs import check_output, claim_run_dir, release_run_dir, write_json
    from tl_cli.core.registry import plain
    from tl_cli.data.base import DATASETS
    from tl_cli.modalities.backbones import build_backbone

    out = Path(str(cfg.output_dir))
    overwrite = bool(cfg.get("overwrite", False))
    n_way = _ints(cfg.get("n_way", 5), "n_way")
    if len(n_way) != 1:
        raise TLError(f"n_way={cfg.n_way!r} must be one integer")
    n_way = n_way[0]
    shots = _ints(cfg.get("n_shot", [1, 5]), "n_shot")
    episodes = _ints(cfg.get("episodes", 600), "episodes")
    if len(episodes) != 1:
        raise TLError(f"episodes={cfg.episodes!r} must be one integer")
    episodes = episodes[0]
    try:
        seed = int(cfg.get("seed", 0))
    except (TypeError, ValueError):
        raise TLError(f"seed={cfg.get('seed')!r} must be an integer") from None
    center = str(cfg.get("center", "none"))
    if center not in ("support", "none"):
        raise TLError(f"center={center!r} must be support or none")
    split = str(cfg.get("split", "all"))
    device = pick_device(cfg.get("device", "auto"))
    check_output(out / "fewshot.json", overwrite=overwrite)

    dcfg = plain(cfg.dataset)
    if OmegaConf.is_missing(cfg.dataset, "root") or not dcfg.get("root"):
        raise TLError("dataset.root is not set: pass dataset.root=DIR (a folder of class folders)")
    dm = DATASETS.build(dcfg)
    use_every_item(dm)
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
    if len(counts) == n_way:
        warn(f"only {len(counts)} classes: every episode uses the same classes")
    say(f"results: {out / 'fewshot.json'}")
    return doc
