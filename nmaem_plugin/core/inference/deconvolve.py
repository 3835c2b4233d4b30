"""The per-particle fit under a population estimated from the particles (``nmaem infer``,
``--population em``).

The encoder's outputs are the starting point only. Each iteration:

1. **Linearise** every particle's likelihood about its current parameters p_i = (z_i,
   shift_i[, w_i]): one rendering and its Jacobian (``particle_fit.linearise_batch``; the
   grey scale profiled out), giving chi2_i and the information form (h_i, H_i).
2. **Accept or refuse** the step that led there, per particle (after the first
   iteration): the step is kept where the posterior energy under the particle's dominant
   component, chi2(p) + (p - m_k)^T Lambda_k (p - m_k), fell; otherwise the particle keeps
   its previous point and linearisation and its damping grows (Levenberg-Marquardt).
3. **Estimate the population** by deconvolution (``population.em``; the number of
   components by BIC, ``population.select``, at the first iteration and at the last
   refinement), warm-started from the previous estimate.
4. **Step** each particle toward its posterior mode under its dominant component:
   (H + Lambda_k + lambda diag) dp = g - Lambda_k (p - m_k), bounded like the fit's steps.

It stops when the steps and the population have settled, or after ``iterations``. The
result: each particle's posterior under the final population (a mixture over the
components, from the last linearisation), summarised by its mean (the latent's ``z`` and
``shift``) and covariance (``z_cov``), and the population itself.

The shift's prior is one Gaussian, the encoder's shifts' mean and covariance, kept fixed
(``LEARN_SHIFT``); a fitted rotation (``--fit-pose``)
keeps the fixed zero-mean prior that ``infer`` calibrates.
"""
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple, Union

import numpy as np
import torch

from . import em as emmod
from . import population as popmod
from .axis_search import AxisSearch, axis_search
from .particle_fit import MAX_STEP_SHIFT, MAX_STEP_TURN_DEG, linearise_batch
from .subspace_search import SubspaceSearch, subspace_search

if TYPE_CHECKING:
    from ..learn.data import ParticleImages, ParticleMetadata
    from ..learn.network import Decoder
    from ..physics.likelihood import Band, WhitenedLikelihood

__all__ = ["Deconvolved", "deconvolve", "resolution_stages", "LAMBDA_FIRST"]

LAMBDA_UP, LAMBDA_DOWN, LAMBDA_FIRST = 4.0, 3.0, 1e-3
LEARN_SHIFT = False    # the shift keeps the encoder's Gaussian as its prior: estimated too, it
                       # traded against z (0.47 A rms shift error instead of 0.024 on the tests'
                       # particles, tests/core/test_particle_fit.py)
BATCH = 32             # particles per rendering batch (the Jacobian holds P transforms each)
EM_MAPS_BETWEEN = 100  # EM maps per iteration between the choices of K (warm starts go on)
COARSEST_A = 32.0      # Angstrom: the band of the first resolution stage
STAGE_ITERATIONS = 2   # iterations per coarse stage
AXIS_SEARCH_STAGES = (0,)  # stages that begin with the axis search (and the last one does)
SUBSPACE_SEARCH = True     # the first stage begins with the subspace search instead
                           # (``subspace_search.py``; not with a masked likelihood)
STEP_RMSD = 1.0        # Angstrom RMSD, the largest change of z in one step (the energy check
                       # refuses a step the linearisation mispredicts)


@dataclass
class Deconvolved:
    """The result: ``mean`` (N, P) and ``cov`` (N, P, P) of each particle's posterior
    (P = d + 2 [+ 3]); ``population`` (``population.Population``); ``lin`` the last
    linearisation; ``chi2`` (N,); ``iterations``; ``history`` (one line per iteration);
    ``unconstrained`` the modes the images hardly see; ``em_converged``; ``searches`` the
    axis searches (``axis_search.py``)."""
    mean: np.ndarray
    cov: np.ndarray
    resp: np.ndarray
    population: popmod.Population
    lin: popmod.Linearised
    chi2: np.ndarray
    iterations: int
    history: list
    unconstrained: np.ndarray
    em_converged: bool
    searches: List[Union[AxisSearch, SubspaceSearch]]

    def describe(self, start: np.ndarray, n_atoms: int) -> str:
        """One line: the change from ``start`` (N, d + 2), the encoder's, to the posterior
        means, and the posterior spread (z in Angstrom RMSD over the ``n_atoms`` atoms)."""
        d = self.population.d
        dz = np.linalg.norm(self.mean[:, :d] - start[:, :d], axis=1) / math.sqrt(n_atoms)
        ds = np.linalg.norm(self.mean[:, d:d + 2] - start[:, d:d + 2], axis=1)
        sd = np.sqrt(np.trace(self.cov[:, :d, :d], axis1=1, axis2=2) / n_atoms)
        text = ("change of z from the encoder's: median %.2f A RMSD (95th percentile %.2f), "
                "of the shift: median %.2f A; posterior sd of z: median %.2f A RMSD"
                % (np.median(dz), np.percentile(dz, 95), np.median(ds), np.median(sd)))
        if self.mean.shape[1] > d + 2:
            turn = np.degrees(np.linalg.norm(self.mean[:, d + 2:], axis=1))
            rms = np.degrees(np.sqrt(np.trace(self.cov[:, d + 2:, d + 2:], axis1=1, axis2=2)))
            text += (", of the rotation: median %.2f deg; posterior rms angle: median %.2f deg"
                     % (np.median(turn), np.median(rms)))
        return text


def _dominant_energy(p, chi2, m, lam, comp):
    """chi2 plus the prior energy under each particle's component ``comp``."""
    dp = p - m[comp]
    return chi2 + np.einsum("ni,nij,nj->n", dp, lam[comp], dp)


def resolution_stages(band: "Band", iterations: int) -> List[Tuple[Optional[float], int]]:
    """The resolution schedule: (band limit in Angstrom or None for the run's band,
    iterations) per stage. The likelihood of z far from the start has local maxima where a
    domain is off by more than the resolution; cutting the band smooths them. The limit
    starts at ``COARSEST_A`` and halves each stage while it stays coarser than the run's
    band, ``STAGE_ITERATIONS`` iterations each, the rest (at least 2) at the run's band;
    fewer than that many iterations in all: the run's band only."""
    finest = band.resolution_high or 2.0 * band.apix
    limits = []
    r = COARSEST_A
    while r > 1.5 * finest:
        limits.append(r)
        r /= 2.0
    n = int(iterations)
    if n < STAGE_ITERATIONS * len(limits) + 2:
        return [(None, n)]
    return [(r, STAGE_ITERATIONS) for r in limits] + [(None, n - STAGE_ITERATIONS * len(limits))]


def _clip(x, bound):
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, bound / np.maximum(n, 1e-12))


def deconvolve(decoder: "Decoder", likelihood: "WhitenedLikelihood", dataset: "ParticleImages",
               meta: "ParticleMetadata", start: np.ndarray, ctf_of: Callable,
               floor: np.ndarray, device: torch.device, iterations: int,
               rotvec: Optional[np.ndarray] = None, turn_sd: Optional[np.ndarray] = None,
               num_workers: int = 0, max_components: int = popmod.DEFAULTS["max_components"],
               log: Callable[[str], None] = print, seed: int = 0,
               bfactor_at: Optional[Callable[[np.ndarray, np.ndarray], Callable]] = None
               ) -> Deconvolved:
    """Run the iterations of the module docstring over every particle of ``dataset``.

    ``start`` (N, d + 2) float: the encoder's (z, shift); ``ctf_of(CTFParams)`` the CTF
    the fit renders with (the envelope included); ``floor`` (d + 2,) the population's
    smallest sd per parameter (``particle_fit.prior_floor``); ``rotvec`` (N, 3) the run's
    pose corrections (kept); ``turn_sd`` (3,) radians: also fit each particle's rotation
    under a zero-mean prior of these sds (``--fit-pose``); ``max_components``: 1 for a
    single Gaussian population, else the most BIC may choose. ``iterations``: in all,
    over the resolution stages (:func:`resolution_stages`). ``bfactor_at(z, shift)``: the
    CTF function with the envelope estimated again at these parameters, called when the
    last stage begins (None: the envelope stays)."""
    from ..base.progress import Progress
    from ..learn.data import make_loader
    N = start.shape[0]
    d = decoder.n_modes
    fit_turn = turn_sd is not None
    E = 2 + (3 if fit_turn else 0)
    P = d + E
    n_atoms = decoder.coords.shape[0]
    max_dz = STEP_RMSD * math.sqrt(n_atoms)
    p = np.zeros((N, P))
    p[:, :d + 2] = start
    zfloor = np.asarray(floor[:d], dtype=np.float64)
    efloor = np.concatenate([np.asarray(floor[d:d + 2], dtype=np.float64)]
                            + ([np.asarray(turn_sd, dtype=np.float64) * 1e-3]
                               if fit_turn else []))
    learn = np.array([LEARN_SHIFT, LEARN_SHIFT] + [False] * (3 if fit_turn else 0))

    def initial(z):
        pop = popmod.initial_population(
            z, np.concatenate([start[:, d:], np.zeros((N, E - 2))], 1), zfloor, efloor,
            learn_extra=learn)
        if fit_turn:
            em_ = pop.extra_mean.copy()
            ec = pop.extra_cov.copy()
            em_[2:] = 0.0
            ec[2:, :] = 0.0
            ec[:, 2:] = 0.0
            ec[2:, 2:] = np.diag(np.asarray(turn_sd, dtype=np.float64) ** 2)
            pop = popmod.Population(pop.weights, pop.means, pop.covs, em_, ec, learn)
        return pop

    pop = initial(start[:, :d])
    batches = [np.arange(s, min(N, s + BATCH)) for s in range(0, N, BATCH)]

    def linearise(lik, q, label):
        chi2 = np.zeros(N)
        g = np.zeros((N, P))
        H = np.zeros((N, P, P))
        progress = Progress(N, label, unit="images")
        for rows, images in make_loader(dataset, batches, num_workers, device.type == "cuda"):
            r = rows.numpy()
            rt = rows.to(device)
            rot, base, ctf_params = meta.batch(rt)
            c, gg, hh = linearise_batch(
                decoder, lik, images.to(device), meta.optics_group[rt],
                torch.as_tensor(q[r], dtype=torch.float32, device=device), rot, base,
                ctf_of(ctf_params),
                rotvec=None if rotvec is None else torch.as_tensor(rotvec[r], device=device),
                fit_turn=fit_turn)
            chi2[r], g[r], H[r] = c.cpu().numpy(), gg.cpu().numpy(), hh.cpu().numpy()
            progress.update(len(r))
        return chi2, g, H

    history = []
    searches = []
    stages = resolution_stages(likelihood.band, iterations)
    total = sum(n for _, n in stages)
    lam = np.zeros(N)
    result = None
    done = 0
    for si, (res, n_it) in enumerate(stages):
        final_stage = si == len(stages) - 1
        if final_stage and bfactor_at is not None and si > 0:
            # the envelope again, now that z is near where the images put it
            ctf_of = bfactor_at(p[:, :d], p[:, d:d + 2])
        lik = likelihood.limited(res)
        band = "to %.0f A" % res if res else "the run's band"
        if si == 0 and SUBSPACE_SEARCH and likelihood.band.mask is None and d > 0:
            progress = Progress(N, "subspace search", unit="images")
            found = subspace_search(decoder, likelihood, dataset, meta, p, pop, ctf_of, device,
                                    rotvec=rotvec, fit_turn=fit_turn, progress=progress.update,
                                    log=log)
            p[:, found.modes] = found.t
            pop = initial(p[:, :d])
            searches.append(found)
            history.append(found.describe(n_atoms))
            log("infer: " + history[-1])
        elif si in AXIS_SEARCH_STAGES or final_stage:
            progress = Progress(N, "axis search (%s)" % band, unit="images")
            found = axis_search(decoder, lik, dataset, meta, p, pop, ctf_of, device,
                                rotvec=rotvec, fit_turn=fit_turn, progress=progress.update)
            p[:, :d] += np.outer(found.t - p[:, :d] @ found.axis, found.axis)
            searches.append(found)
            history.append(found.describe(n_atoms))
            log("infer: " + history[-1])
        chi2, g, H = linearise(lik, p, "fit %d/%d (%s)" % (done + 1, total, band))
        lin = popmod.Linearised(g + np.einsum("nij,nj->ni", H, p), H, d, p.copy())
        lam[:] = 0.0
        for it in range(1, n_it + 1):
            done += 1
            last = final_stage and it == n_it
            t0 = time.time()
            if done == 1 or (final_stage and it == 1) or last:
                result, per_k = emmod.select(lin, pop, zfloor, efloor,
                                             max_components=max_components, seed=seed)
                how = "K = %d%s by BIC (%s)" % (
                    result.population.k, " tied" if result.population.tied else "",
                    ", ".join("K=%s: %.0f" % (k, r.bic) for k, r in per_k))
            else:
                result = emmod.em(lin, pop, zfloor, extra_floor=efloor,
                                  max_iter=EM_MAPS_BETWEEN)
                how = "K = %d" % result.population.k
            pop = result.population
            line = ("population %d/%d (%s): %s; EM %s after %d maps; spread of z %.2f A RMSD "
                    "(%.1f s)" % (done, total, band, how,
                                  "converged" if result.converged else "not converged",
                                  result.iterations, math.sqrt(np.trace(pop.cov) / n_atoms),
                                  time.time() - t0))
            if last:
                history.append(line)
                log("infer: " + line)
                break
            # the step toward each particle's posterior mode under its dominant component
            _, _, resp = popmod.posterior_moments(lin, pop)
            comp = np.argmax(resp, 1)
            m, lamk, _ = popmod.joint_prior(pop)
            A = H + lamk[comp]
            diag = np.diagonal(A, axis1=1, axis2=2)
            A = A + (lam[:, None] * diag)[:, :, None] * np.eye(P)
            rhs = g - np.einsum("nij,nj->ni", lamk[comp], p - m[comp])
            step = np.linalg.solve(A, rhs[..., None])[..., 0]
            step[:, :d] = _clip(step[:, :d], max_dz)
            step[:, d:d + 2] = _clip(step[:, d:d + 2], MAX_STEP_SHIFT)
            if fit_turn:
                step[:, d + 2:] = _clip(step[:, d + 2:], math.radians(MAX_STEP_TURN_DEG))
            q = p + step
            e_old = _dominant_energy(p, chi2, m, lamk, comp)
            chi2_q, g_q, H_q = linearise(lik, q, "fit %d/%d (%s)" % (done + 1, total, band))
            e_new = _dominant_energy(q, chi2_q, m, lamk, comp)
            ok = np.isfinite(e_new) & (e_new <= e_old)
            p[ok], chi2[ok], g[ok], H[ok] = q[ok], chi2_q[ok], g_q[ok], H_q[ok]
            lam = np.where(ok, lam / LAMBDA_DOWN,
                           np.where(lam > 0, lam * LAMBDA_UP, LAMBDA_FIRST))
            lin = popmod.Linearised(g + np.einsum("nij,nj->ni", H, p), H, d, p.copy())
            moved = np.linalg.norm(step[:, :d], axis=1)[ok] / math.sqrt(n_atoms)
            line += ("; steps kept for %d of %d particles (%.0f %%), median %.3f A RMSD"
                     % (ok.sum(), N, 100.0 * ok.mean(),
                        np.median(moved) if len(moved) else 0.0))
            history.append(line)
            log("infer: " + line)
    mean, cov, resp = popmod.posterior_moments(lin, pop)
    unc = popmod.unconstrained(lin, pop)
    return Deconvolved(mean, cov, resp, pop, lin, chi2, done, history, unc, result.converged,
                       searches)
