"""Audio folders: decoding (soundfile), resampling (soxr), checks, augmentation, padded batches.

Layouts are the image ones (``tl_cli.data.base.ClassFolderDataModule``, whose folder scan this reuses
with audio extensions): ``root/train`` + ``root/val`` [+ ``root/test``], ``root/train`` +
``root/test``, or ``root/<class>/*``. With ``label_from=regex`` the label is the one group of
``label_regex`` matched against each file name instead of the class folder (speaker datasets are
often named ``<word>_<speaker>_<take>.wav``); files may then sit at any depth.

Decoding: WAV, FLAC and OGG (Vorbis) through libsndfile (``soundfile``), any sample rate from
2 kHz to 384 kHz, 8 to 32-bit integer or float samples, mono or multichannel (downmixed to the
mean of the channels), resampled with ``soxr`` (HQ) to the backbone's rate (16 kHz).

Unreadable files fail the scan before training with one line naming the file (or are skipped
and counted under ``dataset.skip_corrupt=true``): empty or truncated files (a WAV whose header
declares more samples than the file holds included), non-audio files with
an audio extension, clips without samples, non-finite samples, silent clips (peak below
``SILENCE_PEAK``), sample rates outside the decoded range. The scan decodes every file once.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tl_cli.core.console import warn
from tl_cli.core.errors import TLError
from tl_cli.data.base import (
    DATASETS,
    ClassFolderDataModule,
    FileKind,
)
from tl_cli.data.scan import BadImage

AUDIO_EXTS = (".wav", ".flac", ".ogg")
AUDIO_FILES = FileKind(AUDIO_EXTS, "audio file", "audio files")
MIN_RATE, MAX_RATE = 2_000, 384_000
#: a clip whose loudest sample is below this (-80 dBFS) is silence
SILENCE_PEAK = 1e-4
LABEL_FROM = ("folder", "regex")


def _soundfile():
    try:
        import soundfile
    except (ImportError, OSError) as e:  # OSError: libsndfile missing
        raise TLError(f"audio needs soundfile (libsndfile): pip install soundfile ({e})") from None
    return soundfile


def _decode_reason(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    low = msg.lower()
    if "format not recognised" in low or "unknown format" in low:
        return "not an audio file soundfile can read (unknown format or not audio at all)"
    if "sf_info struct incomplete" in low:
        return (
            "a header the decoder cannot read (sample rate, channel count or format zero or "
            f"missing: {msg})"
        )
    if "sample rate" in low or "samplerate" in low:
        return f"a sample rate the decoder cannot read ({msg})"
    return f"corrupt or truncated audio ({msg})"


def wav_shortfall(path: str | os.PathLike[str]) -> str | None:
    """Why a WAV file is cut short, or None: its ``data`` chunk declares more bytes than the file
    holds. libsndfile reads what is there without a word (a copy cut to half its length decodes
    as a clip of half the length), so the header is read here. Streamed WAVs (data size 0 or
    0xFFFFFFFF: length unknown), RF64 and other formats are left to the decoder."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
                return None
            order = "big" if head[:4] == b"RIFX" else "little"
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                chunk = f.read(8)
                n = int.from_bytes(chunk[4:], order)
                if chunk[:4] == b"data":
                    have = size - pos - 8
                    # tolerance: writers that round the size, or leave a pad byte off
                    if n in (0, 0xFFFFFFFF) or n - have <= max(64, n // 100):
                        return None
                    return (
                        f"truncated WAV: its header says {n} bytes of samples, the file holds "
                        f"{have} ({100 * have // n}%)"
                    )
                pos += 8 + n + (n & 1)
    except OSError:
        return None  # the decoder reports unreadable files
    return None


def decode(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """``(samples, rate)``: float32 mono samples in [-1, 1] at the file's own rate.

    Raises a TLError naming the file for anything that is not a usable clip.
    """
    sf = _soundfile()
    try:
        if os.path.getsize(path) == 0:
            raise TLError(f"{path}: empty file (0 bytes)")
    except FileNotFoundError:
        raise TLError(f"{path}: audio file not found") from None
    short = wav_shortfall(path)
    if short:
        raise TLError(f"{path}: {short}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except TLError:
        raise
    except Exception as e:  # noqa: BLE001 - LibsndfileError, RuntimeError, ValueError, ...
        raise TLError(f"{path}: {_decode_reason(e)}") from None
    if not MIN_RATE <= int(rate) <= MAX_RATE:
        raise TLError(
            f"{path}: sample rate {rate} Hz is outside what tl decodes ({MIN_RATE}-{MAX_RATE} Hz)"
        )
    if data.shape[0] == 0:
        raise TLError(f"{path}: no audio samples (0 frames)")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise TLError(f"{path}: non-finite samples (NaN or inf)")
    peak = float(np.abs(mono).max())
    if peak < SILENCE_PEAK:
        db = "-inf" if peak == 0 else f"{20 * math.log10(peak):.0f}"
        raise TLError(f"{path}: silent clip (peak {db} dBFS, below -80 dBFS)")
    return np.ascontiguousarray(mono, dtype=np.float32), int(rate)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return x
    import soxr

    return soxr.resample(x, rate, target, quality="HQ").astype(np.float32, copy=False)


def load_audio(path: str | os.PathLike[str], sample_rate: int) -> np.ndarray:
    """Decode, downmix to mono and resample to ``sample_rate``; float32 in [-1, 1]."""
    x, rate = decode(path)
    return resample(x, rate, sample_rate)


def check_audio(path: str | os.PathLike[str]) -> str | None:
    """None if ``path`` decodes to a usable clip, else a short reason."""
    try:
        decode(path)
    except TLError as e:
        msg = str(e)
        prefix = f"{path}: "
        return msg[len(prefix) :] if msg.startswith(prefix) else msg
    return None


def scan_audio(
    paths: Sequence[str | os.PathLike[str]], workers: int | None = None
) -> list[BadImage]:
    """Decode every file (libsndfile releases the GIL: threads help); the bad ones, in order."""
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 64:
        reasons = [check_audio(p) for p in paths]
    else:
        with ThreadPoolExecutor(workers) as pool:
            reasons = list(pool.map(check_audio, paths, chunksize=32))
    return [BadImage(str(p), r) for p, r in zip(paths, reasons, strict=True) if r]


# --------------------------------------------------------------------------- clips


def fit_length(
    x: np.ndarray, min_len: int, max_len: int | None, rng: np.random.Generator | None
) -> np.ndarray:
    """Crop to ``max_len`` (centre; random with ``rng``), pad with zeros to ``min_len`` (centre;
    a random offset with ``rng``)."""
    n = len(x)
    if max_len and n > max_len:
        start = int(rng.integers(0, n - max_len + 1)) if rng is not None else (n - max_len) // 2
        x = x[start : start + max_len]
        n = max_len
    if n < min_len:
        room = min_len - n
        left = int(rng.integers(0, room + 1)) if rng is not None else room // 2
        x = np.pad(x, (left, room - left))
    return x


def augment_light(x: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Time shift (up to 100 ms), gain (+-6 dB), and with p=0.5 white noise at 10-40 dB SNR."""
    shift = int(rng.integers(-rate // 10, rate // 10 + 1))
    if shift > 0:
        x = np.concatenate([np.zeros(shift, np.float32), x[:-shift]])
    elif shift < 0:
        x = np.concatenate([x[-shift:], np.zeros(-shift, np.float32)])
    x = x * np.float32(10 ** (rng.uniform(-6, 6) / 20))
    if rng.random() < 0.5:
        rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) or 1e-4
        snr = rng.uniform(10, 40)
        x = x + rng.standard_normal(len(x)).astype(np.float32) * np.float32(rms / 10 ** (snr / 20))
    return np.clip(x, -1.0, 1.0).astype(np.float32, copy=False)


class AudioDataset(Dataset):
    """``(path, label)`` pairs -> ``(waveform (T,), label)`` at the backbone's rate."""

    def __init__(
        self, items: Sequence[tuple[Any, int]], prep: dict[str, Any], augment: bool
    ) -> None:
        self.items = list(items)
        self.rate = int(prep["sample_rate"])
        self.min_len = int(prep.get("min_samples", 0))
        secs = prep.get("max_seconds")
        self.max_len = int(float(secs) * self.rate) if secs else None
        self.augment = bool(augment)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        x = load_audio(path, self.rate)
        # torch's RNG is seeded per worker from the run's seed: augmentation is reproducible
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())) if self.augment else 0)
        x = fit_length(x, self.min_len, self.max_len, rng if self.augment else None)
        if self.augment:
            x = augment_light(x, self.rate, rng)
        return torch.from_numpy(np.ascontiguousarray(x)), label


def pad_collate(
    batch: Sequence[tuple[torch.Tensor, int]], spec_augment: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Zero-pad to the longest clip: ``{"audio": (B, T), "lengths": (B,)}`` [+ ``spec_augment``]."""
    lengths = torch.tensor([len(w) for w, _ in batch], dtype=torch.long)
    audio = torch.zeros(len(batch), int(lengths.max()))
    for i, (w, _) in enumerate(batch):
        audio[i, : len(w)] = w
    x: dict[str, torch.Tensor] = {"audio": audio, "lengths": lengths}
    if spec_augment:
        x["spec_augment"] = torch.ones(len(batch), dtype=torch.bool)
    return x, torch.tensor([y for _, y in batch], dtype=torch.long)


# --------------------------------------------------------------------------- data module


def _one_group_regex(key: str, value: Any, what: str = "the group") -> re.Pattern[str]:
    try:
        pattern = re.compile(str(value))
    except re.error as e:
        raise TLError(f"dataset.{key}={value!r} is not a valid regex: {e}") from None
    if pattern.groups != 1:
        raise TLError(
            f"dataset.{key}={value!r} must have exactly one group ({what}), it has {pattern.groups}"
        )
    return pattern


class AudioFolderDataModule(ClassFolderDataModule):
    """Folders of audio clips, one folder per class (or labels from file names).

    Args:
        root: the dataset folder (layouts: see the module docstring).
        skip_corrupt: skip unreadable clips with a warning instead of failing.
        label_from: ``folder`` (class folders) or ``regex`` (``label_regex`` on file names).
        label_regex: a regular expression with one group, searched in each file name.
        group_regex: a regular expression with one group naming what a file says or where it was
            recorded (the word of ``<word>_<speaker>_<take>.wav``: ``'^(\\d+)_'``); a carved val
            then holds out whole groups, so that it scores unseen words as a text-independent test
            does, and tl warns when val shares its groups with train while test does not.
        max_seconds: clips longer than this are cropped (null: the backbone's default).
        augment: ``light`` (time shift, gain, noise; SpecAugment masking in the backbone) or ``none``.
    """

    item_noun = "recordings"

    name = "audiofolder"
    kind = AUDIO_FILES
    scan_files = staticmethod(scan_audio)

    def __init__(
        self,
        root: str | None = None,
        skip_corrupt: bool = False,
        label_from: str = "folder",
        label_regex: str | None = None,
        group_regex: str | None = None,
        max_seconds: float | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(root=root, skip_corrupt=skip_corrupt, **kw)
        self.group_pattern = _one_group_regex("group_regex", group_regex) if group_regex else None
        #: the groups a carved val holds out (dataset.group_regex)
        self.held_groups: list[str] = []
        if label_from not in LABEL_FROM:
            raise TLError(
                f"dataset.label_from={label_from!r} must be one of {', '.join(LABEL_FROM)}"
            )
        self.label_from = label_from
        self.pattern: re.Pattern[str] | None = None
        if label_from == "regex":
            if not label_regex:
                raise TLError(
                    "dataset.label_from=regex needs dataset.label_regex, e.g. '^\\d+_([a-z]+)_'"
                )
            self.pattern = _one_group_regex("label_regex", label_regex, "the label")
        from tl_cli.core.checkpoint import MAX_AUDIO_SECONDS

        if max_seconds is not None and not 0 < float(max_seconds) <= MAX_AUDIO_SECONDS:
            raise TLError(
                f"dataset.max_seconds={max_seconds} must be a number of seconds in (0, "
                f"{MAX_AUDIO_SECONDS:g}] (longer clips are cropped; memory grows with it)"
            )
        self.max_seconds = max_seconds
        if self.augment not in (None, "none", False, "light"):
            raise TLError(f"dataset.augment={self.augment!r} must be 'light' or 'none'")

    # -- scanning
    def _folders(self, split_dir: Path) -> dict[str, list[Path]]:
        if self.pattern is None:
            return super()._folders(split_dir)
        from tl_cli.data.scan import drop_corrupt

        found: dict[str, list[Path]] = {}
        files = sorted(p for p in split_dir.rglob("*") if p.is_file() and self.kind.matches(p))
        if not files:
            raise TLError(f"{split_dir}: no audio files ({', '.join(AUDIO_EXTS)})")
        for p in files:
            m = self.pattern.search(p.name)
            if m is None or not m.group(1):
                raise TLError(
                    f"{p}: file name does not match dataset.label_regex={self.pattern.pattern!r} "
                    "(or its group is empty)"
                )
            found.setdefault(m.group(1), []).append(p)
        if len(found) < 2:
            raise TLError(
                f"{split_dir}: dataset.label_regex={self.pattern.pattern!r} gives {len(found)} label(s) "
                f"({', '.join(found)}); a classifier needs at least 2"
            )
        found = {k: found[k] for k in sorted(found)}
        kept, bad = drop_corrupt(
            found, split_dir, self.skip_corrupt, scan=self.scan_files, noun=self.kind.noun
        )
        self.skipped_corrupt.extend(bad)
        return kept

    def _scan(self) -> None:
        super()._scan()
        if self.pattern is not None:
            self.layout += f", labels from file names ({self.pattern.pattern})"
        if self.held_groups:
            self.layout += f", val holds out group(s) {', '.join(self.held_groups)} whole"
        if self.group_pattern is not None:
            line = self.group_warning()
            if line:
                warn(line)

    # -- groups (dataset.group_regex): words held out whole
    def group_of(self, path: Any) -> str:
        assert self.group_pattern is not None
        m = self.group_pattern.search(Path(str(path)).name)
        if m is None or not m.group(1):
            raise TLError(
                f"{path}: file name does not match dataset.group_regex="
                f"{self.group_pattern.pattern!r} (or its group is empty)"
            )
        return m.group(1)

    def split_groups(self) -> dict[str, set[str]]:
        return {k: {self.group_of(p) for p, _ in v} for k, v in self.splits.items() if v}

    def group_warning(self) -> str | None:
        """A line when val shares its groups (words) with train while test's are all new: val
        then scores what test does not (text-dependent against text-independent)."""
        g = self.split_groups()
        if "test" not in g or "val" not in g:
            return None
        shared_val = g["val"] & g["train"]
        if g["test"] & g["train"] or not shared_val:
            return None
        return (
            f"val shares its dataset.group_regex groups with train ({', '.join(sorted(shared_val)[:5])}"
            f"{' ...' if len(shared_val) > 5 else ''}) while test's ({', '.join(sorted(g['test'])[:5])}"
            f"{' ...' if len(g['test']) > 5 else ''}) are all new: val/acc measures seen words, test "
            "unseen ones (drop the val/ folder to carve val by group)"
        )

    def _carve(self, items: list[tuple[Any, int]], classes: list[str], where: Path):
        """With ``group_regex``: val holds out whole groups (a seeded choice of
        ``round(val_fraction x groups)``, at least one, never all); otherwise the stratified carve."""
        if self.group_pattern is None or not self.carve:
            return super()._carve(items, classes, where)
        groups = sorted({self.group_of(p) for p, _ in items})
        if len(groups) < 2:
            raise TLError(
                f"{where}: dataset.group_regex={self.group_pattern.pattern!r} finds "
                f"{len(groups)} group(s) ({', '.join(groups)}); holding out whole groups for val "
                "needs at least 2 (or give a val/ folder)"
            )
        import random

        n_val = min(len(groups) - 1, max(1, round(len(groups) * float(self.val_fraction))))
        held_groups = set(random.Random(self.split_seed).sample(groups, n_val))
        keep = [it for it in items if self.group_of(it[0]) not in held_groups]
        held = [it for it in items if self.group_of(it[0]) in held_groups]
        missing = sorted({classes[y] for _, y in items} - {classes[y] for _, y in keep})
        if missing:
            raise TLError(
                f"{where}: holding out group(s) {', '.join(sorted(held_groups))} for val leaves "
                f"class(es) {', '.join(missing[:5])} without training clips; change "
                "dataset.split_seed or give a val/ folder"
            )
        self.held_groups = sorted(held_groups)
        return keep, held

    def read_target(self, root: Path) -> list[tuple[Any, str | None]]:
        """A target domain (``dataset.target_root``): with ``label_from=regex`` the clips at any
        depth, labelled by ``label_regex`` when every file name matches it and unlabelled when
        none does; otherwise class folders (labelled) or a flat folder of clips (unlabelled)."""
        if self.pattern is None:
            return super().read_target(root)
        from tl_cli.data.scan import drop_corrupt

        if not root.is_dir():
            raise TLError(f"dataset.target_root={root} is not a directory (a folder of clips)")
        files = sorted(p for p in root.rglob("*") if p.is_file() and self.kind.matches(p))
        if not files:
            raise TLError(f"dataset.target_root={root}: no audio files ({', '.join(AUDIO_EXTS)})")
        matches = [self.pattern.search(p.name) for p in files]
        labels = [m.group(1) if m is not None and m.group(1) else None for m in matches]
        missing = [p for p, y in zip(files, labels, strict=True) if y is None]
        if missing and len(missing) < len(files):
            raise TLError(
                f"{missing[0]}: file name does not match dataset.label_regex="
                f"{self.pattern.pattern!r} while {len(files) - len(missing)} other target files do "
                "(label all target files, or none: an unlabelled target is only adapted to)"
            )
        kept, bad = drop_corrupt(
            {"": files}, root, self.skip_corrupt, scan=self.scan_files, noun=self.kind.noun
        )
        self.skipped_corrupt.extend(bad)
        label = dict(zip(files, labels, strict=True))
        return [(str(p), label[p]) for p in kept[""]]

    # -- preprocessing and loaders
    def preprocessing_overrides(self) -> dict[str, Any]:
        return {"max_seconds": float(self.max_seconds)} if self.max_seconds else {}

    def set_preprocessing(self, prep: dict[str, Any]) -> None:
        if "sample_rate" not in prep:
            raise TLError(
                "dataset=audiofolder needs an audio backbone (its preprocessing has no sample_rate); "
                "use modality=audio or backbone=speech_embedding"
            )
        self.preprocessing = dict(prep)
        if self.max_seconds:
            self.preprocessing["max_seconds"] = float(self.max_seconds)

    def dataset(self, split: str, train_aug: bool | None = None) -> AudioDataset:  # type: ignore[override]
        items = self.split_items(split)
        aug = split == "train" if train_aug is None else train_aug
        aug = bool(aug) and self.augment not in (None, "none", False)
        return AudioDataset(items, self.preprocessing, augment=aug)

    def collate_fn(self, ds: Dataset | None = None) -> Any:
        """Zero-pad clips to the longest in the batch (+ lengths); SpecAugment on training sets."""
        return functools.partial(pad_collate, spec_augment=getattr(ds, "augment", False))


DATASETS.register("audiofolder", AudioFolderDataModule)


# --------------------------------------------------------------------------- predict / export
