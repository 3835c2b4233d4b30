"""The shrinkage check of ``nmaem infer``: is the inferred landscape as wide as the images
say?

The marginal log-likelihood of the particles (their likelihoods linearised at the inferred
parameters, ``population.Linearised``) under the population, as its spread of z about its
mean is scaled by s. For the population the images support it peaks at s = 1; a peak
clearly above 1 says the landscape is shrunk toward its mean (as the histogram of
point estimates of a noisy encoder is), below 1 that it is spread wider. The population is
the latent's deconvolved one where it has it, else the one the latent implies
(:func:`latent_population`: the mean of z, and the covariance of z plus the mean posterior
covariance z_cov where known, the law of total variance). The result is an
``io.latent.ShrinkageCheck`` (written into latent.npz, read by the report and the infer
protocol).
"""
import math
from typing import Optional, Sequence

import numpy as np

from ..io.latent import ShrinkageCheck
from .population import Linearised, Population, floored_cov, log_evidence

__all__ = ["latent_population", "scale_profile"]


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
    cz = floored_cov(cz, tiny)
    extra = np.asarray(shift, dtype=np.float64)
    if turn is not None:
        extra = np.concatenate([extra, np.asarray(turn, dtype=np.float64)], 1)
    E = extra.shape[1]
    ce = np.atleast_2d(np.cov(extra.T)).reshape(E, E) if len(extra) > 1 else np.eye(E)
    ce = floored_cov(ce, 1e-12 * max(1.0, float(np.trace(ce))))
    return Population(np.ones(1), z.mean(0)[None], cz[None], extra.mean(0), ce)


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
