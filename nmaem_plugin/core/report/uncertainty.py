"""Figures of the population estimate of ``nmaem infer`` (matplotlib, no Scipion): the
shrinkage check and the particles' posterior uncertainty. Used by ``nmaem infer`` (it
writes ``<latent>_shrinkage.png`` beside the latent), ``nmaem report`` and the Scipion
latent viewer.

* :func:`shrinkage_figure` - the particles' marginal log-likelihood as the landscape's
  spread about its mean is scaled by s (``io.latent.ShrinkageCheck``): s = 1 is the
  landscape as inferred, the maximum and its 95 % interval say how wide the images want it.
* :func:`uncertainty_landscape` - the PC1-PC2 plane of z coloured by the particles'
  posterior sd (median per hexagon), and the distribution of that sd.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from ..analysis.labels import pc_coordinates
from ..base.figures import prepare_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..io.latent import ShrinkageCheck

__all__ = ["shrinkage_figure", "uncertainty_landscape"]


def shrinkage_figure(check: ShrinkageCheck, fig: Optional[Figure] = None,
                     title: Optional[str] = None) -> Figure:
    """The shrinkage check: log-likelihood (relative to s = 1) against s on a log axis,
    the inferred landscape (s = 1) and the maximum with its 95 % interval marked."""
    fig = prepare_figure(fig, 7.0, 4.5)
    ax = fig.subplots()
    s, ll = np.asarray(check.scales), np.asarray(check.loglik)
    ax.plot(s, ll, "-", color="C0", label="particles' log-likelihood")
    ax.axvspan(check.low, check.high, color="C1", alpha=0.2,
               label="95 %% interval %.2f-%.2f" % (check.low, check.high))
    ax.axvline(check.best, color="C1", lw=1.5, label="maximum at %.2fx" % check.best)
    ax.axvline(1.0, color="k", lw=1, ls="--", label="as inferred (1x)")
    ax.set_xscale("log")
    ax.set_xlabel("spread of the landscape about its mean, relative to the inferred (s)")
    ax.set_ylabel("log-likelihood - log-likelihood at s = 1")
    lo = float(np.min(ll[np.isfinite(ll)])) if np.isfinite(ll).any() else -1.0
    ax.set_ylim(max(lo, -50.0 * max(1.0, float(np.max(ll)))), None)
    ax.legend(fontsize=8, loc="lower center")
    verdict = ("shrunk toward its mean" if check.low > 1.0 else
               "wider than the images support" if check.high < 1.0 else
               "consistent with the images")
    ax.set_title(title or "Landscape scale: %s" % verdict, fontsize=11)
    return fig


def uncertainty_landscape(z: np.ndarray, z_sd: np.ndarray, fig: Optional[Figure] = None,
                          gridsize: int = 50, title: Optional[str] = None) -> Figure:
    """The particles in the PC1-PC2 plane of z (or z1 against the particle for d = 1),
    each hexagon coloured by the median posterior sd ``z_sd`` (N,) of its particles, and
    the histogram of ``z_sd``; both in the units of z (Angstrom amplitudes)."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    sd = np.asarray(z_sd, dtype=np.float64).ravel()
    if len(sd) != len(z) or len(z) < 2:
        from ..base.errors import NmaemError
        raise NmaemError("an uncertainty landscape needs z_sd for each of at least 2 "
                         "particles (got %d values for %d particles)" % (len(sd), len(z)))
    fig = prepare_figure(fig, 11.0, 4.6)
    ax, hx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1.0]})
    if z.shape[1] > 1:
        _, pc = pc_coordinates(z)
        x, y, ylabel = pc[:, 0], pc[:, 1], "PC2 (A)"
    else:
        x, y, ylabel = z[:, 0], np.arange(len(z), dtype=np.float64), "particle"
    hb = ax.hexbin(x, y, C=sd, reduce_C_function=np.median, gridsize=gridsize,
                   cmap="magma_r", linewidths=0)
    fig.colorbar(hb, ax=ax, label="posterior sd of z (median per hexagon, A)")
    ax.set_xlabel("PC1 (A)" if z.shape[1] > 1 else "z1 (A)")
    ax.set_ylabel(ylabel)
    ax.set_title("Where the particles are uncertain", fontsize=10)
    hx.hist(sd, bins=int(max(5, min(80, len(sd) // 3))), color="C0", edgecolor="none")
    hx.axvline(float(np.median(sd)), color="C1", label="median %.3g A" % np.median(sd))
    hx.set_xlabel("posterior sd of z, sqrt(trace z_cov) (A)")
    hx.set_ylabel("particles")
    hx.legend(fontsize=8)
    fig.suptitle(title or "Per-particle uncertainty of %s particles" % format(len(sd), ","))
    return fig
