"""Figures of nmaem results (matplotlib, no Scipion): used by the Scipion viewers and by
``nmaem report``.

Every function returns a ``matplotlib.figure.Figure`` drawn on ``fig`` when given (a viewer's)
or on a new one (``base/figures.py``).

* :func:`latent_landscape` - histogram of z (d = 1), or for d > 1 the PCA explained
  variance, the PC1 histogram with its density maxima (``analysis.kde.density_maxima``,
  each labelled with its model name and particle counts, ``analysis.labels.maxima_labels``)
  and an equal-aspect PC1-PC2 hexbin; with ground-truth frames, PC1 per true island of frames
  (``analysis.labels.frame_groups``); with the number of atoms, a second axis in RMSD along PC1.
* :func:`mode_amplitudes` - one histogram per mode amplitude z_l.
* :func:`training_curves` - training and validation loss per epoch, images/s, and
  whether the validation loss has levelled off (``learn.convergence``).
* :func:`modes_overview` - eigenvalues, collectivity, per-residue fluctuation and, with a
  target, the overlaps and the floor RMSD.

Large sets are binned, never scattered: the cost grows with N only through histograms.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..analysis.labels import (MAX_KDE_POINTS, frame_groups, landscape_maxima, maxima_labels,
                               pc_coordinates, rmsd_per_angstrom)
from ..base.figures import prepare_figure
from ..learn.convergence import Log, convergence, log_columns

if TYPE_CHECKING:                   # matplotlib and the analysis types only in hints
    from matplotlib.figure import Figure

__all__ = ["latent_landscape", "mode_amplitudes", "training_curves", "load_modes_file",
           "states_overview",
           "residue_fluctuation", "modes_overview", "HIST_BINS", "HEX_GRIDSIZE"]

HIST_BINS = 100              # bins of 1D histograms (fewer for small samples, see _bins)
HEX_GRIDSIZE = 60            # hexagons across the PC1 axis


def _bins(n, nbins=HIST_BINS):
    """Histogram bins: ``nbins``, fewer for small samples (about 3 points per bin)."""
    return int(max(5, min(nbins, n // 3)))



def _hist_with_maxima(ax, x, maxima, sub, bins, xlabel, n_atoms=None):
    counts, edges, _ = ax.hist(x, bins=bins, color="0.6", edgecolor="none",
                               label="particles")
    width = edges[1] - edges[0]
    if maxima is not None and np.all(np.isfinite(maxima.density)):
        # KDE scaled to counts per bin
        ax.plot(maxima.grid, maxima.density * len(x) * width, color="C0", lw=1.2,
                label="KDE (h = %.3g)" % maxima.bandwidth)
    if maxima is not None and len(maxima):
        heights = np.interp(maxima.positions, 0.5 * (edges[1:] + edges[:-1]), counts)
        ax.vlines(maxima.positions, 0, heights, colors="C3", lw=1.0, linestyles="--")
        ax.plot(maxima.positions, heights, "v", color="C3", ms=8, gid="maxima",
                label="density maxima (%d)" % len(maxima))
        for pos, hgt, text in zip(maxima.positions, heights, maxima_labels(x, maxima)):
            ax.annotate(text, (pos, hgt), xytext=(0, 10), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, color="C3",
                        gid="maximum_label")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)       # room for the labels
    if n_atoms:
        scale = rmsd_per_angstrom(n_atoms)
        sec = ax.secondary_xaxis("top", functions=(lambda t: t * scale,
                                                   lambda r: r / scale))
        sec.set_xlabel("RMSD along %s from the reference (A)" % xlabel.split(" ")[0],
                       fontsize=8)
        sec.tick_params(labelsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("particles per bin")
    ax.legend(fontsize=8, loc="upper right")
    title = "%s: %s particles" % (xlabel.split(" ")[0], format(len(x), ","))
    if sub:
        title += " (maxima from %s)" % format(MAX_KDE_POINTS, ",")
    ax.set_title(title, fontsize=10)


def _frames_panel(ax, x, frames, bins, xlabel):
    """PC1 histograms per group of consecutive ground-truth frames (step lines)."""
    from matplotlib import cm
    groups = frame_groups(frames)
    edges = np.histogram_bin_edges(x, bins=bins)
    colours = cm.viridis(np.linspace(0.0, 0.9, len(groups)))
    for (label, mask), c in zip(groups, colours):
        ax.hist(x[mask], bins=edges, histtype="step", color=c, lw=1.4, label=label,
                gid="frame_group")
    corr = np.nan
    if np.std(frames) > 0 and np.std(x) > 0:
        corr = abs(np.corrcoef(x, frames)[0, 1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("particles per bin")
    ax.set_title("%s by ground-truth frame, |corr| = %.3f" % (xlabel.split(" ")[0], corr),
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper right")


def latent_landscape(z: np.ndarray, frames: Optional[np.ndarray] = None,
                     fig: Optional[Figure] = None, bins: int = HIST_BINS,
                     gridsize: int = HEX_GRIDSIZE, max_kde_points: Optional[int] = MAX_KDE_POINTS,
                     maxima_kwargs: Optional[Dict[str, Any]] = None, title: Optional[str] = None,
                     n_atoms: Optional[int] = None) -> Figure:
    """The latent landscape of particles' amplitudes z (N,d).

    d = 1: histogram of z with its density maxima. d > 1: the explained variance ratio
    of the PCs (bars, with the cumulative ratio), the PC1 histogram with its density
    maxima marked, and a PC1-PC2 hexbin (log colour scale: 1,000,000 particles stay
    readable). ``frames`` (N,) ground-truth frames: one more panel with the PC1 (or z)
    histogram of each group of frames (:func:`frame_groups`: the true islands when the
    truth has gaps) and |corr(PC1, frame)|. ``maxima_kwargs`` go to
    ``analysis.density_maxima`` (bandwidth, min_height, ...). Each maximum is labelled
    with its model's name and particle counts (:func:`maxima_labels`). ``n_atoms`` (M of
    the modes): a second x axis in RMSD along PC1 from the reference (|t| / sqrt(M)).
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    n, d = z.shape
    if n < 2 or d < 1:
        from ..base.errors import NmaemError
        raise NmaemError("a latent landscape needs at least 2 particles and d >= 1 "
                         "(got z of shape %s)" % (z.shape,))
    has_frames = frames is not None
    if has_frames:
        frames = np.asarray(frames).ravel()
        if len(frames) != n:
            from ..base.errors import NmaemError
            raise NmaemError("%d frames for %d particles" % (len(frames), n))
    p, pc = pc_coordinates(z)
    x = pc[:, 0]
    xlabel = "z1 (A)" if d == 1 else "PC1 (A)"
    nb = _bins(n, bins)
    maxima, sub = landscape_maxima(x, max_kde_points, **(maxima_kwargs or {}))

    if d == 1:
        ncols = 2 if has_frames else 1
        fig = prepare_figure(fig, 6.0 * ncols, 4.5)
        axes = fig.subplots(1, ncols, squeeze=False)[0]
        _hist_with_maxima(axes[0], x, maxima, sub, nb, xlabel, n_atoms)
        if has_frames:
            _frames_panel(axes[1], x, frames, nb, xlabel)
    else:
        fig = prepare_figure(fig, 11.0, 8.5)
        axes = fig.subplots(2, 2).ravel()
        ax = axes[0]
        k = np.arange(1, d + 1)
        ratio = p.explained_variance_ratio
        ax.bar(k, ratio, color="C0", label="PC", gid="explained_variance")
        ax.plot(k, np.cumsum(ratio), "o-", color="C1", ms=3, label="cumulative")
        ax.set_xlabel("principal component")
        ax.set_ylabel("explained variance ratio")
        ax.set_ylim(0, 1.05)
        ax.set_title("PCA of z (d = %d): PC1 explains %.1f %%" % (d, 100 * ratio[0]),
                     fontsize=10)
        ax.legend(fontsize=8, loc="center right")
        _hist_with_maxima(axes[1], x, maxima, sub, nb, xlabel, n_atoms)
        ax = axes[2]
        hb = ax.hexbin(x, pc[:, 1], gridsize=gridsize, mincnt=1, bins="log",
                       cmap="viridis", linewidths=0)
        fig.colorbar(hb, ax=ax, label="particles")
        ax.set_aspect("equal", adjustable="datalim")   # 1 A is 1 A on both axes
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PC2 (A)")
        ax.set_title("PC1-PC2 density (equal scales)", fontsize=10)
        if has_frames:
            _frames_panel(axes[3], x, frames, nb, xlabel)
        else:
            axes[3].set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


def mode_amplitudes(z: np.ndarray, fig: Optional[Figure] = None, bins: int = HIST_BINS,
                    title: Optional[str] = None) -> Figure:
    """One histogram per amplitude z_l (Angstrom), on a grid of panels."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    n, d = z.shape
    ncols = int(min(4, d))
    nrows = int(np.ceil(d / ncols))
    fig = prepare_figure(fig, 3.0 * ncols, 2.4 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    nb = _bins(n, bins)
    for l in range(d):
        ax = axes[l]
        ax.hist(z[:, l], bins=nb, color="C0", edgecolor="none")
        ax.set_title("mode %d: sd %.3g A" % (l + 1, z[:, l].std()), fontsize=9)
        ax.set_xlabel("z%d (A)" % (l + 1), fontsize=8)
        ax.set_ylabel("particles", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[d:]:
        ax.set_axis_off()
    fig.suptitle(title or "Mode amplitudes of %s particles" % format(n, ","))
    return fig



def training_curves(log: Log, fig: Optional[Figure] = None, title: Optional[str] = None
                    ) -> Figure:
    """Training and validation loss per epoch, training speed (images/s) and the
    :func:`convergence` note under the loss panel's title.

    ``log``: a path to ``log.csv``, a dict of columns, or a list of row dicts (the
    columns epoch, train_loss, val_loss, images_per_s, seconds of docs/training.md). A
    log still being written (no file yet, the header only, a partial last line) draws
    what is there. ``title``: the run's name (the viewers pass the protocol's label)."""
    log = log_columns(log)
    epoch = np.asarray(log.get("epoch", []), dtype=float)
    fig = prepare_figure(fig, 11.0, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    if len(epoch) == 0:
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "no epoch finished yet", ha="center", va="center",
                    transform=ax.transAxes)
    style = "o-" if len(epoch) < 30 else "-"
    for key, label, c in (("train_loss", "training", "C0"), ("val_loss", "validation", "C1")):
        if key in log and np.any(np.isfinite(log[key])):
            ax1.plot(epoch, log[key], style, color=c, ms=4, label="%s loss" % label)
    losses = np.concatenate([np.asarray(log[k], float) for k in ("train_loss", "val_loss")
                             if k in log] or [np.zeros(0)])
    losses = losses[np.isfinite(losses)]
    if len(losses) and losses.min() > 0 and losses.max() / losses.min() > 20:
        ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    conv = convergence(log)
    ax1.set_title("Loss per epoch\n%s" % conv.note, fontsize=9, wrap=True)
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=8)
    ips = np.asarray(log.get("images_per_s", []), float)
    if len(epoch) and len(ips) == len(epoch) and np.any(np.isfinite(ips)):
        ax2.plot(epoch, ips, style, color="C2", ms=4)
        ax2.set_title("Training speed: median %.0f images/s" % np.nanmedian(ips), fontsize=10)
    else:
        ax2.set_title("Training speed", fontsize=10)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("images/s")
    ax2.set_ylim(bottom=0)
    if title:
        fig.suptitle(title)
    return fig


def load_modes_file(path: str) -> Dict[str, np.ndarray]:
    """The arrays of a ``modes.npz`` as a dict (no checks beyond readability)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def residue_fluctuation(data: Mapping[str, np.ndarray]) -> Tuple[List[str], np.ndarray]:
    """Per-residue mean-square fluctuation of the modes, sum_l |u_l,i|^2 / lambda_l
    averaged over each residue's atoms (ANM, up to the factor kT/gamma).

    Returns (keys, values): residue keys ``chain:resnum:icode`` in model order and the
    fluctuations (A^2 per unit kT/gamma)."""
    modes = np.asarray(data["modes"], dtype=np.float64)
    ev = np.asarray(data["eigenvalues"], dtype=np.float64)[:len(modes)]
    ev = np.where(ev > 0, ev, np.nan)
    per_atom = np.nansum((modes ** 2).sum(-1) / ev[:, None], axis=0)
    ids = [str(a) for a in data["atom_ids"]]
    keys = [":".join(a.split(":")[:3]) for a in ids]
    order, inverse = {}, np.empty(len(keys), dtype=np.int64)
    for i, k in enumerate(keys):
        inverse[i] = order.setdefault(k, len(order))
    sums = np.bincount(inverse, weights=per_atom, minlength=len(order))
    counts = np.bincount(inverse, minlength=len(order))
    return list(order), sums / np.maximum(counts, 1)


def modes_overview(data: Union[str, Mapping[str, np.ndarray]], fig: Optional[Figure] = None,
                   title: Optional[str] = None) -> Figure:
    """Diagnostics of a ``modes.npz`` (a path or the dict of its arrays): the eigenvalue
    spectrum, the collectivity of each mode, the per-residue fluctuation and, when the
    file has target diagnostics, |overlap| per mode with the cumulative overlap and the
    floor RMSD (the best RMSD to the target any amplitudes reach)."""
    if isinstance(data, str):
        data = load_modes_file(data)
    d = len(data["modes"])
    k = np.arange(1, d + 1)
    has_target = "target_overlap" in data
    fig = prepare_figure(fig, 11.0, 8.0)
    axes = fig.subplots(2, 2).ravel()

    ax = axes[0]
    ev = np.asarray(data["eigenvalues"], dtype=float)[:d]
    ax.plot(k, ev, "o-", color="C0", ms=4, gid="eigenvalues")
    if np.all(ev > 0):
        ax.set_yscale("log")
    ax.set_xlabel("mode")
    ax.set_ylabel("ANM eigenvalue (gamma / A^2)")
    ax.set_title("Eigenvalue spectrum (%d modes)" % d, fontsize=10)

    ax = axes[1]
    if "collectivity" in data:
        coll = np.asarray(data["collectivity"], dtype=float)[:d]
        ax.bar(k, coll, color="C2", gid="collectivity")
        ax.set_title("Collectivity (mean %.2f)" % coll.mean(), fontsize=10)
    else:
        ax.text(0.5, 0.5, "no collectivity in the file", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_title("Collectivity", fontsize=10)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mode")
    ax.set_ylabel("collectivity")

    ax = axes[2]
    keys, fluct = residue_fluctuation(data)
    chains = [kk.split(":")[0] for kk in keys]
    x = np.arange(len(keys))
    ax.plot(x, fluct, "-", color="C4", lw=1, gid="fluctuation")
    for i in range(1, len(chains)):
        if chains[i] != chains[i - 1]:
            ax.axvline(i - 0.5, color="0.5", lw=0.8, ls=":")
    step = max(1, len(keys) // 8)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([kk.split(":")[0] + kk.split(":")[1] for kk in keys[::step]],
                       fontsize=7)
    ax.set_xlabel("residue (chain + number)")
    ax.set_ylabel("sum_l |u_l|^2 / lambda_l")
    ax.set_title("Per-residue fluctuation (%d residues)" % len(keys), fontsize=10)

    ax = axes[3]
    if has_target:
        ov = np.abs(np.asarray(data["target_overlap"], dtype=float))[:d]
        ax.bar(k, ov, color="C1", label="|overlap|", gid="overlap")
        if "target_cumulative_overlap" in data:
            cum = np.asarray(data["target_cumulative_overlap"], dtype=float)[:d]
            ax.plot(k, cum, "o-", color="C3", ms=3, label="cumulative overlap")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("mode")
        ax.set_ylabel("overlap with the target")
        floor = float(data["target_floor_rmsd"]) if "target_floor_rmsd" in data else np.nan
        rmsd = float(data["target_rmsd"]) if "target_rmsd" in data else np.nan
        ax.set_title("Target: RMSD %.2f A, floor RMSD %.2f A" % (rmsd, floor), fontsize=10)
        ax.text(0.35, 0.6, "floor RMSD %.2f A\n(best reachable with %d modes)" % (floor, d),
                transform=ax.transAxes, va="top", fontsize=8, gid="floor")
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no target model\n(compute the modes with a target\nfor overlaps "
                "and the floor RMSD)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


def states_overview(states_dir: str, fig: Optional[Figure] = None) -> Figure:
    """The states of an ``nmaem states`` folder side by side: each state's model thumbnail
    (``state_NN.png``, its projections along z, y and x; drawn with ``--model``) under its
    name, its particle count and share, and its model's RMSD to the reference; the
    unassigned particles in the title. Reads ``states.json`` (a one-line error when it is
    missing or not a listing)."""
    import os
    from ..analysis.states import STATES_JSON, read_states_json
    from ..base.errors import fail
    path = os.path.join(str(states_dir), STATES_JSON)
    listing = read_states_json(path)
    if not isinstance(listing, dict) or not isinstance(listing.get("states"), list):
        fail(path, "not a states listing: no 'states'")
    states = listing["states"]
    n = max(int(listing.get("n_particles") or 0), 1)
    cols = max(1, min(len(states), 4))
    rows = max(1, -(-len(states) // cols))
    fig = prepare_figure(fig, 3.2 * cols, 3.0 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, s in zip(axes, states):
        thumb = s.get("thumbnail")
        thumb = os.path.join(str(states_dir), os.path.basename(thumb)) if thumb else None
        if thumb and os.path.isfile(thumb):
            import matplotlib.image as mpimg
            ax.imshow(mpimg.imread(thumb))
        else:
            ax.text(0.5, 0.5, "no thumbnail\n(states without --model)", ha="center",
                    va="center", transform=ax.transAxes, fontsize=8, color="0.4")
        rmsd = s.get("rmsd_to_reference")
        ax.set_title("%s: %s particles (%.0f %%)%s" % (
            s.get("name", "state %s" % s.get("state")), format(int(s["n_particles"]), ","),
            100.0 * s["n_particles"] / n, "" if rmsd is None else
            "\nmodel %.2f A RMSD from the reference" % rmsd), fontsize=9)
    unassigned = n - int(listing.get("n_assigned") or 0)
    fig.suptitle("%d states (%s) of %s particles%s" % (
        len(states), listing.get("method", "?"), format(n, ","),
        ", %s in none" % format(unassigned, ",") if unassigned > 0 else ""), fontsize=11)
    return fig
