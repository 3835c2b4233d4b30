"""Figures of nmaem results (matplotlib, no Scipion): used by the Scipion viewers and by
``nmaem report``.

Every function returns a ``matplotlib.figure.Figure``. Without ``fig`` the figure is a
new ``Figure`` with an Agg canvas (no pyplot, no display: safe in threads and on
machines without X); the Scipion viewers pass the figure of a pwem ``EmPlotter`` instead,
so the same drawing code fills a Tk window.

* :func:`latent_landscape` - histogram of z (d = 1), or for d > 1 the PCA explained
  variance, the PC1 histogram with its density maxima (``analysis.density_maxima``,
  each labelled with its model name and particle counts, :func:`maxima_labels`) and an
  equal-aspect PC1-PC2 hexbin; with ground-truth frames, PC1 per true island of frames
  (:func:`frame_groups`); with the number of atoms, a second axis in RMSD along PC1.
* :func:`mode_amplitudes` - one histogram per mode amplitude z_l.
* :func:`training_curves` - training and validation loss per epoch, images/s, and
  whether the validation loss has levelled off (:func:`convergence`).

Data functions shared with the viewers: :func:`pc_range` and :func:`pc_position`
(positions along a PC in RMSD from the reference, checked against the particles' range),
:func:`modes_atom_count`, :func:`maxima_counts`.
* :func:`modes_overview` - eigenvalues, collectivity, per-residue fluctuation and, with a
  target, the overlaps and the floor RMSD.

Large sets are binned, never scattered: the cost grows with N only through histograms.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:                   # matplotlib and the analysis types only in hints
    from matplotlib.figure import Figure

    from ..analysis.landscape import PCA, Maxima

# a training log: a path to log.csv, a dict of columns, or a list of row dicts
Log = Union[str, Mapping[str, Sequence[Any]], Sequence[Mapping[str, Any]]]

HIST_BINS = 100              # bins of 1D histograms (fewer for small samples, see _bins)
HEX_GRIDSIZE = 60            # hexagons across the PC1 axis
MAX_KDE_POINTS = 50000       # density maxima on a random subsample above this size
MAX_FRAME_GROUPS = 6         # PC1 histograms per group of frames (true islands if any)
CONVERGENCE_EPOCHS = 3       # the last 3 epochs against the 3 before them
CONVERGED_CHANGE = 0.01      # |relative change| of the validation loss called levelled off


def new_figure(width: float = 10.0, height: float = 7.0, dpi: int = 100) -> Figure:
    """A Figure with an Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _prepare(fig, width, height):
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
    from ..base.atomic import atomic_open
    fmt = os.path.splitext(str(path))[1].lstrip(".").lower() or "png"
    with atomic_open(path) as fh:
        fig.savefig(fh, dpi=dpi, format=fmt)
    return path


def _bins(n, nbins=HIST_BINS):
    """Histogram bins: ``nbins``, fewer for small samples (about 3 points per bin)."""
    return int(max(5, min(nbins, n // 3)))


def _subsample(x, max_points, seed=0):
    if max_points is None or len(x) <= max_points:
        return x, False
    rng = np.random.default_rng(seed)
    return x[rng.choice(len(x), size=int(max_points), replace=False)], True


def pc_coordinates(z: np.ndarray) -> Tuple[Optional[PCA], np.ndarray]:
    """(PCA, PC coordinates) of z (N,d) as ``analysis.pca`` defines them; d = 1: (None, z)."""
    from ..analysis.landscape import pca
    z = np.asarray(z, dtype=np.float64)
    if z.shape[1] == 1:
        return None, z.copy()
    p = pca(z)
    return p, p.transform(z)


def landscape_maxima(x: np.ndarray, max_points: Optional[int] = MAX_KDE_POINTS, seed: int = 0,
                     **kwargs: Any) -> Tuple[Maxima, bool]:
    """``analysis.density_maxima`` of the 1D sample x (PC1, or z for d = 1), computed on
    a random subsample of ``max_points`` when x is larger (the KDE costs N x 1024
    exponentials). Returns (Maxima, subsampled?)."""
    from ..analysis.landscape import density_maxima
    xs, sub = _subsample(np.asarray(x, dtype=np.float64).ravel(), max_points, seed)
    return density_maxima(xs, **kwargs), sub


# ----------------------------------------------------------------------------- PC positions

def modes_atom_count(path: str) -> int:
    """M, the number of atoms of a ``modes.npz`` (the ``modes`` array is (d, M, 3)), read
    from the array's header only."""
    import zipfile
    from numpy.lib import format as npformat
    from ..base.errors import fail
    try:
        with zipfile.ZipFile(path) as zf, zf.open("modes.npy") as fh:
            version = npformat.read_magic(fh)
            shape = (npformat.read_array_header_1_0(fh) if version == (1, 0)
                     else npformat.read_array_header_2_0(fh))[0]
    except KeyError:
        fail(path, "not a modes file: no 'modes'")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        fail(path, "not a readable modes file (%s)" % (str(exc).splitlines() or ["?"])[0])
    if len(shape) != 3 or shape[2] != 3 or shape[1] < 1:
        fail(path, "'modes' has shape %s, not (d, M, 3)" % (shape,))
    return int(shape[1])


def rmsd_per_angstrom(n_atoms: Optional[int]) -> float:
    """RMSD (A) of a displacement of 1 A along a PC: 1 / sqrt(M). The modes are orthonormal
    over the M atoms' 3M coordinates, so RMSD(X0 + U z, X0) = |z| / sqrt(M)
    (docs/analysis.md); without ``n_atoms``, 1 (positions stay in amplitude units)."""
    return 1.0 if not n_atoms else 1.0 / np.sqrt(float(n_atoms))


def pc_range(z: np.ndarray, k: int = 0, n_atoms: Optional[int] = None) -> Tuple[float, float]:
    """(low, high) of the particles' coordinates along PC k+1 (z1 when d = 1), in RMSD from
    the reference (A) when ``n_atoms`` is given: the coordinate from z = 0 (``PCA.transform``)
    times 1 / sqrt(M), signed."""
    _, pc = pc_coordinates(np.asarray(z, dtype=np.float64).reshape(len(z), -1))
    x = pc[:, k] * rmsd_per_angstrom(n_atoms)
    return float(x.min()), float(x.max())


def pc_position(z: np.ndarray, value: Union[float, str], k: int = 0, n_atoms: Optional[int] = None
                ) -> np.ndarray:
    """The latent point at ``value`` along PC k+1: the mean of z moved along that PC
    (``PCA.along``; z itself when d = 1). ``value`` is in the units of :func:`pc_range`
    and must lie within the particles' range: a point outside it is a model no particle
    supports, so it is refused (``NmaemError`` naming the range)."""
    from ..base.errors import NmaemError
    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    lo, hi = pc_range(z, k, n_atoms)
    name = "z1" if z.shape[1] == 1 else "PC%d" % (k + 1)
    unit = "A RMSD along %s from the reference" % name if n_atoms else "A"
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise NmaemError("%s position %r is not a number" % (name, value))
    if not np.isfinite(value) or not lo <= value <= hi:
        raise NmaemError("%s = %.3g is outside the particles' range %.3g to %.3g (%s)"
                         % (name, value, lo, hi, unit))
    t = value / rmsd_per_angstrom(n_atoms)
    if z.shape[1] == 1:
        return np.array([t])
    from ..analysis.landscape import pca
    return pca(z).along(k, t)


# ----------------------------------------------------------------------------- maxima

def maxima_counts(x: np.ndarray, maxima: Maxima) -> Tuple[np.ndarray, np.ndarray]:
    """(near, basin): per maximum, the particles of the full sample x within its radius
    and in its basin, and the particles of its basin (basins split at the lowest KDE
    point between consecutive maxima, as ``density_maxima`` does). Equal to
    ``len(maxima.near[k])`` and ``maxima.basin_counts`` when the maxima were found on x
    itself; on a subsample, the counts of all particles."""
    x = np.asarray(x, dtype=np.float64).ravel()
    pos = np.asarray(maxima.positions, dtype=np.float64)
    if len(pos) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    g, f = np.asarray(maxima.grid), np.asarray(maxima.density)
    # the grid point of each maximum (its refined position is within half a step of it)
    step = (g[-1] - g[0]) / max(len(g) - 1, 1)
    idx = (np.clip(np.rint((pos - g[0]) / step), 0, len(g) - 1).astype(np.int64)
           if step > 0 else np.zeros(len(pos), np.int64))
    bounds = [g[a + np.argmin(f[a:b + 1])] for a, b in zip(idx[:-1], idx[1:])]
    basin = np.searchsorted(np.array(bounds), x, side="right")
    basin_counts = np.bincount(basin, minlength=len(pos))
    near = np.array([np.count_nonzero((basin == k) & (np.abs(x - pos[k]) <= maxima.radius))
                     for k in range(len(pos))], dtype=np.int64)
    return near, basin_counts.astype(np.int64)


def maxima_labels(x: np.ndarray, maxima: Maxima) -> List[str]:
    """One label per maximum: the name of its model in ``nmaem export --maxima``
    (``maximum_01``...) and its particle counts, "N near / B in basin" (the model is the
    mean z of the N near particles; its basin holds B)."""
    from ..analysis.export import numbered_name
    near, basin = maxima_counts(x, maxima)
    return ["%s\n%s near / %s in basin" % (numbered_name("maximum", k, len(near)),
                                           format(int(near[k]), ","),
                                           format(int(basin[k]), ","))
            for k in range(len(near))]


# ----------------------------------------------------------------------------- frames

def frame_islands(frames: np.ndarray) -> List[Tuple[int, int]]:
    """The true islands of a ground truth: runs of consecutive populated frames, as
    (first, last) pairs in order (a discontinuous simulation has three; a continuous one
    has one)."""
    values = np.unique(np.asarray(frames).astype(np.int64))
    if len(values) == 0:
        return []
    cuts = np.flatnonzero(np.diff(values) > 1)
    starts = np.r_[values[0], values[cuts + 1]]
    ends = np.r_[values[cuts], values[-1]]
    return list(zip(starts.tolist(), ends.tolist()))


def frame_groups(frames: np.ndarray, max_groups: int = MAX_FRAME_GROUPS
                 ) -> List[Tuple[str, np.ndarray]]:
    """Groups of ground-truth frames for the landscape's colours: list of (label, mask).
    Up to ``max_groups`` populated frames: one group each. Otherwise the true islands
    (:func:`frame_islands`) when there are 2 to ``max_groups`` of them, so that no group
    straddles a gap; otherwise ``max_groups`` runs of consecutive frames."""
    frames = np.asarray(frames)
    values = np.unique(frames)
    if len(values) <= max_groups:
        return [("frame %d" % v, frames == v) for v in values]
    islands = frame_islands(frames)
    if 2 <= len(islands) <= max_groups:
        return [("island %d: frames %d-%d" % (i + 1, a, b), (frames >= a) & (frames <= b))
                for i, (a, b) in enumerate(islands)]
    edges = np.array_split(values, max_groups)
    return [("frames %d-%d" % (e[0], e[-1]), (frames >= e[0]) & (frames <= e[-1]))
            for e in edges]


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
        fig = _prepare(fig, 6.0 * ncols, 4.5)
        axes = fig.subplots(1, ncols, squeeze=False)[0]
        _hist_with_maxima(axes[0], x, maxima, sub, nb, xlabel, n_atoms)
        if has_frames:
            _frames_panel(axes[1], x, frames, nb, xlabel)
    else:
        fig = _prepare(fig, 11.0, 8.5)
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
    fig = _prepare(fig, 3.0 * ncols, 2.4 * nrows + 0.4)
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


def _log_columns(log):
    """A log (path, dict of columns or list of row dicts) as a dict of float arrays, rows
    without a finite epoch (a partly written line) dropped; a missing or unreadable file
    is an empty log (a training that has not finished an epoch)."""
    if isinstance(log, (str, os.PathLike)):
        from ..io.runfolder import read_log_columns
        try:
            log = read_log_columns(log)
        except (OSError, UnicodeDecodeError):
            log = {}
    elif isinstance(log, (list, tuple)):
        keys = set().union(*[r.keys() for r in log]) if log else set()
        log = {k: [r.get(k, np.nan) for r in log] for k in keys}
    cols = {}
    for k, v in log.items():
        if k is None:           # csv's overflow column of a malformed line
            continue
        try:
            cols[k] = np.asarray(v, dtype=float).ravel()
        except (TypeError, ValueError):
            cols[k] = np.array([np.nan if not _isnumber(a) else float(a) for a in v])
    epoch = cols.get("epoch", np.zeros(0))
    keep = np.isfinite(epoch)
    return {k: v[keep] if len(v) == len(keep) else v for k, v in cols.items()}


def _isnumber(a):
    try:
        float(a)
        return True
    except (TypeError, ValueError):
        return False


class Convergence:
    """Has the loss levelled off? ``change``: relative change of the mean loss over the
    last ``n`` epochs against the ``n`` before them, (mean_last - mean_prev) / |mean_prev|
    (None with fewer than 2n finite values); ``key``: the column judged (``val_loss``, or
    ``train_loss`` for a run without validation particles); ``epochs``: (first, last)
    epoch of each window; ``note``: one sentence for the figure and the viewer."""

    def __init__(self, key: str, change: Optional[float], n: int,
                 epochs: Optional[Tuple[Tuple[int, int], Tuple[int, int]]], note: str) -> None:
        self.key, self.change, self.n, self.epochs, self.note = key, change, n, epochs, note

    @property
    def converged(self) -> bool:
        return self.change is not None and abs(self.change) < CONVERGED_CHANGE


def convergence(log: Log, n: int = CONVERGENCE_EPOCHS, tol: float = CONVERGED_CHANGE
                ) -> Convergence:
    """:class:`Convergence` of a training log (path, columns or rows): the validation
    loss's mean over the last ``n`` epochs against the ``n`` epochs before; levelled off
    when |relative change| < ``tol``."""
    cols = _log_columns(log)
    epoch = cols.get("epoch", np.zeros(0))
    key, what = "val_loss", "validation loss"
    vals = cols.get(key)
    if vals is None or np.count_nonzero(np.isfinite(vals)) == 0:
        key, what = "train_loss", "training loss (no validation particles)"
        vals = cols.get(key, np.zeros(0))
    ok = np.isfinite(vals)
    e, v = epoch[ok], vals[ok]
    if len(v) < 2 * n:
        return Convergence(key, None, n, None,
                           "%d epoch(s) with a %s: %d needed to judge convergence (the "
                           "last %d against the %d before)" % (len(v), what.split(" (")[0],
                                                                2 * n, n, n))
    last, prev = v[-n:].mean(), v[-2 * n:-n].mean()
    if prev != 0:
        change = (last - prev) / abs(prev)
    else:
        change = 0.0 if last == prev else np.copysign(np.inf, last - prev)
    epochs = ((int(e[-2 * n]), int(e[-n - 1])), (int(e[-n]), int(e[-1])))
    verdict = ("levelled off (|change| < %g %%)" % (100 * tol) if abs(change) < tol else
               "still decreasing: more epochs may help" if change < 0 else
               "rising: look for overfitting or a too high learning rate")
    note = ("%s %+.2f %% (mean of epochs %d-%d vs %d-%d): %s"
            % (what[0].upper() + what[1:], 100 * change, epochs[1][0], epochs[1][1],
               epochs[0][0], epochs[0][1], verdict))
    return Convergence(key, float(change), n, epochs, note)


def training_curves(log: Log, fig: Optional[Figure] = None, title: Optional[str] = None
                    ) -> Figure:
    """Training and validation loss per epoch, training speed (images/s) and the
    :func:`convergence` note under the loss panel's title.

    ``log``: a path to ``log.csv``, a dict of columns, or a list of row dicts (the
    columns epoch, train_loss, val_loss, images_per_s, seconds of docs/training.md). A
    log still being written (no file yet, the header only, a partial last line) draws
    what is there. ``title``: the run's name (the viewers pass the protocol's label)."""
    log = _log_columns(log)
    epoch = np.asarray(log.get("epoch", []), dtype=float)
    fig = _prepare(fig, 11.0, 4.2)
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
    fig = _prepare(fig, 11.0, 8.0)
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


# ----------------------------------------------------------------------- model thumbnails

THUMBNAIL_BOX = 96           # rendered projection, pixels across
THUMBNAIL_PX = 160           # pixels of one view in the PNG (height; width x number of views)
THUMBNAIL_MARGIN = 8.0       # Angstrom kept free around the model in the projection
THUMBNAIL_BLUR = 2.0         # Angstrom, Gaussian sigma of the thumbnails' low-pass filter


def thumbnail_frame(coords: np.ndarray, box: int = THUMBNAIL_BOX, margin: float = THUMBNAIL_MARGIN
                    ) -> Tuple[np.ndarray, float]:
    """(centre (3,), apix) that put every atom of ``coords`` (M, 3) inside a ``box`` px
    projection along any axis: the centroid, and a pixel size (at least 1 A) such that the
    largest distance from it plus ``margin`` fits in half the box. Models of one series
    (an export, the states of a run) share the frame of their reference, so that their
    thumbnails compare."""
    coords = np.asarray(coords, dtype=np.float64)
    centre = coords.mean(0)
    radius = float(np.sqrt(((coords - centre) ** 2).sum(-1).max())) if len(coords) else 0.0
    return centre, max(1.0, 2.0 * (radius + margin) / (int(box) - 2))


def model_projections(coords: np.ndarray, elements: Sequence[str], views: Sequence[str] = ("z",),
                      box: int = THUMBNAIL_BOX, apix: Optional[float] = None,
                      centre: Optional[np.ndarray] = None, blur: float = 0.0) -> np.ndarray:
    """(V, box, box) float64 projections of an atomic model, arrays [y, x], one per view of
    ``views`` (``poses.VIEW_AXES``: along the model's z, y or x axis), rendered by
    ``imaging.Renderer`` (band-limited atoms with their form factors, no CTF, no shift).
    ``centre`` (3,) Angstrom lands on pixel (box//2, box//2); without ``centre``/``apix``,
    :func:`thumbnail_frame`. An atom at r projects onto pixel (x, y) =
    box//2 + (A (r - centre))[:2] / apix with A = ``poses.view_matrix(view)``. ``blur``
    > 0: a Gaussian low-pass of that sigma (Angstrom), exp(-2 pi^2 blur^2 |q|^2)."""
    import torch
    from ..physics.renderer import Renderer
    from ..io.poses import view_matrix
    coords = np.asarray(coords, dtype=np.float64)
    if centre is None or apix is None:
        c0, a0 = thumbnail_frame(coords, box)
        centre = c0 if centre is None else centre
        apix = a0 if apix is None else apix
    r = Renderer(np.asarray(elements), int(box), float(apix), centre=np.asarray(centre, float))
    rot = torch.as_tensor(np.stack([view_matrix(v) for v in views]), dtype=torch.float32)
    with torch.no_grad():
        ft = r.render_ft(torch.as_tensor(coords, dtype=torch.float32), rot)
    ft = ft.to(torch.complex128).numpy()
    if blur > 0:
        qy = np.fft.fftfreq(r.box, d=r.apix)[:, None]
        qx = np.fft.rfftfreq(r.box, d=r.apix)[None, :]
        ft = ft * np.exp(-2.0 * np.pi ** 2 * blur ** 2 * (qx ** 2 + qy ** 2))
    return np.fft.irfft2(ft, s=(r.box, r.box))


def model_thumbnail(coords: np.ndarray, elements: Sequence[str], path: str,
                    views: Sequence[str] = ("z", "y", "x"), box: int = THUMBNAIL_BOX,
                    apix: Optional[float] = None, centre: Optional[np.ndarray] = None,
                    px: int = THUMBNAIL_PX, blur: float = THUMBNAIL_BLUR) -> str:
    """Save a PNG of the model's projections side by side (:func:`model_projections`,
    low-passed by ``blur``, each view labelled with its axis), ``px`` pixels high and ``px``
    x len(views) wide, atomically (:func:`save`); returns ``path``. Image x to the right,
    image y up."""
    imgs = model_projections(coords, elements, views=views, box=box, apix=apix, centre=centre,
                             blur=blur)
    dpi = 100
    fig = new_figure(px * len(views) / dpi, px / dpi, dpi=dpi)
    fig.set_layout_engine(None)
    for k, (view, img) in enumerate(zip(views, imgs)):
        ax = fig.add_axes([k / len(views), 0.0, 1.0 / len(views), 1.0])
        ax.imshow(img, cmap="gray", origin="lower", interpolation="bilinear",
                  vmin=0.0, vmax=float(img.max()) or 1.0)
        ax.set_axis_off()
        ax.text(0.04, 0.96, "along %s" % view, color="yellow", fontsize=7, va="top",
                transform=ax.transAxes)
    return save(fig, path, dpi=dpi)


def series_thumbnails(coords: Sequence[np.ndarray], elements: Sequence[str],
                      paths: Sequence[str]) -> List[str]:
    """:func:`model_thumbnail` of each model of a series (``coords`` (M, 3) each) to its
    path, all in the frame of the whole series (:func:`thumbnail_frame`), so that they
    compare."""
    centre, apix = thumbnail_frame(np.concatenate([np.asarray(c) for c in coords]))
    return [model_thumbnail(xyz, elements, path, centre=centre, apix=apix)
            for xyz, path in zip(coords, paths)]
