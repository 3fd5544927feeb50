"""A callback for the DDP test: all-gathers the backbone weights and records whether ranks agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch


class WeightSyncProbe(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.rows: list[dict] = []
        self.start: torch.Tensor | None = None

    def _flat(self, pl_module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in pl_module.backbone.parameters()])

    def on_train_start(self, trainer, pl_module):
        self.start = self._flat(pl_module).clone()

    def on_train_epoch_end(self, trainer, pl_module):
        flat = self._flat(pl_module)
        gathered = trainer.strategy.all_gather(flat)  # (world, n)
        if trainer.is_global_zero:
            self.rows.append(
                {
                    "epoch": trainer.current_epoch,
                    "world": int(gathered.shape[0]),
                    "max_rank_diff": float((gathered - gathered[0]).abs().max()),
                    "moved_from_start": float((flat - self.start).abs().max()),
                }
            )
            self.out.write_text(json.dumps(self.rows))
