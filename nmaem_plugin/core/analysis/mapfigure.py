"""The figure of a state's map (``state_NN/map.png``, and the states viewer): its central
sections with the contour of its model's map, and its FSC curves. Numpy and matplotlib
(lazily, through ``base.figures``); torch-free, so that the Scipion viewer draws it on its
own figure."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..base.figures import prepare_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["central_sections", "draw_state_map"]

# the sections: (name, axis of the [z, y, x] array cut at D//2, horizontal, vertical)
SECTIONS = (("xy (z = centre)", 0, "x", "y"), ("xz (y = centre)", 1, "x", "z"),
            ("yz (x = centre)", 2, "y", "z"))


def central_sections(volume: np.ndarray) -> list:
    """The three central sections of ``volume`` [z, y, x] through voxel D//2, in the order
    of :data:`SECTIONS` (each [vertical, horizontal])."""
    v = np.asarray(volume)
    c = v.shape[0] // 2
    return [v[c, :, :], v[:, c, :], v[:, :, c]]


def draw_state_map(volume: np.ndarray, model_volume: Optional[np.ndarray], apix: float,
                   curves: Sequence[tuple], title: str = "",
                   fig: Optional["Figure"] = None) -> "Figure":
    """Central sections of ``volume`` (grey, as given: low-pass it first) with the contour
    of ``model_volume`` at a quarter of its maximum, and the FSC ``curves``: tuples
    (label, frequency (S,) 1/A, fsc (S,), threshold, resolution A or None)."""
    fig = prepare_figure(fig, 13.0, 3.6)
    axes = fig.subplots(1, 4)
    D = volume.shape[0]
    extent = [-(D // 2) * apix, (D - D // 2) * apix] * 2
    secs = central_sections(volume)
    msecs = central_sections(model_volume) if model_volume is not None else [None] * 3
    level = None if model_volume is None else 0.25 * float(np.max(model_volume))
    for ax, (name, _, h, v), s, m in zip(axes[:3], SECTIONS, secs, msecs):
        ax.imshow(s, cmap="gray", origin="lower", extent=extent)
        if m is not None and level is not None and float(np.max(m)) > level:
            ax.contour(m, levels=[level], colors="tab:orange", linewidths=0.8,
                       origin="lower", extent=extent)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("%s (A)" % h, fontsize=8)
        ax.set_ylabel("%s (A)" % v, fontsize=8)
        ax.tick_params(labelsize=7)
    ax = axes[3]
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for (label, freq, curve, thr, res), col in zip(curves, colours):
        text = label if res is None else "%s: %.1f A at %.3g" % (label, res, thr)
        ax.plot(freq, curve, color=col, lw=1.2, label=text)
        ax.axhline(thr, color=col, lw=0.6, ls="--")
    ax.set_ylim(-0.2, 1.05)
    ax.set_xlabel("spatial frequency (1/A)", fontsize=8)
    ax.set_ylabel("FSC", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("FSC", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
