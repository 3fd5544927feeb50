"""Cached backbone features for frozen-backbone training.

A frozen backbone maps each image to the same features every epoch, so `tl` computes them once
per split and trains the head on the cached tensors: each later epoch costs only the head.

* Features are computed in ``setup()``, i.e. inside ``trainer.fit``, after Lightning has set up
  the process group: under DDP each rank extracts its own shard (``rank::world_size``) and the
  shards are all-gathered, so every rank holds exactly the single-process features.
* ``cache_dir``: features also go to disk as ``.npy`` memory maps (written while extracting, then
  renamed into place), read back with ``mmap_mode="r"``: memory stays bounded for datasets
  larger than RAM, and a later run with the same key skips extraction. The key hashes the
  backbone's weights, the preprocessing, the transform (eval or augmented view), and every
  file's path, size and mtime, so any change invalidates it.
* ``cache_views=K``: the train split is cached K times with training augmentation; epoch e
  trains on view ``e mod K``. With ``K=0`` train features use the eval transform (no
  augmentation).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from tl_cli.console import progress, say
from tl_cli.data import EpochShuffle, TransferDataModule

CACHE_FORMAT = 1


class ArrayFeatures(Dataset):
    """``(features, label)`` rows from arrays (in memory or memory-mapped)."""

    def __init__(self, feats: Any, labels: Any) -> None:
        self.feats, self.labels = feats, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        # a dict marks cached features for the task module (``tl_cli.tasks.cached``)
        feats = torch.as_tensor(np.asarray(self.feats[i], dtype=np.float32))
        return {"features": feats}, int(self.labels[i])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def weights_digest(backbone: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in backbone.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(
    weights: str, prep: dict[str, Any], items: list[tuple[Any, int]], view: str, source: str
) -> str:
    """Changes whenever the weights, preprocessing, transform view or any file changes."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "weights": weights,
                "prep": prep,
                "view": view,
                "source": source,
            },
            sort_keys=True,
        ).encode()
    )
    for item, label in items:
        if isinstance(item, str):
            st = os.stat(item)
            h.update(f"{item}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
        else:
            h.update(f"{item}\0{label}\n".encode())
    return h.hexdigest()[:32]


@torch.inference_mode()
def extract(
    backbone: torch.nn.Module,
    ds: Dataset,
    dm: TransferDataModule,
    device: torch.device,
    desc: str,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of `ds` (this rank's shard under DDP, gathered), written into `out` if given."""
    rank, world = _world()
    n = len(ds)  # type: ignore[arg-type]
    shard = Subset(ds, list(range(rank, n, world))) if world > 1 else ds
    loader = dm.make_loader(shard, shuffle=False)
    feats = (
        out
        if out is not None and world == 1
        else np.empty((len(shard), backbone.num_features), dtype=np.float32)
    )  # type: ignore[arg-type]
    labels = np.empty(len(shard), dtype=np.int64)
    i = 0
    with progress(desc, total=len(loader)) as advance:
        for x, y in loader:
            f = backbone(x.to(device, non_blocking=True)).float().cpu().numpy()
            feats[i : i + len(f)] = f
            labels[i : i + len(f)] = np.asarray(y)
            i += len(f)
            advance()
    if world == 1:
        return (feats if out is None else np.empty(0)), labels
    # gather equal-sized padded shards, then interleave back to dataset order
    per = (n + world - 1) // world
    pad_f = torch.zeros(per, feats.shape[1])
    pad_f[: len(feats)] = torch.from_numpy(feats)
    pad_y = torch.full((per,), -1, dtype=torch.long)
    pad_y[: len(labels)] = torch.from_numpy(labels)
    gf = [torch.zeros_like(pad_f) for _ in range(world)]
    gy = [torch.zeros_like(pad_y) for _ in range(world)]
    dist.all_gather(gf, pad_f)
    dist.all_gather(gy, pad_y)
    full_f = torch.stack(gf, 1).reshape(per * world, -1)[:n]
    full_y = torch.stack(gy, 1).reshape(per * world)[:n]
    if out is not None:
        out[0:n] = full_f.numpy()
    return full_f.numpy(), full_y.numpy()


class RowWriter:
    """Writes rows of a ``.npy`` file with plain file writes.

    A writable memmap would keep every written page mapped (and counted) in this process until
    the end; file writes leave them to the page cache, so memory stays bounded while extracting.
    """

    def __init__(self, path: Path, rows: int, dim: int) -> None:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
        self.offset, self.row_bytes = header.offset, dim * 4
        del header
        self.fh = open(path, "r+b")  # noqa: SIM115 - closed in close()

    def __setitem__(self, sl: slice, value: np.ndarray) -> None:
        self.fh.seek(self.offset + (sl.start or 0) * self.row_bytes)
        self.fh.write(np.ascontiguousarray(value, dtype=np.float32).tobytes())

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


class FeatureDataModule(pl.LightningDataModule):
    """Serves cached ``(features, label)`` batches in place of images.

    Args:
        backbone: the frozen backbone (moved to the trainer's device while extracting).
        images: the scanned image data module (its splits, transforms and loaders are used).
        cache_dir: optional folder for the on-disk cache.
        views: augmented train views (0: train features from the eval transform).
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        images: TransferDataModule,
        cache_dir: str | None = None,
        views: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.images = images
        self.batch_size = images.batch_size
        self.cache_dir = Path(os.path.expanduser(cache_dir)) if cache_dir else None
        self.views = max(0, int(views))
        self.splits: dict[str, list[ArrayFeatures]] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    # -- building
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        device = (
            self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        )
        was = next(self.backbone.parameters()).device
        self.backbone.to(device)
        digest = weights_digest(self.backbone) if self.cache_dir else ""
        try:
            for split in self.images.splits:
                if split == "train" and self.views > 0:
                    self.splits[split] = [
                        self._one(split, True, f"aug{v}", device, digest) for v in range(self.views)
                    ]
                else:
                    self.splits[split] = [self._one(split, False, "eval", device, digest)]
        finally:
            self.backbone.to(was)
        if self.cache_dir and _world()[0] == 0:
            say(
                f"feature cache {self.cache_dir}: {self.cache_hits} hit(s), {self.cache_misses} computed"
            )

    def _one(
        self, split: str, aug: bool, view: str, device: torch.device, digest: str
    ) -> ArrayFeatures:
        ds = self.images.dataset(split, train_aug=aug)
        desc = f"caching {split} features" + (f" ({view})" if aug else "")
        if self.cache_dir is None:
            f, y = extract(self.backbone, ds, self.images, device, desc)
            return ArrayFeatures(f, y)
        key = cache_key(
            digest,
            self.images.preprocessing or {},
            self.images.splits[split],
            view,
            type(self.images).__name__,
        )
        stem = self.cache_dir / f"{split}-{key}"
        fpath, ypath = stem.with_suffix(".features.npy"), stem.with_suffix(".labels.npy")
        rank, world = _world()
        if fpath.exists() and ypath.exists():
            self.cache_hits += 1
            return ArrayFeatures(np.load(fpath, mmap_mode="r"), np.load(ypath))
        self.cache_misses += 1
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        n = len(ds)
        tmp = fpath.with_name(f".{fpath.name}.{os.getpid()}.tmp")
        out = RowWriter(tmp, n, self.backbone.num_features) if rank == 0 else None
        f, y = extract(self.backbone, ds, self.images, device, desc, out=out)  # type: ignore[arg-type]
        del f
        if out is not None:
            out.close()
            ytmp = ypath.with_name(f".{ypath.name}.{os.getpid()}.tmp.npy")
            np.save(ytmp, y)
            os.replace(ytmp, ypath)
            os.replace(tmp, fpath)  # features last: their presence marks a complete entry
        if world > 1:
            dist.barrier()
        return ArrayFeatures(np.load(fpath, mmap_mode="r"), np.load(ypath))

    # -- loaders
    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        n = len(ds)  # type: ignore[arg-type]
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochShuffle(n) if shuffle else None,
            num_workers=0,
        )

    def train_dataloader(self) -> DataLoader:
        views = self.splits["train"]
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return self._loader(views[epoch % len(views)], True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["val"][0], False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits["test"][0], False)
