"""A global search along the population's principal axis (part of ``deconvolve.py``).

The local fit (Gauss-Newton from the current point) cannot leave the basin of the
likelihood it starts in. Far from the start the likelihood of z has other maxima (a domain
off by more than the resolution), so particles started from an encoder that regresses
toward the mean stay near it, and a population estimated from them stays shrunk. This
step looks along the population's principal axis v instead:

1. a grid of ``GRID_POINTS`` positions t_c on v, over the population's mean +-
   ``GRID_HALF_WIDTH`` sd along v;
2. for each particle i and position c, the whitened chi-square chi2_ic of its image
   against the rendering at its current z moved to t_c along v (its other parameters as
   they are, its grey scale profiled out);
3. the distribution of t over the particles, estimated without a parametric form: the
   nonparametric maximum-likelihood estimate on the grid (Kiefer and Wolfowitz 1956), by
   EM on the weights pi_c (r_ic proportional to pi_c exp(-chi2_ic / 2), pi_c = mean_i r_ic),
   which deconvolves the images' noise along v and shows several states where there are;
4. each particle moved along v to its posterior mean under that distribution.

The local fit then continues from there. The grid's end weights are reported: weight at an
end says the grid was too short.
"""
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from ..physics.likelihood import whitened_fit
from ..physics.rotations import correct_rotations
from .population import Population

if TYPE_CHECKING:
    from ..learn.data import ParticleImages, ParticleMetadata
    from ..learn.network import Decoder
    from ..physics.likelihood import WhitenedLikelihood

__all__ = ["AxisSearch", "axis_search", "npmle_weights", "posterior_means", "GRID_POINTS",
           "GRID_HALF_WIDTH"]

GRID_POINTS = 25
GRID_HALF_WIDTH = 6.0       # population sds along the axis, each side of its mean
NPMLE_ITERATIONS = 2000
BATCH = 8                   # particles per batch (times GRID_POINTS renderings)


@dataclass
class AxisSearch:
    """The result: ``axis`` (d,) unit vector, ``grid`` (G,) positions along it (z units,
    from z = 0), ``weights`` (G,) the estimated distribution, ``t`` (N,) each particle's
    posterior mean along the axis, ``moved`` (N,) how far it moved (z units)."""
    axis: np.ndarray
    grid: np.ndarray
    weights: np.ndarray
    t: np.ndarray
    moved: np.ndarray

    def describe(self, n_atoms: int) -> str:
        """One line: where the weight is, and the moves (Angstrom RMSD)."""
        s = math.sqrt(n_atoms)
        w = self.weights
        peaks = [i for i in range(len(w)) if w[i] >= 0.02
                 and (i == 0 or w[i] >= w[i - 1]) and (i == len(w) - 1 or w[i] >= w[i + 1])]
        text = ("axis search: weight at %s A RMSD along the population's principal axis "
                "(grid %.1f to %.1f); moves median %.2f A RMSD (95th percentile %.2f)"
                % (", ".join("%.1f (%.2f)" % (self.grid[i] / s, w[i]) for i in peaks),
                   self.grid[0] / s, self.grid[-1] / s, np.median(self.moved) / s,
                   np.percentile(self.moved, 95) / s))
        if w[0] > 0.01 or w[-1] > 0.01:
            text += "; weight at the grid's end (%.2f, %.2f): the grid is too short" % (w[0],
                                                                                   w[-1])
        return text


def npmle_weights(chi2: np.ndarray, iterations: int = NPMLE_ITERATIONS,
                  tol: float = 1e-10) -> np.ndarray:
    """Weights pi (G,) of the grid points maximising sum_i log sum_c pi_c exp(-chi2_ic / 2)
    (``chi2`` (N, G)), by EM from uniform weights."""
    L = -0.5 * (chi2 - chi2.min(1, keepdims=True))
    E = np.exp(L)
    G = chi2.shape[1]
    pi = np.full(G, 1.0 / G)
    for _ in range(int(iterations)):
        R = E * pi
        R /= R.sum(1, keepdims=True)
        new = R.mean(0)
        if np.abs(new - pi).max() < tol:
            pi = new
            break
        pi = new
    return pi


def posterior_means(chi2: np.ndarray, pi: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Each particle's posterior mean of the grid's ``points`` (G,) or (G, k) under the
    weights ``pi`` (G,), its likelihood exp(-chi2 / 2) (``chi2`` (N, G))."""
    R = np.exp(-0.5 * (chi2 - chi2.min(1, keepdims=True))) * pi
    R /= R.sum(1, keepdims=True)
    return R @ points


def axis_search(decoder: "Decoder", likelihood: "WhitenedLikelihood", dataset: "ParticleImages",
                meta: "ParticleMetadata", p: np.ndarray, pop: Population, ctf_of: Callable,
                device: torch.device, rotvec: Optional[np.ndarray] = None,
                fit_turn: bool = False, progress: Optional[Callable[[int], None]] = None
                ) -> AxisSearch:
    """The search of the module docstring for the particles' parameters ``p`` (N, P) =
    (z, shift[, w]) under ``likelihood`` (its band); other arguments as in
    ``deconvolve.deconvolve``. ``p`` is not changed: the caller moves the particles to
    ``z + (t - axis . z) axis``."""
    d = decoder.n_modes
    w, V = np.linalg.eigh(pop.cov)
    axis = V[:, -1]
    axis = axis * np.sign(axis[np.argmax(np.abs(axis))])
    mu, sd = float(pop.mean @ axis), math.sqrt(max(w[-1], 1e-12))
    grid = mu + np.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, GRID_POINTS) * sd
    N, G = p.shape[0], GRID_POINTS
    chi2 = np.zeros((N, G))
    ax = torch.as_tensor(axis, dtype=torch.float32, device=device)
    gt = torch.as_tensor(grid, dtype=torch.float32, device=device)
    with torch.no_grad():
        wts = None
        for s in range(0, N, BATCH):
            r = np.arange(s, min(N, s + BATCH))
            n = len(r)
            _, images = dataset[r]
            rt = torch.as_tensor(r, device=device)
            rot, base, ctf_params = meta.batch(rt)
            q = torch.as_tensor(p[r], dtype=torch.float32, device=device)
            z = q[:, :d]
            zc = z[:, None, :] + (gt[None, :, None] - (z @ ax)[:, None, None]) * ax
            rows = torch.arange(n, device=device).repeat_interleave(G)
            A = decoder.rotations(rot, None if rotvec is None
                                  else torch.as_tensor(rotvec[r], device=device))
            if fit_turn:
                A = correct_rotations(A, q[:, d + 2:])
            S = decoder.render_ft(zc.reshape(n * G, d), A[rows], (base + q[:, d:d + 2])[rows],
                                  ctf_of(ctf_params[rows]))
            S = likelihood.band.rendered_ft(S)
            Y = likelihood.band.images_ft(images.to(device).float())[rows]
            wts = likelihood.weights(meta.optics_group[rt][rows])
            chi2[r] = whitened_fit(Y, S, wts)["chi2"].double().cpu().numpy().reshape(n, G)
            if progress is not None:
                progress(n)
    pi = npmle_weights(chi2)
    t = posterior_means(chi2, pi, grid)
    moved = np.abs(t - p[:, :d] @ axis)
    return AxisSearch(axis, grid, pi, t, moved)
