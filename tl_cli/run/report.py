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

from tl_cli.core.console import fmt
from tl_cli.core.metrics import EVAL_SUMMARY, TRAIN_SUMMARY
from tl_cli.core.metrics import HISTORY_KEYS as HISTORY
from tl_cli.core.outputs import atomic_path, write_text

TRAIN_KEYS = list(TRAIN_SUMMARY)
EVAL_KEYS = list(EVAL_SUMMARY)
HISTORY_KEYS = list(HISTORY)


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    """PNG beside ``path``, then renamed onto it (`tl_cli.core.outputs.atomic_path`)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")


# --------------------------------------------------------------------------- plots


def plot_curves(
    history: list[dict[str, float]], path: Path, title: str = "", best_epoch: int | None = None
) -> Path:
    """Loss and accuracy per epoch (1-based), train and val, in two panels; saved as PNG."""
    _save(curves_figure(history, title, best_epoch), path)
    return path


def curves_figure(history: list[dict[str, float]], title: str = "", best_epoch: int | None = None):
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, what in zip(axes, ("loss", "acc"), strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            key = f"{split}/{what}"
            pts = [(int(r["epoch"]) + 1, float(r[key])) for r in history if key in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, label=key, markersize=4)
        if best_epoch:
            ax.axvline(
                best_epoch,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"best epoch ({best_epoch})",
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if what == "acc" else "loss")
        ax.set_title("Accuracy" if what == "acc" else "Loss")
        if what == "acc":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def normalize_rows(matrix: list[list[int]]):
    """Each row divided by its total (a row with no images stays 0): per-class recall on the diagonal."""
    import numpy as np

    cm = np.asarray(matrix, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def plot_confusion(
    matrix: list[list[int]],
    class_names: list[str],
    path: Path,
    normalize: bool = True,
    title: str = "",
) -> Path:
    """Rows = true class, columns = predicted; ``normalize`` divides each row by its count (recall)."""
    _save(confusion_figure(matrix, class_names, normalize, title), path)
    return path


def confusion_figure(
    matrix: list[list[int]], class_names: list[str], normalize: bool = True, title: str = ""
):
    import numpy as np

    cm = np.asarray(matrix, dtype=float)
    n = len(class_names)
    shown = normalize_rows(matrix) if normalize else cm
    side = min(max(5.0, 0.45 * n + 2.5), 30.0)
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    im = ax.imshow(
        shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(1.0, float(cm.max()))
    )
    fig.colorbar(
        im,
        ax=ax,
        fraction=0.046,
        pad=0.04,
        label="fraction of true class" if normalize else "images",
    )
    font = 10 if n <= 12 else 8 if n <= 25 else 6 if n <= 50 else 4
    ax.set_xticks(
        range(n),
        labels=class_names,
        rotation=45 if n > 4 else 0,
        ha="right" if n > 4 else "center",
        fontsize=font,
    )
    ax.set_yticks(range(n), labels=class_names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 25:
        hi = shown.max() if shown.size else 0.0
        for i in range(n):
            for j in range(n):
                text = f"{shown[i, j]:.2f}\n({int(cm[i, j])})" if normalize else str(int(cm[i, j]))
                dark = shown[i, j] > 0.6 * (1.0 if normalize else hi)
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=font - 1,
                    color="white" if dark else "black",
                )
    ax.set_title(
        title or ("Confusion matrix (row-normalised)" if normalize else "Confusion matrix")
    )
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


def md_table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]

    def cell(v: Any) -> str:
        return (fmt(v) if isinstance(v, float) else str(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


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
    written = {
        "curves": str(plot_curves(history, out / "curves.png", title, metrics.get("best_epoch")))
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
        f"- images: train {metrics.get('train_size')}, val {metrics.get('val_size')}, test {metrics.get('test_size')}",
        f"- best checkpoint: `{metrics.get('best_checkpoint')}` (epoch {metrics.get('best_epoch')} of {metrics.get('epochs')})",
    ]
    if status:
        lines.append(f"- gates: {status}")
    lines += ["", "## Final metrics", ""]
    lines.append(
        md_table(["metric", "value"], [[k, metrics[k]] for k in TRAIN_KEYS if k in metrics])
    )
    lines.append("")
    if gates:
        lines.append(_gates_md(gates))
    lines += ["## Training curves", "", "![Loss and accuracy per epoch](curves.png)", ""]
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
        rows = [[int(r["epoch"]) + 1, *(r.get(k, "") for k in HISTORY_KEYS[1:])] for r in history]
        lines += [md_table(HISTORY_KEYS, rows), ""]
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


def eval_report(out: Path, result: dict[str, Any], normalize: bool = True) -> dict[str, str]:
    """Write confusion_matrix.png and report.md into the eval run dir; returns {name: path}."""
    names = list(result["class_names"])
    split = result.get("split", "")
    title = f"Confusion matrix{' (row-normalised)' if normalize else ''}: {split}, {result.get('num_samples')} images, acc {result.get('acc', 0.0):.3f}"
    png = plot_confusion(
        result["confusion_matrix"], names, out / "confusion_matrix.png", normalize, title
    )
    lines = [
        "# tl eval report",
        "",
        f"- checkpoint: `{result.get('checkpoint')}`",
        f"- data: `{result.get('dataset')}`, split {split}, {result.get('num_samples')} images",
        "",
        "## Metrics",
        "",
        md_table(["metric", "value"], [[k, result[k]] for k in EVAL_KEYS if k in result]),
        "",
    ]
    gates = result.get("gates") or []
    if gates:
        lines.append(_gates_md(gates))
    rows = [
        [c, r["precision"], r["recall"], r["f1"], r["support"]]
        for c, r in result["per_class"].items()
    ]
    lines += [
        "## Per class",
        "",
        md_table(["class", "precision", "recall", "f1", "support"], rows),
        "",
    ]
    lines += ["## Confusion matrix", "", "![Confusion matrix](confusion_matrix.png)", ""]
    write_text(out / "report.md", "\n".join(lines))
    return {"confusion_matrix": str(png), "report": str(out / "report.md")}
