"""Density maxima of a 1D sample by a Gaussian KDE (the landscape of point estimates along
PC1): bandwidth rules (improved Sheather-Jones, Silverman, Scott), the KDE, the rules that
keep a maximum (``peak_indices``: height, prominence, significance) and ``density_maxima``
with its basins. The deconvolved landscape's maxima (``maxima.py``) keep theirs by the same
``peak_indices``. Definitions and defaults: ``docs/analysis.md``.
"""
from typing import Callable, List, Optional, Tuple

import numpy as np

from ..base.errors import NmaemError
from .landscape import DEFAULTS

__all__ = ["Maxima", "kde_bandwidth", "isj_bandwidth", "silverman_bandwidth", "density_maxima",
           "refined_peaks", "peak_indices"]


def silverman_bandwidth(x: np.ndarray) -> float:
    """Silverman's rule: h = 0.9 min(sd, IQR/1.349) n^(-1/5) (sd alone when IQR is 0)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(ddof=1) if len(x) > 1 else 0.0
    q75, q25 = np.percentile(x, [75, 25])
    spread = min(sd, (q75 - q25) / 1.349) if q75 > q25 else sd
    return 0.9 * spread * len(x) ** -0.2


def _isj_residual(t, n, k2, a2):
    """t - the plug-in estimate of t (Botev, Grotowski & Kroese 2010, eq. 20-21, l = 7)."""
    from math import factorial
    ell = 7
    f = 2.0 * np.pi ** (2 * ell) * np.sum(k2 ** ell * a2 * np.exp(-k2 * np.pi ** 2 * t))
    for s in range(ell - 1, 1, -1):
        if not f > 0:
            return np.nan
        # E|K^(s)|^2 factor: (1*3*5*...*(2s-1)) / sqrt(2 pi)
        k0 = factorial(2 * s) / (2 ** s * factorial(s)) / np.sqrt(2 * np.pi)
        c = (1 + 0.5 ** (s + 0.5)) / 3.0
        ts = (2 * c * k0 / (n * f)) ** (2.0 / (3 + 2 * s))
        f = 2.0 * np.pi ** (2 * s) * np.sum(k2 ** s * a2 * np.exp(-k2 * np.pi ** 2 * ts))
    if not f > 0:
        return np.nan
    return t - (2 * n * np.sqrt(np.pi) * f) ** -0.4


def isj_bandwidth(x: np.ndarray, grid_size: int = 2 ** 12) -> Optional[float]:
    """Improved Sheather-Jones plug-in bandwidth (Botev et al. 2010), or None if it fails.

    The data are binned on ``grid_size`` points over [min - R/2, max + R/2] (R the range),
    the squared cosine coefficients of the histogram feed the fixed-point equation
    t = xi gamma^[l](t), solved by bisection (Brent) on t in (0, 0.1]; h = sqrt(t) x width.
    Unlike the normal-reference rules it does not assume one bump, so it does not smooth
    separated modes away.
    """
    from scipy.fft import dct
    from scipy.optimize import brentq
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    lo, hi = x.min(), x.max()
    if n < 2 or not hi > lo:
        return None
    width = 2.0 * (hi - lo)
    edges = np.linspace(lo - (hi - lo) / 2, hi + (hi - lo) / 2, grid_size + 1)
    hist = np.histogram(x, edges)[0] / len(x)
    a = dct(hist, type=2)
    k2 = np.arange(1, grid_size, dtype=np.float64) ** 2
    a2 = (a[1:] / 2) ** 2
    g = lambda t: _isj_residual(t, n, k2, a2)      # noqa: E731
    top = 0.1
    lo_t = 1e-12
    try:
        if not (np.isfinite(g(lo_t)) and np.isfinite(g(top))) or g(lo_t) * g(top) > 0:
            return None
        t = brentq(g, lo_t, top, xtol=1e-14, rtol=1e-10, maxiter=200)
    except (ValueError, RuntimeError, FloatingPointError):
        return None
    return float(np.sqrt(t) * width)


def kde_bandwidth(x: np.ndarray, rule: str = "isj") -> float:
    """KDE bandwidth of the 1D sample x: ``isj`` (default; Silverman's rule where the
    plug-in equation has no root), ``silverman`` or ``scott`` (1.06 sd n^(-1/5))."""
    x = np.asarray(x, dtype=np.float64)
    if rule == "isj":
        with np.errstate(all="ignore"):
            h = isj_bandwidth(x)
        return silverman_bandwidth(x) if h is None or not np.isfinite(h) else h
    if rule == "silverman":
        return silverman_bandwidth(x)
    if rule == "scott":
        return 1.06 * (x.std(ddof=1) if len(x) > 1 else 0.0) * len(x) ** -0.2
    raise NmaemError("unknown bandwidth rule %r (isj, silverman, scott or a number)" % rule)


def _kde(x, grid, h, chunk=4096):
    dens = np.zeros(len(grid))
    for s in range(0, len(x), chunk):
        u = (grid[None, :] - x[s:s + chunk, None]) / h
        dens += np.exp(-0.5 * u * u).sum(0)
    return dens / (len(x) * h * np.sqrt(2 * np.pi))


class Maxima:
    """Density maxima of a 1D sample. ``positions``, ``densities`` (K,) sorted by position;
    ``near`` list of K index arrays (particles within ``radius`` of the maximum and in its
    basin); ``basin`` (N,) the maximum each particle's basin belongs to; ``bandwidth``,
    ``radius``; ``grid`` and ``density`` the KDE curve."""

    def __init__(self, positions: np.ndarray, densities: np.ndarray, near: List[np.ndarray],
                 basin: np.ndarray, bandwidth: float, radius: float, grid: np.ndarray,
                 density: np.ndarray):
        self.positions, self.densities, self.near, self.basin = positions, densities, near, basin
        self.bandwidth, self.radius, self.grid, self.density = bandwidth, radius, grid, density

    def __len__(self):
        return len(self.positions)

    @property
    def basin_counts(self) -> np.ndarray:
        return np.bincount(self.basin, minlength=len(self))


def peak_indices(f: np.ndarray, se: Callable[[int, int], float],
                 min_height: float = DEFAULTS["min_height"],
                 min_prominence: float = DEFAULTS["min_prominence"],
                 min_significance: float = DEFAULTS["min_significance"]) -> np.ndarray:
    """Grid indices (sorted) of the maxima of a density ``f`` on a grid that pass the
    rules of :func:`density_maxima`: height at least ``min_height`` of the highest;
    prominence (above the higher of the lowest points separating it from higher maxima,
    or from the ends) at least ``min_prominence`` of its height and at least
    ``min_significance`` times ``se(peak, dip)``, the standard error of f(peak) - f(dip)
    (grid indices)."""
    i = np.arange(1, len(f) - 1)
    peaks = i[(f[i] > f[i - 1]) & (f[i] >= f[i + 1])]
    keep = []
    for p in peaks:
        if f[p] < min_height * f.max():
            continue
        higher = peaks[f[peaks] > f[p]]
        left = higher[higher < p]
        right = higher[higher > p]
        a = left.max() if len(left) else 0
        b = right.min() + 1 if len(right) else len(f)
        lo = a + int(np.argmin(f[a:p + 1]))
        ro = p + int(np.argmin(f[p:b]))
        dip = lo if f[lo] >= f[ro] else ro
        rise = f[p] - f[dip]
        if rise >= min_prominence * f[p] and rise >= min_significance * se(int(p), dip):
            keep.append(p)
    return np.array(keep, dtype=np.int64)


def refined_peaks(grid: np.ndarray, f: np.ndarray,
                  keep: np.ndarray) -> Tuple[np.ndarray, List[float]]:
    """(positions, densities) of the maxima ``keep`` (grid indices, inside the grid) of a
    density ``f`` on the even ``grid``, each refined by the parabola through it and its
    two neighbours."""
    dx = grid[1] - grid[0]
    positions, densities = [], []
    for p in keep:
        a, b, c = f[p - 1], f[p], f[p + 1]
        den = a - 2 * b + c
        off = 0.5 * (a - c) / den if den < 0 else 0.0
        positions.append(grid[p] + off * dx)
        densities.append(b - 0.25 * (a - c) * off)
    return np.array(positions), densities


def density_maxima(x: np.ndarray, bandwidth: Optional[float] = None,
                   min_height: float = DEFAULTS["min_height"],
                   min_prominence: float = DEFAULTS["min_prominence"],
                   radius: Optional[float] = None, grid_size: int = DEFAULTS["kde_grid"],
                   min_significance: float = DEFAULTS["min_significance"]) -> Maxima:
    """Local maxima of a Gaussian KDE of the 1D sample ``x`` (e.g. PC1).

    ``bandwidth``: a number in the units of x, or a rule name for ``kde_bandwidth``
    (default ``isj``, the improved Sheather-Jones plug-in). The
    KDE is evaluated on ``grid_size`` points spanning [min - 3h, max + 3h]; a grid local
    maximum is refined by a parabola through its 3 points. A maximum is kept when its
    density is at least ``min_height`` x the highest and its prominence (height above the
    higher of the two lowest points separating it from higher maxima, or from the ends) is
    at least ``min_prominence`` x its density and at least ``min_significance`` standard
    errors of the difference of the two KDE values, sqrt((f_max + f_dip) R(K) / (n h)),
    R(K) = 1 / (2 sqrt(pi)) for the Gaussian kernel (the KDE's pointwise variance f R(K) /
    (n h), the two taken as independent). Basins are split at the lowest KDE point
    between consecutive kept maxima; ``near`` holds the particles of each basin within
    ``radius`` (default: the bandwidth) of the maximum.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if len(x) == 0:
        raise NmaemError("density maxima need at least one particle")
    if bandwidth is None or isinstance(bandwidth, str):
        h = kde_bandwidth(x, bandwidth or "isj")
    else:
        h = float(bandwidth)
    if not h > 0:
        # all values equal (or one particle): one maximum holding everything
        pos = np.array([np.median(x)])
        return Maxima(pos, np.array([np.inf]), [np.arange(len(x))],
                      np.zeros(len(x), dtype=np.int64), 0.0, 0.0, pos.copy(),
                      np.array([np.inf]))
    r = h if radius is None else float(radius)
    grid = np.linspace(x.min() - 3 * h, x.max() + 3 * h, int(grid_size))
    f = _kde(x, grid, h)

    def se(p, dip):
        return float(np.sqrt((f[p] + f[dip]) / (2 * np.sqrt(np.pi) * len(x) * h)))

    keep = peak_indices(f, se, min_height, min_prominence, min_significance)
    positions, densities = refined_peaks(grid, f, keep)
    # basin boundaries: the lowest KDE point between consecutive maxima
    bounds = [grid[a + np.argmin(f[a:b + 1])] for a, b in zip(keep[:-1], keep[1:])]
    basin = np.searchsorted(np.array(bounds), x, side="right").astype(np.int64)
    near = [np.flatnonzero((basin == k) & (np.abs(x - positions[k]) <= r))
            for k in range(len(keep))]
    return Maxima(positions, np.array(densities), near, basin, h, r, grid, f)


