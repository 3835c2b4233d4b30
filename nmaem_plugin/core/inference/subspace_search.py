"""A global search over the lowest normal modes (part of ``deconvolve.py``, before the local fit).

The local fit cannot leave the basin of the likelihood it starts in, and the encoder's
outputs regress toward the population mean; the axis search (``axis_search.py``) looks
along the population's first axis, but that axis is itself estimated from the shrunk
starts (on held-out particles its cosine to the true open -> closed change was 0.7). This
search does not use the starts' direction at all: the subspace is the ``MODES`` lowest
normal modes, fixed by the physics (the largest thermal amplitudes, 1/sqrt(eigenvalue)),
and in it

1. a product grid of ``POINTS`` positions per mode about the population mean, each mode's
   half-width ``HALF_WIDTH`` population sds along it but at least ``MIN_HALF_RMSD``
   Angstrom RMSD (so a population shrunk to nothing still gets a grid);
2. for every particle and every grid point, the whitened chi-square to ``RESOLUTION_A``
   (its grey scale profiled out) of the rendering of the grid's conformation (the other
   modes at the population mean) with the particle's pose, shift and CTF, by the Fourier
   slice theorem (``physics/slices.ProjectionBank``: one structure factor per grid point).
   The band: fine enough that the images say something about the modes (at 32 A, under
   noise whose power is highest at low frequency, a particle's chi-square varied by 3.5
   over the grid, against 11 at 16 A; held-out DIMS particles, docs/benchmarks.md), coarse
   enough that the grid's step (about 1 A RMSD) resolves the likelihood;
3. the distribution of the particles over the grid, without a parametric form: the
   nonparametric maximum-likelihood estimate (``axis_search.npmle_weights``), which
   deconvolves the noise; weight at the ends of an axis is reported (the population may
   reach beyond the grid, or the images hardly see that mode);
4. each particle's coordinates along these modes set to its posterior mean under that
   distribution (its other modes as they were).
"""
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from ..physics.rotations import correct_rotations
from ..physics.slices import ProjectionBank
from .axis_search import npmle_weights, posterior_means
from .population import Population

if TYPE_CHECKING:
    from ..learn.data import ParticleImages, ParticleMetadata
    from ..learn.network import Decoder
    from ..physics.likelihood import WhitenedLikelihood

__all__ = ["SubspaceSearch", "subspace_search", "MODES", "POINTS"]

MODES = 3
POINTS = 9
HALF_WIDTH = 6.0        # population sds along each mode, each side of its mean
MIN_HALF_RMSD = 3.0     # Angstrom RMSD: the smallest half-width along each mode
END_WEIGHT = 0.05       # weight at the two ends of an axis above which it is reported
RESOLUTION_A = 16.0     # Angstrom: the band of the search (or the run's, when coarser)
OVERSAMPLE = 2          # the bank's frequency grid (finer costs more; see ProjectionBank)
BATCH = 16


@dataclass
class SubspaceSearch:
    """The result: ``modes`` (k,) the modes searched (0-based), ``axes`` (k, P) the grid's
    positions along each (z units), ``weights`` (P^k,) the estimated distribution over the
    grid (C order), ``t`` (N, k) each particle's posterior mean along the modes,
    ``moved`` (N,) how far it moved (z units)."""
    modes: np.ndarray
    axes: np.ndarray
    weights: np.ndarray
    t: np.ndarray
    moved: np.ndarray

    def marginals(self) -> np.ndarray:
        """(k, P) the distribution's marginal along each searched mode."""
        k, P = self.axes.shape
        W = self.weights.reshape((P,) * k)
        return np.array([W.sum(axis=tuple(j for j in range(k) if j != m))
                         for m in range(k)])

    @property
    def ends(self) -> np.ndarray:
        """(k,) the weight at the two ends of each mode's axis."""
        marg = self.marginals()
        return marg[:, 0] + marg[:, -1]

    def describe(self, n_atoms: int) -> str:
        """One line: the population's spread along the searched modes and the moves."""
        s = math.sqrt(n_atoms)
        sd = []
        for marg, a in zip(self.marginals(), self.axes):
            mu = marg @ a
            sd.append(math.sqrt(max(marg @ (a - mu) ** 2, 0.0)) / s)
        text = ("subspace search over modes %s: spread of the population along them %s A "
                "RMSD (grid half-widths %s); moves median %.2f A RMSD (95th percentile %.2f)"
                % ("/".join(str(int(m) + 1) for m in self.modes),
                   "/".join("%.2f" % v for v in sd),
                   "/".join("%.1f" % ((a[-1] - a[0]) / 2 / s) for a in self.axes),
                   np.median(self.moved) / s, np.percentile(self.moved, 95) / s))
        wide = [str(int(m) + 1) for m, e in zip(self.modes, self.ends) if e > END_WEIGHT]
        if wide:
            text += ("; weight at the ends of the grid along mode(s) %s (%s): the population "
                     "may reach beyond it, or the images hardly see these modes at this band"
                     % (", ".join(wide), "/".join("%.2f" % e for e in self.ends)))
        return text


def _grid(axes: np.ndarray) -> np.ndarray:
    """(P^k, k) the product grid of ``axes`` (k, P), C order."""
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], 1)


def _chi2(decoder, likelihood, dataset, meta, p, ctf_of, device, rotvec, fit_turn, bank,
          progress):
    """(N, G) whitened chi-square of every particle against every bank conformation."""
    d = decoder.n_modes
    band = likelihood.band
    dev = bank.table.device
    iy, ix = torch.nonzero(torch.as_tensor(band.weights > 0, device=dev), as_tuple=True)
    ky = torch.fft.fftfreq(band.box, d=1.0 / band.box, dtype=torch.float64, device=dev)[iy]
    kx = ix.double()
    N = p.shape[0]
    out = np.zeros((N, bank.G))
    with torch.no_grad():
        for s in range(0, N, BATCH):
            r = np.arange(s, min(N, s + BATCH))
            _, images = dataset[r]
            rt = torch.as_tensor(r, device=device)
            rot, base, ctf_params = meta.batch(rt)
            q = torch.as_tensor(p[r], dtype=torch.float32, device=device)
            A = decoder.rotations(rot, None if rotvec is None
                                  else torch.as_tensor(rotvec[r], device=device))
            if fit_turn:
                A = correct_rotations(A, q[:, d + 2:])
            shifts = (base + q[:, d:d + 2]).double() + decoder.offset.double()
            S = bank.project(A, shifts, kx, ky)                               # (B, G, K)
            S = S * ctf_of(ctf_params)[:, iy, ix].to(torch.complex64)[:, None, :]
            Y = band.images_ft(images.to(device).float())[:, iy, ix]
            w = likelihood.weights(meta.optics_group[rt])[:, iy, ix]
            yr = torch.einsum("bk,bgk->bg", w, (Y[:, None, :] * S.conj()).real).double()
            rr = torch.einsum("bk,bgk->bg", w, S.real ** 2 + S.imag ** 2).double()
            yy = (w * (Y.real ** 2 + Y.imag ** 2)).sum(1).double()
            out[r] = (yy[:, None] - yr ** 2 / rr.clamp_min(1e-300)).cpu().numpy()
            if progress is not None:
                progress(len(r))
    return out


def subspace_search(decoder: "Decoder", likelihood: "WhitenedLikelihood",
                    dataset: "ParticleImages", meta: "ParticleMetadata", p: np.ndarray,
                    pop: Population, ctf_of: Callable, device: torch.device,
                    rotvec: Optional[np.ndarray] = None, fit_turn: bool = False,
                    n_modes: int = MODES, points: int = POINTS,
                    progress: Optional[Callable[[int], None]] = None,
                    log: Callable[[str], None] = print) -> SubspaceSearch:
    """The search of the module docstring for the particles' parameters ``p`` (N, P) =
    (z, shift[, w]) under ``likelihood`` (its band, which must be coarse enough for the
    bank: the first resolution stage), other arguments as in ``deconvolve.deconvolve``.
    ``p`` is not changed: the caller sets ``p[:, modes] = t``."""
    if likelihood.band.mask is not None:
        raise ValueError("the subspace search needs an unmasked likelihood")
    d = decoder.n_modes
    k = min(int(n_modes), d)
    modes = np.arange(k)
    n_atoms = decoder.coords.shape[0]
    mean = pop.mean
    sd = np.sqrt(np.maximum(np.diag(pop.cov)[:k], 0.0))
    half = np.maximum(HALF_WIDTH * sd, MIN_HALF_RMSD * math.sqrt(n_atoms))
    res = likelihood.band.resolution_high or 2.0 * likelihood.band.apix
    if res < RESOLUTION_A:
        likelihood = likelihood.limited(RESOLUTION_A)
        res = RESOLUTION_A
    X0 = decoder.coords.detach().to(device).double()      # the bank on the fit's device
    U = decoder.modes.detach().to(device).double()
    axes = mean[:k, None] + np.linspace(-1.0, 1.0, points)[None, :] * half[:, None]
    grid = _grid(axes)
    Z = np.tile(mean, (len(grid), 1))
    Z[:, :k] = grid
    X = X0 + torch.einsum("gd,dmk->gmk", torch.as_tensor(Z, device=device), U)
    bank = ProjectionBank(decoder.elements, X, decoder.box, decoder.apix, decoder.centre, res,
                          oversample=OVERSAMPLE)
    chi2 = _chi2(decoder, likelihood, dataset, meta, p, ctf_of, device, rotvec, fit_turn, bank,
                 progress)
    pi = npmle_weights(chi2)
    t = posterior_means(chi2, pi, grid)
    moved = np.linalg.norm(t - p[:, :k], axis=1)
    return SubspaceSearch(modes, axes, pi, t, moved)
