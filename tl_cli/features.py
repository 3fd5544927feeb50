"""Cached backbone features for frozen-backbone training.

A frozen backbone maps each image to the same features every epoch, so `tl` computes them once
per split (eval transforms) and trains the head on the cached tensors. Each later epoch costs
only the head.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tl_cli.console import progress
from tl_cli.data import TransferDataModule


@torch.inference_mode()
def extract(backbone: torch.nn.Module, loader: DataLoader, device: torch.device, desc: str) -> TensorDataset:
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    with progress(desc, total=len(loader)) as advance:
        for x, y in loader:
            feats.append(backbone(x.to(device, non_blocking=True)).float().cpu())
            labels.append(torch.as_tensor(y))
            advance()
    backbone.train(was_training)
    return TensorDataset(torch.cat(feats), torch.cat(labels))


class FeatureDataModule(pl.LightningDataModule):
    """Serves cached ``(features, label)`` batches in place of images."""

    def __init__(self, splits: dict[str, TensorDataset], batch_size: int, seed: int = 0) -> None:
        super().__init__()
        self.splits = splits
        self.batch_size = batch_size
        self.seed = seed

    @classmethod
    def from_images(cls, backbone: torch.nn.Module, dm: TransferDataModule, device: torch.device | None = None) -> FeatureDataModule:
        device = device or next(backbone.parameters()).device
        splits: dict[str, Any] = {}
        for split in dm.splits:
            ds = dm.dataset(split, train_aug=False)
            loader = dm.make_loader(ds, shuffle=False)
            splits[split] = extract(backbone, loader, device, f"caching {split} features")
        return cls(splits, dm.batch_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
