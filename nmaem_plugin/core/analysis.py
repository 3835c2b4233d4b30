"""Analysis of the latent space: PCA, k-means, density maxima, deformed models, RMSD metrics.

Every particle i has d normal-mode amplitudes z_i (Angstrom) and its conformation is
X(z_i) = X0 + sum_l z_il U_l. This module reads a training run folder and a latent file,
summarises the z_i (``pca``, ``kmeans``, ``density_maxima``), writes deformed all-atom
models at chosen latent points (``export``, the ``nmaem export`` command) and measures the
accuracy of the z_i against a simulated dataset's ground truth (``evaluate``, the
``nmaem evaluate`` command). Definitions, parameters and defaults: ``docs/analysis.md``.

Conventions used throughout:

* PCA axes are the eigenvectors of the sample covariance of z (centred); a particle's PC
  coordinates are the coordinates of z itself along those axes, ``pc = z @ V.T``, measured
  from z = 0 (the reference model X0), not from the mean. V is orthogonal, so
  ``z = pc @ V``; for d = 1 the axis is +1 and PC1 = z. Each axis' sign makes its
  largest-magnitude entry positive.
* RMSDs are over all matched atoms with no superposition: on synthetic data the pose is
  known, so the frames are already in the reference's frame.
"""
import csv
import json
import os

import numpy as np

from .atomic import atomic_path
from .latent import read_latent
from .errors import NmaemError, fail

__all__ = ["PCA", "Maxima", "load_run", "pca", "kmeans",
           "kde_bandwidth", "isj_bandwidth", "silverman_bandwidth", "density_maxima", "traversal_points", "deformed_coords",
           "export", "evaluate", "DEFAULTS"]

# defaults shared by the command line, the docs and the tests
DEFAULTS = dict(
    steps=10,              # points per PC traversal
    low_percentile=5.0,    # PC traversal from this percentile of the data ...
    high_percentile=95.0,  # ... to this one
    kde_grid=1024,         # KDE evaluation points on PC1
    min_height=0.1,        # a maximum's density must be >= this fraction of the highest one
    min_prominence=0.1,    # ... and rise by >= this fraction of its height above the dip
                           #     separating it from any higher maximum
    min_significance=3.0,  # ... and by >= this many standard errors of the KDE (a bump
                           #     of the sample's own noise is not a state)
    n_init=10,             # k-means restarts (k-means++ seeding), best inertia kept
    max_iter=300,          # k-means iterations per restart
)


# ----------------------------------------------------------------------------- inputs

def load_run(run_dir, need_modes=True):
    """Read a training run folder: (reference AtomicModel, NormalModes or None, config dict).

    ``run_dir`` is the folder (or its ``config.json``). ``config.json`` names the reference
    model (``"reference"``) and the modes file (``"modes"``), both relative to the folder.
    The modes must have been computed on that reference (same atom ids in the same order,
    coordinates within 0.01 A). ``"n_modes"`` (when present) is the d the run was trained
    with: the first d modes of the file are used, and d = 0 (or ``"modes"`` null) means a
    run without modes: the modes returned are None, and ``need_modes=True`` makes that an
    error.
    Raises :class:`NmaemError` with a one-line message on any problem.
    """
    from .modes import check_modes_match, load_modes
    from .structure import read_model
    run_dir = str(run_dir)
    if os.path.basename(run_dir) == "config.json" and os.path.isfile(run_dir):
        run_dir = os.path.dirname(run_dir) or "."
    if not os.path.isdir(run_dir):
        fail(run_dir, "no such training run folder")
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        fail(run_dir, "not a training run folder (no config.json)")
    try:
        with open(cfg_path) as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        fail(cfg_path, "not readable as JSON (%s)" % str(exc).splitlines()[0])
    if not isinstance(config, dict):
        fail(cfg_path, "expected a JSON object")
    ref_name = config.get("reference")
    if not ref_name:
        fail(cfg_path, "no \"reference\" entry (the reference model file)")
    ref_path = os.path.join(run_dir, str(ref_name))
    if not os.path.isfile(ref_path):
        fail(ref_path, "reference model named in %s is missing" % cfg_path)
    model = read_model(ref_path)
    modes_name = config.get("modes")
    n_modes = config.get("n_modes")
    if n_modes is not None:
        try:
            n_modes = int(n_modes)
        except (TypeError, ValueError):
            fail(cfg_path, "\"n_modes\" is not a number (%r)" % (n_modes,))
        if n_modes < 0:
            fail(cfg_path, "\"n_modes\" is negative (%d)" % n_modes)
    if not modes_name or n_modes == 0:
        if need_modes:
            fail(cfg_path, "the run has no normal modes (d = 0)" if n_modes == 0 else
                 "no \"modes\" entry (the modes file)")
        return model, None, config
    modes_path = os.path.join(run_dir, str(modes_name))
    if not os.path.isfile(modes_path):
        fail(modes_path, "modes file named in %s is missing" % cfg_path)
    nm = load_modes(modes_path)
    check_modes_match(nm, model)
    if n_modes is not None and n_modes != nm.n_modes:
        if n_modes > nm.n_modes:
            fail(cfg_path, "\"n_modes\" is %d but %s holds %d modes"
                 % (n_modes, modes_path, nm.n_modes))
        from dataclasses import replace
        nm = replace(nm, modes=nm.modes[:n_modes], eigenvalues=nm.eigenvalues[:n_modes])
    return model, nm, config


def _check_d(latent, nm, run_dir):
    d_model = 0 if nm is None else nm.n_modes
    if latent.d != d_model:
        fail(latent.path, "z has d = %d amplitudes per particle but the run %s has %d modes"
             % (latent.d, run_dir, d_model))


def _need_z(latent, what):
    if latent.d == 0:
        fail(latent.path, "z has d = 0 amplitudes (a run without normal modes): %s needs "
                          "amplitudes" % what)


# ----------------------------------------------------------------------------- PCA

class PCA:
    """Principal axes of z. ``components`` (d,d) rows = axes V, sorted by decreasing
    variance; ``explained_variance`` (d,) sample variances (ddof 1) along them;
    ``explained_variance_ratio`` (d,) the same over their sum (zeros when z is constant);
    ``mean`` (d,). ``transform(z) = z @ V.T`` (from z = 0), ``inverse(pc) = pc @ V``."""

    def __init__(self, mean, components, explained_variance):
        self.mean = mean
        self.components = components
        self.explained_variance = explained_variance
        total = explained_variance.sum()
        self.explained_variance_ratio = (explained_variance / total if total > 0
                                         else np.zeros_like(explained_variance))

    @property
    def d(self):
        return len(self.mean)

    def transform(self, z):
        return np.asarray(z, dtype=np.float64) @ self.components.T

    def inverse(self, pc):
        return np.asarray(pc, dtype=np.float64) @ self.components


def pca(z):
    """PCA of z (N,d), N >= 2, d >= 1: a :class:`PCA`."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] == 0:
        raise NmaemError("PCA needs amplitudes z of shape (N, d) with d >= 1 (got %s)"
                         % (z.shape,))
    if z.shape[0] < 2:
        raise NmaemError("PCA needs at least 2 particles (got %d)" % z.shape[0])
    mean = z.mean(axis=0)
    c = z - mean
    cov = c.T @ c / (len(z) - 1)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    w = np.clip(w[order], 0.0, None)
    V = v[:, order].T.copy()
    for k in range(len(V)):          # sign: largest-magnitude entry positive
        if V[k, np.argmax(np.abs(V[k]))] < 0:
            V[k] = -V[k]
    return PCA(mean, V, w)


# ----------------------------------------------------------------------------- k-means

def _sqdist(x, c):
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def _kmeanspp(x, k, rng):
    n = len(x)
    centres = [x[rng.integers(n)]]
    d2 = _sqdist(x, centres[0][None])[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
            j = rng.integers(n)
        else:
            j = rng.choice(n, p=d2 / total)
        centres.append(x[j])
        d2 = np.minimum(d2, _sqdist(x, x[j][None])[:, 0])
    return np.array(centres)


def kmeans(z, k, seed=0, n_init=DEFAULTS["n_init"], max_iter=DEFAULTS["max_iter"]):
    """Lloyd's k-means with k-means++ seeding, ``n_init`` restarts from one seeded generator.

    Returns (centres (k,d), labels (N,), counts (k,)); clusters are numbered by decreasing
    size (ties by the first coordinate of the centre). The same inputs and seed give the
    same result. An empty cluster is re-seeded at the point farthest from its centre.
    """
    x = np.asarray(z, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise NmaemError("k-means needs amplitudes z of shape (N, d) with d >= 1")
    k = int(k)
    if k < 1:
        raise NmaemError("--kmeans needs K >= 1 (got %d)" % k)
    n_distinct = len(np.unique(x, axis=0))
    if k > n_distinct:
        raise NmaemError("--kmeans %d asks for more clusters than the %d distinct latent "
                         "points" % (k, n_distinct))
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max(1, int(n_init))):
        c = _kmeanspp(x, k, rng)
        labels = None
        for _ in range(int(max_iter)):
            d2 = _sqdist(x, c)
            new = np.argmin(d2, axis=1)
            counts = np.bincount(new, minlength=k)
            for j in np.flatnonzero(counts == 0):   # re-seed empty clusters
                far = np.argmax(d2[np.arange(len(x)), new])
                new[far] = j
                d2[far] = 0.0
                counts = np.bincount(new, minlength=k)
            sums = np.zeros_like(c)
            np.add.at(sums, new, x)
            c = sums / counts[:, None]
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
        inertia = _sqdist(x, c)[np.arange(len(x)), labels].sum()
        if best is None or inertia < best[0] - 1e-12 * max(1.0, abs(best[0])):
            best = (inertia, c.copy(), labels.copy())
    _, c, labels = best
    counts = np.bincount(labels, minlength=k)
    order = np.lexsort((c[:, 0], -counts))
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return c[order], rank[labels], counts[order]


# ----------------------------------------------------------------------------- maxima

def silverman_bandwidth(x):
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


def isj_bandwidth(x, grid_size=2 ** 12):
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


def kde_bandwidth(x, rule="isj"):
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

    def __init__(self, positions, densities, near, basin, bandwidth, radius, grid, density):
        self.positions, self.densities, self.near, self.basin = positions, densities, near, basin
        self.bandwidth, self.radius, self.grid, self.density = bandwidth, radius, grid, density

    def __len__(self):
        return len(self.positions)

    @property
    def basin_counts(self):
        return np.bincount(self.basin, minlength=len(self))


def density_maxima(x, bandwidth=None, min_height=DEFAULTS["min_height"],
                   min_prominence=DEFAULTS["min_prominence"], radius=None,
                   grid_size=DEFAULTS["kde_grid"],
                   min_significance=DEFAULTS["min_significance"]):
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
    i = np.arange(1, len(f) - 1)
    peaks = i[(f[i] > f[i - 1]) & (f[i] >= f[i + 1])]
    keep = []
    for p in peaks:
        if f[p] < min_height * f.max():
            continue
        higher = peaks[f[peaks] > f[p]]
        left = higher[higher < p]
        right = higher[higher > p]
        lo = f[(left.max() if len(left) else 0):p + 1].min()
        ro = f[p:(right.min() + 1 if len(right) else len(f))].min()
        dip = max(lo, ro)
        se = np.sqrt((f[p] + dip) / (2 * np.sqrt(np.pi) * len(x) * h))
        if f[p] - dip >= min_prominence * f[p] and f[p] - dip >= min_significance * se:
            keep.append(p)
    keep = np.array(keep, dtype=np.int64)
    dx = grid[1] - grid[0]
    positions, densities = [], []
    for p in keep:
        a, b, c = f[p - 1], f[p], f[p + 1]
        den = a - 2 * b + c
        off = 0.5 * (a - c) / den if den < 0 else 0.0
        positions.append(grid[p] + off * dx)
        densities.append(b - 0.25 * (a - c) * off)
    positions = np.array(positions)
    # basin boundaries: the lowest KDE point between consecutive maxima
    bounds = [grid[a + np.argmin(f[a:b + 1])] for a, b in zip(keep[:-1], keep[1:])]
    basin = np.searchsorted(np.array(bounds), x, side="right").astype(np.int64)
    near = [np.flatnonzero((basin == k) & (np.abs(x - positions[k]) <= r))
            for k in range(len(keep))]
    return Maxima(positions, np.array(densities), near, basin, h, r, grid, f)


# ----------------------------------------------------------------------------- models

def traversal_points(p, pcs, steps=DEFAULTS["steps"], low=DEFAULTS["low_percentile"],
                     high=DEFAULTS["high_percentile"], z=None):
    """Points along principal axes: a list of dicts (``pc``, ``step``, ``percentile``, ``z``).

    For each PC k (1-based) in ``pcs``, ``steps`` values t evenly spaced from the ``low`` to
    the ``high`` percentile of the data's PC k coordinates (``z`` (N,d), the data PCA ``p``
    was made from); each point is the mean of z moved along axis k to PC k = t, so its
    other PC coordinates are the mean's: z = mean + (t - mean . v_k) v_k.
    """
    if not (0 <= low <= high <= 100):
        raise NmaemError("percentiles must satisfy 0 <= low <= high <= 100 (got %g, %g)"
                         % (low, high))
    if steps < 1:
        raise NmaemError("--steps must be at least 1 (got %d)" % steps)
    scores = p.transform(z)
    perc = np.linspace(low, high, steps) if steps > 1 else np.array([(low + high) / 2.0])
    out = []
    for k in pcs:
        if not 1 <= k <= p.d:
            raise NmaemError("PC %d asked but z has d = %d amplitudes" % (k, p.d))
        v = p.components[k - 1]
        c = p.mean @ v
        for s, (q, t) in enumerate(zip(perc, np.percentile(scores[:, k - 1], perc)), 1):
            out.append(dict(pc=int(k), step=s, percentile=float(q), z=p.mean + (t - c) * v))
    return out


def deformed_coords(model, nm, z):
    """X0 + sum_l z_l U_l (M,3) from the reference model's own coordinates."""
    z = np.asarray(z, dtype=np.float64)
    return model.coords + np.tensordot(z, nm.modes.astype(np.float64), axes=(-1, 0))


def _parse_pcs(pcs):
    if isinstance(pcs, str):
        try:
            return [int(s) for s in pcs.replace(" ", "").split(",") if s]
        except ValueError:
            raise NmaemError("--pcs takes PC numbers separated by commas, e.g. 1 or 1,2 "
                             "(got %r)" % pcs)
    return [int(k) for k in pcs]


def _parse_z(text, d):
    try:
        z = np.array([float(s) for s in str(text).replace(" ", "").split(",") if s])
    except ValueError:
        raise NmaemError("--z takes d numbers separated by commas (got %r)" % text)
    if len(z) != d or not np.all(np.isfinite(z)):
        raise NmaemError("--z %s has %d finite value(s) but the model has d = %d modes"
                         % (text, len(z), d))
    return z


def _width(n):
    return max(2, len(str(n)))


def export(latent_path, run_dir, out_dir, pcs=None, steps=DEFAULTS["steps"],
           low=DEFAULTS["low_percentile"], high=DEFAULTS["high_percentile"], kmeans_k=None,
           maxima=False, z_list=(), fmt="pdb", seed=0, overwrite=False, bandwidth=None,
           min_height=DEFAULTS["min_height"], min_prominence=DEFAULTS["min_prominence"],
           min_significance=DEFAULTS["min_significance"], log=print):
    """Write deformed all-atom models at latent points; returns the listing (a dict).

    Any combination of: ``pcs`` (list of 1-based PCs, or "1,2") with ``steps`` points from
    the ``low`` to the ``high`` percentile (``traversal_points``); ``kmeans_k`` cluster
    centres (``kmeans``, ``seed``); ``maxima`` (``density_maxima`` on PC1, each model at the
    mean z of the particles near the maximum; ``bandwidth``, ``min_height`` and
    ``min_prominence`` as there); ``z_list`` explicit amplitude vectors
    (strings "1.5,-0.3,..." or arrays). With none of them, PC1 in ``steps`` points.
    Files: ``pc1_01.pdb``..., ``cluster_01``..., ``maximum_01``..., ``z_01``... (``.cif``
    with ``fmt='cif'``), ``models.json`` and ``models.csv``. Existing files are refused
    unless ``overwrite``. ``latent_path`` may be None when only ``z_list`` is given.
    """
    if fmt not in ("pdb", "cif"):
        raise NmaemError("--format must be pdb or cif (got %r)" % fmt)
    if not (pcs or kmeans_k or maxima or z_list):
        pcs = [1]
    pcs = _parse_pcs(pcs) if pcs else []
    model, nm, _ = load_run(run_dir, need_modes=False)
    latent = None
    if pcs or kmeans_k or maxima:
        if latent_path is None:
            raise NmaemError("--latent is needed for --pcs, --kmeans and --maxima")
        latent = read_latent(latent_path)
        _check_d(latent, nm, run_dir)
        _need_z(latent, "export")
    elif latent_path is not None:
        latent = read_latent(latent_path)
        _check_d(latent, nm, run_dir)
    if nm is None:
        fail(run_dir, "the run has no normal modes (d = 0): every exported model would be "
                      "the reference itself")
    d, M = nm.n_modes, model.n_atoms
    p = pca(latent.z) if (latent is not None and latent.n >= 2 and latent.d > 0) else None

    entries = []      # (name stem, info dict, z)
    if pcs:
        if p is None:
            fail(latent.path, "PC traversal needs at least 2 particles")
        for pt in traversal_points(p, pcs, steps, low, high, latent.z):
            entries.append(("pc%d_%0*d" % (pt["pc"], _width(steps), pt["step"]),
                            dict(kind="pc", pc=pt["pc"], step=pt["step"],
                                 percentile=pt["percentile"]), pt["z"]))
    if kmeans_k:
        centres, labels, counts = kmeans(latent.z, kmeans_k, seed=seed)
        for j in range(len(centres)):
            entries.append(("cluster_%0*d" % (_width(len(centres)), j + 1),
                            dict(kind="cluster", cluster=j + 1, n_particles=int(counts[j])),
                            centres[j]))
    if maxima:
        if p is None:
            fail(latent.path, "density maxima need at least 2 particles")
        mx = density_maxima(p.transform(latent.z)[:, 0], bandwidth=bandwidth,
                            min_height=min_height, min_prominence=min_prominence,
                            min_significance=min_significance)
        counts = mx.basin_counts
        for j in range(len(mx)):
            members = mx.near[j]
            if len(members):
                zj = latent.z[members].mean(0)
            else:   # cannot happen for a KDE maximum, but stay defined: the PC1 line
                zj = p.mean + (mx.positions[j] - p.mean @ p.components[0]) * p.components[0]
            entries.append(("maximum_%0*d" % (_width(len(mx)), j + 1),
                            dict(kind="maximum", maximum=j + 1,
                                 pc1_position=float(mx.positions[j]),
                                 density=float(mx.densities[j]),
                                 n_particles=int(len(members)), n_basin=int(counts[j]),
                                 bandwidth=float(mx.bandwidth)), zj))
    for j, zt in enumerate(z_list):
        zj = _parse_z(zt, d) if isinstance(zt, str) else np.asarray(zt, dtype=np.float64)
        if zj.shape != (d,):
            raise NmaemError("z of shape %s for d = %d modes" % (zj.shape, d))
        entries.append(("z_%0*d" % (_width(len(z_list)), j + 1), dict(kind="z"), zj))

    os.makedirs(out_dir, exist_ok=True)
    files = ["%s.%s" % (stem, fmt) for stem, _, _ in entries] + ["models.json", "models.csv"]
    existing = [f for f in files if os.path.exists(os.path.join(out_dir, f))]
    if existing and not overwrite:
        fail(os.path.join(out_dir, existing[0]),
             "already exists (%d of the %d output files do); choose another -o or pass "
             "--overwrite" % (len(existing), len(files)))

    from .structure import write_model
    listing = dict(latent=None if latent is None else os.path.abspath(latent.path),
                   model=os.path.abspath(str(run_dir)), n_particles=None if latent is None
                   else latent.n, d=d, n_atoms=M, format=fmt, seed=seed, models=[])
    if p is not None:
        listing["pca"] = dict(explained_variance_ratio=p.explained_variance_ratio.tolist(),
                              explained_variance=p.explained_variance.tolist(),
                              mean=p.mean.tolist(), components=p.components.tolist())
    for (stem, info, zj), fname in zip(entries, files):
        write_model(os.path.join(out_dir, fname), model, deformed_coords(model, nm, zj))
        row = dict(file=fname, **info)
        row["z"] = [float(v) for v in zj]
        row["pc_coords"] = None if p is None else [float(v) for v in p.transform(zj)]
        row["rmsd_to_reference"] = float(np.linalg.norm(zj) / np.sqrt(M))
        row.setdefault("n_particles", None)
        listing["models"].append(row)
    with atomic_path(os.path.join(out_dir, "models.json"), suffix=".json") as tmp:
        with open(tmp, "w") as fh:
            fh.write(format_json(listing) + "\n")
    with atomic_path(os.path.join(out_dir, "models.csv"), suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "kind", "n_particles", "rmsd_to_reference"]
                       + ["z%d" % (l + 1) for l in range(d)]
                       + (["pc%d" % (l + 1) for l in range(d)] if p is not None else []))
            for row in listing["models"]:
                w.writerow([row["file"], row["kind"],
                            "" if row["n_particles"] is None else row["n_particles"],
                            "%.6g" % row["rmsd_to_reference"]]
                           + ["%.6g" % v for v in row["z"]]
                           + (["%.6g" % v for v in row["pc_coords"]] if p is not None else []))
    log("export: %d model(s) of %d atoms -> %s (listing in models.json, models.csv)"
        % (len(entries), M, out_dir))
    return listing


# ----------------------------------------------------------------------------- evaluate

def _load_truth(sim_dir):
    sim_dir = str(sim_dir)
    if not os.path.isdir(sim_dir):
        fail(sim_dir, "no such simulated dataset folder")
    gt_path = os.path.join(sim_dir, "ground_truth.npz")
    fr_path = os.path.join(sim_dir, "frames.pdb")
    for path in (gt_path, fr_path):
        if not os.path.isfile(path):
            fail(path, "missing: --truth must be a folder written by nmaem simulate")
    try:
        with np.load(gt_path, allow_pickle=False) as f:
            gt = {k: f[k] for k in f.files}
    except Exception as exc:  # numpy raises several types for corrupt archives
        fail(gt_path, "not readable (%s)" % (str(exc).splitlines() or ["?"])[0])
    if "frame" not in gt:
        fail(gt_path, "no 'frame' array")
    params = {}
    if "params" in gt:
        try:
            params = json.loads(str(gt["params"]))
        except ValueError:
            params = {}
    return gt, params, fr_path


def _summary_stats(v):
    v = np.asarray(v, dtype=np.float64)
    q = np.percentile(v, [5, 25, 50, 75, 95])
    return dict(median=float(q[2]), mean=float(v.mean()), p5=float(q[0]), p25=float(q[1]),
                p75=float(q[3]), p95=float(q[4]), max=float(v.max()))


def _rmsd_rows(x0, U, z, targets, chunk=512):
    """sqrt(mean_atoms |x0 + z U - targets|^2) per row; x0 (M,3), U (d,M,3), z (N,d),
    targets (N,M,3) given as an index into a frame array: (frames, frame_idx)."""
    frames, idx = targets
    out = np.empty(len(idx))
    for s in range(0, len(idx), chunk):
        x = x0[None] + np.tensordot(z[s:s + chunk], U, axes=(1, 0)) if U is not None \
            else np.broadcast_to(x0, (len(idx[s:s + chunk]),) + x0.shape)
        diff = x - frames[idx[s:s + chunk]]
        out[s:s + chunk] = np.sqrt((diff * diff).sum((1, 2)) / x0.shape[0])
    return out


def evaluate(latent_path, sim_dir, run_dir, per_particle=None, bandwidth=None,
             min_height=DEFAULTS["min_height"], min_prominence=DEFAULTS["min_prominence"],
             min_significance=DEFAULTS["min_significance"]):
    """Accuracy of a latent file against a simulated dataset's ground truth: a dict.

    See ``docs/analysis.md`` for every field. In short: per-particle RMSD of
    X0 + U z_i to the particle's true frame (matched atoms, no superposition), the floor
    RMSD of each frame (best any z can do), the RMSD of X0 to each frame (the d = 0
    baseline), |corr(PC1, frame)|, the PCA explained variance, the density maxima on PC1
    with the frame and RMSD at each, the shift error, and a ``summary``.
    ``per_particle`` (a .npz path) also saves the per-particle arrays. ``bandwidth``,
    ``min_height`` and ``min_prominence`` go to ``density_maxima``.
    """
    from .modes import floor_rmsd
    from .structure import read_trajectory, rmsd
    model, nm, _ = load_run(run_dir, need_modes=False)
    latent = read_latent(latent_path)
    _check_d(latent, nm, run_dir)
    gt, params, fr_path = _load_truth(sim_dir)
    frame_all = np.asarray(gt["frame"]).astype(np.int64)
    n_gt = len(frame_all)
    if latent.index.max() >= n_gt:
        bad = int(np.sum(latent.index >= n_gt))
        fail(latent.path, "%d index value(s) beyond the %d particles of the ground truth "
                          "(max index %d): latent and --truth are different datasets"
             % (bad, n_gt, int(latent.index.max())))
    fmodel, frames = read_trajectory(fr_path)
    if frame_all.max() >= len(frames) or frame_all.min() < 0:
        fail(os.path.join(str(sim_dir), "ground_truth.npz"),
             "frame numbers outside the %d models of frames.pdb" % len(frames))
    # match atoms by their full ids (chain:resnum:icode:resname:atom)
    pos = {a: k for k, a in enumerate(fmodel.atom_ids)}
    ref_ids = model.atom_ids
    ia = np.array([k for k, a in enumerate(ref_ids) if a in pos], dtype=np.int64)
    if len(ia) == 0:
        fail(fr_path, "no atom shared with the run's reference model (matched by "
                      "chain:resnum:icode:resname:atom)")
    ib = np.array([pos[ref_ids[k]] for k in ia], dtype=np.int64)
    x0 = model.coords[ia]
    T = frames[:, ib, :]
    U = None if nm is None else nm.modes.astype(np.float64)[:, ia, :]

    frame = frame_all[latent.index]
    per_rmsd = _rmsd_rows(x0, U, latent.z, (T, frame))
    ref_rmsd_frames = np.array([rmsd(x0, t) for t in T])
    floor_frames = ref_rmsd_frames.copy() if U is None else np.asarray(floor_rmsd(U, x0, T))
    per_floor = floor_frames[frame]

    out = dict(latent=os.path.abspath(latent.path), truth=os.path.abspath(str(sim_dir)),
               model=os.path.abspath(str(run_dir)), n_particles=int(latent.n), d=int(latent.d),
               n_atoms=int(model.n_atoms), n_matched_atoms=int(len(ia)),
               n_frames=int(len(frames)), distribution=params.get("distribution"),
               snr_db=params.get("snr_db"))
    out["rmsd"] = _summary_stats(per_rmsd)
    out["floor_rmsd"] = _summary_stats(per_floor)
    out["reference_rmsd"] = _summary_stats(ref_rmsd_frames[frame])
    out["excess_rmsd"] = _summary_stats(per_rmsd - per_floor)
    out["floor_rmsd_per_frame"] = [float(v) for v in floor_frames]
    out["reference_rmsd_per_frame"] = [float(v) for v in ref_rmsd_frames]
    counts = np.bincount(frame, minlength=len(frames))
    med = np.full(len(frames), np.nan)
    for f in np.flatnonzero(counts):
        med[f] = np.median(per_rmsd[frame == f])
    out["particles_per_frame"] = counts.tolist()
    out["median_rmsd_per_frame"] = [None if np.isnan(v) else float(v) for v in med]

    # shifts: against ground truth when the particle file had no origins, else against 0
    if "shift" in gt and gt["shift"].shape == (n_gt, 2):
        if params.get("unknown_shifts", True):
            true_shift, against = gt["shift"][latent.index].astype(np.float64), "ground_truth"
        else:
            true_shift, against = np.zeros((latent.n, 2)), "zero (origins in the particle file)"
        err = np.linalg.norm(latent.shift - true_shift, axis=1)
        out["shift_error"] = dict(compared_to=against, rmse=float(np.sqrt((err ** 2).mean())),
                                  median=float(np.median(err)), p95=float(np.percentile(err, 95)))
    else:
        out["shift_error"] = None

    p = None
    if latent.d > 0 and latent.n >= 2:
        p = pca(latent.z)
        pc1 = p.transform(latent.z)[:, 0]
        out["pca_explained_variance_ratio"] = p.explained_variance_ratio.tolist()
        out["pc1_explained_variance"] = float(p.explained_variance_ratio[0])
        if pc1.std() > 0 and frame.std() > 0:
            out["abs_corr_pc1_frame"] = float(abs(np.corrcoef(pc1, frame)[0, 1]))
        else:
            out["abs_corr_pc1_frame"] = None
        mx = density_maxima(pc1, bandwidth=bandwidth, min_height=min_height,
                            min_prominence=min_prominence, min_significance=min_significance)
        counts = mx.basin_counts
        rows = []
        for j in range(len(mx)):
            members = mx.near[j]
            if len(members) == 0:
                continue
            zj = latent.z[members].mean(0)
            f = int(np.percentile(frame[members], 50, method="lower"))
            xj = x0 + np.tensordot(zj, U, axes=(0, 0))
            rows.append(dict(pc1=float(mx.positions[j]), density=float(mx.densities[j]),
                             n_near=int(len(members)), n_basin=int(counts[j]),
                             frame=f, frame_spread=float(np.std(frame[members])),
                             z=[float(v) for v in zj], rmsd=rmsd(xj, T[f]),
                             floor_rmsd=float(floor_frames[f]),
                             reference_rmsd=float(ref_rmsd_frames[f])))
        out["maxima"] = dict(bandwidth=float(mx.bandwidth), radius=float(mx.radius),
                             min_height=min_height, min_prominence=min_prominence,
                             min_significance=min_significance, points=rows)
    else:
        out["pca_explained_variance_ratio"] = None
        out["pc1_explained_variance"] = None
        out["abs_corr_pc1_frame"] = None
        out["maxima"] = None

    mrows = out["maxima"]["points"] if out["maxima"] else []
    out["summary"] = dict(
        distribution=params.get("distribution"), d=int(latent.d),
        n_particles=int(latent.n),
        median_rmsd=out["rmsd"]["median"], median_floor_rmsd=out["floor_rmsd"]["median"],
        median_reference_rmsd=out["reference_rmsd"]["median"],
        pc1_explained_variance=out["pc1_explained_variance"],
        abs_corr_pc1_frame=out["abs_corr_pc1_frame"],
        n_maxima=len(mrows), maxima_frames=[r["frame"] for r in mrows],
        maxima_rmsd=[r["rmsd"] for r in mrows],
        max_maxima_rmsd=max([r["rmsd"] for r in mrows]) if mrows else None,
        maxima_below_1_5A=(all(r["rmsd"] < 1.5 for r in mrows) if mrows else None),
        shift_rmse=None if out["shift_error"] is None else out["shift_error"]["rmse"])
    if per_particle:
        with atomic_path(per_particle, suffix=".npz") as tmp:
            np.savez(tmp, index=latent.index, frame=frame, rmsd=per_rmsd,
                     floor_rmsd=per_floor, reference_rmsd=ref_rmsd_frames[frame],
                     pc1=(p.transform(latent.z)[:, 0] if p is not None
                          else np.zeros(0)))
        out["per_particle_file"] = os.path.abspath(per_particle)
    return out


def _clean(o):
    """Plain JSON types (NaN and infinities as null)."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, (np.bool_, bool)):
        return bool(o)
    if isinstance(o, (np.integer, int)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        return float(o) if np.isfinite(o) else None
    return o


def format_json(result):
    """JSON text of an ``evaluate`` or ``export`` result (NaN and infinities as null)."""
    return json.dumps(_clean(result), indent=1)
