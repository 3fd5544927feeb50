"""`tl eval checkpoint=PATH`: score a checkpoint on its own dataset or any folder of its modality.

The task in the checkpoint scores itself (``TransferTask.evaluate``): classification reports
accuracy, macro-F1, per-class precision and recall, the confusion matrix and its errors.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from tl_cli.core.errors import TLError
from tl_cli.run import gates as tl_gates
from tl_cli.run.evaluation import dataset_for, evaluate_module, pick_split
from tl_cli.tasks.loading import load_module


def run(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.get("checkpoint"):
        raise TLError("checkpoint is required: tl eval checkpoint=RUN/checkpoints/best.ckpt")
    gates = tl_gates.parse(cfg)  # fail_under.* / fail_over.*: a bad value fails before any work
    module, ckpt = load_module(cfg.checkpoint)
    module.set_tta(cfg.get("tta", "none"))  # before any data is read: a bad value fails first
    meta = ckpt["tl"]
    dm, new_root = dataset_for(meta, cfg, cfg.checkpoint)
    module.check_classes(dm.class_names, f"dataset {getattr(dm, 'root', dm.name)}")
    dm.set_preprocessing(meta["preprocessing"])
    split = pick_split(dm, str(cfg.get("split", "auto")), new_root)
    return evaluate_module(module, cfg.checkpoint, dm, split, cfg, gates)
