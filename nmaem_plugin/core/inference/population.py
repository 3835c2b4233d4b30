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

* The number of components K (``em.select``): 1 to ``max_components`` by BIC over the
  marginal likelihood, each K from ``n_init`` k-means++ starts on the particles' posterior
  means; a component whose weight falls below ``min_weight`` is dropped.
* Each component's covariance keeps every eigenvalue at least ``floor**2`` (per z
  coordinate), so no component collapses onto a few particles; directions the images
  hardly constrain are reported by :func:`unconstrained` (the mean information per particle
  against the population's precision) and keep their starting spread.
* Everything here is numpy float64 (torch-free), in chunks of particles.

Per-particle posterior: the mixture of the components' Gaussians, summarised by its mean
and covariance (:func:`posterior_moments`); the latent's ``z`` and ``z_cov``.

Estimating it (EM, the number of components) is ``em.py``; the landscape of states is
drawn from the particles' posteriors (``analysis/maxima.py``); the shrinkage check from this
model's marginal likelihood (``shrinkage.py``).
"""
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Tuple

import numpy as np

from ..base.choices import POPULATION_MAX_COMPONENTS

if TYPE_CHECKING:
    import torch

__all__ = ["Linearised", "Population", "joint_prior", "posterior", "posterior_moments",
           "log_evidence", "iter_posteriors", "initial_population", "collapse", "unconstrained",
           "floored_cov", "floored",
           "DEFAULTS"]

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
    (E, E)). ``tied``: the components share one covariance (their ``covs`` are equal).
    ``learn_extra`` (E,) bool: which of e's coordinates EM estimates (the others
    keep their mean and variance: a fixed prior, e.g. the rotation's)."""
    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    extra_mean: np.ndarray
    extra_cov: np.ndarray
    learn_extra: np.ndarray = field(default=None)
    tied: bool = False

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
        cov = (1 if self.tied else K) * (d * (d + 1) // 2)
        return K - 1 + K * d + cov + m + m * (m + 1) // 2

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

def floored_cov(c: np.ndarray, floor2: float) -> np.ndarray:
    """``c`` symmetrised with every eigenvalue at least ``floor2``."""
    w, v = np.linalg.eigh(0.5 * (c + c.T))
    return (v * np.maximum(w, floor2)) @ v.T

def floored(c: np.ndarray, floor2: np.ndarray) -> np.ndarray:
    """``c`` with each variance at least ``floor2`` (diagonal) and every eigenvalue at
    least the smallest of them."""
    if len(c) == 0:
        return c
    return floored_cov(c + np.diag(np.maximum(floor2 - np.diag(c), 0.0)), float(floor2.min()))

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
    cz = floored_cov(cz + np.diag(np.maximum(np.asarray(floor) ** 2 - np.diag(cz), 0.0)),
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

def unconstrained(lin: Linearised, pop: Population, ratio: float = 0.05) -> np.ndarray:
    """Indices of the z coordinates (modes) that the images hardly constrain: the mean
    information per particle along the mode is below ``ratio`` times the population's
    precision along it (the posterior there is the prior: EM cannot estimate the spread)."""
    d = lin.d
    info = np.mean(lin.H[:, np.arange(d), np.arange(d)], axis=0)
    prec = 1.0 / np.diag(pop.cov)
    return np.flatnonzero(info < ratio * prec)


def iter_posteriors(lin: Linearised, pop: Population, chunk: int = DEFAULTS["chunk"]
                    ) -> Iterator[Tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]]:
    """For each chunk of particles: float64 tensors (log evidence (n, K), posterior means
    (n, K, P), posterior covariances (n, K, P, P)) under each component (the E-step)."""
    prior = _Prior(pop)
    for sl in _chunks(lin.n, chunk):
        yield _posterior_t(*_tensors(lin, sl), prior)
