"""A matplotlib ``Figure`` without pyplot and its atomic save: what the report's figures and the
model thumbnails are drawn on.

Without ``fig`` a figure function makes a new ``Figure`` with an Agg canvas (no pyplot, no
display: safe in threads and on machines without X); the Scipion viewers pass the figure of a
pwem ``EmPlotter`` instead (``prepare_figure`` clears and sizes it), so the same drawing code
fills a Tk window. matplotlib is imported when a figure is made.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:                   # matplotlib only in hints
    from matplotlib.figure import Figure

__all__ = ["new_figure", "prepare_figure", "save"]


def new_figure(width: float = 10.0, height: float = 7.0, dpi: int = 100) -> Figure:
    """A Figure with an Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def prepare_figure(fig: Optional[Figure], width: float, height: float) -> Figure:
    """``fig`` cleared and sized ``width`` x ``height`` inches with the constrained layout, or
    a :func:`new_figure` when ``fig`` is None."""
    if fig is None:
        return new_figure(width, height)
    fig.clear()
    try:
        fig.set_size_inches(width, height, forward=True)
    except Exception:  # some GUI canvases refuse a resize before they are shown
        pass
    fig.set_layout_engine("constrained")
    return fig


def save(fig: Figure, path: str, dpi: int = 100) -> str:
    """Save ``fig`` as PNG (or any format matplotlib knows from the extension), atomically."""
    from .atomic import atomic_open
    fmt = os.path.splitext(str(path))[1].lstrip(".").lower() or "png"
    with atomic_open(path) as fh:
        fig.savefig(fh, dpi=dpi, format=fmt)
    return path
