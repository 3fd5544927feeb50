"""Hydra multirun (`tl train -m a=1,2 b=x,y`): keep sweeping past a failed run, summarise at the end.

* :func:`keep_sweeping` wraps the task: in a multirun, a run that fails (bad input, a failed gate,
  a crash) prints its one line, leaves ``failed.json`` in its job dir, and the sweep goes on.
* :class:`SweepSummary` is a Hydra callback (``hydra.callbacks`` in train.yaml / eval.yaml): at the
  end of the sweep it writes ``summary.csv`` and ``summary.md`` into the sweep dir, a row per job
  with the overrides that vary and the job's metrics, prints the table, and exits 1 if any job
  failed (so CI sees it).
* :func:`objective` gives the Optuna sweeper (``hparams_search=optuna``) the number to optimise.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tl_cli.core.errors import EXIT_FAILED, TLError, full_errors, one_line
from tl_cli.core.metrics import EVAL_SUMMARY, FINAL_METRICS
from tl_cli.core.outputs import atomic_file, write_json, write_text

#: Columns of the summary, in order, when the jobs wrote them (train: metrics.json; eval: eval.json).
METRIC_COLUMNS = list(dict.fromkeys([*FINAL_METRICS, "best_epoch", "fit_seconds", *EVAL_SUMMARY]))


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The metric columns of a sweep: each job's task's final metrics (metrics.json
    ``metric_names``), else classification's, then the eval summary; those some job has."""
    declared = [
        k for r in rows for k in ((r["metrics"].get("metric_names") or {}).get("final") or [])
    ]
    cols = dict.fromkeys([*declared, *METRIC_COLUMNS])
    return [c for c in cols if any(c in r["metrics"] for r in rows)]


FAILED_FILE = "failed.json"


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


def keep_sweeping(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """In a multirun, turn a job's failure into a line + ``failed.json`` instead of ending the sweep."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig) -> Any:
        if not in_multirun() or full_errors():
            return fn(cfg)
        try:
            return fn(cfg)
        except KeyboardInterrupt:
            raise
        except SystemExit as e:  # a command that exits by itself (e.g. interrupted training)
            if e.code in (0, None) or e.code in (130, 143):
                raise
            message, code = (
                f"exit code {e.code}",
                int(e.code) if isinstance(e.code, int) else EXIT_FAILED,
            )
        except TLError as e:
            message, code = one_line(e), e.exit_code
        except GeneratorExit:
            raise
        except BaseException as e:  # noqa: BLE001 - one job's crash (a Rust panic too) must not lose the others
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            message, code = f"{type(e).__name__}: {first}", EXIT_FAILED
        print(f"tl: error: {message}", file=sys.stderr)
        _record_failure(cfg, message, code)
        return float("nan") if cfg.get("optimized_metric") else None

    return wrapper


def _record_failure(cfg: DictConfig, message: str, code: int) -> None:
    from tl_cli.core.outputs import CLAIMED, earlier_outputs

    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001
        out = Path(str(cfg.get("output_dir", ".")))
    if earlier_outputs(out) and str(out.resolve()) not in CLAIMED:
        return  # an earlier run's dir (the job was refused): its results are not this job's to mark
    write_json(out / FAILED_FILE, {"error": message, "exit_code": code})


def objective(cfg: DictConfig, result: Any) -> float | None:
    """The number a sweeper optimises: ``result[cfg.optimized_metric]`` when that key is set."""
    key = cfg.get("optimized_metric")
    if not key:
        return None
    if not isinstance(result, dict) or not isinstance(result.get(key), int | float):
        known = ", ".join(
            k
            for k, v in (result or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        )
        raise TLError(f"optimized_metric={key!r} is not a metric of this run (metrics: {known})")
    return float(result[key])


# --------------------------------------------------------------------------- summary


def _parse_override(o: str) -> tuple[str, str]:
    key, _, value = o.partition("=")
    return key.lstrip("+~"), value


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One dict per job dir (numbered subdirs of the sweep dir): overrides, status, metrics."""
    jobs = sorted(
        (d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()),
        key=lambda d: int(d.name),
    )
    rows = []
    for d in jobs:
        ov_file = d / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(ov_file)] if ov_file.is_file() else []
        row: dict[str, Any] = {
            "job": int(d.name),
            "dir": str(d),
            "overrides": dict(map(_parse_override, overrides)),
        }
        metrics: dict[str, Any] = {}
        for name in ("metrics.json", "eval.json"):
            if (d / name).is_file():
                try:
                    metrics = json.loads((d / name).read_text())
                except (OSError, ValueError):
                    metrics = {}
                break
        failed = d / FAILED_FILE
        if failed.is_file():
            try:
                info = json.loads(failed.read_text())
            except (OSError, ValueError):
                info = {}
            row["status"] = "failed"
            row["error"] = str(info.get("error", "failed"))
        elif metrics:
            row["status"] = "ok"
        else:
            row["status"] = "no result"
        row["metrics"] = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        rows.append(row)
    return rows


def varying_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs (the swept parameters), in first-seen order."""
    keys: list[str] = []
    for r in rows:
        for k in r["overrides"]:
            if k not in keys:
                keys.append(k)
    varying = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]
    return varying or keys


def write_summary(
    sweep_dir: Path, rows: list[dict[str, Any]], sort_by: str | None = None
) -> tuple[Path, Path]:
    """summary.csv (every job, every column) and summary.md (the table a person reads)."""
    params = varying_keys(rows)
    metric_cols = metric_columns(rows)
    header = ["job", "status", *params, *metric_cols, "error", "dir"]
    csv_path = sweep_dir / "summary.csv"
    with atomic_file(csv_path, "w", newline="") as f:  # beside it, then renamed
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(
                [
                    r["job"],
                    r["status"],
                    *(r["overrides"].get(k, "") for k in params),
                    *(r["metrics"].get(c, "") for c in metric_cols),
                    r.get("error", ""),
                    r["dir"],
                ]
            )
    best = _best(rows, sort_by)
    lines = [f"# Sweep summary: {len(rows)} runs", "", f"Sweep dir: `{sweep_dir}`", ""]
    if best is not None:
        lines += [
            f"Best by {sort_by}: job {best['job']} ({_fmt(best['metrics'][sort_by])}), marked *.",
            "",
        ]
    md_header = ["job", "status", *params, *metric_cols]
    lines.append("| " + " | ".join(md_header) + " |")
    lines.append(
        "| "
        + " | ".join(":---" if i < 2 + len(params) else "---:" for i in range(len(md_header)))
        + " |"
    )
    for r in rows:
        job = f"{r['job']}*" if best is r else str(r["job"])
        status = r["status"] if r["status"] != "failed" else f"failed: {r.get('error', '')}"
        cells = [
            job,
            status,
            *(f"`{r['overrides'].get(k, '')}`" for k in params),
            *(_fmt(r["metrics"].get(c)) for c in metric_cols),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    md_path = sweep_dir / "summary.md"
    write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def _best(rows: list[dict[str, Any]], key: str | None) -> dict[str, Any] | None:
    cands = [
        r
        for r in rows
        if key
        and r.get("status") == "ok"
        and isinstance(r["metrics"].get(key), int | float)
        and not math.isnan(r["metrics"][key])
    ]
    if not cands:
        return None
    lower_better = key is not None and key.endswith("loss")
    return (min if lower_better else max)(cands, key=lambda r: r["metrics"][key])


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def print_summary(sweep_dir: Path, rows: list[dict[str, Any]], sort_by: str | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from tl_cli.core.console import console

    params = varying_keys(rows)
    metric_cols = metric_columns(rows)[:4]
    best = _best(rows, sort_by)
    t = Table(title=f"sweep: {len(rows)} runs ({sweep_dir})", header_style="bold")
    for c in ["job", "status", *params, *metric_cols]:
        t.add_column(
            escape(c),
            justify="right" if c in metric_cols or c == "job" else "left",
            overflow="fold",
        )
    for r in rows:
        status = {"ok": "[green]ok[/]", "failed": "[red]failed[/]"}.get(r["status"], r["status"])
        t.add_row(
            f"{r['job']}{' *' if best is r else ''}",
            status,
            *(escape(str(r["overrides"].get(k, ""))) for k in params),
            *(_fmt(r["metrics"].get(c)) for c in metric_cols),
        )
    console.print(t)
    for r in rows:
        if r["status"] == "failed":
            console.print(f"job {r['job']} failed: {escape(str(r.get('error', '')))}")
    console.print(escape(f"summary: {sweep_dir / 'summary.md'}, {sweep_dir / 'summary.csv'}"))


class SweepSummary(Callback):
    """Hydra callback: the sweep's table of runs (summary.csv, summary.md, console) at multirun end.

    Args:
        sort_by: the metric that marks the best run (``val/acc`` by default; losses: lowest wins).
        fail_on_error: exit 1 after the summary when any job failed or left no result.
    """

    def __init__(self, sort_by: str | None = "val/acc", fail_on_error: bool = True) -> None:
        self.sort_by = sort_by
        self.fail_on_error = fail_on_error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        if not rows:
            return
        sort_by = (
            self.sort_by
            if any(self.sort_by in r["metrics"] for r in rows)
            else ("acc" if any("acc" in r["metrics"] for r in rows) else None)
        )
        from tl_cli.core.outputs import SWEEP_OUTPUTS, earlier_outputs

        earlier = earlier_outputs(sweep_dir, SWEEP_OUTPUTS)
        if earlier and not config.get("overwrite", False):
            print(
                f"tl: warning: {earlier[0]} is an earlier sweep's summary: kept (overwrite=true "
                "replaces it)",
                file=sys.stderr,
            )
            return
        try:
            write_summary(sweep_dir, rows, sort_by)
            print_summary(sweep_dir, rows, sort_by)
        except Exception as e:  # noqa: BLE001 - the runs are done; a summary problem must not hide them
            print(
                f"tl: warning: sweep summary not written: {type(e).__name__}: {e}", file=sys.stderr
            )
        bad = [r for r in rows if r["status"] != "ok"]
        if bad and self.fail_on_error:
            print(
                f"tl: error: {len(bad)} of {len(rows)} sweep runs failed (jobs {', '.join(str(r['job']) for r in bad)}); see {sweep_dir / 'summary.md'}",
                file=sys.stderr,
            )
            sys.exit(EXIT_FAILED)


def check_search_args(args: list[str]) -> None:
    """``hparams_search=optuna`` needs ``-m`` and the Optuna plugin: say so in one line (exit 2)."""
    choice = next((a.split("=", 1)[1] for a in args if a.startswith("hparams_search=")), None)
    if not choice or choice in ("null", "none"):
        return
    if not {"-m", "--multirun"} & set(args):
        print(
            f"tl: error: hparams_search={choice} searches only in multirun mode: add -m (tl train -m hparams_search={choice})",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if choice == "optuna":
        import importlib.util

        if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
            print(
                "tl: error: hparams_search=optuna needs the Optuna sweeper: pip install 'tl-cli[optuna]'",
                file=sys.stderr,
            )
            raise SystemExit(2)
