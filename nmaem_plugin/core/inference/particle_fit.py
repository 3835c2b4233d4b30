"""Per-particle fit after the encoder (``nmaem infer --fit-iterations``, on by default).

The encoder is amortised: one network maps every image to its (z, shift), and after a
finite training it does not reach the best fit of each image (docs/benchmarks.md, "How
much of the images' information the encoder uses": its spread within a state was 3 times
the one-image Cramer-Rao bound). Starting from the encoder's output, each particle's
amplitudes z (d) and shift t (2), p = (z, t), are then fitted to its own image in the
training likelihood, with a Gaussian prior on p:

    E(p) = chi2(p) + (p - mu)^T C^-1 (p - mu)

``chi2`` is the whitened chi-square at the image's best grey scale
(``likelihood.whitened_fit``; -2 log L of the coloured-noise Gaussian model up to a
constant), with the run's noise spectrum, band and mask and the file's rotation (times
the run's pose correction, kept as the encoder gave it). ``mu`` and ``C`` are the mean
and covariance of the encoder's (z, t) over the particles inferred (an empirical-Bayes
prior: the population the images come from, broadened by the encoder's own error, so it
shrinks less than the true population would), with a shrinkage of C toward its diagonal
by (d + 2) / N for small sets, and each sd kept at least 0.01 A (RMSD along a mode, or
shift; ``prior_floor``). Without the shift's prior the fit trades shift for
conformation on noisy images (measured on the tests' 0 dB, 3.75 A/px particles: the shift
error grew from 0.02 to 0.65 A rms).

Envelope: the renderer's atoms are sharp, but real images lose contrast with resolution
beyond the CTF (radiation damage, motion, thermal disorder) and so does any average over
what the model cannot follow (states off the modes' span, pose and defocus errors). A
rendering without that fall-off asks z to explain high-frequency signal that is not there.
``envelope_bfactor`` estimates, by maximum likelihood over a calibration set at the
encoder's z, one B-factor B of an envelope exp(-B s^2 / 4) for the data set; the fit then
renders with it (the CTF's B-factor, ``physics.ctf.ctf_2d``).

The minimisation is Levenberg-Marquardt on the linearised rendering: the Jacobian J of the
rendered transform with respect to (z, t) (``Decoder.render_ft_jacobian``: exact on the
renderer's matrix-product route, ``Renderer.render_ft_jvp``; forward differences on the
NUFFT route), the step solving
(a^2 J^T W J + C^-1 + lambda diag) dp = a J^T W r - C^-1 (p - mu), r = Y - a S, and a
step kept only where E falls (else lambda grows and the particle keeps its point): E never
ends above the encoder's. Each step is also bounded (``MAX_STEP_RMSD`` Angstrom RMSD in z,
``MAX_STEP_SHIFT`` Angstrom in t). One iteration costs about a rendering and 2d weighted
structure-factor products per particle (d + 3 renderings on the NUFFT route).
"""
import math
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np
import torch

from ..physics.likelihood import whitened_fit

if TYPE_CHECKING:
    from ..physics.likelihood import WhitenedLikelihood
    from ..learn.network import Decoder

__all__ = ["population_prior", "prior_floor", "fit_batch", "linearise_batch",
           "envelope_bfactor", "FitStats",
           "MAX_STEP_RMSD", "MAX_STEP_SHIFT"]

MAX_STEP_RMSD = 0.5        # Angstrom RMSD of the largest change of z in one step
MAX_STEP_SHIFT = 1.0       # Angstrom, the largest change of the shift in one step
MAX_STEP_TURN_DEG = 2.0    # degrees, the largest change of the rotation in one step
# the prior's smallest sd: Angstrom RMSD along a mode, Angstrom of shift
MIN_PRIOR_SD_RMSD, MIN_PRIOR_SD_SHIFT = 0.01, 0.01
LAMBDA_UP, LAMBDA_DOWN, LAMBDA_FIRST = 4.0, 3.0, 1e-2
# envelope_bfactor: the search interval's end and tolerance (A^2)
BFACTOR_MAX, BFACTOR_TOL = 1000.0, 2.0


def population_prior(p: np.ndarray, min_sd: Optional[np.ndarray] = None
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """(mu (P,), precision (P, P)) float64 of the Gaussian prior from the encoder's
    parameters p (N, P), (z, shift) per particle: mean and covariance, the covariance shrunk
    toward its diagonal by min(1, P / N), each variance raised by 1e-6 of itself (and
    1e-12) and, with ``min_sd`` (P,), to at least ``min_sd**2`` (an encoder whose shift
    output is constant must not pin the fit with a precision of 1e12). N >= 2."""
    p = np.asarray(p, dtype=np.float64)
    n, k = p.shape
    if n < 2:
        raise ValueError("a population prior needs at least 2 particles")
    mu = p.mean(0)
    if k == 0:
        return mu, np.zeros((0, 0))
    c = np.atleast_2d(np.cov(p.T))
    alpha = min(1.0, k / float(n))
    c = (1.0 - alpha) * c + alpha * np.diag(np.diag(c))
    v = np.diag(c) * (1.0 + 1e-6) + 1e-12
    if min_sd is not None:
        v = np.maximum(v, np.asarray(min_sd, dtype=np.float64).reshape(k) ** 2)
    c[np.diag_indices(k)] = v
    return mu, np.linalg.inv(c)


def prior_floor(n_modes: int, n_atoms: int) -> np.ndarray:
    """The prior's smallest sd per parameter (d + 2,): ``MIN_PRIOR_SD_RMSD`` Angstrom RMSD
    along each mode (times sqrt(M) in z) and ``MIN_PRIOR_SD_SHIFT`` Angstrom of shift."""
    return np.array([MIN_PRIOR_SD_RMSD * math.sqrt(n_atoms)] * int(n_modes)
                    + [MIN_PRIOR_SD_SHIFT] * 2)


class FitStats:
    """Totals over the batches: particles, those whose E fell, the changes of z (Angstrom
    RMSD) and of the shift (Angstrom) and, where a rotation was fitted, the changes of it
    (radians, (n, 3)) and their posterior variances (the Laplace approximation's)."""

    def __init__(self):
        self.n, self.improved = 0, 0
        self.dz_rmsd, self.dshift, self.dturn, self.turn_var = [], [], [], []

    def add(self, improved: torch.Tensor, dz_rmsd: torch.Tensor, dshift: torch.Tensor,
            dturn: Optional[torch.Tensor] = None, turn_var: Optional[torch.Tensor] = None
            ) -> None:
        self.n += int(improved.numel())
        self.improved += int(improved.sum())
        self.dz_rmsd.append(dz_rmsd.cpu().numpy())
        self.dshift.append(dshift.cpu().numpy())
        if dturn is not None:
            self.dturn.append(dturn.cpu().numpy())
        if turn_var is not None:
            self.turn_var.append(turn_var.cpu().numpy())

    def describe(self) -> str:
        dz = np.concatenate(self.dz_rmsd) if self.dz_rmsd else np.zeros(0)
        ds = np.concatenate(self.dshift) if self.dshift else np.zeros(0)
        if not self.n:
            return "no particles"
        text = ("posterior energy lower for %d of %d particles (%.0f %%); change of z: median "
                "%.2f A RMSD (95th percentile %.2f), of the shift: median %.2f A"
                % (self.improved, self.n, 100.0 * self.improved / self.n, np.median(dz),
                   np.percentile(dz, 95), np.median(ds)))
        if self.dturn:
            turn = np.degrees(np.linalg.norm(np.concatenate(self.dturn), axis=1))
            text += ", of the rotation: median %.2f deg" % np.median(turn)
        if self.turn_var:
            # rms angle of the Laplace posterior; a 3-D Gaussian's median angle is 0.89 of it
            sd = np.degrees(np.sqrt(np.concatenate(self.turn_var).sum(1)))
            text += "; posterior rms angle: median %.2f deg" % np.median(sd)
        return text


def envelope_bfactor(decoder: "Decoder", likelihood: "WhitenedLikelihood",
                     images: torch.Tensor, groups: Optional[torch.Tensor], z: torch.Tensor,
                     shift: torch.Tensor, rotations: torch.Tensor, base_shift: torch.Tensor,
                     ctf: Optional[torch.Tensor], rotvec: Optional[torch.Tensor] = None,
                     b_max: float = BFACTOR_MAX) -> Tuple[float, float, float]:
    """(B, chi2 at B, chi2 at 0): the maximum-likelihood B-factor (A^2, in [0, ``b_max``])
    of an envelope exp(-B s^2 / 4) that the images carry beyond the renderings (the
    module docstring's "envelope"), at the given z and shift: the total whitened
    chi-square of the images against the renderings times the envelope, each at its best
    grey scale, minimised by golden-section search to ``BFACTOR_TOL``. Arguments as in
    :func:`fit_batch`, for all the particles at once (rendered once; the renderer chunks
    by its memory budget)."""
    from ..physics.ctf import bfactor_envelope
    band = likelihood.band
    with torch.no_grad():
        Y = band.images_ft(images.float())
        S = decoder.render_ft(z, rotations, base_shift + shift, ctf, rotvec=rotvec)
        w = likelihood.weights(groups)
        grid = decoder.renderer().grid
        s2 = (grid.fx ** 2 + grid.fy ** 2).to(S.real.dtype)

        def total(b):
            env = bfactor_envelope(s2, float(b))
            return float(whitened_fit(Y, band.rendered_ft(S * env), w)["chi2"].double().sum())

        golden = (math.sqrt(5.0) - 1.0) / 2.0
        lo, hi = 0.0, float(b_max)
        x1, x2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        f1, f2 = total(x1), total(x2)
        while hi - lo > BFACTOR_TOL:
            if f1 <= f2:
                hi, x2, f2 = x2, x1, f1
                x1 = hi - golden * (hi - lo)
                f1 = total(x1)
            else:
                lo, x1, f1 = x1, x2, f2
                x2 = lo + golden * (hi - lo)
                f2 = total(x2)
        b, fb = (x1, f1) if f1 <= f2 else (x2, f2)
        f0 = total(0.0)
        if f0 <= fb:
            b, fb = 0.0, f0
    return float(b), fb, f0


def _rotated(base_rot, q, d, fit_turn):
    """The rotations rendered for parameters ``q``: the base ones, turned by q's rotation
    vector (its last 3 entries) when the rotation is fitted."""
    if not fit_turn:
        return base_rot
    from ..physics.rotations import correct_rotations
    return correct_rotations(base_rot, q[:, d + 2:])


def _render_jacobian(decoder, band, q, d, base_rot, base_shift, ctf, fit_turn):
    """(S (B, D, K), J (P, B, D, K)): the renderings at parameters ``q`` (B, P) =
    (z, shift[, w]) and their derivatives, as the likelihood's band sees them (mask)."""
    S, J = decoder.render_ft_jacobian(q[:, :d], _rotated(base_rot, q, d, fit_turn),
                                      base_shift + q[:, d:d + 2], ctf, rotation=fit_turn)
    if band.mask is not None:
        P, B = J.shape[:2]
        S = band.rendered_ft(S)
        J = band.rendered_ft(J.reshape(P * B, *J.shape[2:])).reshape(J.shape)
    return S, J


def linearise_batch(decoder: "Decoder", likelihood: "WhitenedLikelihood", images: torch.Tensor,
                    groups: Optional[torch.Tensor], q: torch.Tensor, rotations: torch.Tensor,
                    base_shift: torch.Tensor, ctf: Optional[torch.Tensor],
                    rotvec: Optional[torch.Tensor] = None, fit_turn: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gauss-Newton model of each image's likelihood about parameters ``q`` (B, P) =
    (z (d), shift (2)[, w (3) with ``fit_turn``]), the grey scale profiled out:
    (chi2 (B,), g (B, P), H (B, P, P)) float64 such that
    chi2(q + dq) ~ chi2 - 2 g.dq + dq^T H dq, i.e. log L(q + dq) = const + g.dq -
    dq^T H dq / 2. With r = Y - a S at the image's best scale a,
    g = a J^T W r and H = a^2 (J^T W J - (J^T W S)(S^T W J) / S^T W S): a change of the
    rendering along S itself is a change of scale, which the per-particle scale absorbs.
    Other arguments as in :func:`fit_batch`."""
    B = q.shape[0]
    d = decoder.n_modes
    with torch.no_grad():
        Y = likelihood.band.images_ft(images.float())
        w = likelihood.weights(groups)
        if w.dim() == 2:
            w = w.expand(B, *w.shape)
        base_rot = decoder.rotations(rotations, rotvec)
        S, J = _render_jacobian(decoder, likelihood.band, q.float(), d, base_rot, base_shift,
                                ctf, fit_turn)
        fit = whitened_fit(Y, S, w)
        a = fit["scale"].double()
        r = Y - fit["scale"][:, None, None] * S
        wd = w.double()
        Jr, Ji = J.real.double(), J.imag.double()
        g = (torch.einsum("bdk,ibdk,bdk->bi", wd, Jr, r.real.double())
             + torch.einsum("bdk,ibdk,bdk->bi", wd, Ji, r.imag.double())) * a[:, None]
        JWJ = (torch.einsum("bdk,ibdk,jbdk->bij", wd, Jr, Jr)
               + torch.einsum("bdk,ibdk,jbdk->bij", wd, Ji, Ji))
        JWS = (torch.einsum("bdk,ibdk,bdk->bi", wd, Jr, S.real.double())
               + torch.einsum("bdk,ibdk,bdk->bi", wd, Ji, S.imag.double()))
        SWS = fit["model"].double().clamp_min(torch.finfo(torch.float64).tiny)
        H = (JWJ - JWS[:, :, None] * JWS[:, None, :] / SWS[:, None, None]) * (a * a)[:, None, None]
        H = 0.5 * (H + H.transpose(1, 2))
    return fit["chi2"].double(), g, H


def _energy(Y, S, w, p, mu, prec):
    fit = whitened_fit(Y, S, w)
    e = fit["chi2"]
    if prec is not None:
        dp = p - mu
        e = e + ((dp @ prec) * dp).sum(1)
    return e, fit["scale"]


def fit_batch(decoder: "Decoder", likelihood: "WhitenedLikelihood", images: torch.Tensor,
              groups: Optional[torch.Tensor],
              z0: torch.Tensor, shift0: torch.Tensor, rotations: torch.Tensor,
              base_shift: torch.Tensor, ctf: Optional[torch.Tensor],
              mu: torch.Tensor, prec: Optional[torch.Tensor], iterations: int,
              rotvec: Optional[torch.Tensor] = None, stats: Optional[FitStats] = None,
              turn0: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Fitted (z (B, d), shift (B, 2), turn (B, 3) or None) of one batch (module
    docstring): ``images`` (B, D, D) as given to the likelihood, ``z0``/``shift0`` the
    encoder's, ``base_shift`` (B, 2) = -origin (the decoder adds its offset), ``rotvec`` the
    run's pose corrections (kept as given). ``turn0`` (B, 3) radians: also fit a rotation
    w of the model applied last (rendered rotation A R(v) R(w), ``pose_fit``), starting
    there. ``mu`` (P,) and ``prec`` (P, P) the prior on p = (z, shift[, w]) (``prec``
    None: no prior)."""
    B, d = z0.shape
    fit_turn = turn0 is not None
    P = d + 2 + (3 if fit_turn else 0)
    p = torch.cat([z0.detach().float(), shift0.detach().float()]
                  + ([turn0.detach().float()] if fit_turn else []), 1)
    p_start = p.clone()

    def split(q):
        return q[:, :d], q[:, d:d + 2], (q[:, d + 2:] if fit_turn else None)

    if iterations <= 0 or B == 0:
        return split(p)
    n_atoms = decoder.coords.shape[0]
    max_dz = MAX_STEP_RMSD * math.sqrt(n_atoms)
    with torch.no_grad():
        Y = likelihood.band.images_ft(images.float())
        w = likelihood.weights(groups)
        if w.dim() == 2:
            w = w.expand(B, *w.shape)
        band = likelihood.band
        base_rot = decoder.rotations(rotations, rotvec)

        def rotated(q):
            return _rotated(base_rot, q, d, fit_turn)

        def jac(q):
            return _render_jacobian(decoder, band, q, d, base_rot, base_shift, ctf, fit_turn)

        def clip(x, bound):
            return x * torch.clamp(bound / x.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)

        def hessian(J, a):
            Jr, Ji = J.real, J.imag
            H = (torch.einsum("bdk,ibdk,jbdk->bij", w, Jr, Jr)
                 + torch.einsum("bdk,ibdk,jbdk->bij", w, Ji, Ji)) * (a * a)[:, None, None]
            return H if prec is None else H + prec

        S, J = jac(p)
        E, a = _energy(Y, S, w, p, mu, prec)
        E_start = E.clone()
        lam = torch.zeros(B, device=p.device)
        eye = torch.eye(P, device=p.device)
        for it in range(int(iterations)):
            r = Y - a[:, None, None] * S
            H = hessian(J, a)
            g = (torch.einsum("bdk,ibdk,bdk->bi", w, J.real, r.real)
                 + torch.einsum("bdk,ibdk,bdk->bi", w, J.imag, r.imag)) * a[:, None]
            if prec is not None:
                g = g - (p - mu) @ prec
            diag = torch.diagonal(H, dim1=1, dim2=2)
            Hd = H + ((lam[:, None] * diag).unsqueeze(-1)
                      + 1e-9 * diag.mean(1)[:, None, None]) * eye
            # float64: the prior's precisions span many decades (z in A amplitude, shifts)
            step = torch.linalg.solve(Hd.double(), g.double()[..., None])[..., 0].to(p.dtype)
            parts = [clip(step[:, :d], max_dz), clip(step[:, d:d + 2], MAX_STEP_SHIFT)]
            if fit_turn:
                parts.append(clip(step[:, d + 2:], math.radians(MAX_STEP_TURN_DEG)))
            pn = p + torch.cat(parts, 1)
            last = it == int(iterations) - 1
            if last:
                Sn = decoder.render_ft(pn[:, :d], rotated(pn), base_shift + pn[:, d:d + 2],
                                       ctf)
                Sn = band.rendered_ft(Sn)
                Jn = None
            else:
                Sn, Jn = jac(pn)
            En, an = _energy(Y, Sn, w, pn, mu, prec)
            ok = torch.isfinite(En) & (En < E)
            p = torch.where(ok[:, None], pn, p)
            E = torch.where(ok, En, E)
            if not last:
                S = torch.where(ok[:, None, None], Sn, S)
                J = torch.where(ok[None, :, None, None], Jn, J)
                a = torch.where(ok, an, a)
            lam = torch.where(ok, lam / LAMBDA_DOWN,
                              torch.where(lam > 0, lam * LAMBDA_UP,
                                          torch.full_like(lam, LAMBDA_FIRST)))
        if stats is not None:
            dp = p - p_start
            var = None
            if fit_turn:     # the Laplace approximation's variances of w (last Jacobian)
                H = hessian(J, a).double()
                H = H + 1e-9 * torch.diagonal(H, dim1=1, dim2=2).mean(1)[:, None, None] * eye
                var = torch.diagonal(torch.linalg.inv(H), dim1=1, dim2=2)[:, d + 2:].float()
            stats.add(E < E_start, dp[:, :d].norm(dim=1) / math.sqrt(n_atoms),
                      dp[:, d:d + 2].norm(dim=1),
                      None if not fit_turn else dp[:, d + 2:], var)
    return split(p)
