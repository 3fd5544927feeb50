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
  file's path, size and mtime (in-memory items such as texts: their content), so any change
  invalidates it.
* Integrity: an entry is ``<split>-<key>.features.npy``, ``.labels.npy`` and ``.meta.json``, a
  manifest (rows, dim, dtypes, byte sizes, sha256 of both files) written last, after both arrays
  are renamed into place, so its presence marks a complete entry. Every load checks the npy
  headers, sizes and checksums against it (hashed in chunks: tens of milliseconds per 25 MB); a
  damaged entry (or one without a manifest) is reported with its path and rebuilt. Temp files
  ``.<name>.<pid>.tmp[.npy]`` left by a killed run are removed once that pid no longer exists,
  and a full disk while writing is a one-line error naming the file, with the temp removed.
* ``cache_views=K``: the train split is cached K times with training augmentation; epoch e
  trains on view ``e mod K``. With ``K=0`` train features use the eval transform (no
  augmentation).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader, Dataset, Subset

from tl_cli.core.console import progress, say
from tl_cli.core.errors import EXIT_FAILED, TLError
from tl_cli.data.base import EpochBalanced, EpochShuffle, TransferDataModule

CACHE_FORMAT = 1  # part of every key: changing it orphans all entries
MANIFEST_VERSION = 1  # the .meta.json layout: an entry with another version is rebuilt
_HASH_CHUNK = 4 << 20
#: ``.<final name>.<pid>.tmp`` (features, manifest) or ``.<final name>.<pid>.tmp.npy`` (labels)
_TEMP = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.tmp(?:\.npy)?$")


class ArrayFeatures(Dataset):
    """``(features, label)`` rows from arrays (in memory or memory-mapped)."""

    def __init__(self, feats: Any, labels: Any) -> None:
        self.feats, self.labels = feats, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        # a dict marks cached features for the task module (``tl_cli.tasks.base.cached``)
        feats = torch.from_numpy(np.array(self.feats[i], dtype=np.float32))
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
        elif hasattr(item, "cache_bytes"):  # in-memory content (text): hashed, not stat()ed
            h.update(item.cache_bytes() + f"\0{label}\n".encode())
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
            f = backbone(move_data_to_device(x, device)).float().cpu().numpy()
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

    def abort(self) -> None:
        """Close without flushing to disk (the file is about to be removed)."""
        try:
            self.fh.close()
        except OSError:
            pass


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in fixed-size chunks (memory stays bounded for any size)."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) from a ``.npy`` header."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        return shape, fortran, dtype, fh.tell()


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_manifest(meta: Path, fpath: Path, ypath: Path, rows: int, dim: int) -> None:
    """Write the manifest of a complete entry (temp file, then an atomic rename)."""
    doc = {
        "version": MANIFEST_VERSION,
        "rows": rows,
        "dim": dim,
        "dtype": "float32",
        "labels_dtype": "int64",
        "features": _file_entry(fpath),
        "labels": _file_entry(ypath),
    }
    tmp = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(json.dumps(doc, indent=1) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, meta)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_entry(meta: Path, fpath: Path, ypath: Path) -> str | None:
    """None if the entry is complete and intact, else what is wrong, naming the file."""
    if not meta.exists():
        return f"{meta}: missing (entry incomplete or from an older tl)"
    try:
        doc = json.loads(meta.read_text())
        rows, dim = int(doc["rows"]), int(doc["dim"])
        if doc.get("version") != MANIFEST_VERSION:
            return f"{meta}: manifest version {doc.get('version')!r}, expected {MANIFEST_VERSION}"
        want = {
            fpath: ((rows, dim), np.dtype(doc["dtype"]), doc["features"]),
            ypath: ((rows,), np.dtype(doc["labels_dtype"]), doc["labels"]),
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{meta}: unreadable manifest ({type(e).__name__}: {e})"
    for path, (shape, dtype, entry) in want.items():
        if not path.exists():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path}: {size} bytes, expected {entry['bytes']} (truncated or overwritten)"
        try:
            got_shape, fortran, got_dtype, offset = _npy_header(path)
        except (OSError, ValueError) as e:
            return f"{path}: bad .npy header ({e})"
        if got_shape != shape or got_dtype != dtype or fortran:
            return (
                f"{path}: header says {got_dtype}{list(got_shape)}, expected {dtype}{list(shape)}"
            )
        if offset + int(np.prod(shape)) * dtype.itemsize != size:
            return f"{path}: {size} bytes do not hold a {dtype}{list(shape)} array"
        if file_sha256(path) != entry["sha256"]:
            return f"{path}: checksum mismatch (contents changed on disk)"
    return None


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temp files whose writer (the pid in the name) no longer exists; never a live one's."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass  # another run removed it first
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a real pid: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True
    return True


WHOLE_BATCH_MAX = 16384


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
        # set by the task when nothing trains (a head fitted by L-BFGS on a frozen backbone): the
        # train epochs then only measure the train metrics, so each is served as one batch
        self.whole_train_batch = False

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
        if self.cache_dir and _world()[0] == 0:
            for p in remove_stale_temps(self.cache_dir):
                say(f"feature cache: removed {p} (left by a run that no longer exists)")
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
        meta = stem.with_suffix(".meta.json")
        rank, world = _world()
        problem: str | None = "absent"
        if rank == 0:
            if any(p.exists() for p in (meta, fpath, ypath)):
                problem = check_entry(meta, fpath, ypath)
                if problem:
                    say(f"feature cache: damaged entry {problem}; rebuilding")
        if world > 1:  # rank 0's verdict for all: every rank takes the same path
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem is None:
            self.cache_hits += 1
            return ArrayFeatures(np.load(fpath, mmap_mode="r"), np.load(ypath))
        self.cache_misses += 1
        n, dim = len(ds), self.backbone.num_features
        if rank == 0:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            meta.unlink(missing_ok=True)  # no manifest until the new entry is complete
        pid = os.getpid()
        tmp = fpath.with_name(f".{fpath.name}.{pid}.tmp")
        ytmp = ypath.with_name(f".{ypath.name}.{pid}.tmp.npy")
        writing = fpath  # named in a disk-full error (its temp file is removed)
        out: RowWriter | None = None
        try:
            out = RowWriter(tmp, n, dim) if rank == 0 else None
            f, y = extract(self.backbone, ds, self.images, device, desc, out=out)  # type: ignore[arg-type]
            del f
            if out is not None:
                out.close()
                out = None
                writing = ypath
                np.save(ytmp, y)
                os.replace(ytmp, ypath)
                os.replace(tmp, fpath)
                writing = meta
                write_manifest(meta, fpath, ypath, n, dim)  # last: marks a complete entry
        except BaseException as e:
            if out is not None:
                out.abort()
            for p in (tmp, ytmp):
                p.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TLError(
                    f"no space left on the device writing the feature cache {writing} "
                    f"({n} x {dim} float32 = {n * dim * 4 / 2**20:.1f} MiB for this split): "
                    "free space, or point strategy.cache_dir elsewhere (null: no disk cache)",
                    exit_code=EXIT_FAILED,
                ) from e
            raise
        if world > 1:
            dist.barrier()
        return ArrayFeatures(np.load(fpath, mmap_mode="r"), np.load(ypath))

    # -- loaders
    def _loader(self, ds: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        n = len(ds)  # type: ignore[arg-type]
        sampler = EpochShuffle(n) if shuffle else None
        if shuffle and getattr(self.images, "balance", None) == "sampler":
            sampler = EpochBalanced(np.asarray(ds.labels).tolist())  # type: ignore[attr-defined]
        return DataLoader(
            ds,
            batch_size=batch_size or self.batch_size,
            sampler=sampler,
            num_workers=0,
        )

    def train_dataloader(self) -> DataLoader:
        views = self.splits["train"]
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        ds = views[epoch % len(views)]
        # one batch up to WHOLE_BATCH_MAX inputs (84 MB of 1280-d features): beyond that the
        # per-step overhead is small against the epoch anyway
        whole = min(max(1, len(ds)), WHOLE_BATCH_MAX) if self.whole_train_batch else None
        return self._loader(ds, True, whole)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["val"][0], False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits["test"][0], False)
