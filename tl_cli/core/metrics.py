"""Metric names and output schemas: the one place they are defined.

Task modules log ``<stage>/<metric>`` (``train/loss``, ``val/acc``, ``test/macro_f1``); train.py
writes them to metrics.json, evaluate.py writes un-prefixed scores to eval.json; reports, gates,
sweep summaries and the console read the same names from here.
"""

from __future__ import annotations

#: schema versions of the JSON files tl writes (bump on a breaking change)
METRICS_SCHEMA_VERSION = 1  # metrics.json (tl train)
EVAL_SCHEMA_VERSION = 1  # eval.json (tl eval)
PREDICTIONS_SCHEMA_VERSION = 1  # predictions.json (tl predict)
SIDECAR_SCHEMA_VERSION = 1  # model.json (tl export)

#: per-epoch numbers: history rows in metrics.json, console lines, curves.png
EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")
HISTORY_KEYS = ("epoch", *EPOCH_METRICS, "seconds")
#: the final numbers of a train run: summaries, report.md, sweep tables, train gates
FINAL_METRICS = (
    "val/acc",
    "val/loss",
    "test/acc",
    "test/macro_f1",
    "test/balanced_acc",
    "test/loss",
)
#: domain adaptation (dataset.target_root, tl_cli.transfer.adapt): the target's scores (accuracy and
#: macro-F1 only when the target has class folders) and unsupervised signals
TARGET_METRICS = (
    "source/val/acc",
    "target/acc",
    "target/macro_f1",
    "target/entropy",
    "target/pred_classes",
)
#: the summary table of `tl train`
TRAIN_SUMMARY = (*FINAL_METRICS, *TARGET_METRICS, "best_epoch", "epochs", "fit_seconds")


#: the leave-one-out accuracy of a run validated on its own training items (strategy=prototypes
#: without a val split): its headline, and what a bare ``fail_under.acc`` gates when there is no test
LOO_ACC = "loo/acc"


def train_summary(metrics: dict) -> list[str]:
    """The summary keys of a train run: its task's final metrics (metrics.json ``metric_names``,
    written from the task's declarations), the adaptation ones, then best epoch, epochs, time."""
    final = (metrics.get("metric_names") or {}).get("final") or FINAL_METRICS
    # no val split (prototypes): the leave-one-out accuracy first, the honest estimate
    loo = [LOO_ACC] if LOO_ACC in metrics else []
    return [*loo, *final, *TARGET_METRICS, "best_epoch", "epochs", "fit_seconds"]


def epoch_keys(metrics: dict) -> tuple[str, ...]:
    """The per-epoch metric names of a train run (its task's ``epoch_metrics``)."""
    return tuple((metrics.get("metric_names") or {}).get("epoch") or EPOCH_METRICS)


#: what `tl distill` adds to metrics.json (besides ``teacher/test/acc``, the teacher measured on
#: the same split in the same run): sizes, measured CPU latency per input, teacher/student ratios
DISTILL_METRICS = (
    "teacher/test/acc",
    "acc_ratio",
    "student_params",
    "teacher_params",
    "param_ratio",
    "student_latency_ms_b1",
    "teacher_latency_ms_b1",
    "speedup_b1",
    "student_latency_ms_b32",
    "teacher_latency_ms_b32",
    "speedup_b32",
)
#: the summary table of `tl eval` (eval.json keys)
EVAL_SUMMARY = ("acc", "top5_acc", "macro_f1", "loss", "num_samples")
#: the metric that picks best.ckpt unless the task says otherwise
DEFAULT_MONITOR = ("val/acc", "max")
