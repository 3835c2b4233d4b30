"""The realistic simulator: each nuisance of real data does what docs/simulation.md says,
keeps its ground truth, and leaves everything else unchanged (independent streams)."""
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.io.particles import read_particles
from nmaem_plugin.core.io.stacks import ImageStack
from nmaem_plugin.core.sim.nuisances import (Nuisances, coloured_noise, random_rotation_errors,
                                             relion_normalise)
from nmaem_plugin.core.io.poses import rotation_angle_deg
from nmaem_plugin.core.sim.simulate import SimulationSettings, morph_frames, simulate
from nmaem_plugin.core.physics.structure import kabsch, match_atoms, read_model, read_trajectory

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")
NMAEM = [sys.executable, "-m", "nmaem_plugin"]


def quiet(*a, **k):
    pass


def images_of(d):
    t = read_particles(os.path.join(d, "particles.star"))
    with ImageStack(t) as s:
        return t, s.read(np.arange(t.n)).astype(np.float64)


class TestNuisanceFunctions(unittest.TestCase):
    def test_coloured_noise_spectrum(self):
        """Radial power of coloured noise follows R ** (-s / s_N), total variance sigma^2
        (measured with numpy's FFT, shells averaged over 400 images)."""
        D, R, sigma = 64, 10.0, 2.5
        gen = torch.Generator().manual_seed(3)
        x = coloured_noise((400, D, D), sigma, R, generator=gen).double().numpy()
        self.assertAlmostEqual(x.var() / sigma ** 2, 1.0, delta=0.02)
        p = (np.abs(np.fft.fft2(x)) ** 2).mean(0) / D ** 2
        k = np.fft.fftfreq(D, 1.0 / D)
        s = np.hypot(k[:, None], k[None, :]) / (D / 2)
        lo = p[(s > 0.1) & (s < 0.2)].mean() / np.exp(-np.log(R) * 0.15)
        hi = p[(s > 0.9) & (s < 1.0)].mean() / np.exp(-np.log(R) * 0.95)
        # both shells measure the same normalisation constant: the shape is R ** (-s)
        self.assertAlmostEqual(lo / hi, 1.0, delta=0.05)
        # white noise for R = 1 is exactly the generator's draws
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        np.testing.assert_array_equal(coloured_noise((2, 8, 8), 1.0, 1.0, generator=g1),
                                      torch.randn((2, 8, 8), generator=g2))

    def test_relion_normalise(self):
        """Background outside 0.75 of the half box: mean 0, sd 1 (computed by hand)."""
        rng = np.random.default_rng(0)
        D = 48
        x = rng.normal(3.0, 7.0, (5, D, D))
        y = relion_normalise(torch.as_tensor(x.copy()), 0.75).numpy()
        yy, xx = np.mgrid[:D, :D]
        bg = (xx - D // 2) ** 2 + (yy - D // 2) ** 2 > (0.75 * D / 2) ** 2
        for i in range(5):
            self.assertAlmostEqual(y[i][bg].mean(), 0.0, places=10)
            self.assertAlmostEqual(y[i][bg].std(), 1.0, places=10)
            # an affine map of the input
            a = np.polyfit(x[i].ravel(), y[i].ravel(), 1)
            np.testing.assert_allclose(np.polyval(a, x[i]), y[i], atol=1e-9)

    def test_rotation_errors_rms(self):
        """The rms angle of the error rotations is the requested sd (20,000 draws)."""
        E = random_rotation_errors(20000, 3.0, np.random.default_rng(1))
        ang = rotation_angle_deg(E, np.broadcast_to(np.eye(3), E.shape))
        self.assertAlmostEqual(np.sqrt((ang ** 2).mean()), 3.0, delta=0.05)
        np.testing.assert_allclose(E @ np.transpose(E, (0, 2, 1)),
                                   np.broadcast_to(np.eye(3), E.shape), atol=1e-12)

    def test_bad_values(self):
        for bad in (dict(noise_falloff=0.5), dict(contrast_sd=-1), dict(angle_error_sd=np.nan),
                    dict(bg_radius=1.2)):
            with self.assertRaises(NmaemError) as cm:
                Nuisances(**bad)
            self.assertNotIn("\n", str(cm.exception))


class TestRealisticSimulation(unittest.TestCase):
    """Small morph datasets (48 px), each nuisance against the plain dataset of the same
    seed: the base draws are shared, so differences are the nuisance's alone."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="nmaem-nuis-")
        model, frames = morph_frames(read_model(OPEN), read_model(CLOSED), 5)
        cls.model, cls.frames = model, frames
        cls.settings = SimulationSettings(n=64, box=48, apix=3.0, distribution="uniform",
                                          shift_std=2.0, seed=4)
        cls.plain = cls.make("plain", snr_db=None)

    @classmethod
    def make(cls, name, reference_model=None, **kw):
        d = os.path.join(cls.tmp, name)
        simulate(d, cls.model, cls.frames, cls.settings.with_(**kw), log=quiet,
                 device="cpu", reference_model=reference_model)
        return d

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_pose_origin_defocus_errors_only_in_the_star(self):
        d = self.make("errors", snr_db=None, nuisances=Nuisances(
            angle_error_sd=2.0, origin_error_sd=0.5, defocus_error_sd=300.0))
        t0, im0 = images_of(self.plain)
        t1, im1 = images_of(d)
        np.testing.assert_array_equal(im0, im1)          # same images
        gt = np.load(os.path.join(d, "ground_truth.npz"))
        # truth kept, file differs by the errors
        np.testing.assert_allclose(gt["euler"], t0.euler, atol=1e-9)
        np.testing.assert_allclose(gt["euler_file"], t1.euler, atol=1e-9)
        ang = rotation_angle_deg(t0.rotation_matrices(), t1.rotation_matrices())
        self.assertTrue(0.5 < np.sqrt((ang ** 2).mean()) < 4.0, ang)
        do = t1.origin - t0.origin
        self.assertTrue(0.2 < do.std() < 1.0, do.std())
        np.testing.assert_allclose(gt["origin_file"], t1.origin, atol=1e-6)
        dd = t1.defocus_u - t0.defocus_u
        np.testing.assert_allclose(t1.defocus_v - t0.defocus_v, dd, atol=1e-6)
        self.assertTrue(150 < dd.std() < 500, dd.std())
        np.testing.assert_allclose(gt["defocus_u"], t0.defocus_u)

    def test_contrast_offset_normalisation(self):
        """image = a_i * clean + b_i (no noise), then RELION normalisation: an affine map
        of the plain image, per particle, with slope sign +."""
        d = self.make("contrast", snr_db=None, nuisances=Nuisances(contrast_sd=0.3))
        _, im0 = images_of(self.plain)
        _, im1 = images_of(d)
        a = np.load(os.path.join(d, "ground_truth.npz"))["contrast"]
        np.testing.assert_allclose(im1, a[:, None, None] * im0, rtol=1e-5, atol=1e-7)
        self.assertAlmostEqual(np.log(a).std(), 0.3, delta=0.1)
        d = self.make("normalised", snr_db=0.0, nuisances=Nuisances(
            contrast_sd=0.3, offset_sd=1.0, normalise=True))
        _, im2 = images_of(d)
        D = im2.shape[-1]
        yy, xx = np.mgrid[:D, :D]
        bg = (xx - D // 2) ** 2 + (yy - D // 2) ** 2 > (0.75 * D / 2) ** 2
        np.testing.assert_allclose(im2[:, bg].mean(1), 0.0, atol=1e-5)
        np.testing.assert_allclose(im2[:, bg].std(1), 1.0, atol=1e-5)

    def test_bfactor_envelope(self):
        """The images' Fourier transforms are the plain dataset's times exp(-B s^2 / 4)
        (computed here with numpy), and the STAR does not carry the B-factor."""
        B, D, apix = 80.0, 48, 3.0
        d = self.make("bfac", snr_db=None, nuisances=Nuisances(bfactor=B))
        t, im = images_of(d)
        self.assertTrue(np.all(t.ctf_bfactor == 0))      # not in the STAR
        _, im0 = images_of(self.plain)
        F, F0 = np.fft.rfft2(im), np.fft.rfft2(im0)
        ky = np.fft.fftfreq(D)[:, None] / apix
        kx = np.fft.rfftfreq(D)[None, :] / apix
        env = np.exp(-B * (kx ** 2 + ky ** 2) / 4.0)
        strong = np.abs(F0) > 1e-3 * np.abs(F0).max()
        self.assertGreater(strong.sum(), 1000)
        ratio = (F / np.where(strong, F0, 1.0))[strong]
        np.testing.assert_allclose(ratio.real, np.broadcast_to(env, F.shape)[strong],
                                   atol=2e-3)
        np.testing.assert_allclose(ratio.imag, 0.0, atol=2e-3)

    def test_atom_jitter_and_reference_model(self):
        d = self.make("jitter", snr_db=None, nuisances=Nuisances(atom_jitter=0.5),
                      reference_model=read_model(CLOSED))
        f0 = read_trajectory(os.path.join(self.plain, "frames.pdb"))[1]
        f1 = read_trajectory(os.path.join(d, "frames.pdb"))[1]
        dev = (f1 - f0).reshape(-1)
        self.assertAlmostEqual(dev.std(), 0.5, delta=0.02)
        ref = read_model(os.path.join(d, "reference.pdb"))
        closed = read_model(CLOSED)
        self.assertEqual(list(ref.atom_name), list(closed.atom_name))
        # superposed on the plain dataset's frame 0: a fresh Kabsch fit moves it no further
        ref0 = read_model(os.path.join(self.plain, "reference.pdb"))
        ia, ib = match_atoms(ref0, ref)
        R, t = kabsch(ref.coords[ib], ref0.coords[ia])
        np.testing.assert_allclose(R, np.eye(3), atol=2e-5)  # PDB: 3 decimals
        np.testing.assert_allclose(t, 0.0, atol=3e-3)

    def test_cli_realistic_and_bad_option(self):
        out = os.path.join(self.tmp, "cli")
        r = subprocess.run(NMAEM + ["simulate", "-o", out, "--ref", OPEN, "--n", "8",
                                    "--box", "32", "--apix", "4", "--realistic",
                                    "--angle-error", "0"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        import json
        p = json.loads(str(np.load(os.path.join(out, "ground_truth.npz"))["params"]))
        self.assertEqual(p["nuisances"]["angle_error_sd"], 0.0)
        self.assertTrue(p["nuisances"]["normalise"])
        self.assertEqual(p["nuisances"]["noise_falloff"], 10.0)
        r = subprocess.run(NMAEM + ["simulate", "-o", out + "2", "--ref", OPEN, "--n", "8",
                                    "--box", "32", "--contrast-sd", "-1"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertIn("--contrast-sd must be >= 0", lines[0])
        self.assertFalse(os.path.exists(os.path.join(out + "2", "particles.star")))


if __name__ == "__main__":
    unittest.main()


class TestConsensusPoses(unittest.TestCase):
    def test_rigid_core_of_a_two_domain_toy(self):
        """A 60-atom domain that moves rigidly (20 degrees about an off-centre axis, plus a
        translation) and a 20-atom domain that moves on its own: the core is the large
        domain, and consensus_errors gives back the inverse of its motion."""
        from nmaem_plugin.core.sim.nuisances import consensus_errors, rigid_core
        from nmaem_plugin.core.io.poses import rotvec_to_matrix
        rng = np.random.default_rng(3)
        ref = np.concatenate([rng.normal(0, 8, (60, 3)), rng.normal(0, 4, (20, 3)) + 25])
        Q = rotvec_to_matrix(np.radians(20.0) * np.array([0.0, 0.6, 0.8]))
        p, shift = np.array([3.0, -2.0, 5.0]), np.array([1.0, 2.0, -1.5])
        moved = ref.copy()
        moved[:60] = (ref[:60] - p) @ Q.T + p + shift
        moved[60:] = ref[60:] + rng.normal(0, 6, (20, 3))
        frames = np.stack([ref, moved])
        core = rigid_core(ref, frames)
        np.testing.assert_array_equal(core, np.arange(80) < 60)
        c = np.array([10.0, 10.0, 10.0])
        R, t = consensus_errors(ref, frames, core, c)
        np.testing.assert_allclose(R[0], np.eye(3), atol=1e-9)
        np.testing.assert_allclose(t[0], 0, atol=1e-9)
        np.testing.assert_allclose(R[1], Q.T, atol=1e-9)
        # x_ref - c = R (x_f - c) + t on the core, by the definition
        np.testing.assert_allclose((moved[:60] - c) @ R[1].T + t[1], ref[:60] - c, atol=1e-9)

    def test_consensus_poses_align_the_core(self):
        """In the STAR of a morph with --consensus-poses, the reference's core atoms placed
        with the written pose and origin land where the particle's frame puts them (within
        the core's own flexibility), its other atoms do not; the written error grows
        along the morph, and ground_truth.npz keeps both rotations."""
        from nmaem_plugin.core.io.poses import euler_to_matrix
        tmp = tempfile.mkdtemp(prefix="nmaem-consensus-")
        try:
            model, frames = morph_frames(read_model(OPEN), read_model(CLOSED), 6)
            simulate(tmp, model, frames,
                     SimulationSettings(n=24, box=32, apix=3.0, snr_db=None, seed=1,
                                        shift_std=2.0,
                                        nuisances=Nuisances(consensus_poses=True)),
                     device="cpu", log=quiet)
            gt = np.load(os.path.join(tmp, "ground_truth.npz"))
            t = read_particles(os.path.join(tmp, "particles.star"))
            _, fr = read_trajectory(os.path.join(tmp, "frames.pdb"))
            ref = read_model(os.path.join(tmp, "reference.pdb")).coords
            core = gt["rigid_core"]
            self.assertTrue(50 < core.sum() < len(core) - 50)
            c = np.full(3, 16 * 3.0)
            A_true = euler_to_matrix(*gt["euler"].T)
            A_file = t.rotation_matrices()
            np.testing.assert_allclose(A_file, euler_to_matrix(*gt["euler_file"].T),
                                       atol=1e-9)

            def placed(A, X, shift):
                return np.einsum("nij,nmj->nmi", A, X - c)[..., :2] + shift[:, None]
            true_xy = placed(A_true, fr[gt["frame"]], gt["shift"].astype(np.float64))
            file_xy = placed(A_file, np.repeat(ref[None], t.n, 0), -t.origin_or_zero())
            dist = np.linalg.norm(true_xy - file_xy, axis=2)
            self.assertLess(np.sqrt(np.mean(dist[:, core] ** 2)), 1.0)
            far = gt["frame"] == 5
            self.assertTrue(far.any())
            self.assertGreater(np.sqrt(np.mean(dist[far][:, ~core] ** 2)), 3.0)
            ang = rotation_angle_deg(A_true, A_file)
            np.testing.assert_allclose(ang[gt["frame"] == 0], 0.0, atol=1e-6)
            means = [ang[gt["frame"] == f].mean() for f in range(6) if (gt["frame"] == f).any()]
            self.assertTrue(np.all(np.diff(means) > 0), means)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
