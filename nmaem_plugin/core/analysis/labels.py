"""What the figures and the Scipion viewers label the latent landscape with: PC coordinates,
positions along a PC in RMSD from the reference and their range (``pc_range``,
``pc_position``), the density maxima of a large sample, the particles near and in the basin of
each maximum and their labels (``maxima_counts``, ``maxima_labels``), the true islands of a
simulation's frames (``frame_islands``, ``frame_groups``). numpy only (no matplotlib)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Union

import numpy as np

if TYPE_CHECKING:                   # the analysis types only in hints
    from .kde import Maxima
    from .landscape import PCA

__all__ = ["pc_coordinates", "landscape_maxima", "modes_atom_count", "rmsd_per_angstrom",
           "pc_range", "pc_position", "maxima_counts", "maxima_labels", "frame_islands",
           "frame_groups", "MAX_KDE_POINTS", "MAX_FRAME_GROUPS"]

MAX_KDE_POINTS = 50000       # density maxima on a random subsample above this size
MAX_FRAME_GROUPS = 6         # PC1 histograms per group of frames (true islands if any)


def _subsample(x, max_points, seed=0):
    if max_points is None or len(x) <= max_points:
        return x, False
    rng = np.random.default_rng(seed)
    return x[rng.choice(len(x), size=int(max_points), replace=False)], True


def pc_coordinates(z: np.ndarray) -> Tuple[Optional[PCA], np.ndarray]:
    """(PCA, PC coordinates) of z (N,d) as ``analysis.pca`` defines them; d = 1: (None, z)."""
    from .landscape import pca
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
    from .kde import density_maxima
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
    from .landscape import pca
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
    from .export import numbered_name
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
