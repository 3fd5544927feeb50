"""Compatibility names: the task modules live in ``tl_cli.tasks``, checkpoint loading in
``tl_cli.checkpoint`` and the transfer policy in ``tl_cli.policy``."""

from __future__ import annotations

from tl_cli.checkpoint import load_module, read_checkpoint
from tl_cli.policy import sync_grads
from tl_cli.tasks import ClassificationTask, TransferTask

#: the image-classification task (the name tl 0.1 used)
TransferModule = ClassificationTask

__all__ = [
    "ClassificationTask",
    "TransferModule",
    "TransferTask",
    "load_module",
    "read_checkpoint",
    "sync_grads",
]
