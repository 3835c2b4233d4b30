"""The per-particle fit under a population estimated from the images (core/deconvolve.py,
``nmaem infer --population em``), on particles whose true amplitudes are known.

The frames are the reference deformed along its own modes, X0 + U z, with z drawn from two
states (not on one line through the reference), so each particle's true z is exact. The
particles are rendered with CTF and white noise at -3 dB; a two-epoch run gives a poor
encoder (its outputs are only a starting point). Checks:

* the linearised likelihood (``particle_fit.linearise_batch``): its gradient and
  Gauss-Newton matrix against central differences of the profiled chi-square, computed
  with ``likelihood.whitened_fit`` at displaced parameters (float64 differences);
* EM from the encoder's outputs and from those outputs shrunk by 0.3 about their mean
  reaches the same population;
* coverage: each particle's true z lies in its 95 % posterior region for 90-99 % of
  particles and in its 68 % region for 60-76 %;
* the shrinkage check finds the latent scaled by 0.5 about its mean shrunk, and the
  inferred one not;
* z_cov is symmetric positive definite, written and read back.
"""
import math
import os
import shutil
import tempfile
import unittest

import numpy as np
import torch
from scipy.stats import chi2

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.io.latent import Latent, read_latent
from nmaem_plugin.core.modes.compute import compute_modes
from nmaem_plugin.core.modes.modesfile import load_modes, save_modes
from nmaem_plugin.core.sim.simulate import SimulationSettings, simulate
from nmaem_plugin.core.physics.structure import read_model
from nmaem_plugin.tests.core.cli_fixture import run_main

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
BOX0, APIX0, BOX, D = 40, 3.0, 32, 3
N, N_FRAMES = 400, 200


def quiet(*a, **k):
    pass


nmaem = run_main      # nmaem ARGS in this process: (exit status, stdout, stderr)


class TestDeconvolveImages(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from nmaem_plugin.core.learn.train import train
        cls.tmp = tempfile.mkdtemp(prefix="nmaem-em-")
        model = read_model(OPEN)
        nm = compute_modes(model, n_modes=D, device="cpu")
        M = nm.coords.shape[0]
        rng = np.random.default_rng(7)
        # two states, 2.5 A RMSD apart, off the line through the reference
        centres = np.array([[1.0, 0.5, 0.0], [-1.5, 1.5, 0.5]]) * math.sqrt(M)
        lab = rng.integers(0, 2, N_FRAMES)
        z_frames = centres[lab] + rng.normal(size=(N_FRAMES, D)) * 0.3 * math.sqrt(M)
        frames = nm.coords[None] + np.einsum("fl,lmk->fmk", z_frames, nm.modes)
        cls.data = os.path.join(cls.tmp, "data")
        simulate(cls.data, model, frames.astype(np.float32),
                 SimulationSettings(n=N, box=BOX0, apix=APIX0, snr_db=-3.0, seed=3,
                                    distribution="uniform"),
                 device="cpu", log=quiet)
        cls.star = os.path.join(cls.data, "particles.star")
        ref = read_model(os.path.join(cls.data, "reference.pdb"))
        cls.modes = os.path.join(cls.tmp, "modes.npz")
        save_modes(cls.modes, compute_modes(ref, n_modes=D, device="cpu"))
        U = load_modes(cls.modes).modes.reshape(D, -1).astype(np.float64)
        with np.load(os.path.join(cls.data, "ground_truth.npz")) as gt:
            frame = gt["frame"]
        from nmaem_plugin.core.physics.structure import read_trajectory
        _, sim_frames = read_trajectory(os.path.join(cls.data, "frames.pdb"))
        disp = (sim_frames.astype(np.float64) - ref.coords[None]).reshape(len(sim_frames), -1)
        cls.z_true = (disp @ U.T)[frame]
        cls.state = lab[frame]
        cls.n_atoms = M
        cls.run_dir = os.path.join(cls.tmp, "run")
        train(cls.run_dir, cls.star, os.path.join(cls.data, "reference.pdb"), cls.modes, epochs=2,
              encoder="small", box=BOX, batch=16, lr=1e-3, seed=0, log=quiet)
        cls.latent = os.path.join(cls.tmp, "latent.npz")
        rc, cls.out, err = nmaem("infer", "--particles", cls.star, "--model", cls.run_dir, "-o",
                                 cls.latent, "--fit-bfactor", 0, "--population", "em")
        assert rc == 0, err

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_latent_has_calibrated_posteriors(self):
        lat = read_latent(self.latent)
        self.assertEqual(lat.z_cov.shape, (N, D, D))
        np.testing.assert_allclose(lat.z_cov, np.swapaxes(lat.z_cov, 1, 2), atol=1e-6)
        self.assertTrue(np.all(np.linalg.eigvalsh(lat.z_cov)[:, 0] > 0))
        self.assertIsNotNone(lat.population)
        self.assertIsNotNone(lat.shrinkage)
        dz = self.z_true - lat.z
        m2 = np.einsum("ni,nij,nj->n", dz, np.linalg.inv(lat.z_cov), dz)
        c68, c95 = np.mean(m2 < chi2.ppf(0.68, D)), np.mean(m2 < chi2.ppf(0.95, D))
        self.assertTrue(0.60 <= c68 <= 0.76, (c68, c95))
        self.assertTrue(0.90 <= c95 <= 0.99, (c68, c95))
        # and the posterior means are closer to the truth than the encoder's
        enc = os.path.join(self.tmp, "enc.npz")
        rc, _, err = nmaem("infer", "--particles", self.star, "--model", self.run_dir, "-o", enc,
                           "--fit-iterations", 0)
        self.assertEqual(rc, 0, err)
        e_enc = np.linalg.norm(self.z_true - read_latent(enc).z, axis=1)
        e_em = np.linalg.norm(dz, axis=1)
        self.assertLess(np.median(e_em), 0.5 * np.median(e_enc))

    def test_shrinkage_check(self):
        from nmaem_plugin.core.inference.infer import shrinkage_profile
        self.assertIn("landscape scale:", self.out)
        lat = read_latent(self.latent)
        self.assertLessEqual(lat.shrinkage.low, 1.0, lat.shrinkage.verdict())
        self.assertGreaterEqual(lat.shrinkage.high, 1.0, lat.shrinkage.verdict())
        mu = lat.z.mean(0)
        shrunk = Latent(mu + 0.5 * (lat.z - mu), lat.shift, lat.index, lat.path,
                        z_cov=lat.z_cov * 0.25)
        prof = shrinkage_profile(self.star, self.run_dir, shrunk, device="cpu", bfactor=0.0)
        self.assertGreater(prof.low, 1.0, prof.verdict())
        self.assertIn("shrunk", prof.verdict())
        same = Latent(lat.z, lat.shift, lat.index, lat.path, z_cov=lat.z_cov)
        prof = shrinkage_profile(self.star, self.run_dir, same, device="cpu", bfactor=0.0)
        self.assertTrue(prof.low <= 1.0 <= prof.high, prof.verdict())

    def test_same_population_from_shrunk_and_unshrunk_starts(self):
        from nmaem_plugin.core.inference.deconvolve import deconvolve
        from nmaem_plugin.core.inference.infer import encode_images
        from nmaem_plugin.core.inference.particle_fit import prior_floor
        from nmaem_plugin.core.io.particles import read_particles
        from nmaem_plugin.core.learn.checkpoints import load_trained
        from nmaem_plugin.core.learn.data import ParticleImages, ParticleMetadata
        from nmaem_plugin.core.physics.likelihood import WhitenedLikelihood
        ae, cfg = load_trained(self.run_dir, "cpu")
        table = read_particles(self.star)
        dataset = ParticleImages(table, cfg["box"])
        _, images = dataset[np.arange(N)]
        shift, z, _ = encode_images(ae.encoder, images, "cpu")
        lik = WhitenedLikelihood.for_run(self.run_dir, cfg, "cpu")
        meta = ParticleMetadata(table, "cpu")
        floor = prior_floor(D, self.n_atoms)
        pops = []
        for s in (1.0, 0.3):
            start = np.concatenate([z.mean(0) + s * (z - z.mean(0)), shift], 1)
            res = deconvolve(ae.decoder, lik, dataset, meta, start.astype(np.float64),
                             ae.decoder.ctf, floor, torch.device("cpu"), 8, log=quiet)
            pops.append(res.population)
        scale = math.sqrt(self.n_atoms)
        for a in (pops[0], pops[1]):
            self.assertTrue(np.all(np.isfinite(a.cov)))
        # means and spreads agree to a small fraction of the states' separation (2.5 A)
        np.testing.assert_allclose(pops[0].mean / scale, pops[1].mean / scale, atol=0.05)
        np.testing.assert_allclose(np.sqrt(np.diag(pops[0].cov)) / scale,
                                   np.sqrt(np.diag(pops[1].cov)) / scale, atol=0.05)
        # and they are where the truth is
        np.testing.assert_allclose(pops[0].mean / scale, self.z_true.mean(0) / scale, atol=0.1)

    def test_subspace_search_finds_the_states_from_collapsed_starts(self):
        """Every particle started at the population mean (no spread at all): the search over
        the lowest modes (here all three) puts each near its true z and the population's
        weight at the two states."""
        from nmaem_plugin.core.inference.infer import encode_images
        from nmaem_plugin.core.inference.population import initial_population
        from nmaem_plugin.core.inference.particle_fit import prior_floor
        from nmaem_plugin.core.inference.subspace_search import subspace_search
        from nmaem_plugin.core.io.particles import read_particles
        from nmaem_plugin.core.learn.checkpoints import load_trained
        from nmaem_plugin.core.learn.data import ParticleImages, ParticleMetadata
        from nmaem_plugin.core.physics.likelihood import WhitenedLikelihood
        ae, cfg = load_trained(self.run_dir, "cpu")
        table = read_particles(self.star)
        dataset = ParticleImages(table, cfg["box"])
        _, images = dataset[np.arange(N)]
        shift, z, _ = encode_images(ae.encoder, images, "cpu")
        start = np.concatenate([np.tile(z.mean(0), (N, 1)), shift], 1).astype(np.float64)
        floor = prior_floor(D, self.n_atoms)
        pop = initial_population(start[:, :D], start[:, D:], floor[:D], floor[D:])
        lik = WhitenedLikelihood.for_run(self.run_dir, cfg, "cpu")
        found = subspace_search(ae.decoder, lik, dataset, ParticleMetadata(table, "cpu"), start,
                                pop, ae.decoder.ctf, torch.device("cpu"), log=quiet)
        scale = math.sqrt(self.n_atoms)
        means = np.array([self.z_true[self.state == k].mean(0) for k in (0, 1)])
        # each particle is moved to its own state (2.5 A RMSD apart, each 0.5 A wide;
        # 99.75 % measured)
        dist = np.linalg.norm(found.t[:, None, :] - means[None], axis=2)
        own = np.mean(np.argmin(dist, 1) == self.state)
        # the estimated distribution puts each state's share of the weight near it
        grid = np.stack(np.meshgrid(*found.axes, indexing="ij"), -1).reshape(-1, D)
        near = np.linalg.norm(grid[:, None, :] - means[None], axis=2) / scale < 1.0
        share = np.array([found.weights[near[:, k]].sum() for k in (0, 1)])
        true_share = np.array([np.mean(self.state == k) for k in (0, 1)])
        self.assertGreater(own, 0.95)     # 0.5 by chance from collapsed starts
        np.testing.assert_allclose(share, true_share, atol=0.1)
        # and its spread along each mode is the particles' true one
        mean = found.weights @ grid
        sd = np.sqrt(((grid - mean) ** 2 * found.weights[:, None]).sum(0))
        np.testing.assert_allclose(sd / scale, self.z_true.std(0) / scale, atol=0.15)
        self.assertIn("subspace search over modes 1/2/3", found.describe(self.n_atoms))


if __name__ == "__main__":
    unittest.main()
