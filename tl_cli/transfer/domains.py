"""``domains.png``: source and target features in 2-D, before and after adaptation.

A PCA (deterministic: the SVD of the centred features of both domains together) of the features
the classifier sees; colour is the domain, the marker is the class (unlabelled target points are
drawn as crosses). Drawn on matplotlib's Agg canvas like tl_cli.run.report's plots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MARKERS = ("o", "s", "^", "v", "D", "P", "*", "X", "<", ">", "p", "h", "8", "d", "H", "1")
COLORS = {"source": "#1f77b4", "target": "#d62728"}


def pca_2d(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both sets projected on the first two principal axes of their union; the explained ratios."""
    x = np.concatenate([a, b]).astype(np.float64)
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    # a fixed sign per axis (the largest loading positive): the picture does not flip between runs
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    comps = comps * signs[:, None]
    y = x @ comps.T
    ratio = (s[:2] ** 2) / max(float((s**2).sum()), 1e-12)
    return y[: len(a)], y[len(a) :], ratio


def marker_size(n: int) -> float:
    """Scatter marker area (points^2) for ``n`` points: large enough to tell the class markers
    apart when there are few points, smaller when hundreds would overlap."""
    return float(np.clip(3000.0 / max(n, 1), 20.0, 70.0))


def _marker(c: int) -> str:
    return "x" if c < 0 else MARKERS[int(c) % len(MARKERS)]


def _panel(ax, src, tgt, ys, yt, title: str) -> None:
    ps, pt, ratio = pca_2d(src, tgt)
    size = marker_size(len(ps) + len(pt))
    for dom, pts, labels in (("source", ps, ys), ("target", pt, yt)):
        for c in np.unique(labels):
            sel = labels == c
            marker = _marker(c)
            ax.scatter(
                pts[sel, 0],
                pts[sel, 1],
                s=size,
                marker=marker,
                c=COLORS[dom],
                alpha=0.6,
                edgecolors="white" if marker not in ("x", "1") else None,
                linewidths=1.2 if marker in ("x", "1") else 0.4,
            )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%})")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})" if len(ratio) > 1 else "PC2")


def plot_domains(
    path: Path,
    before: tuple[np.ndarray, np.ndarray],
    after: tuple[np.ndarray, np.ndarray] | None,
    src_labels: np.ndarray,
    tgt_labels: np.ndarray,
    title: str = "",
    after_title: str = "after adaptation",
    class_names: list[str] | None = None,
) -> Path:
    """Write the plot: one panel (before) or two (before, after); the legend names the domains
    (colour) and the classes (marker; ``class_names`` in label order)."""
    from tl_cli.core.plots import save_figure as _save

    fig = domains_figure(before, after, src_labels, tgt_labels, title, after_title, class_names)
    _save(fig, Path(path))
    return Path(path)


def domains_figure(
    before: tuple[np.ndarray, np.ndarray],
    after: tuple[np.ndarray, np.ndarray] | None,
    src_labels: np.ndarray,
    tgt_labels: np.ndarray,
    title: str = "",
    after_title: str = "after adaptation",
    class_names: list[str] | None = None,
):
    """The figure `plot_domains` saves."""
    from matplotlib.lines import Line2D

    from tl_cli.core.plots import figure as _figure

    panels = 1 if after is None else 2
    fig = _figure(5.5 * panels + 2.0, 5)  # + the legend's column
    axes = np.atleast_1d(fig.subplots(1, panels))
    _panel(
        axes[0],
        *before,
        src_labels,
        tgt_labels,
        "backbone features" if after is None else "before: backbone features (source model)",
    )
    if after is not None:
        _panel(axes[1], *after, src_labels, tgt_labels, after_title)
    handles = [
        Line2D([], [], marker="o", ls="", color=COLORS[d], label=d) for d in ("source", "target")
    ]
    present = sorted({int(c) for c in np.concatenate([src_labels, tgt_labels])})
    for c in present:
        name = (
            "unlabelled target"
            if c < 0
            else (class_names[c] if class_names and c < len(class_names) else f"class {c}")
        )
        handles.append(
            Line2D([], [], marker=_marker(c), ls="", color="0.3", label=name, markersize=7)
        )
    fig.legend(
        handles=handles,
        loc="outside right upper",
        fontsize=8 if len(handles) <= 20 else 6,
        title="colour: domain; marker: class",
        title_fontsize=8,
    )
    fig.suptitle(f"{title}: PCA of source and target (marker = class)", fontsize=11)
    return fig


def plot_disentangle(
    path: Path,
    panels: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    src_labels: np.ndarray,
    tgt_labels: np.ndarray,
) -> Path:
    """``disentangle.png`` (``adapt=dsn``): a 2 x 2 grid, rows the shared and private codes,
    columns the encoders before and after training; each panel a PCA of source and target."""
    from matplotlib.lines import Line2D

    from tl_cli.core.plots import figure as _figure
    from tl_cli.core.plots import save_figure as _save

    fig = _figure(11, 10)
    axes = fig.subplots(2, 2)
    what = {
        "shared": "shared code (the classifier's input)",
        "private": "private codes (one encoder per domain)",
    }
    for i, space in enumerate(("shared", "private")):
        for j, when in enumerate(("before", "after")):
            src, tgt = panels[(space, when)]
            _panel(axes[i, j], src, tgt, src_labels, tgt_labels, f"{when} training: {what[space]}")
    handles = [
        Line2D([], [], marker="o", ls="", color=COLORS[d], label=d) for d in ("source", "target")
    ]
    fig.legend(handles=handles, loc="outside upper right", fontsize=9)
    fig.suptitle(
        "adapt=dsn: the shared code should mix the domains, the private codes keep them apart "
        "(PCA, marker = class)",
        fontsize=11,
    )
    _save(fig, Path(path))
    return Path(path)
