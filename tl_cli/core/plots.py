"""Figures without a display: a matplotlib Figure on the Agg canvas, saved atomically as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tl_cli.core.outputs import atomic_path


def figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> None:
    """PNG beside ``path``, then renamed onto it (`tl_cli.core.outputs.atomic_path`)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")
