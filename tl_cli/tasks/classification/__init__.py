"""Single-label classification: one class per input (images, texts, clips)."""

from tl_cli.tasks.classification.task import ClassificationTask, val_score

__all__ = ["ClassificationTask", "val_score"]
