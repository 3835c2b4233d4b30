"""Estimating the population (``population.py``) by EM, the linearisation fixed.

``em``: EM from a starting population, accelerated by SQUAREM (Varadhan and Roland 2008,
Scand. J. Stat. 35:335: an extrapolation from two EM steps, kept only where the likelihood
does not fall), each component's covariance kept above its floor. ``select``: the number of
components by BIC, K = 1 .. ``max_components`` on a subset of the particles, each K > 1
from the best K - 1 fit with its heaviest component split and from k-means++ starts on the
posterior means, the chosen K then refitted on every particle.
"""
import math
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

import numpy as np

from .population import (DEFAULTS, Linearised, Population, collapse, floored, floored_cov,
                         iter_posteriors, posterior_moments)

__all__ = ["EMResult", "em", "select", "SELECT_TOL"]

SELECT_TOL = 1e-4      # EM stop while choosing the form (nats per particle per cycle)


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
    Nk = torch.zeros(K, dtype=torch.float64)
    S1 = torch.zeros(K, d, dtype=torch.float64)
    S2 = torch.zeros(K, d, d, dtype=torch.float64)
    e1 = torch.zeros(E, dtype=torch.float64)
    e2 = torch.zeros(E, E, dtype=torch.float64)
    ll = 0.0
    for ev, m, c in iter_posteriors(lin, pop, chunk):
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
    if pop.tied:
        covs = np.broadcast_to(np.einsum("k,kij->ij", Nk, covs) / Nk.sum(), covs.shape)
    covs = np.stack([floored(c, floor2) for c in covs])
    weights = Nk / Nk.sum()
    em_, ec = pop.extra_mean.copy(), pop.extra_cov.copy()
    li = np.flatnonzero(pop.learn_extra)
    if len(li):
        new_m = e1 / N
        new_c = e2 / N - np.outer(new_m, new_m)
        em_[li] = new_m[li]
        ec[np.ix_(li, li)] = floored(new_c[np.ix_(li, li)], efloor2[li])
    return ll, Population(weights, means, covs, em_, ec, pop.learn_extra, pop.tied)

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
    return Population(w / w.sum(), means, covs, em_, ec, like.learn_extra, like.tied)

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
        covs.append(floored_cov(0.5 * cj + 0.5 * pop1.covs[0] / k, floor2.min()))
    weights = np.array(weights, dtype=np.float64)
    return replace(pop1, weights=weights / weights.sum(), means=np.array(means),
                   covs=np.array(covs))

def _tie(pop: Population) -> Population:
    """``pop`` with one covariance for all components: their weighted mean."""
    c = np.einsum("k,kij->ij", pop.weights, pop.covs)
    return replace(pop, covs=np.broadcast_to(c, pop.covs.shape).copy(), tied=True)


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

def select(lin: Linearised, pop1: Population, floor: np.ndarray,
           extra_floor: Optional[np.ndarray] = None,
           max_components: int = DEFAULTS["max_components"], n_init: int = DEFAULTS["n_init"],
           seed: int = 0, max_iter: int = DEFAULTS["max_iter"], tol: float = DEFAULTS["tol"],
           max_particles: int = DEFAULTS["select_particles"],
           log: Optional[Callable[[str], None]] = None
           ) -> Tuple[EMResult, List[Tuple[str, EMResult]]]:
    """The population's form by BIC (module docstring): EM for K = 1 .. ``max_components``
    components, with one covariance shared by the components ("tied": the states differ
    by their means, few parameters) and with one each ("full"), on at most
    ``max_particles`` particles (a random subset); each K > 1 from the best K - 1 fit of
    its family with its heaviest component split (:func:`_split`) and from ``n_init``
    k-means++ starts on the posterior means; a family stops after two K in a row that
    raise its BIC. The chosen form is then refitted on every particle. Returns (that
    result, (label such as "3 tied", the best result of that form on the subset) for each
    form tried; a result may hold fewer components than asked where some fell below
    ``min_weight``)."""
    rng = np.random.default_rng(seed)
    floor = np.asarray(floor, dtype=np.float64)
    sub = lin
    if lin.n > max_particles:
        sub = lin.subset(np.sort(rng.choice(lin.n, int(max_particles), replace=False)))
    stol = max(tol, SELECT_TOL)
    one = em(sub, collapse(pop1), floor, max_iter, stol, extra_floor=extra_floor)
    results = [("1", one)]
    zpost = posterior_moments(sub, one.population)[0][:, :lin.d]
    for tied in (True, False):
        prev = one.population
        worse = 0
        best_bic = one.bic
        for k in range(2, int(max_components) + 1):
            starts = [_split(prev)] if prev.k == k - 1 else []
            if pop1.k == k and pop1.tied == tied:
                starts.append(pop1)          # the previous estimate, warm
            starts += [_split_start(zpost, one.population, k, rng, floor ** 2)
                       for _ in range(int(n_init))]
            best = None
            for start in starts:
                if start.k < k:
                    continue
                r = em(sub, _tie(start) if tied else replace(start, tied=False), floor,
                       max_iter, stol, extra_floor=extra_floor)
                if best is None or r.loglik > best.loglik:
                    best = r
            if best is None:
                break
            label = "%d%s" % (k, " tied" if tied else "")
            if log is not None:
                log("population: K = %s: log-likelihood %.1f, BIC %.1f (%d EM maps)"
                    % (label, best.loglik, best.bic, best.iterations))
            results.append((label, best))
            prev = best.population
            worse = worse + 1 if best.bic > best_bic else 0
            best_bic = min(best_bic, best.bic)
            if worse >= 2:
                break
    chosen = min((r for _, r in results), key=lambda r: r.bic)
    if sub is not lin:
        chosen = em(lin, chosen.population, floor, max_iter, tol, extra_floor=extra_floor)
    return chosen, results
