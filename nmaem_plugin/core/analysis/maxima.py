"""The landscape of conformations and its states: density maxima along PC1 and the
models at them, one home for ``nmaem states --maxima``, ``nmaem export --maxima`` and the
figures.

Two estimates of the density, by what the latent holds:

* **Deconvolved** (a latent with ``z_cov``, from ``nmaem infer`` with the population
  estimate): the average of the particles' posteriors, f(z) = (1/N) sum_i N(z; m_i, C_i)
  (m_i = z, C_i = z_cov). Averaged over the data, a posterior is the prior, so this
  estimates the population itself: it is neither broadened by the images' noise (as a
  histogram of per-particle best fits is) nor narrowed toward the mean (as a histogram of
  posterior means is). PC axes: the eigenvectors of its covariance, cov(m) + mean(C)
  (the law of total variance). Along PC1 (t = v.z) each particle contributes a 1D Gaussian
  (mean v.m_i, variance v^T C_i v). Maxima are kept by the rules of
  ``analysis.density_maxima`` (height, prominence), their significance measured with the
  empirical standard error of the average, std_i(phi_i(peak) - phi_i(dip)) / sqrt(N).
  A particle's basin is the one holding most of its posterior mass along PC1; the model
  at a maximum t* is the conditional mean E[z | v.z = t*] under f (each particle's
  Gaussian conditional mean, weighted by its density at t*): where the state lies in all
  d amplitudes.
* **Point estimates** (an older latent, without ``z_cov``): the Gaussian KDE of PC1 of z
  (``analysis.density_maxima``), the model at a maximum the mean z of the particles near
  it. Point estimates are shrunk toward the reference where the images are noisy, and so
  are these states; the functions say so (``Landscape.note``).

Numpy only.
"""
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np

from ..base.errors import NmaemError
from .kde import Maxima, density_maxima, peak_indices, refined_peaks
from .landscape import DEFAULTS, PCA, pca

if TYPE_CHECKING:
    from ..io.latent import Latent

__all__ = ["Landscape", "StateMaxima", "landscape", "maxima", "POINT_ESTIMATE_NOTE"]

POINT_ESTIMATE_NOTE = ("the latent has no posterior covariances (z_cov): the landscape is the "
                       "histogram of point estimates, which noise narrows toward the "
                       "reference; infer again (nmaem infer --population em) "
                       "for the deconvolved landscape")
SQRT2PI = float(np.sqrt(2.0 * np.pi))


@dataclass
class Landscape:
    """``z`` (N, d) the particles' amplitudes (posterior means), ``z_cov`` (N, d, d) or
    None, ``pca`` the axes (of the deconvolved covariance when ``z_cov`` is given);
    ``note`` what the landscape is not, or ''."""
    z: np.ndarray
    z_cov: Optional[np.ndarray]
    pca: PCA
    note: str

    @property
    def deconvolved(self) -> bool:
        return self.z_cov is not None

    def along(self, k: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """(t (N,), var (N,)): each particle's position along PC ``k`` (from z = 0) and
        its posterior variance there (zeros without ``z_cov``)."""
        v = self.pca.components[k]
        t = self.z @ v
        if self.z_cov is None:
            return t, np.zeros_like(t)
        return t, np.einsum("i,nij,j->n", v, self.z_cov, v)

    def density(self, x: np.ndarray, k: int = 0) -> np.ndarray:
        """The deconvolved density along PC ``k`` at the points ``x`` (needs ``z_cov``)."""
        t, var = self.along(k)
        return _contributions(np.asarray(x, dtype=np.float64), t, var).mean(0)

    def conditional_mean(self, t_star: float, k: int = 0) -> np.ndarray:
        """E[z | PC_k = t_star] under the average posterior (d,) (needs ``z_cov``)."""
        v = self.pca.components[k]
        t, var = self.along(k)
        w = _contributions(np.array([t_star]), t, var)[:, 0]
        if not w.sum() > 0:
            w = np.exp(-0.5 * (t_star - t) ** 2 / var)
        cv = np.einsum("nij,j->ni", self.z_cov, v)
        cond = self.z + cv * ((t_star - t) / var)[:, None]
        return (w[:, None] * cond).sum(0) / w.sum()


def _contributions(x, t, var):
    """phi_i(x_j) (N, len(x)): each particle's 1D Gaussian density at the points x."""
    sd = np.sqrt(var)
    out = np.empty((len(t), len(x)))
    for s in range(0, len(t), 2048):
        u = (x[None, :] - t[s:s + 2048, None]) / sd[s:s + 2048, None]
        out[s:s + 2048] = np.exp(-0.5 * u * u) / (SQRT2PI * sd[s:s + 2048, None])
    return out


def landscape(z: np.ndarray, z_cov: Optional[np.ndarray] = None) -> Landscape:
    """The landscape of amplitudes ``z`` (N, d), deconvolved where ``z_cov`` is given."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] == 0 or len(z) < 2:
        raise NmaemError("a landscape needs amplitudes z of shape (N, d) with N >= 2 and "
                         "d >= 1 (got %s)" % (z.shape,))
    if z_cov is None:
        return Landscape(z, None, pca(z), POINT_ESTIMATE_NOTE)
    z_cov = np.asarray(z_cov, dtype=np.float64)
    total = np.atleast_2d(np.cov(z.T)) + z_cov.mean(0)
    return Landscape(z, z_cov, pca(z, covariance=total), "")


def from_latent(latent: "Latent") -> Landscape:
    """:func:`landscape` of a latent file's z (and z_cov where it has them)."""
    return landscape(latent.z, latent.z_cov)


@dataclass
class StateMaxima:
    """The maxima of a landscape along PC1: ``maxima`` (``analysis.Maxima``: positions,
    densities, basins, the particles near each), ``z`` (K, d) the model of each maximum,
    ``landscape``."""
    maxima: Maxima
    z: np.ndarray
    landscape: Landscape


def maxima(land: Landscape, bandwidth: Optional[float] = None,
           min_height: float = DEFAULTS["min_height"],
           min_prominence: float = DEFAULTS["min_prominence"],
           min_significance: float = DEFAULTS["min_significance"],
           grid_size: int = DEFAULTS["kde_grid"]) -> StateMaxima:
    """Density maxima along PC1 and the model at each (module docstring). ``bandwidth``
    applies to point estimates only (the deconvolved density has none: each particle's
    own posterior spread; another value than the default is warned about)."""
    t, var = land.along(0)
    if not land.deconvolved:
        mx = density_maxima(t, bandwidth=bandwidth, min_height=min_height,
                            min_prominence=min_prominence, min_significance=min_significance,
                            grid_size=grid_size)
        reps = []
        for k in range(len(mx)):
            rows = mx.near[k] if len(mx.near[k]) else np.flatnonzero(mx.basin == k)
            reps.append(land.z[rows].mean(0))
        return StateMaxima(mx, np.array(reps).reshape(len(mx), land.z.shape[1]), land)
    if bandwidth is not None and str(bandwidth).strip().lower() != "isj":   # the default
        from ..base.errors import warning
        warning("--bandwidth %s is not used: it applies to a latent without z_cov (point "
                "estimates); the deconvolved landscape has each particle's posterior spread"
                % bandwidth)
    sd = np.sqrt(var)
    grid = np.linspace((t - 4 * sd).min(), (t + 4 * sd).max(), int(grid_size))
    phi = _contributions(grid, t, var)               # (N, G)
    f = phi.mean(0)

    def se(p, dip):
        return float((phi[:, p] - phi[:, dip]).std() / np.sqrt(len(t)))

    keep = peak_indices(f, se, min_height, min_prominence, min_significance)
    positions, densities = refined_peaks(grid, f, keep)
    bounds = np.array([grid[a + np.argmin(f[a:b + 1])] for a, b in zip(keep[:-1], keep[1:])])
    edges = np.concatenate([[-np.inf], bounds, [np.inf]])
    # each particle's basin: the one holding most of its posterior mass along PC1
    from math import erf
    cdf = np.vectorize(lambda u: 0.5 * (1.0 + erf(u / np.sqrt(2.0))))
    mass = np.stack([cdf((edges[j + 1] - t) / sd) - cdf((edges[j] - t) / sd)
                     for j in range(len(keep))], 1) if len(keep) else np.ones((len(t), 1))
    basin = np.argmax(mass, 1).astype(np.int64)
    radius = float(np.median(sd))
    near = [np.flatnonzero((basin == k) & (np.abs(t - positions[k]) <= radius))
            for k in range(len(keep))]
    mx = Maxima(positions, np.array(densities), near, basin, radius, radius, grid, f)
    reps = np.array([land.conditional_mean(float(x)) for x in positions])
    return StateMaxima(mx, reps.reshape(len(keep), land.z.shape[1]), land)
