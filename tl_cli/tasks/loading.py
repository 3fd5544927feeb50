"""Rebuilding a trained task from its checkpoint alone: validated data in, registries out."""

from __future__ import annotations

import os

from tl_cli.core.checkpoint import read_checkpoint
from tl_cli.core.errors import TLError
from tl_cli.tasks.base import TASKS


def load_module(path: str | os.PathLike[str]):
    """Rebuild the trained model from a checkpoint alone (no network, no original config).

    Returns:
        (task module in eval mode, the validated checkpoint dict).
    """
    import tl_cli.tasks.components  # noqa: F401 - every registry complete

    ckpt = read_checkpoint(path)
    meta = ckpt["tl"]
    cls = TASKS.get(meta["task"])
    try:
        module = cls(**ckpt["hyper_parameters"], pretrained=False)
    except TLError as e:
        raise TLError(f"checkpoint={path}: {e}") from None
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise TLError(
            f"checkpoint={path}: weights do not fit the model it describes ({detail[:300]})"
        ) from None
    module.eval()
    return module, ckpt
