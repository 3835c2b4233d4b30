"""Latent statistics: PCA, k-means, traversals, deformed coordinates.

Every particle i has d normal-mode amplitudes z_i (Angstrom) and its conformation is
X(z_i) = X0 + sum_l z_il U_l. This module reads a training run folder (``load_run``) and
summarises the z_i (``pca``, ``kmeans``; the density maxima are in ``kde.py`` and
``maxima.py``). Deformed all-atom models at
chosen latent points are written by ``export.py`` (``nmaem export``); the accuracy against a
simulated dataset's ground truth is measured by ``evaluate.py`` (``nmaem evaluate``).
Definitions, parameters and defaults: ``docs/analysis.md``.

Conventions used throughout:

* PCA axes are the eigenvectors of the sample covariance of z (centred); a particle's PC
  coordinates are the coordinates of z itself along those axes, ``pc = z @ V.T``, measured
  from z = 0 (the reference model X0), not from the mean. V is orthogonal, so
  ``z = pc @ V``; for d = 1 the axis is +1 and PC1 = z. Each axis' sign makes its
  largest-magnitude entry positive.
* RMSDs are over all matched atoms with no superposition: on synthetic data the pose is
  known, so the frames are already in the reference's frame.
"""
import json
import os
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np

from ..base.errors import NmaemError, fail, require_folder

if TYPE_CHECKING:
    from ..io.latent import Latent
    from ..modes.modesfile import NormalModes
    from ..physics.structure import AtomicModel

__all__ = ["PCA", "load_run", "check_latent_d", "need_z", "format_json", "pca", "kmeans",
           "traversal_points", "deformed_coords", "DEFAULTS"]

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

def load_run(run_dir: str, need_modes: bool = True
             ) -> Tuple["AtomicModel", Optional["NormalModes"], dict]:
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
    from ..modes.modesfile import check_modes_match, load_modes
    from ..physics.structure import read_model
    run_dir = str(run_dir)
    if os.path.basename(run_dir) == "config.json" and os.path.isfile(run_dir):
        run_dir = os.path.dirname(run_dir) or "."
    require_folder(run_dir, "training run folder")
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


def check_latent_d(latent: "Latent", nm: Optional["NormalModes"], run_dir: str,
                   cfg: Optional[dict] = None) -> None:
    """Fail when the latent file's d differs from the run's number of modes, or (with the
    run's ``cfg``) when another run made it (``latent.check_latent``, the model fingerprint)."""
    d_model = 0 if nm is None else nm.n_modes
    if latent.d != d_model:
        fail(latent.path, "z has d = %d amplitudes per particle but the run %s has %d modes"
             % (latent.d, run_dir, d_model))
    if cfg is not None:
        from ..io.latent import check_latent
        check_latent(latent, str(run_dir).rsplit(os.sep + "config.json", 1)[0], cfg)


def need_z(latent: "Latent", what: str) -> None:
    """Fail when the latent file has no amplitudes (d = 0)."""
    if latent.d == 0:
        fail(latent.path, "z has d = 0 amplitudes (a run without normal modes): %s needs "
                          "amplitudes" % what)


# ----------------------------------------------------------------------------- PCA

class PCA:
    """Principal axes of z. ``components`` (d,d) rows = axes V, sorted by decreasing
    variance; ``explained_variance`` (d,) sample variances (ddof 1) along them;
    ``explained_variance_ratio`` (d,) the same over their sum (zeros when z is constant);
    ``mean`` (d,). ``transform(z) = z @ V.T`` (from z = 0), ``inverse(pc) = pc @ V``."""

    def __init__(self, mean: np.ndarray, components: np.ndarray,
                 explained_variance: np.ndarray):
        self.mean = mean
        self.components = components
        self.explained_variance = explained_variance
        total = explained_variance.sum()
        self.explained_variance_ratio = (explained_variance / total if total > 0
                                         else np.zeros_like(explained_variance))

    @property
    def d(self) -> int:
        return len(self.mean)

    def transform(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) @ self.components.T

    def inverse(self, pc: np.ndarray) -> np.ndarray:
        return np.asarray(pc, dtype=np.float64) @ self.components

    def along(self, k: int, t: float) -> np.ndarray:
        """The mean of z moved along PC k+1 to coordinate ``t`` (its other PC
        coordinates those of the mean): ``mean + (t - mean . V_k) V_k``."""
        v = self.components[k]
        return self.mean + (float(t) - self.mean @ v) * v


def pca(z: np.ndarray, covariance: Optional[np.ndarray] = None) -> PCA:
    """PCA of z (N,d), N >= 2, d >= 1: a :class:`PCA`; ``covariance`` (d, d) replaces the
    sample covariance of z (e.g. the deconvolved one, ``landscape.py``)."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] == 0:
        raise NmaemError("PCA needs amplitudes z of shape (N, d) with d >= 1 (got %s)"
                         % (z.shape,))
    if z.shape[0] < 2:
        raise NmaemError("PCA needs at least 2 particles (got %d)" % z.shape[0])
    mean = z.mean(axis=0)
    c = z - mean
    cov = c.T @ c / (len(z) - 1) if covariance is None else np.asarray(covariance, float)
    w, v = np.linalg.eigh(0.5 * (cov + cov.T))
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


def kmeans(z: np.ndarray, k: int, seed: int = 0, n_init: int = DEFAULTS["n_init"],
           max_iter: int = DEFAULTS["max_iter"]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
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


# ----------------------------------------------------------------------------- models

def traversal_points(p: PCA, pcs: Sequence[int], steps: int = DEFAULTS["steps"],
                     low: float = DEFAULTS["low_percentile"],
                     high: float = DEFAULTS["high_percentile"],
                     z: Optional[np.ndarray] = None) -> List[dict]:
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


def deformed_coords(model: "AtomicModel", nm: "NormalModes", z: np.ndarray) -> np.ndarray:
    """X0 + sum_l z_l U_l (M,3) from the reference model's own coordinates."""
    z = np.asarray(z, dtype=np.float64)
    return model.coords + np.tensordot(z, nm.modes.astype(np.float64), axes=(-1, 0))


# ----------------------------------------------------------------------------- output

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


def format_json(result: dict) -> str:
    """JSON text of an ``evaluate`` or ``export`` result (NaN and infinities as null)."""
    return json.dumps(_clean(result), indent=1)
