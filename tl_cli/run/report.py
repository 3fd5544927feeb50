"""Pictures and markdown a person (or a CI step summary) can read.

* ``tl train``: ``curves.png`` (loss and accuracy per epoch, train and val) and ``report.md``
  (final metrics, gates, plots, per-epoch history, the resolved config).
* ``tl eval``: ``confusion_matrix.png`` (class names on the axes, optionally row-normalised) and
  ``report.md`` (metrics, gates, per-class table, the plot).

Plots are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global state).
Every file is written beside its target and renamed onto it (`tl_cli.core.outputs`): never half a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tl_cli.core.markdown import md_table
from tl_cli.core.metrics import EPOCH_METRICS, epoch_keys, train_summary
from tl_cli.core.outputs import write_text
from tl_cli.core.plots import figure as _figure
from tl_cli.core.plots import save_figure as _save

# --------------------------------------------------------------------------- plots


def plot_curves(
    history: list[dict[str, float]],
    path: Path,
    title: str = "",
    best_epoch: int | None = None,
    keys: tuple[str, ...] = EPOCH_METRICS,
    head_fit: dict[str, Any] | None = None,
) -> Path:
    """The loss and the task's main metric per epoch (1-based), train and val, in two panels;
    for a run of one epoch, its numbers and the head's fit instead (`one_epoch_figure`)."""
    _save(curves_figure(history, title, best_epoch, keys, head_fit), path)
    return path


#: how a metric family is named on a plot axis
AXIS_NAMES = {"acc": "accuracy", "f1": "entity F1", "map_50": "mAP@0.5", "map": "mAP"}


def _main_family(keys: tuple[str, ...]) -> str:
    """The metric of the second panel: the first non-loss family the task logs per epoch."""
    families = list(dict.fromkeys(k.split("/", 1)[1] for k in keys if "/" in k))
    return next((f for f in families if f != "loss"), "acc")


def curve_metric(keys: tuple[str, ...]) -> str:
    """What the curves' second panel shows, in words (``accuracy``, ``entity F1``, ...)."""
    main = _main_family(keys)
    return AXIS_NAMES.get(main, main)


#: a plain cross-entropy logged beside a training objective that is not one (label smoothing,
#: class weights): the train loss comparable with val/loss
PLAIN_TRAIN_LOSS = "train/ce"


def has_curve(history: list[dict[str, float]]) -> bool:
    """Two or more validated epochs: something to draw a curve through."""
    return len([r for r in history if any(k.startswith("val/") for k in r)]) >= 2


def _series(what: str, history: list[dict[str, float]]) -> list[tuple[str, str, str]]:
    """(key, label, style) of the lines of one panel: train and val; the loss panel draws the
    plain train cross-entropy when the objective was smoothed, the objective dashed beside it."""
    if what == "loss" and any(PLAIN_TRAIN_LOSS in r for r in history):
        return [
            (PLAIN_TRAIN_LOSS, "train cross-entropy (comparable with val/loss)", "-o"),
            ("train/loss", "train/loss (the objective: label smoothing / class weights)", "--"),
            ("val/loss", "val/loss", "-s"),
        ]
    return [(f"train/{what}", f"train/{what}", "-o"), (f"val/{what}", f"val/{what}", "-s")]


def curves_figure(
    history: list[dict[str, float]],
    title: str = "",
    best_epoch: int | None = None,
    keys: tuple[str, ...] = EPOCH_METRICS,
    head_fit: dict[str, Any] | None = None,
):
    main = _main_family(keys)
    if not has_curve(history):
        return one_epoch_figure(history, title, keys, head_fit)
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, what in zip(axes, ("loss", main), strict=True):
        for key, label, style in _series(what, history):
            pts = [(int(r["epoch"]) + 1, float(r[key])) for r in history if key in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, label=label, markersize=4)
        if best_epoch:
            ax.axvline(
                best_epoch,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"best epoch ({best_epoch})",
            )
        name = AXIS_NAMES.get(what, what)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name[0].upper() + name[1:])
        if what != "loss":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def describe_head_fit(head_fit: dict[str, Any] | None) -> str:
    """How the head was fitted, in words (the L-BFGS probe's choice), or ""."""
    if not head_fit or head_fit.get("method") != "lbfgs":
        return ""
    parts = [f"head fitted by L-BFGS to convergence: C={head_fit['C']:.3g}"]
    if head_fit.get("cv_acc") is not None:
        parts.append(f"{head_fit.get('folds')}-fold CV accuracy {head_fit['cv_acc']:.3f}")
    if head_fit.get("train_acc") is not None:
        parts.append(f"train accuracy {head_fit['train_acc']:.3f}")
    return ", ".join(parts)


def one_epoch_figure(
    history: list[dict[str, float]],
    title: str = "",
    keys: tuple[str, ...] = EPOCH_METRICS,
    head_fit: dict[str, Any] | None = None,
):
    """A run of one epoch has no curve (two dots on a zoomed axis said nothing): its numbers as
    a table, and how the head was fitted."""
    fig = _figure(8, 3)
    ax = fig.subplots()
    ax.axis("off")
    row = history[-1] if history else {}
    families = list(dict.fromkeys(k.split("/", 1)[1] for k in keys if "/" in k))
    smoothed = PLAIN_TRAIN_LOSS in row
    cells = [
        [
            "loss (train: the objective)" if f == "loss" and smoothed else AXIS_NAMES.get(f, f),
            *(f"{row[f'{s}/{f}']:.4f}" if f"{s}/{f}" in row else "-" for s in ("train", "val")),
        ]
        for f in families
    ]
    if smoothed:
        cells.append(["cross-entropy (as val/loss)", f"{row[PLAIN_TRAIN_LOSS]:.4f}", "-"])
    if cells:
        table = ax.table(
            cellText=cells, colLabels=["", "train", "val"], loc="center", cellLoc="center"
        )
        table.scale(1, 1.6)
    note = describe_head_fit(head_fit)
    ax.set_title(
        "one epoch: no curve to draw" + (f"\n{note}" if note else ""), fontsize=9, loc="left"
    )
    if title:
        fig.suptitle(title)
    return fig


def plot_lr_find(
    lrs: list[float], losses: list[float], path: Path, suggestion: float | None
) -> Path:
    """Loss against learning rate (log scale), with the suggestion marked."""
    fig = _figure(6, 4)
    ax = fig.subplots()
    ax.plot(lrs, losses, "-", label="loss")
    if suggestion is not None:
        ax.axvline(suggestion, color="red", linestyle="--", label=f"suggestion {suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("Learning-rate finder")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)
    return path


# --------------------------------------------------------------------------- markdown


def _gates_md(gates: list[dict[str, Any]]) -> str:
    if not gates:
        return ""
    rows = [
        [
            f"`{g['rule']}.{g['metric']}`",
            g.get("key") or "",
            g.get("value"),
            f"{g['threshold']:g}",
            "pass" if g.get("passed") else "**FAIL**",
        ]
        for g in gates
    ]
    return (
        "## Gates\n\n"
        + md_table(
            ["gate", "metric", "value", "threshold", "result"], rows, ["l", "l", "r", "r", "l"]
        )
        + "\n"
    )


def _config_yaml(cfg: Any) -> str:
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return str(cfg)
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that only Hydra's runtime can resolve
        return OmegaConf.to_yaml(cfg)


def train_report(out: Path, cfg: Any, metrics: dict[str, Any]) -> dict[str, str]:
    """Write curves.png and report.md into the run dir; returns {name: path}."""
    history = metrics.get("history") or []
    title = f"{metrics.get('backbone', '')} / {metrics.get('strategy', '')}".strip(" /")
    head_fit = (metrics.get("defaults") or {}).get("head_fit")
    written = {
        "curves": str(
            plot_curves(
                history,
                out / "curves.png",
                title,
                metrics.get("best_epoch"),
                epoch_keys(metrics),
                head_fit,
            )
        )
    }
    status = ""
    gates = metrics.get("gates") or []
    if gates:
        status = "all gates passed" if all(g.get("passed") for g in gates) else "**a gate FAILED**"
    lines = [
        f"# tl {getattr(cfg, 'get', lambda *_: None)('command') or 'train'} report",
        "",
        f"- run: `{out}`",
        f"- model: {metrics.get('backbone')} ({metrics.get('strategy')}), {metrics.get('num_classes')} classes: "
        + ", ".join(metrics.get("class_names", [])[:20])
        + (" ..." if len(metrics.get("class_names", [])) > 20 else ""),
        f"- {metrics.get('item_noun', 'inputs')}: train {metrics.get('train_size')}, val {metrics.get('val_size')}, test {metrics.get('test_size')}"
        + (
            " (no val split: val is the training items; loo/acc, leave-one-out, is the estimate)"
            if metrics.get("val_is_train")
            else ""
        ),
        f"- best checkpoint: `{metrics.get('best_checkpoint')}` (epoch {metrics.get('best_epoch')} of {metrics.get('epochs')})",
    ]
    if status:
        lines.append(f"- gates: {status}")
    lines += ["", "## Final metrics", ""]
    lines.append(
        md_table(
            ["metric", "value"], [[k, metrics[k]] for k in train_summary(metrics) if k in metrics]
        )
    )
    lines.append("")
    if gates:
        lines.append(_gates_md(gates))
    main = curve_metric(epoch_keys(metrics))
    if has_curve(history):
        lines += ["## Training curves", "", f"![Loss and {main} per epoch](curves.png)", ""]
    else:
        note = describe_head_fit(head_fit)
        lines += [
            "## Training",
            "",
            "One epoch: no curve to draw; its numbers are below" + (f" ({note})." if note else "."),
            "",
        ]
    if any(PLAIN_TRAIN_LOSS in r for r in history) and PLAIN_TRAIN_LOSS not in epoch_keys(metrics):
        lines += [
            f"`train/loss` is the training objective (label smoothing "
            f"{getattr(cfg, 'get', lambda *_: None)('label_smoothing') or 0:g} or class weights); "
            f"`{PLAIN_TRAIN_LOSS}`, the plain cross-entropy, is the one comparable with `val/loss`.",
            "",
        ]
    lr = metrics.get("lr_find")
    if lr:
        sugg = lr.get("suggestion")
        lines += [
            "## Learning-rate finder",
            "",
            (
                f"Suggested learning rate {sugg:.3g}"
                if sugg is not None
                else "No suggestion (too few points)"
            )
            + f"; trained with optimizer.lr={lr.get('lr'):.3g}.",
            "",
            f"![Learning-rate finder]({lr.get('plot', 'lr_find.png')})",
            "",
        ]
    if history:
        lines += ["## Per-epoch history", ""]
        extra = [PLAIN_TRAIN_LOSS] if any(PLAIN_TRAIN_LOSS in r for r in history) else []
        cols = ["epoch", *epoch_keys(metrics), *extra, "seconds"]
        rows = [[int(r["epoch"]) + 1, *(r.get(k, "") for k in cols[1:])] for r in history]
        lines += [md_table(cols, rows), ""]
    lines += [
        "## Resolved config",
        "",
        "<details><summary>config</summary>",
        "",
        "```yaml",
        _config_yaml(cfg).rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    write_text(out / "report.md", "\n".join(lines))
    written["report"] = str(out / "report.md")
    return written


def eval_report(
    out: Path,
    result: dict[str, Any],
    summary: tuple[str, ...] | list[str],
    sections: list[str],
    noun: str = "inputs",
) -> Path:
    """report.md of ``tl eval``: what was scored, the task's summary metrics, the gates, then the
    task's own sections (tables, plots and error analysis it wrote beside it)."""
    split = result.get("split", "")
    lines = [
        "# tl eval report",
        "",
        f"- checkpoint: `{result.get('checkpoint')}`",
        f"- data: `{result.get('dataset')}`, split {split}, {result.get('num_samples')} {noun}",
        "",
        "## Metrics",
        "",
        md_table(["metric", "value"], [[k, result[k]] for k in summary if k in result]),
        "",
    ]
    gates = result.get("gates") or []
    if gates:
        lines.append(_gates_md(gates))
    lines += sections
    return write_text(out / "report.md", "\n".join(lines))
