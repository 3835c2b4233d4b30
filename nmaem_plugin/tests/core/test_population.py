"""The population estimated by deconvolution (core/population.py) and the deconvolved
landscape (core/landscape.py), on measurements whose truth is known.

A linear-Gaussian measurement model stands in for the images: particle i has true
parameters p_i = (z_i, e_i) drawn from a known population (three states on a path that is
not a straight line, plus a Gaussian shift), and its "image" is y_i = J_i p_i + noise with
a random J_i (one coordinate of z unseen by every J_i). Its likelihood in information form
is exact: H_i = J_i^T J_i, h_i = J_i^T y_i. The checks are against the truth and against an
independent formula (the evidence in covariance form), never against the code itself.
"""
import math
import os
import unittest

import numpy as np
from scipy.stats import chi2, multivariate_normal

from nmaem_plugin.core.inference import em as EM
from nmaem_plugin.core.inference import population as P
from nmaem_plugin.core.inference.shrinkage import latent_population, scale_profile
from nmaem_plugin.core.analysis.maxima import landscape, maxima

MEANS = np.array([[0.0, 0.0, 0.0, 0.0], [6.0, 2.0, 0.0, 0.0], [10.0, -3.0, 1.0, 0.0]])
SDS = np.array([1.0, 0.6, 0.4, 0.2])
EXTRA_MEAN, EXTRA_SD = np.array([0.3, -0.2]), 0.7


def simulate(n, seed, means=MEANS, unseen=True, scale=1.0):
    """(Linearised, true z (n, d), labels): the measurements of n particles."""
    rng = np.random.default_rng(seed)
    K, d = means.shape
    lab = rng.integers(0, K, n)
    z = means[lab] + rng.normal(size=(n, d)) * SDS
    e = EXTRA_MEAN + rng.normal(size=(n, 2)) * EXTRA_SD
    p = np.concatenate([z, e], 1)
    seen = np.array([0.5, 0.5, 0.5, 0.0 if unseen else 0.5, 1.0, 1.0]) * scale
    J = rng.normal(size=(n, 30, d + 2)) * seen * rng.uniform(0.3, 1.0, size=(n, 1, 1))
    y = np.einsum("nmp,np->nm", J, p) + rng.normal(size=(n, 30))
    H = np.einsum("nmp,nmq->npq", J, J)
    h = np.einsum("nmp,nm->np", J, y)
    return P.Linearised(h, H, d), z, lab


FLOOR, EFLOOR = np.full(4, 0.01), np.full(2, 0.01)


def start(z, shrink, rng):
    """Starting values like an encoder's: the truth shrunk about its mean, with noise."""
    s = z.mean(0) + shrink * (z - z.mean(0)) + rng.normal(size=z.shape) * 0.1
    return P.initial_population(s, np.zeros((len(z), 2)), FLOOR, EFLOOR)


class TestDeconvolution(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.lin, cls.z, cls.lab = simulate(3000, seed=0)
        rng = np.random.default_rng(1)
        cls.fits = {}
        for shrink in (1.0, 0.3):
            cls.fits[shrink] = EM.select(cls.lin, start(cls.z, shrink, rng), FLOOR, EFLOOR,
                                        max_components=5)

    def sorted_pop(self, shrink):
        pop = self.fits[shrink][0].population
        o = np.argsort(pop.means[:, 0])
        return pop.weights[o], pop.means[o], pop.covs[o], pop

    def test_bic_finds_the_three_states(self):
        for shrink in (1.0, 0.3):
            self.assertEqual(self.fits[shrink][0].population.k, 3)
            ks = [k for k, _ in self.fits[shrink][1]]
            self.assertIn("3", ks)

    def test_recovers_the_true_population(self):
        """Means of the seen coordinates within 4 standard errors of the truth (the
        standard error from the component's spread and size, inflated by the measurement
        noise: at most 0.1 here), weights within 0.03, sds of the seen coordinates
        within 15 %; the shift's population too."""
        w, m, c, pop = self.sorted_pop(1.0)
        np.testing.assert_allclose(w, [1 / 3] * 3, atol=0.03)
        np.testing.assert_allclose(m[:, :3], MEANS[:, :3], atol=0.15)
        sd = np.sqrt(np.diagonal(c, axis1=1, axis2=2))[:, :3]
        np.testing.assert_allclose(sd, np.broadcast_to(SDS[:3], sd.shape), rtol=0.15)
        np.testing.assert_allclose(pop.extra_mean, EXTRA_MEAN, atol=0.05)
        np.testing.assert_allclose(np.sqrt(np.diag(pop.extra_cov)), EXTRA_SD, rtol=0.1)

    def test_same_population_from_shrunk_and_unshrunk_starts(self):
        """Started from the truth shrunk by 0.3 about its mean, EM reaches the same
        population (seen coordinates) as from the unshrunk start: far closer to each
        other than to the truth's statistical error."""
        _, m1, c1, _ = self.sorted_pop(1.0)
        _, m3, c3, _ = self.sorted_pop(0.3)
        np.testing.assert_allclose(m3[:, :3], m1[:, :3], atol=0.02)
        np.testing.assert_allclose(c3[:, :3, :3], c1[:, :3, :3], atol=0.01)

    def test_em_out_of_iterations_says_so_and_keeps_its_last_population(self):
        """EM stopped by its limit: not converged, a valid population no worse than its
        start (the marginal likelihood computed here from the population it returns)."""
        rng = np.random.default_rng(5)
        pop0 = start(self.z, 0.3, rng)
        res = EM.em(self.lin, pop0, FLOOR, max_iter=3, extra_floor=EFLOOR)
        self.assertFalse(res.converged)
        self.assertLessEqual(res.iterations, 3)
        for c in res.population.covs:
            self.assertTrue((np.linalg.eigvalsh(c) > 0).all())
        self.assertGreater(P.log_evidence(self.lin, res.population),
                           P.log_evidence(self.lin, pop0))
        self.assertAlmostEqual(res.history[-1], res.loglik, delta=1e-6 * abs(res.loglik))

    def test_unseen_mode_is_reported(self):
        self.assertEqual(P.unconstrained(self.lin, self.fits[1.0][0].population).tolist(), [3])

    def test_posteriors_are_calibrated(self):
        """The true z of the seen coordinates lies in the 68 % and 95 % posterior regions
        of its particle as often as it should."""
        mean, cov, _ = P.posterior_moments(self.lin, self.fits[1.0][0].population)
        dz = (self.z - mean[:, :4])[:, :3]
        m2 = np.einsum("ni,nij,nj->n", dz, np.linalg.inv(cov[:, :3, :3]), dz)
        # the bounds: 60-76 % inside the 68 % region, 90-99 % inside the 95 % one
        c68, c95 = np.mean(m2 < chi2.ppf(0.68, 3)), np.mean(m2 < chi2.ppf(0.95, 3))
        self.assertTrue(0.60 <= c68 <= 0.76 and 0.90 <= c95 <= 0.99, (c68, c95))
        np.testing.assert_allclose(cov, np.swapaxes(cov, 1, 2), atol=1e-12)
        self.assertTrue(np.all(np.linalg.eigvalsh(cov)[:, 0] > 0))

    def test_shrinkage_check(self):
        """The marginal likelihood peaks at the estimated spread (1 inside the interval)
        and, for the population shrunk by 0.5, at about 2 (1 outside)."""
        pop = self.fits[1.0][0].population
        prof = scale_profile(self.lin, pop)
        self.assertLessEqual(prof.low, 1.0)
        self.assertGreaterEqual(prof.high, 1.0)
        self.assertIn("consistent", prof.verdict())
        shrunk = scale_profile(self.lin, pop.scaled(0.5))
        self.assertGreater(shrunk.low, 1.0)
        self.assertAlmostEqual(shrunk.best, 2.0, delta=0.15)
        self.assertIn("shrunk", shrunk.verdict())

    def test_latent_population_is_the_law_of_total_variance(self):
        """The population a latent implies (posterior means + mean posterior covariance)
        has the estimated population's mean and covariance on the seen coordinates."""
        pop = self.fits[1.0][0].population
        mean, cov, _ = P.posterior_moments(self.lin, pop)
        implied = latent_population(mean[:, :4], mean[:, 4:], cov[:, :4, :4])
        np.testing.assert_allclose(implied.mean[:3], pop.mean[:3], atol=0.02)
        np.testing.assert_allclose(implied.cov[:3, :3], pop.cov[:3, :3], rtol=0.03, atol=0.05)


class TestFormulas(unittest.TestCase):
    def test_evidence_against_the_covariance_form(self):
        """With full-rank H_i the evidence of each component is N(zhat; m_k, S_k + H^-1)
        times a factor of the particle alone: the differences between components (and
        the responsibilities) must match scipy's densities, and the posterior mean and
        covariance the textbook product of Gaussians."""
        lin, _, _ = simulate(50, seed=3, unseen=False)
        rng = np.random.default_rng(4)
        pop = P.Population([0.3, 0.7], rng.normal(size=(2, 4)) * 3,
                           [np.eye(4) * 2.0, np.diag([1.0, 2.0, 3.0, 0.5])],
                           EXTRA_MEAN, np.eye(2) * EXTRA_SD ** 2)
        ev, mean, cov = P.posterior(lin, pop)
        m, lam, _ = P.joint_prior(pop)
        for i in range(5):
            Hinv = np.linalg.inv(lin.H[i])
            zhat = Hinv @ lin.h[i]
            ref = []
            for k in range(2):
                S = np.linalg.inv(lam[k])
                ref.append(math.log(pop.weights[k])
                           + multivariate_normal(m[k], S + Hinv).logpdf(zhat))
                post_cov = np.linalg.inv(lin.H[i] + lam[k])
                np.testing.assert_allclose(cov[i, k], post_cov, rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(mean[i, k], post_cov @ (lin.H[i] @ zhat
                                                                   + lam[k] @ m[k]),
                                           rtol=1e-8, atol=1e-10)
            self.assertAlmostEqual(ev[i, 1] - ev[i, 0], ref[1] - ref[0], places=8)


class TestLandscape(unittest.TestCase):
    def test_deconvolved_maxima_where_the_states_are(self):
        """Posterior means are shrunk toward each component; the deconvolved landscape's
        maxima are at the states' PC1 positions, and the models there at the states'
        means (seen coordinates); with the posterior covariances dropped, the point
        estimates' histogram is used and the landscape says so."""
        lin, z, lab = simulate(3000, seed=5, scale=0.35)       # noisier particles
        fit, _ = EM.select(lin, start(z, 0.5, np.random.default_rng(0)), FLOOR, EFLOOR,
                          max_components=5)
        mean, cov, _ = P.posterior_moments(lin, fit.population)
        land = landscape(mean[:, :4], cov[:, :4, :4])
        self.assertTrue(land.deconvolved)
        sm = maxima(land)
        self.assertEqual(len(sm.maxima), 3)
        true_means = np.array([z[lab == k].mean(0) for k in range(3)])
        order = np.argsort(sm.z[:, 0])
        np.testing.assert_allclose(sm.z[order][:, :3], true_means[np.argsort(true_means[:, 0])][:, :3],
                                   atol=0.3)
        # each particle's basin is its true state for most particles
        v = land.pca.components[0]
        truth_rank = np.argsort(np.argsort(true_means @ v))
        state_rank = np.argsort(np.argsort(sm.maxima.positions))
        agree = np.mean(state_rank[sm.maxima.basin] == truth_rank[lab])
        self.assertGreater(agree, 0.9)
        point = landscape(mean[:, :4])
        self.assertFalse(point.deconvolved)
        self.assertIn("z_cov", point.note)


if __name__ == "__main__":
    unittest.main()


class TestLatentZCov(unittest.TestCase):
    """read_latent refuses a z_cov that is not a covariance, naming the first bad row."""

    def test_bad_z_cov_refused(self):
        import tempfile
        from nmaem_plugin.core.base.errors import NmaemError
        from nmaem_plugin.core.io.latent import read_latent, write_latent
        n, d = 5, 3
        good = np.tile(np.eye(d), (n, 1, 1))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "latent.npz")
            write_latent(path, np.zeros((n, d)), z_cov=good)
            np.testing.assert_array_equal(read_latent(path).z_cov, good)
            indefinite = good.copy()
            indefinite[3, 1, 1] = -0.5            # eigenvalue -0.5 in row 3
            write_latent(path, np.zeros((n, d)), z_cov=indefinite)
            with self.assertRaisesRegex(NmaemError, "not positive definite.*row 3"):
                read_latent(path)
            asym = good.copy()
            asym[2, 0, 1] = 0.5                   # row 2: not symmetric
            write_latent(path, np.zeros((n, d)), z_cov=asym)
            with self.assertRaisesRegex(NmaemError, "not symmetric.*row 2"):
                read_latent(path)
