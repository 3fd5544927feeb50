"""Audio clips in `tl predict` and `tl export`: which files, how to read one, the graph's inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tl_cli.modalities.audio.data import AUDIO_EXTS, fit_length, load_audio, pad_collate
from tl_cli.modalities.base import MODALITIES, Modality


@MODALITIES.register("audio")
class AudioModality(Modality):
    """Audio clips: 16 kHz mono float32 waveforms, zero-padded into a batch, with lengths."""

    name = "audio"
    noun = "clips"
    folder_dataset = "audiofolder"
    extensions = AUDIO_EXTS

    def loader(self, prep: dict[str, Any]):
        rate, min_len = int(prep["sample_rate"]), int(prep.get("min_samples", 0))
        secs = prep.get("max_seconds")
        max_len = int(float(secs) * rate) if secs else None

        def load(path: Any) -> torch.Tensor:
            x = fit_length(load_audio(path, rate), min_len, max_len, None)
            return torch.from_numpy(np.ascontiguousarray(x))

        return load

    def collate(self, inputs: list[Any], prep: dict[str, Any]) -> Any:
        x, _ = pad_collate([(w, 0) for w in inputs])
        return x

    def example(self, prep: dict[str, Any], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        n = int(prep.get("min_samples", 16000)) + int(prep["sample_rate"]) // 2
        audio = 0.1 * torch.randn(batch, n, generator=g)
        lengths = torch.full((batch,), n, dtype=torch.long)
        lengths[-1] = int(prep.get("min_samples", n))  # one clip padded in its batch
        audio[-1, int(lengths[-1]) :] = 0
        return audio, lengths

    def input_names(self, prep: dict[str, Any]) -> list[str]:
        return ["audio", "lengths"]

    def dynamic_axes(self, prep: dict[str, Any]) -> dict[str, dict[int, str]]:
        return {"audio": {0: "batch", 1: "samples"}, "lengths": {0: "batch"}}

    def axis_min(self, prep: dict[str, Any]) -> dict[str, int]:
        return {"samples": int(prep.get("min_samples", 1))}  # one window at least

    def pack(self, *tensors: torch.Tensor) -> Any:
        return {"audio": tensors[0], "lengths": tensors[1]}

    def describe_input(self, prep: dict[str, Any]) -> dict[str, Any]:
        rate = int(prep["sample_rate"])
        return {
            "name": "audio",
            "shape": ["batch", "samples"],
            "dtype": "float32",
            "lengths": {"name": "lengths", "shape": ["batch"], "dtype": "int64"},
            "sample_rate": rate,
            "transform": (
                f"decode, mean of channels, resample to {rate} Hz (soxr HQ), samples in [-1, 1]; "
                f"centre-pad with zeros to at least {prep.get('min_samples')} samples, crop "
                f"to {prep.get('max_seconds')} s (centre); batch: zero-pad at the end to the "
                "longest clip, lengths = samples before that padding (the model itself adds "
                f"{prep.get('pad_frames', 0)} frames of silence before and after each clip)"
            ),
            "front_end": {
                k: prep[k]
                for k in (
                    "n_fft",
                    "hop_samples",
                    "mel_bins",
                    "top_db",
                    "mel_transform",
                    "window_frames",
                    "window_stride",
                    "pad_frames",
                    "pooling",
                    "features",
                    "normalize",
                )
                if k in prep
            },
        }
