"""Metric gates for CI: ``fail_under.<metric>=X`` (and ``fail_over.<metric>=X`` for losses).

A gate that fails ends the command with exit code 1 and one line naming every failing metric,
after the run's outputs (metrics.json / eval.json, plots, report.md) have been written, so a CI
job still has its artifacts.

Metric names:

* ``tl eval``: any number in eval.json, nested keys joined with dots:
  ``fail_under.acc=0.9``, ``fail_under.macro_f1=0.8``, ``fail_under.per_class.cat.recall=0.7``.
* ``tl train``: ``acc``, ``macro_f1`` and ``loss`` mean the final test metric when the dataset has a
  test split, else the best-epoch validation metric; ``val.acc`` / ``test.acc`` (dots for the
  slash: Hydra keys cannot hold ``/``) pick one explicitly. Any other number in metrics.json works too.

A metric that is NaN or infinite fails every gate that names it, ``fail_under`` and ``fail_over``
alike (a NaN compares false with anything, so a plain comparison would pass it). A model whose
outputs are NaN/inf fails every gate, whatever the metrics computed from them say. Such a value may
arrive as a float or, from strict JSON, as ``None`` with its key listed in ``"nonfinite"``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tl_cli.core.errors import EXIT_FAILED, TLError
from tl_cli.core.metrics import FINAL_METRICS

#: The gate kinds: config key -> (comparison that fails, symbol shown when it fails).
RULES = {"fail_under": "<", "fail_over": ">"}

#: metrics.json keys a `tl train` gate may name up front (before any training).
TRAIN_METRICS = FINAL_METRICS
_TRAIN_BARE = ("acc", "loss", "macro_f1")


def register_configs() -> None:
    """Register ``tl_gates``: open ``fail_under`` / ``fail_over`` dicts for train.yaml and eval.yaml.

    Hydra locks composed configs (struct mode), so ``fail_under.acc=0.9`` would need a ``+``
    prefix on a plain ``fail_under: {}``. A node stored with its struct flag off accepts any key.
    """
    from hydra.core.config_store import ConfigStore

    node = OmegaConf.create({k: {} for k in RULES})
    for k in RULES:
        node[k]._set_flag("struct", False)
    ConfigStore.instance().store(name="tl_gates", node=node)


@dataclass
class Gate:
    rule: str  # fail_under | fail_over
    metric: str  # as the user wrote it, dots (acc, val.acc, per_class.cat.f1)
    threshold: float
    key: str | None = None  # the metric it resolved to (val/acc, per_class.cat.f1)
    value: float | None = None
    passed: bool | None = None
    error: str | None = None  # the gate names a metric that is not there
    #: set when the metric is NaN/inf: "nan", "inf", "-inf" or "not finite" (None + nonfinite flag)
    nonfinite: str | None = field(default=None, repr=False)
    #: set when the model itself is unusable (NaN/inf outputs): the gate fails whatever the value
    unusable: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.rule}.{self.metric}"

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (no NaN/inf in it: a non-finite value is ``None``, ``passed`` False)."""
        d = asdict(self)
        d.pop("nonfinite")
        d.pop("unusable")
        if self.nonfinite:
            d["value"] = None
        if self.unusable:
            d["error"] = self.unusable
        return d

    def failure(self) -> str:
        """This failed gate, for the one-line error."""
        what = self.key or self.metric
        if self.unusable:
            return f"{what} {self.value:.4f} is not usable: {self.unusable} ({self.name})"
        if self.nonfinite == "not finite":
            return f"{what} is not finite ({self.name})"
        if self.nonfinite:
            return f"{what} = {self.nonfinite} is not finite ({self.name})"
        return f"{what} {self.value:.4f} {RULES[self.rule]} {self.threshold:g} ({self.name})"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(_flatten(v, key))
            else:
                out[key] = v
    return out


def parse(cfg: DictConfig | dict[str, Any]) -> list[Gate]:
    """The gates in a config; a value that is not a number is bad input (exit 2)."""
    gates: list[Gate] = []
    for rule in RULES:
        node = cfg.get(rule) if cfg is not None else None
        if node is None:
            continue
        plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        if not isinstance(plain, dict):
            raise TLError(
                f"{rule}={plain!r} must be a mapping of metric to threshold, e.g. {rule}.acc=0.9"
            )
        for metric, v in _flatten(plain).items():
            if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(float(v)):
                raise TLError(f"{rule}.{metric}={v!r} is not a number (e.g. {rule}.{metric}=0.9)")
            gates.append(Gate(rule, metric, float(v)))
    return gates


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _flagged(data: dict[str, Any], key: str) -> bool:
    """Whether ``key`` is listed as non-finite (its value stored as None) in ``data["nonfinite"]``."""
    flags = data.get("nonfinite")
    if not isinstance(flags, list | tuple):
        return False
    forms = {key, key.replace("/", "."), key.replace(".", "/", 1)}
    return any(isinstance(f, str) and f in forms for f in flags)


def _nonfinite(value: Any, flagged: bool) -> str | None:
    """The kind of a non-finite metric (nan, inf, -inf; "not finite": a flagged None), else None."""
    if value is None:
        return "not finite" if flagged else None
    if isinstance(value, int | float) and not isinstance(value, bool) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return None


def _numeric_keys(data: dict[str, Any]) -> list[str]:
    return [
        k
        for k, v in _flatten(data).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]


def _split_key(metric: str, metrics: dict[str, Any]) -> str | None:
    """A bare name (``acc``, ``f1``, ``map_50``): the test metric when there is one, else val's;
    when val is the training items (``val_is_train``), the leave-one-out one before val's."""
    splits = ("test", "loo", "val") if metrics.get("val_is_train") else ("test", "val")
    for split in splits:
        key = f"{split}/{metric}"
        if key in metrics or _flagged(metrics, key):
            return key
    return None


def resolve_train_key(metric: str, metrics: dict[str, Any] | None = None) -> str | None:
    """The metrics.json key a train gate names; None if unknown (metrics None: names only).

    A bare name means the final test metric when the run has a test split, else the best-epoch
    validation metric; ``val.acc`` / ``test.acc`` pick one; any other number of metrics.json
    (``best_epoch``, ``fit_seconds``) is itself.
    """
    if metrics is None:
        return metric.replace(".", "/", 1) if "." in metric else f"test/{metric}"
    if "." not in metric:
        key = _split_key(metric, metrics)
        if key is not None or metric in _TRAIN_BARE:
            return key
    slashed = metric.replace(".", "/", 1)
    for cand in (slashed, metric):
        v = metrics.get(cand)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return cand
        if v is None and _flagged(metrics, cand):
            return cand
    return None


def check_train_names(
    gates: list[Gate],
    final: tuple[str, ...] = TRAIN_METRICS,
    bare: tuple[str, ...] = _TRAIN_BARE,
) -> None:
    """Fail before training when a gate names no metric `tl train` produces; ``final`` and
    ``bare`` are the task's declarations (``final_metrics``, ``gate_metrics``)."""
    known = {*final, "best_epoch", "epochs", "fit_seconds"}
    for g in gates:
        if g.metric in bare or g.metric.replace(".", "/", 1) in known:
            continue
        names = ", ".join([*bare, *(k.replace("/", ".") for k in final)])
        raise TLError(f"{g.name}: tl train has no metric {g.metric!r}; gate one of: {names}")


def evaluate(
    gates: list[Gate], data: dict[str, Any], kind: str, unusable: str | None = None
) -> list[Gate]:
    """Fill in each gate's value and result. kind: ``train`` (metrics.json) or ``eval`` (eval.json).

    Never raises, so the caller can write its outputs first; a gate naming a metric that is not
    there gets ``error`` set, and :func:`enforce` reports it as bad input. ``unusable`` (why the
    model's outputs cannot be trusted: NaN/inf logits) fails every gate, whatever the metrics
    computed from those outputs say (an argmax over NaN logits still gives an accuracy).
    """
    where = "metrics.json" if kind == "train" else "eval.json"
    for g in gates:
        if kind == "train":
            key = resolve_train_key(g.metric, data)
            value = data.get(key) if key else None
        else:
            key, value = g.metric, _lookup(data, g.metric)
        g.nonfinite = _nonfinite(value, key is not None and _flagged(data, key))
        if g.nonfinite:  # fails whatever the rule: NaN < x and NaN > x are both false
            g.key, g.passed = key, False
            g.value = None if value is None else float(value)
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            g.passed = False
            if kind == "train" and g.metric in (
                "macro_f1",
                "test.macro_f1",
                "test.acc",
                "test.loss",
            ):
                g.error = f"{g.name}: this run has no test split, so no {g.metric}; gate val.acc or val.loss instead"
            else:
                avail = [
                    k
                    for k in _numeric_keys(data)
                    if not k.startswith(
                        ("history", "per_class", "confusion", "gates", "schema_version")
                    )
                ]
                hint = ", ".join(a.replace("/", ".") if kind == "train" else a for a in avail[:12])
                extra = (
                    "; per class: per_class.<class>.<precision|recall|f1>" if kind == "eval" else ""
                )
                g.error = f"{g.name}: no metric {g.metric!r} in {where} (numbers: {hint}{extra})"
            continue
        g.key, g.value = key, float(value)
        g.passed = not (g.value < g.threshold if g.rule == "fail_under" else g.value > g.threshold)
        if unusable:
            g.passed, g.unusable = False, unusable
    return gates


def enforce(gates: list[Gate], where: str) -> None:
    """Raise if a gate named an unknown metric (exit 2) or failed (exit 1): one line for all."""
    bad = [g.error for g in gates if g.error]
    if bad:
        raise TLError("; ".join(bad))
    failed = [g for g in gates if g.passed is False]
    if failed:
        parts = "; ".join(g.failure() for g in failed)
        raise TLError(f"gate failed: {parts}; see {where}", exit_code=EXIT_FAILED)


def print_gates(gates: list[Gate]) -> None:
    """A rich table of the gates and their results (nothing if there are none)."""
    if not gates:
        return
    from rich.markup import escape
    from rich.table import Table

    from tl_cli.core.console import console, fmt, rank_zero

    if not rank_zero():
        return
    t = Table(title="gates", header_style="bold")
    for col in ("gate", "metric", "value", "threshold", "result"):
        t.add_column(col, justify="right" if col in ("value", "threshold") else "left")
    for g in gates:
        res = (
            "[green]pass[/]"
            if g.passed
            else "[red]FAIL[/]"
            if not g.error
            else "[red]no such metric[/]"
        )
        shown = (
            ("not finite" if g.nonfinite == "not finite" else f"{g.nonfinite} (not finite)")
            if g.nonfinite
            else fmt(g.value)
        )
        t.add_row(escape(g.name), escape(str(g.key or g.metric)), shown, f"{g.threshold:g}", res)
    console.print(t)
