"""Rebuilding a trained task from its checkpoint alone: validated data in, registries out."""

from __future__ import annotations

import os
from typing import Any

from tl_cli.core.checkpoint import read_checkpoint, refuse
from tl_cli.core.errors import TLError
from tl_cli.tasks.base import TASKS


def load_module(path: str | os.PathLike[str]):
    """Rebuild the trained model from a checkpoint alone (no network, no original config).

    The architecture is built on the ``meta`` device first (no memory) and checked against the
    stored weights' names and shapes; only a checkpoint whose weights fit is built for real.

    Returns:
        (task module in eval mode, the validated checkpoint dict).
    """
    import tl_cli.tasks.components  # noqa: F401 - every registry complete

    ckpt = read_checkpoint(path)
    meta = ckpt["tl"]
    cls = TASKS.get(meta["task"])
    check_architecture(cls, ckpt, path)
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


def check_architecture(cls: Any, ckpt: dict[str, Any], path: Any) -> None:
    """Build the described model on the ``meta`` device (shapes only, nothing allocated) and
    refuse the checkpoint unless its ``state_dict`` has exactly those tensors and shapes, and its
    preprocessing fits the backbone (text: the tokenizer's hash and vocabulary; audio: the rate).

    A model named in a checkpoint (any timm or Hugging Face architecture) therefore costs no more
    memory than the weights the file itself holds.
    """
    import torch

    try:
        with torch.device("meta"):
            shell = cls(**ckpt["hyper_parameters"], pretrained=False)
    except TLError as e:
        raise TLError(f"checkpoint={path}: {e}") from None
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    sd = ckpt["state_dict"]
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [k for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{k} is {tuple(sd[k].shape)}, the model has {want[k]}")
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise TLError(
            f"checkpoint={path}: weights do not fit the model it describes ({'; '.join(parts)}); "
            "nothing was built"
        )
    prep = ckpt["tl"]["preprocessing"]
    own = getattr(shell.backbone, "preprocessing", {}) or {}
    modality = ckpt["tl"].get("modality", "image")
    if modality == "text":
        if prep["tokenizer_sha256"] != own.get("tokenizer_sha256"):
            raise TLError(
                f"checkpoint={path}: refused: tl.preprocessing.tokenizer_sha256 is not the hash of "
                "the tokenizer its backbone carries"
            )
        config = getattr(getattr(shell.backbone, "model", None), "config", None)
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and prep["pad_id"] >= vocab:
            raise refuse(
                path,
                "tl.preprocessing.pad_id",
                prep["pad_id"],
                f"is not below the vocabulary size {vocab}",
            )
        if prep["max_length"] > int(own.get("max_positions") or prep["max_length"]):
            raise refuse(
                path,
                "tl.preprocessing.max_length",
                prep["max_length"],
                f"is above the model's {own.get('max_positions')} positions",
            )
    elif modality == "audio" and own.get("sample_rate") not in (None, prep["sample_rate"]):
        raise refuse(
            path,
            "tl.preprocessing.sample_rate",
            prep["sample_rate"],
            f"is not the rate its backbone takes ({own['sample_rate']} Hz)",
        )
    del shell
