"""Where a command runs: ``device=auto|cpu|cuda``."""

from __future__ import annotations

import torch

from tl_cli.core.errors import TLError


def pick_device(want: str) -> torch.device:
    want = str(want)
    if want not in ("auto", "cpu", "cuda", "gpu"):
        raise TLError(f"device={want!r} must be auto, cpu or cuda")
    if want in ("cuda", "gpu") and not torch.cuda.is_available():
        raise TLError(f"device={want}: no CUDA device here")
    use_cuda = want != "cpu" and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")
