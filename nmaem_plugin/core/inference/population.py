"""The population of conformations, estimated by deconvolution (empirical Bayes).

Each particle i carries parameters p_i = (z_i, e_i): the d mode amplitudes z (Angstrom)
and e further per-particle parameters (the 2D shift, Angstrom; with ``--fit-pose`` also a
rotation vector, radians). Its image constrains p_i through the likelihood, which the
per-particle fit linearises about a point (Gauss-Newton, ``particle_fit.linearise``) into
the information form

    log L_i(p) = const - 1/2 p^T H_i p + h_i^T p          (H_i (P, P) PSD, h_i (P,))

H_i may be singular (a mode the image does not see). The population is a Gaussian mixture
over z, times one Gaussian over e (the shift does not depend on the conformation):

    p ~ sum_k pi_k N(z; mu_k, Sigma_k) N(e; mu_e, Sigma_e)

and it is estimated by maximising the marginal likelihood of all the particles,
prod_i integral L_i(p) prior(p) dp, with EM: the posterior of each particle under each
component is Gaussian (Q_ik = H_i + Lambda_k, mean Q_ik^-1 (h_i + Lambda_k m_k)), its
responsibility the component's evidence, and the M-step sets each component's mean and
covariance to the responsibility-weighted mean of the posterior means and the spread of
the posterior means plus the mean posterior covariance (the law of total variance). This is
"extreme deconvolution" (Bovy, Hogg and Roweis 2011, Ann. Appl. Stat. 5:1657) in
information form. Unlike the histogram of per-particle point estimates, which noise
broadens (maximum likelihood) or the prior narrows (posterior means), the estimate is
consistent: the images' noise is deconvolved, whatever the starting values.

Choices and guards:

* The number of components K (``select``): 1 to ``max_components`` by BIC over the
  marginal likelihood, each K from ``n_init`` k-means++ starts on the particles' posterior
  means; a component whose weight falls below ``min_weight`` is dropped.
* Each component's covariance keeps every eigenvalue at least ``floor**2`` (per z
  coordinate), so no component collapses onto a few particles; directions the images
  hardly constrain are reported by :func:`unconstrained` (the mean information per particle
  against the population's precision) and keep their starting spread.
* Everything here is numpy float64 (torch-free), in chunks of particles.

Per-particle posterior: the mixture of the components' Gaussians, summarised by its mean
and covariance (:func:`posterior_moments`); the latent's ``z`` and ``z_cov``.

The landscape on this population (the states issue): principal axes of the population's
covariance (:func:`principal_axes`), the 1D marginal density along an axis (a mixture of
1D Gaussians, :func:`marginal_density`), and the conditional mean of z at a point of an axis
(:func:`conditional_mean`): where a state at a maximum of the marginal lies in all d.

Shrinkage check (:func:`scale_profile`): the marginal log-likelihood of the particles as the
population's spread about its mean is scaled by s; for a population that the images support
it peaks at s = 1, and a peak clearly above 1 says the landscape is shrunk.
"""
import math
from dataclasses import dataclass, field, replace
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..base.choices import POPULATION_MAX_COMPONENTS
from ..io.latent import ShrinkageCheck

__all__ = ["Linearised", "Population", "EMResult", "posterior", "posterior_moments",
           "log_evidence", "em", "select", "initial_population", "principal_axes",
           "marginal_density", "conditional_mean", "scale_profile",
           "unconstrained", "joint_prior", "latent_population", "collapse", "DEFAULTS"]

DEFAULTS = dict(
    max_components=POPULATION_MAX_COMPONENTS,   # K = 1 .. this, chosen by BIC
    n_init=2,             # k-means++ starts per K (besides splitting the K - 1 fit)
    select_particles=3000,  # the number of components is chosen on at most this many
    max_iter=500,         # EM iterations (linearisation fixed)
    tol=1e-5,             # EM stop: gain of the log-likelihood per particle (nats) per cycle
    min_weight=0.01,      # a component below this weight is dropped
    chunk=4096,           # particles per chunk of the E-step
)


@dataclass
class Linearised:
    """The linearised log-likelihood of N particles in information form: ``h`` (N, P),
    ``H`` (N, P, P) symmetric PSD, over p = (z (d), e (P - d)); ``d`` the number of mode
    amplitudes. ``at`` (N, P): the points of linearisation (for reference only)."""
    h: np.ndarray
    H: np.ndarray
    d: int
    at: Optional[np.ndarray] = None

    @property
    def n(self) -> int:
        return self.h.shape[0]

    @property
    def p(self) -> int:
        return self.h.shape[1]

    def subset(self, rows: np.ndarray) -> "Linearised":
        return Linearised(self.h[rows], self.H[rows], self.d,
                          None if self.at is None else self.at[rows])


@dataclass
class Population:
    """A Gaussian mixture over z (``weights`` (K,), ``means`` (K, d), ``covs`` (K, d, d))
    times a Gaussian over the other parameters e (``extra_mean`` (E,), ``extra_cov``
    (E, E)). ``learn_extra`` (E,) bool: which of e's coordinates EM estimates (the others
    keep their mean and variance: a fixed prior, e.g. the rotation's)."""
    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    extra_mean: np.ndarray
    extra_cov: np.ndarray
    learn_extra: np.ndarray = field(default=None)

    def __post_init__(self):
        self.weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        K = len(self.weights)
        self.means = np.asarray(self.means, dtype=np.float64).reshape(K, -1)
        d = self.means.shape[1]
        self.covs = np.asarray(self.covs, dtype=np.float64).reshape(K, d, d)
        self.extra_mean = np.asarray(self.extra_mean, dtype=np.float64).reshape(-1)
        E = len(self.extra_mean)
        self.extra_cov = np.asarray(self.extra_cov, dtype=np.float64).reshape(E, E)
        if self.learn_extra is None:
            self.learn_extra = np.ones(E, dtype=bool)
        self.learn_extra = np.asarray(self.learn_extra, dtype=bool).reshape(E)

    @property
    def k(self) -> int:
        return len(self.weights)

    @property
    def d(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> np.ndarray:
        """The population's mean z (d,)."""
        return self.weights @ self.means

    @property
    def cov(self) -> np.ndarray:
        """The population's covariance of z (d, d) (within plus between components)."""
        mu = self.mean
        dm = self.means - mu
        return (np.einsum("k,kij->ij", self.weights, self.covs)
                + np.einsum("k,ki,kj->ij", self.weights, dm, dm))

    def scaled(self, s: float) -> "Population":
        """The population with its spread of z about its mean scaled by ``s``."""
        mu = self.mean
        return replace(self, means=mu + s * (self.means - mu), covs=self.covs * s * s)

    def n_params(self) -> int:
        """Free parameters (for BIC): weights, means and covariances of z, and e's learned
        means and variances (with their covariances)."""
        K, d = self.k, self.d
        m = int(self.learn_extra.sum())
        return K - 1 + K * (d + d * (d + 1) // 2) + m + m * (m + 1) // 2

    def arrays(self) -> dict:
        """The population as the arrays ``io.latent.write_latent`` stores."""
        return dict(weights=self.weights, means=self.means, covs=self.covs,
                    extra_mean=self.extra_mean, extra_cov=self.extra_cov)

    @classmethod
    def from_arrays(cls, data: Optional[Mapping[str, np.ndarray]]) -> Optional["Population"]:
        """The population of :meth:`arrays` (``Latent.population``), or None."""
        if data is None:
            return None
        return cls(data["weights"], data["means"], data["covs"], data["extra_mean"],
                   data["extra_cov"])


def joint_prior(pop: Population) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m (K, P), Lambda (K, P, P), logdet S (K,)) of each joint component."""
    K, d, E = pop.k, pop.d, len(pop.extra_mean)
    P = d + E
    m = np.concatenate([pop.means, np.broadcast_to(pop.extra_mean, (K, E))], 1)
    lam = np.zeros((K, P, P))
    logdet = np.zeros(K)
    ld_e = 2.0 * np.log(np.diag(np.linalg.cholesky(pop.extra_cov))).sum() if E else 0.0
    inv_e = np.linalg.inv(pop.extra_cov) if E else None
    for k in range(K):
        c = np.linalg.cholesky(pop.covs[k])
        lam[k, :d, :d] = np.linalg.inv(pop.covs[k])
        if E:
            lam[k, d:, d:] = inv_e
        logdet[k] = 2.0 * np.log(np.diag(c)).sum() + ld_e
    lam = 0.5 * (lam + lam.transpose(0, 2, 1))
    return m, lam, logdet


def _chunks(n, size):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


class _Prior:
    """A population's joint components as float64 tensors (the E-step's constants)."""

    def __init__(self, pop: Population):
        import torch
        m, lam, logdet = joint_prior(pop)
        t = lambda a: torch.as_tensor(a, dtype=torch.float64)
        self.m, self.lam = t(m), t(lam)
        self.lam_m = torch.einsum("kij,kj->ki", self.lam, self.m)
        with np.errstate(divide="ignore"):
            logw = np.log(pop.weights)
        self.const = t(logw - 0.5 * logdet - 0.5 * np.einsum("ki,kij,kj->k", m, lam, m))


def _posterior_t(h, H, prior: _Prior):
    """Tensors (log evidence (n, K), means (n, K, P), covariances (n, K, P, P)) for a
    chunk ``h`` (n, P), ``H`` (n, P, P) float64 tensors."""
    import torch
    Q = H[:, None] + prior.lam[None]
    b = h[:, None] + prior.lam_m[None]
    L, info = torch.linalg.cholesky_ex(Q)
    if bool((info != 0).any()):
        # a posterior precision that is not numerically positive definite
        Q = Q + 1e-9 * torch.diagonal(Q, dim1=-2, dim2=-1).mean(-1)[..., None, None] \
            * torch.eye(Q.shape[-1], dtype=Q.dtype)
        L = torch.linalg.cholesky(Q)
    cov = torch.cholesky_inverse(L)
    mean = (cov @ b[..., None])[..., 0]
    logdet_q = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    ev = prior.const[None] - 0.5 * logdet_q + 0.5 * (b * mean).sum(-1)
    return ev, mean, cov


def _tensors(lin: Linearised, sl: slice):
    import torch
    return (torch.as_tensor(lin.h[sl], dtype=torch.float64),
            torch.as_tensor(lin.H[sl], dtype=torch.float64))


def posterior(lin: Linearised, pop: Population, rows: slice = slice(None)
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the particles ``rows``: (log evidence (n, K) including log pi_k, posterior means
    (n, K, P), posterior covariances (n, K, P, P)) under each component."""
    ev, mean, cov = _posterior_t(*_tensors(lin, rows), _Prior(pop))
    return ev.numpy(), mean.numpy(), cov.numpy()


def log_evidence(lin: Linearised, pop: Population, chunk: int = DEFAULTS["chunk"]) -> float:
    """Total marginal log-likelihood of the particles under ``pop`` (up to a constant of
    the particles alone)."""
    import torch
    prior = _Prior(pop)
    total = 0.0
    for sl in _chunks(lin.n, chunk):
        ev = _posterior_t(*_tensors(lin, sl), prior)[0]
        total += float(torch.logsumexp(ev, 1).sum())
    return total


def _logsumexp(a, axis):
    mx = np.max(a, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    return (mx + np.log(np.exp(a - mx).sum(axis=axis, keepdims=True))).squeeze(axis)


def posterior_moments(lin: Linearised, pop: Population, chunk: int = DEFAULTS["chunk"]
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each particle's posterior (a mixture over the components), summarised: (mean
    (N, P), covariance (N, P, P), responsibilities (N, K))."""
    import torch
    N, P = lin.n, lin.p
    mean = np.zeros((N, P))
    cov = np.zeros((N, P, P))
    resp = np.zeros((N, pop.k))
    prior = _Prior(pop)
    for sl in _chunks(N, chunk):
        ev, m, c = _posterior_t(*_tensors(lin, sl), prior)
        r = torch.softmax(ev, 1)
        mu = torch.einsum("nk,nki->ni", r, m)
        dm = m - mu[:, None]
        cv = torch.einsum("nk,nkij->nij", r, c) + torch.einsum("nk,nki,nkj->nij", r, dm, dm)
        mean[sl], cov[sl], resp[sl] = mu.numpy(), cv.numpy(), r.numpy()
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    return mean, cov, resp


def _clamp_cov(c, floor2):
    w, v = np.linalg.eigh(0.5 * (c + c.T))
    return (v * np.maximum(w, floor2)) @ v.T


def _floored(c, floor2):
    """``c`` with each variance at least ``floor2`` (diagonal) and every eigenvalue at
    least the smallest of them."""
    if len(c) == 0:
        return c
    return _clamp_cov(c + np.diag(np.maximum(floor2 - np.diag(c), 0.0)), float(floor2.min()))


@dataclass
class EMResult:
    """The estimate: ``population``, ``loglik`` (total, up to a constant), ``iterations``
    (EM maps evaluated), ``converged``, ``bic``; ``history`` the log-likelihood of each
    accepted population."""
    population: Population
    loglik: float
    iterations: int
    converged: bool
    bic: float
    history: List[float]


def _em_map(lin, pop, floor2, efloor2, min_weight, chunk):
    """(log-likelihood of ``pop``, the population one EM step gives)."""
    import torch
    N, d = lin.n, lin.d
    K, E = pop.k, len(pop.extra_mean)
    prior = _Prior(pop)
    Nk = torch.zeros(K, dtype=torch.float64)
    S1 = torch.zeros(K, d, dtype=torch.float64)
    S2 = torch.zeros(K, d, d, dtype=torch.float64)
    e1 = torch.zeros(E, dtype=torch.float64)
    e2 = torch.zeros(E, E, dtype=torch.float64)
    ll = 0.0
    for sl in _chunks(N, chunk):
        ev, m, c = _posterior_t(*_tensors(lin, sl), prior)
        lse = torch.logsumexp(ev, 1)
        ll += float(lse.sum())
        r = torch.exp(ev - lse[:, None])
        Nk += r.sum(0)
        mz = m[..., :d]
        S1 += torch.einsum("nk,nki->ki", r, mz)
        S2 += (torch.einsum("nk,nki,nkj->kij", r, mz, mz)
               + torch.einsum("nk,nkij->kij", r, c[..., :d, :d]))
        if E:
            me = m[..., d:]
            e1 += torch.einsum("nk,nki->i", r, me)
            e2 += (torch.einsum("nk,nki,nkj->ij", r, me, me)
                   + torch.einsum("nk,nkij->ij", r, c[..., d:, d:]))
    Nk, S1, S2, e1, e2 = (x.numpy() for x in (Nk, S1, S2, e1, e2))
    keep = Nk / N >= min_weight
    if not keep.any():
        keep[np.argmax(Nk)] = True
    Nk, S1, S2 = Nk[keep], S1[keep], S2[keep]
    means = S1 / Nk[:, None]
    covs = S2 / Nk[:, None, None] - np.einsum("ki,kj->kij", means, means)
    covs = np.stack([_floored(c, floor2) for c in covs])
    weights = Nk / Nk.sum()
    em_, ec = pop.extra_mean.copy(), pop.extra_cov.copy()
    li = np.flatnonzero(pop.learn_extra)
    if len(li):
        new_m = e1 / N
        new_c = e2 / N - np.outer(new_m, new_m)
        em_[li] = new_m[li]
        ec[np.ix_(li, li)] = _floored(new_c[np.ix_(li, li)], efloor2[li])
    return ll, Population(weights, means, covs, em_, ec, pop.learn_extra)


def _vec(pop):
    li = np.flatnonzero(pop.learn_extra)
    return np.concatenate([pop.weights, pop.means.ravel(), pop.covs.ravel(),
                           pop.extra_mean[li], pop.extra_cov[np.ix_(li, li)].ravel()])


def _unvec(theta, like):
    K, d = like.k, like.d
    li = np.flatnonzero(like.learn_extra)
    n = len(li)
    i = 0

    def take(size):
        nonlocal i
        out = theta[i:i + size]
        i += size
        return out

    w = take(K)
    means = take(K * d).reshape(K, d)
    covs = take(K * d * d).reshape(K, d, d)
    em_, ec = like.extra_mean.copy(), like.extra_cov.copy()
    em_[li] = take(n)
    ec[np.ix_(li, li)] = take(n * n).reshape(n, n)
    if np.any(w <= 0):
        return None
    covs = 0.5 * (covs + covs.transpose(0, 2, 1))
    ec = 0.5 * (ec + ec.T)
    try:
        for c in list(covs) + ([ec] if len(ec) else []):
            np.linalg.cholesky(c)
    except np.linalg.LinAlgError:
        return None
    return Population(w / w.sum(), means, covs, em_, ec, like.learn_extra)


def em(lin: Linearised, pop: Population, floor: np.ndarray,
       max_iter: int = DEFAULTS["max_iter"], tol: float = DEFAULTS["tol"],
       min_weight: float = DEFAULTS["min_weight"], chunk: int = DEFAULTS["chunk"],
       extra_floor: Optional[np.ndarray] = None) -> EMResult:
    """EM from ``pop`` with the linearisation fixed (module docstring), accelerated by
    SQUAREM (Varadhan and Roland 2008, Scand. J. Stat. 35:335: an extrapolation from
    two EM steps, kept only where the likelihood does not fall). ``floor`` (d,): the
    smallest sd of each component along each z coordinate (and every eigenvalue of its
    covariance at least the smallest floor squared); ``extra_floor`` (E,) the same for e.
    Stops when the log-likelihood rises by less than ``tol`` per particle over one cycle,
    or after ``max_iter`` EM maps (``converged`` False)."""
    N = lin.n
    floor2 = np.asarray(floor, dtype=np.float64) ** 2
    efloor2 = (np.zeros(len(pop.extra_mean)) if extra_floor is None
               else np.asarray(extra_floor, dtype=np.float64) ** 2)

    def F(p):
        return _em_map(lin, p, floor2, efloor2, min_weight, chunk)

    history = []
    evals = 0
    converged = False
    ll0, pop1 = F(pop)
    evals += 1
    history.append(ll0)
    current, ll_cur = pop, ll0
    while evals < max_iter:
        ll1, pop2 = F(pop1)
        evals += 1
        cand = None
        if pop2.k == pop1.k == current.k:
            t0, t1, t2 = _vec(current), _vec(pop1), _vec(pop2)
            r, v = t1 - t0, t2 - 2 * t1 + t0
            nv = float(np.sqrt(v @ v))
            alpha = -float(np.sqrt(r @ r)) / nv if nv > 0 else -1.0
            alpha = min(alpha, -1.0)
            while alpha < -1.0:
                cand = _unvec(t0 - 2 * alpha * r + alpha * alpha * v, current)
                if cand is not None:
                    break
                alpha = 0.5 * (alpha - 1.0)
            if alpha >= -1.0:
                cand = None
        nxt, ll_nxt = pop2, None
        if cand is not None:
            ll_c, after = F(cand)
            evals += 1
            if ll_c >= ll1:
                nxt, ll_nxt, pop_after = cand, ll_c, after
        if ll_nxt is None:
            ll_nxt, pop_after = F(pop2)
            evals += 1
        if ll_nxt < ll_cur:
            # exact EM never lowers the likelihood; the floors on the covariances can, by
            # a little, at a fixed point on their boundary: settled there
            converged = ll_cur - ll_nxt < 10.0 * tol * N
            break
        gain = ll_nxt - ll_cur
        current, ll_cur, pop1 = nxt, ll_nxt, pop_after
        history.append(ll_cur)
        if gain < tol * N:
            converged = True
            break
    bic = -2.0 * ll_cur + current.n_params() * math.log(max(N, 2))
    return EMResult(current, ll_cur, evals, converged, bic, history)


def _kmeanspp(x, k, rng):
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        if d2.sum() <= 0:
            centres.append(x[rng.integers(len(x))])
            continue
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())])
    return np.array(centres)


def _split_start(z, pop1: Population, k, rng, floor2):
    """A K-component start: k-means++ centres on the points z (N, d) (whitened by the
    one-component covariance), a few Lloyd iterations, each cluster's covariance (at
    least its share of the single component's)."""
    L = np.linalg.cholesky(pop1.covs[0])
    w = np.linalg.solve(L, (z - pop1.means[0]).T).T
    c = _kmeanspp(w, k, rng)
    for _ in range(20):
        lab = np.argmin(((w[:, None] - c[None]) ** 2).sum(-1), 1)
        c = np.array([w[lab == j].mean(0) if np.any(lab == j) else c[j] for j in range(k)])
    lab = np.argmin(((w[:, None] - c[None]) ** 2).sum(-1), 1)
    weights, means, covs = [], [], []
    for j in range(k):
        sel = z[lab == j]
        if len(sel) < 2:
            continue
        weights.append(len(sel))
        means.append(sel.mean(0))
        cj = np.cov(sel.T).reshape(z.shape[1], z.shape[1])
        covs.append(_clamp_cov(0.5 * cj + 0.5 * pop1.covs[0] / k, floor2.min()))
    weights = np.array(weights, dtype=np.float64)
    return replace(pop1, weights=weights / weights.sum(), means=np.array(means),
                   covs=np.array(covs))


def initial_population(z: np.ndarray, extra: np.ndarray, floor: np.ndarray,
                       extra_floor: np.ndarray, learn_extra: Optional[np.ndarray] = None,
                       extra_mean: Optional[np.ndarray] = None,
                       extra_cov: Optional[np.ndarray] = None) -> Population:
    """One Gaussian with the mean and covariance of the starting values ``z`` (N, d) and
    ``extra`` (N, E) (each variance at least its floor squared); ``extra_mean`` /
    ``extra_cov`` replace those of e where given (a fixed prior)."""
    z = np.asarray(z, dtype=np.float64)
    extra = np.asarray(extra, dtype=np.float64)
    d, E = z.shape[1], extra.shape[1]
    cz = np.atleast_2d(np.cov(z.T)) if len(z) > 1 else np.zeros((d, d))
    cz = _clamp_cov(cz + np.diag(np.maximum(np.asarray(floor) ** 2 - np.diag(cz), 0.0)),
                    float(np.min(floor)) ** 2)
    me = extra.mean(0) if extra_mean is None else np.asarray(extra_mean, dtype=np.float64)
    if extra_cov is None:
        ce = np.atleast_2d(np.cov(extra.T)) if len(extra) > 1 else np.zeros((E, E))
        ce = np.diag(np.maximum(np.diag(ce), np.asarray(extra_floor) ** 2))
    else:
        ce = np.asarray(extra_cov, dtype=np.float64)
    return Population(np.ones(1), z.mean(0)[None], cz[None], me, ce.reshape(E, E),
                      learn_extra)


def collapse(pop: Population) -> Population:
    """One Gaussian with the mixture's mean and covariance of z."""
    if pop.k == 1:
        return pop
    return replace(pop, weights=np.ones(1), means=pop.mean[None], covs=pop.cov[None])


def _split(pop: Population) -> Population:
    """``pop`` with its heaviest component split in two along its principal axis (means
    at +-1 sd, each with half the weight and the covariance less that axis' share)."""
    k = int(np.argmax(pop.weights))
    w, v = np.linalg.eigh(pop.covs[k])
    axis, sd = v[:, -1], math.sqrt(max(w[-1], 0.0))
    c = pop.covs[k] - 0.75 * w[-1] * np.outer(axis, axis)
    means = np.concatenate([np.delete(pop.means, k, 0),
                            [pop.means[k] - sd * axis, pop.means[k] + sd * axis]])
    covs = np.concatenate([np.delete(pop.covs, k, 0), [c, c]])
    weights = np.concatenate([np.delete(pop.weights, k), [pop.weights[k] / 2] * 2])
    return replace(pop, weights=weights, means=means, covs=covs)


def latent_population(z: np.ndarray, shift: np.ndarray, z_cov: Optional[np.ndarray] = None,
                      turn: Optional[np.ndarray] = None) -> Population:
    """The population a latent without a deconvolved one implies: one Gaussian with the
    mean of the particles' z and the covariance of z plus their mean posterior covariance
    ``z_cov`` (N, d, d) where known (the law of total variance); the shift's (and a
    fitted rotation's) mean and covariance as they are."""
    z = np.asarray(z, dtype=np.float64)
    d = z.shape[1]
    cz = np.atleast_2d(np.cov(z.T)).reshape(d, d) if len(z) > 1 else np.zeros((d, d))
    if z_cov is not None:
        cz = cz + np.asarray(z_cov, dtype=np.float64).mean(0)
    tiny = 1e-12 * max(1.0, float(np.trace(cz)))
    cz = _clamp_cov(cz, tiny)
    extra = np.asarray(shift, dtype=np.float64)
    if turn is not None:
        extra = np.concatenate([extra, np.asarray(turn, dtype=np.float64)], 1)
    E = extra.shape[1]
    ce = np.atleast_2d(np.cov(extra.T)).reshape(E, E) if len(extra) > 1 else np.eye(E)
    ce = _clamp_cov(ce, 1e-12 * max(1.0, float(np.trace(ce))))
    return Population(np.ones(1), z.mean(0)[None], cz[None], extra.mean(0), ce)


def select(lin: Linearised, pop1: Population, floor: np.ndarray,
           extra_floor: Optional[np.ndarray] = None,
           max_components: int = DEFAULTS["max_components"], n_init: int = DEFAULTS["n_init"],
           seed: int = 0, max_iter: int = DEFAULTS["max_iter"], tol: float = DEFAULTS["tol"],
           max_particles: int = DEFAULTS["select_particles"],
           log=None) -> Tuple[EMResult, List[Tuple[int, EMResult]]]:
    """The number of components by BIC (module docstring): EM for K = 1 .. ``max_components``
    on at most ``max_particles`` particles (a random subset), each K > 1 from the best
    K - 1 fit with its heaviest component split (:func:`_split`) and from ``n_init``
    k-means++ starts on the posterior means; stops after two K in a row that raise the BIC.
    The chosen K is then refitted on every particle. Returns (that result, (K, the best
    result of that K on the subset) for each K tried; a result may hold fewer components
    than asked where some fell below ``min_weight``)."""
    rng = np.random.default_rng(seed)
    floor = np.asarray(floor, dtype=np.float64)
    sub = lin
    if lin.n > max_particles:
        sub = lin.subset(np.sort(rng.choice(lin.n, int(max_particles), replace=False)))
    one = em(sub, collapse(pop1), floor, max_iter, tol, extra_floor=extra_floor)
    results = [one]
    asked = [1]
    zpost = posterior_moments(sub, one.population)[0][:, :lin.d]
    worse = 0
    for k in range(2, int(max_components) + 1):
        prev = results[-1].population
        starts = [_split(prev)] if prev.k == k - 1 else []
        if pop1.k == k:
            starts.append(pop1)          # the previous estimate, warm
        starts += [_split_start(zpost, one.population, k, rng, floor ** 2)
                   for _ in range(int(n_init))]
        best = None
        for start in starts:
            if start.k < k:
                continue
            r = em(sub, start, floor, max_iter, tol, extra_floor=extra_floor)
            if best is None or r.loglik > best.loglik:
                best = r
        if best is None:
            break
        if log is not None:
            log("population: K = %d: log-likelihood %.1f, BIC %.1f (%d EM maps)"
                % (k, best.loglik, best.bic, best.iterations))
        worse = worse + 1 if best.bic > min(r.bic for r in results) else 0
        results.append(best)
        asked.append(k)
        if worse >= 2:
            break
    chosen = min(results, key=lambda r: r.bic)
    if sub is not lin:
        chosen = em(lin, chosen.population, floor, max_iter, tol, extra_floor=extra_floor)
    return chosen, list(zip(asked, results))


def unconstrained(lin: Linearised, pop: Population, ratio: float = 0.05) -> np.ndarray:
    """Indices of the z coordinates (modes) that the images hardly constrain: the mean
    information per particle along the mode is below ``ratio`` times the population's
    precision along it (the posterior there is the prior: EM cannot estimate the spread)."""
    d = lin.d
    info = np.mean(lin.H[:, np.arange(d), np.arange(d)], axis=0)
    prec = 1.0 / np.diag(pop.cov)
    return np.flatnonzero(info < ratio * prec)


# ----------------------------------------------------------------------------- landscape

def principal_axes(pop: Population) -> Tuple[np.ndarray, np.ndarray]:
    """(variances (d,), axes (d, d) rows) of the population's covariance of z, largest
    first; each axis' largest-magnitude entry positive (``analysis.pca``'s convention)."""
    w, v = np.linalg.eigh(pop.cov)
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order].T
    sign = np.sign(v[np.arange(len(v)), np.argmax(np.abs(v), axis=1)])
    sign[sign == 0] = 1.0
    return w, v * sign[:, None]


def marginal_density(pop: Population, axis: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The population's density of t = axis . z at the points ``x`` (a 1D mixture of
    Gaussians; ``axis`` a unit vector (d,))."""
    a = np.asarray(axis, dtype=np.float64)
    m = pop.means @ a
    v = np.einsum("i,kij,j->k", a, pop.covs, a)
    x = np.asarray(x, dtype=np.float64)[:, None]
    return (pop.weights * np.exp(-0.5 * (x - m) ** 2 / v) / np.sqrt(2 * np.pi * v)).sum(1)


def conditional_mean(pop: Population, axis: np.ndarray, t: float) -> np.ndarray:
    """E[z | axis . z = t] under the population (d,): each component's Gaussian
    conditional mean, weighted by its density at t."""
    a = np.asarray(axis, dtype=np.float64)
    m = pop.means @ a
    ca = np.einsum("kij,j->ki", pop.covs, a)
    v = ca @ a
    logw = np.log(pop.weights) - 0.5 * (t - m) ** 2 / v - 0.5 * np.log(v)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    cond = pop.means + ca * ((t - m) / v)[:, None]
    return w @ cond


# ----------------------------------------------------------------------------- shrinkage

def scale_profile(lin: Linearised, pop: Population,
                  scales: Optional[Sequence[float]] = None) -> ShrinkageCheck:
    """Marginal log-likelihood of the particles (``lin``) as ``pop``'s spread of z about
    its mean is scaled by s (``scales``, default 61 values from 1/4 to 4, log-spaced, and
    41 more about the best of them); the maximum refined by a parabola in log s."""
    s = (np.exp(np.linspace(math.log(0.25), math.log(4.0), 61)) if scales is None
         else np.asarray(scales, dtype=np.float64))
    ll = np.array([log_evidence(lin, pop.scaled(float(v))) for v in s])
    if scales is None:
        # a finer look about the maximum, for the interval
        i = int(np.argmax(ll))
        fine = np.exp(np.linspace(math.log(s[max(i - 3, 0)]), math.log(s[min(i + 3, len(s) - 1)]),
                                  41))
        s = np.concatenate([s, fine])
        ll = np.concatenate([ll, [log_evidence(lin, pop.scaled(float(v))) for v in fine]])
        o = np.argsort(s)
        s, ll = s[o], ll[o]
    ll1 = log_evidence(lin, pop)
    ll = ll - ll1
    i = int(np.argmax(ll))
    best = float(s[i])
    if 0 < i < len(s) - 1:
        x = np.log(s[i - 1:i + 2])
        y = ll[i - 1:i + 2]
        den = (y[0] - 2 * y[1] + y[2])
        if den < 0:
            off = 0.5 * (y[0] - y[2]) / den
            best = float(math.exp(x[1] + off * (x[1] - x[0])))
    inside = s[ll >= ll.max() - 1.92]
    return ShrinkageCheck(s, ll, best, float(inside.min()), float(inside.max()))
