"""Single-label classification: one class per input (images, texts, clips)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from tl_cli.tasks.base import TASKS, TransferTask


@TASKS.register("classification")
class ClassificationTask(TransferTask):
    """Single-label classification: cross-entropy (label smoothing in training), accuracy, macro-F1."""

    def build_extra(self) -> None:
        n = self.num_outputs
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.test_acc = MulticlassAccuracy(n, average="micro")
        self.test_f1 = MulticlassF1Score(n, average="macro")
        # balanced accuracy = mean per-class recall
        self.val_bacc = MulticlassAccuracy(n, average="macro")
        self.test_bacc = MulticlassAccuracy(n, average="macro")
        # val: [correct, summed loss, images] for val/score; predicted-class counts per stage
        self._val_sums = torch.zeros(3, dtype=torch.float64)
        self.pred_counts: dict[str, torch.Tensor] = {}

    #: best.ckpt: the highest val/acc, ties broken by the lower val/loss (see val_score)
    monitor = ("val/score", "max")

    def supports_head_fit(self) -> bool:
        return True

    def loss(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        smoothing = self.label_smoothing if stage == "train" else 0.0
        weight = None
        if stage == "train" and self.class_weight is not None:
            weight = self.class_weight.to(out.device, out.dtype)
        return F.cross_entropy(out, y, weight=weight, label_smoothing=smoothing)

    def update_metrics(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> None:
        acc = getattr(self, f"{stage}_acc")
        acc(out, y)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val")
        if stage in ("val", "test"):
            bacc = getattr(self, f"{stage}_bacc")
            bacc(out, y)
            self.log(f"{stage}/balanced_acc", bacc, on_epoch=True)
            pred = out.detach().argmax(1)
            counts = torch.bincount(pred, minlength=self.num_outputs).cpu()
            self.pred_counts[stage] = self.pred_counts.get(stage, torch.zeros_like(counts)) + counts
        if stage == "val":
            with torch.no_grad():
                loss = F.cross_entropy(out.detach().float(), y, reduction="sum")
            self._val_sums += torch.tensor(
                [float((pred == y).sum()), float(loss), float(len(y))], dtype=torch.float64
            )
        if stage == "test":
            self.test_f1(out, y)
            self.log("test/macro_f1", self.test_f1, on_epoch=True)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64)
        self.pred_counts["val"] = torch.zeros(self.num_outputs, dtype=torch.long)

    def on_test_epoch_start(self) -> None:
        self.pred_counts["test"] = torch.zeros(self.num_outputs, dtype=torch.long)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        sums = self._val_sums.to(self.device)
        counts = self.pred_counts["val"].to(self.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        correct, loss_sum, n = (float(v) for v in sums)
        if n > 0:
            self.log("val/score", val_score(correct / n, loss_sum / n, int(n)))
            self.log("val/pred_classes", float((counts > 0).sum()))


def val_score(acc: float, loss: float, n: int) -> float:
    """The checkpoint criterion: val/acc, ties broken by the lower val/loss.

    ``acc - (0.5 / n) * loss / (1 + loss)`` for ``n`` validation images: the loss term is under
    half an image of accuracy, so it never outweighs a real accuracy difference and only orders
    epochs with the same accuracy (a lower loss always scores higher). Scaled by ``1 / n`` rather
    than a fixed tiny factor so that it survives Lightning's float32 metrics.
    """
    eps = 0.5 / max(1, n)
    if not math.isfinite(loss):
        return acc - eps
    return acc - eps * loss / (1.0 + loss)
