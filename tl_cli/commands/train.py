"""`tl train` / `tl finetune`: check the inputs, train (``tl_cli.run.training``), then write
metrics.json, the report and the gates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from tl_cli.core.console import say, stage_table, summary_table
from tl_cli.core.metrics import LOO_ACC, train_summary
from tl_cli.core.outputs import release_run_dir, write_json
from tl_cli.run import gates as tl_gates
from tl_cli.run.loggers import make_logger
from tl_cli.run.report import train_report
from tl_cli.run.training import (
    describe_defaults,
    guard_run_dir,
    quiet_lightning,
    task_class,
    train,
)


def headline(metrics: dict[str, Any], task: Any) -> str:
    """The run's result in one line: the task's validation metric at the best epoch; without a
    val split (val measured on the training items), the leave-one-out accuracy instead."""
    val = next((k for k in task.final_metrics if k.startswith("val/")), task.monitor[0])
    shown = f"{val} {metrics[val]:.4f} " if isinstance(metrics.get(val), float) else ""
    if metrics.get("val_is_train") and isinstance(metrics.get(LOO_ACC), float):
        shown = (
            f"{LOO_ACC} {metrics[LOO_ACC]:.4f} (leave-one-out; {shown.strip()} is measured on "
            "the training items: no val split) "
        )
    elif metrics.get("val_is_train"):
        shown = f"{shown}(measured on the training items: no val split) "
    if metrics.get("val_is_train"):  # no epoch was picked on val: a best epoch would mislead
        return shown.strip()
    return f"{shown}(best epoch {metrics['best_epoch']})"


def run(cfg: DictConfig, callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """`tl train`: check the inputs, `train`, then write metrics.json, the report and the gates.

    Args:
        cfg: the composed train config.
        callbacks: extra Lightning callbacks (for programmatic use and tests).
    """
    quiet_lightning()
    out = Path(str(cfg.output_dir))
    guard_run_dir(out, cfg)
    # fail_under.* / fail_over.*: a bad name or value fails before any work
    gates = tl_gates.parse(cfg)
    task = task_class(cfg)
    tl_gates.check_train_names(gates, task.final_metrics, task.gate_metrics)
    logger = make_logger(cfg, out)  # the logger group; a missing package fails before any work
    metrics, objects = train(cfg, callbacks, logger)
    ckpt_dir = out / "checkpoints"
    metrics["gates"] = [g.as_dict() for g in tl_gates.evaluate(gates, metrics, "train")]
    if objects["trainer"].is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", metrics)  # strict JSON, written beside it and renamed
        train_report(out, cfg, metrics)  # curves.png + report.md
        release_run_dir(out)
        summary_table(
            f"tl {cfg.get('command', 'train')}: {out}",
            metrics,
            train_summary(metrics),
        )
        if metrics.get("stages"):
            stage_table(metrics["stages"])
        say(f"[bold]defaults[/] {describe_defaults(metrics['defaults'])}")
        say(f"{headline(metrics, task)}, checkpoint {ckpt_dir / 'best.ckpt'}")
        say(f"report: {out / 'report.md'}\nnext: tl eval checkpoint={ckpt_dir / 'best.ckpt'}")
        tl_gates.print_gates(gates)
    # exit 1 on a failed gate, after the outputs exist
    tl_gates.enforce(gates, str(out / "metrics.json"))
    return metrics
