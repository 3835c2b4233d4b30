"""The fit check (core/fitcheck.py): a correct dataset passes, each injected fault is named.

One realistic small dataset is made once: adenylate kinase (CA atoms, to keep it fast) at
48 px and 3 A/px by ``simulate`` without noise, then, as RELION particles are: a contrast
per particle (uniform 0.5-1.5), coloured noise (power falling with frequency) at about
-10 dB, pose errors (2 degrees rms on each angle written to the STAR) and RELION's
normalisation (background mean 0, sd 1). Faults are injected into copies: the model
translated (docking), translated by -(D//2)*apix (origin convention), mirrored (hand), the
STAR's pixel size edited (x 1.1), the images negated (contrast).
"""
import contextlib
import io
import os
import shutil
import tempfile
import unittest

import numpy as np

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.cli import main as cli
from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.physics.fitcheck import fit_check
from nmaem_plugin.core.io.particles import read_particles
from nmaem_plugin.core.io.stacks import ImageStack, write_stack
from nmaem_plugin.core.io.star import write_star
from nmaem_plugin.core.physics.noise import radius_grid
from nmaem_plugin.core.sim.simulate import SimulationSettings, simulate
from nmaem_plugin.core.physics.structure import read_model, write_model

BOX, APIX, N = 48, 3.0, 150
CHECK = dict(n=N, device="cpu")


def quiet(*a, **k):
    pass


def make_realistic(sim_dir, out_dir, rng, snr_db=-10.0, angle_error=2.0, negate=False):
    """RELION-like particles from a noise-free simulation; returns the new STAR path."""
    table = read_particles(os.path.join(sim_dir, "particles.star"))
    with ImageStack(table) as st:
        clean = st.read(np.arange(table.n)).astype(np.float64)
    D = clean.shape[-1]
    clean *= rng.uniform(0.5, 1.5, size=(len(clean), 1, 1))
    filt = np.sqrt(1.0 / (1.0 + (radius_grid(D) / 4.0) ** 2) + 0.1)
    noise = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(clean.shape)) * filt, s=(D, D))
    noise *= np.sqrt(clean.var() / noise.var() / 10 ** (snr_db / 10))
    img = clean + noise
    y, x = np.mgrid[0:D, 0:D] - D // 2
    bg = np.hypot(x, y) > 0.4 * D
    img = (img - img[:, bg].mean(1)[:, None, None]) / img[:, bg].std(1)[:, None, None]
    if negate:
        img = -img
    os.makedirs(out_dir, exist_ok=True)
    stack = os.path.join(out_dir, "particles.mrcs")
    write_stack(stack, img.astype(np.float32), table.apix[0])
    table.stack_paths = np.array([os.path.abspath(stack)] * table.n)
    table.stack_index = np.arange(table.n)
    table.euler = table.euler + rng.normal(0.0, angle_error, table.euler.shape)
    star = os.path.join(out_dir, "particles.star")
    write_star(star, table)
    return star


class TestFitCheck(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="nmaem_fitcheck_")
        ak = read_model(os.path.join(DATA_DIR, "ak_open_4ake.pdb"))
        ca = ak.select(ak.atom_name == "CA")
        sim = os.path.join(cls.tmp, "sim")
        simulate(sim, ca, ca.coords[None],
                 SimulationSettings(n=N, box=BOX, apix=APIX, snr_db=None, shift_std=2.0,
                                    seed=1), device="cpu", log=quiet)
        cls.ref_path = os.path.join(sim, "reference.pdb")
        cls.ref = read_model(cls.ref_path)
        rng = np.random.default_rng(7)
        cls.star = make_realistic(sim, os.path.join(cls.tmp, "real"), rng)
        cls.neg_star = make_realistic(sim, os.path.join(cls.tmp, "neg"),
                                      np.random.default_rng(7), negate=True)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def write_ref(self, coords, name):
        path = os.path.join(self.tmp, name)
        write_model(path, self.ref, coords)
        return path

    def test_correct_passes(self):
        res = fit_check(self.star, self.ref_path, **CHECK)
        self.assertEqual(res["verdict"], "pass", res["message"])
        self.assertIsNone(res["cause"])
        self.assertGreater(res["scores"]["z"], 5.0)
        self.assertGreater(res["scores"]["scale_median"], 0.0)
        # the estimates agree with the truth even when nothing is wrong
        self.assertLess(np.abs(res["estimates"]["translation_A"]).max(), 1.5)
        self.assertAlmostEqual(res["estimates"]["scale"], 1.0, delta=0.02)
        # a coarser band crops the images (48 px at 3 A -> 32 px at 4.5 A for 9 A) and passes
        low = fit_check(self.star, self.ref_path, resolution_high=9.0, **CHECK)
        self.assertEqual((low["box"], low["apix"]), (32, 4.5))
        self.assertEqual(low["verdict"], "pass", low["message"])
        # command line: passes, prints the numbers
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            rc = cli.main(["check", "--particles", self.star, "--ref", self.ref_path,
                           "--n", "80", "--device", "cpu"])
        self.assertEqual(rc, 0)
        self.assertIn("PASS", out.getvalue())
        self.assertIn("shuffled poses", out.getvalue())

    def test_docking_offset(self):
        t = np.array([6.0, -5.0, 4.0])
        ref = self.write_ref(self.ref.coords + t, "moved.pdb")
        res = fit_check(self.star, ref, **CHECK)
        self.assertEqual(res["cause"], "offset", res["message"])
        np.testing.assert_allclose(res["estimates"]["translation_A"], -t, atol=1.5)
        self.assertIn("not docked", res["message"])
        self.assertTrue(res["message"].startswith(ref + ": "))

    def test_origin_convention(self):
        ref = self.write_ref(self.ref.coords - (BOX // 2) * APIX, "centred.pdb")
        res = fit_check(self.star, ref, **CHECK)
        self.assertEqual(res["cause"], "origin", res["message"])
        self.assertIn("(D//2)*apix", res["message"])
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = cli.main(["check", "--particles", self.star, "--ref", ref, "--n", "80",
                           "--device", "cpu"])
        self.assertEqual(rc, 2)
        last = err.getvalue().strip().splitlines()[-1]
        self.assertTrue(last.startswith("nmaem: error: %s: map origin convention" % ref), last)
        # --force reports and exits 0
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = cli.main(["check", "--particles", self.star, "--ref", ref, "--n", "80",
                           "--device", "cpu", "--force"])
        self.assertEqual(rc, 0)

    def test_hand(self):
        c = (BOX // 2) * APIX
        x = self.ref.coords.copy()
        x[:, 2] = 2 * c - x[:, 2]
        res = fit_check(self.star, self.write_ref(x, "mirror.pdb"), **CHECK)
        self.assertEqual(res["cause"], "hand", res["message"])

    def test_pixel_size(self):
        table = read_particles(self.star)
        table.apix = table.apix * 1.1
        table.origin = table.origin * 1.1
        star = os.path.join(self.tmp, "real", "apix.star")
        write_star(star, table)
        res = fit_check(star, self.ref_path, **CHECK)
        self.assertEqual(res["cause"], "pixel_size", res["message"])
        self.assertAlmostEqual(res["estimates"]["scale"], 1.1, delta=0.02)
        self.assertAlmostEqual(res["estimates"]["pixel_size"], APIX, delta=0.06)
        alt = {a["name"]: a for a in res["alternatives"]}
        self.assertGreater(alt["pixel_size"]["rho"], alt["offset"]["rho"])
        self.assertTrue(res["message"].startswith(star + ": wrong pixel size"))

    def test_contrast(self):
        res = fit_check(self.neg_star, self.ref_path, **CHECK)
        self.assertEqual(res["cause"], "contrast", res["message"])
        self.assertIn("inverted contrast", res["message"])

    def test_no_poses(self):
        table = read_particles(self.star)
        table.euler = None
        star = os.path.join(self.tmp, "real", "noposes.star")
        write_star(star, table)
        with self.assertRaisesRegex(NmaemError, "^%s: no poses" % star):
            fit_check(star, self.ref_path, **CHECK)


if __name__ == "__main__":
    unittest.main()
