"""The simulator: SNR, frame distributions, reproducibility, bounded memory, contracts."""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import mrcfile
import numpy as np
import torch

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.physics.renderer import Renderer
from nmaem_plugin.core.physics.rotations import matrix_to_euler
from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.io.particles import read_particles
from nmaem_plugin.core.io.stacks import ImageStack
from nmaem_plugin.core.sim.simulate import (SimulationSettings, frame_probabilities,
                                            lognormal_defocus, morph_frames, simulate,
                                            uniform_rotations)
from nmaem_plugin.core.physics.structure import read_model, read_trajectory, rmsd

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")
NMAEM = [sys.executable, "-m", "nmaem_plugin"]


def quiet(*a, **k):
    pass


class SimTestCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nmaem-sim-")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


class TestSampling(unittest.TestCase):
    def test_distribution_shapes(self):
        """Histograms of 20,000 draws have the requested shapes."""
        rng = np.random.default_rng(0)
        F = 50
        h = {d: np.bincount(rng.choice(F, 20000, p=frame_probabilities(F, d)), minlength=F)
             for d in ("uniform", "continuous", "discontinuous")}
        # uniform: chi-square against the flat histogram (49 dof: 99.9% quantile ~ 85)
        e = 20000 / F
        self.assertLess(((h["uniform"] - e) ** 2 / e).sum(), 85)
        # continuous: every frame populated, three local maxima near 0.2, 0.5, 0.8 of 49
        c = np.convolve(h["continuous"], np.ones(3) / 3, mode="same")
        self.assertTrue(np.all(h["continuous"] > 0))
        peaks = [i for i in range(2, F - 2) if c[i] == c[i - 2:i + 3].max()]
        self.assertEqual(len(peaks), 3, peaks)
        np.testing.assert_allclose(peaks, [9.8, 24.5, 39.2], atol=2.5)
        # the dips between peaks are well above zero (overlapping components)
        self.assertGreater(c[17], 0.3 * c[peaks[0]])
        # discontinuous: three separated islands of populated frames
        occ = h["discontinuous"] > 0
        islands = np.flatnonzero(np.diff(np.r_[0, occ.astype(int), 0]) == 1)
        self.assertEqual(len(islands), 3)
        centres = [np.average(np.arange(F), weights=h["discontinuous"] * (abs(np.arange(F) - m) < 8))
                   for m in (8.2, 24.5, 40.8)]
        np.testing.assert_allclose(centres, [49 / 6, 24.5, 49 * 5 / 6], atol=0.5)
        with self.assertRaises(NmaemError):
            frame_probabilities(50, "bimodal")

    def test_uniform_rotations(self):
        """Uniform on SO(3): proper rotations, E[R] = 0, cos(tilt) uniform on [-1, 1]."""
        R = uniform_rotations(20000, np.random.default_rng(1))
        np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape),
                                   atol=1e-12)
        np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
        self.assertLess(np.abs(R.mean(0)).max(), 0.02)
        _, tilt, _ = matrix_to_euler(R)
        hist = np.histogram(np.cos(np.deg2rad(tilt)), bins=10, range=(-1, 1))[0]
        self.assertLess(np.abs(hist / 2000.0 - 1).max(), 0.1)

    def test_lognormal_defocus(self):
        d = lognormal_defocus(200000, 1.0, 0.3, np.random.default_rng(2)) / 1e4
        self.assertAlmostEqual(d.mean(), 1.0, delta=0.005)
        self.assertAlmostEqual(d.std(), 0.3, delta=0.005)
        self.assertGreater(d.min(), 0)

    def test_morph(self):
        a, b = read_model(OPEN), read_model(CLOSED)
        model, frames = morph_frames(a, b, 11)
        self.assertEqual(frames.shape, (11, 1656, 3))
        np.testing.assert_allclose(frames[0], a.coords)
        # last frame: the closed model superposed on the open one (all-atom RMSD after fit)
        ca = a.atom_name == "CA"
        self.assertAlmostEqual(rmsd(frames[-1][ca], frames[0][ca]), 7.13, delta=0.05)
        # intermediate frames lie on the straight line
        np.testing.assert_allclose(frames[5], 0.5 * (frames[0] + frames[-1]), atol=1e-9)


class TestSimulate(SimTestCase):
    def test_dataset_contract_and_snr(self):
        """1,000 images at -20 dB: measured SNR within 5 %; files as the contract says."""
        model, frames = morph_frames(read_model(OPEN), read_model(CLOSED), 10)
        out = os.path.join(self.tmp, "d")
        simulate(out, model, frames,
                 SimulationSettings(n=1000, distribution="continuous", box=48, apix=2.0,
                                    snr_db=-20.0, shift_std=1.5, seed=3),
                 chunk=400, log=quiet)
        for f in ("particles.star", "ground_truth.npz", "frames.pdb", "reference.pdb"):
            self.assertTrue(os.path.isfile(os.path.join(out, f)), f)
        table = read_particles(os.path.join(out, "particles.star"))
        self.assertEqual(table.n, 1000)
        np.testing.assert_array_equal(table.box, 48)
        np.testing.assert_allclose(table.apix, 2.0)
        gt = np.load(os.path.join(out, "ground_truth.npz"))
        self.assertEqual(gt["frame"].shape, (1000,))
        self.assertEqual(gt["shift"].shape, (1000, 2))
        self.assertEqual(gt["shift"].dtype, np.float32)
        np.testing.assert_allclose(table.origin, -gt["shift"], atol=1e-6)  # origin = -shift
        self.assertEqual(len(os.listdir(os.path.join(out, "stacks"))), 3)
        # SNR measured here, independently: re-render the clean images from the files
        _, fr = read_trajectory(os.path.join(out, "frames.pdb"))
        r = Renderer(model.elements, 48, 2.0)
        idx = np.arange(1000)
        t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
        ctf = r.ctf(defocus_u=t(table.defocus_u), defocus_v=t(table.defocus_v),
                    defocus_angle=t(table.defocus_angle), voltage=t(table.voltage),
                    cs=t(table.cs), amp_contrast=t(table.amp_contrast))
        with torch.no_grad():
            clean = r.render(t(fr[gt["frame"]]), t(table.rotation_matrices()),
                             t(-table.origin), ctf).numpy()
        with ImageStack(table) as st:
            noisy = st.read(idx)
        snr_lin = clean.reshape(1000, -1).var(1).mean() / (noisy - clean).reshape(1000, -1).var(1).mean()
        self.assertLess(abs(snr_lin / 10 ** (-20 / 10.0) - 1.0), 0.05)
        # the noise is white and Gaussian around the clean image
        resid = (noisy - clean).ravel()
        self.assertLess(abs(resid.mean()) / resid.std(), 0.01)
        self.assertLess(abs(((resid / resid.std()) ** 4).mean() - 3.0), 0.05)
        # frames.pdb is in the dataset frame: the reference's centre at the box centre
        ref = read_model(os.path.join(out, "reference.pdb"))
        np.testing.assert_allclose(ref.coords.mean(0), [48.0, 48.0, 48.0], atol=1e-3)
        np.testing.assert_allclose(fr[0], ref.coords, atol=1e-3)

    def test_same_seed_same_files(self):
        model, frames = morph_frames(read_model(OPEN), read_model(CLOSED), 5)

        def digest(out):
            h = {}
            for root, _, files in os.walk(out):
                for f in files:
                    p = os.path.join(root, f)
                    with open(p, "rb") as fh:
                        h[os.path.relpath(p, out)] = hashlib.sha256(fh.read()).hexdigest()
            return h
        st = SimulationSettings(n=120, distribution="uniform", box=32, apix=3.0,
                                snr_db=-10.0, seed=11, shift_std=1.0)
        simulate(os.path.join(self.tmp, "a"), model, frames, st, chunk=50, log=quiet)
        simulate(os.path.join(self.tmp, "b"), model, frames, st, chunk=50, log=quiet)
        da, db = digest(os.path.join(self.tmp, "a")), digest(os.path.join(self.tmp, "b"))
        self.assertEqual(set(da), set(db))
        for k in da:      # the manifest records its process and time (io/outputs.py)
            if k != "ground_truth.npz" and not k.startswith(".nmaem-"):
                self.assertEqual(da[k], db[k], k)
        ga, gb = (np.load(os.path.join(self.tmp, d, "ground_truth.npz")) for d in "ab")
        for k in ("frame", "shift", "euler", "defocus_u"):
            np.testing.assert_array_equal(ga[k], gb[k])
        # another seed gives other images
        simulate(os.path.join(self.tmp, "c"), model, frames, st.with_(seed=12), chunk=50,
                 log=quiet)
        dc = digest(os.path.join(self.tmp, "c"))
        self.assertNotEqual(da["stacks/particles_00000.mrcs"], dc["stacks/particles_00000.mrcs"])

    def test_like_uses_the_files_poses_and_ctf(self):
        """--like renders the STAR's own poses, origins and CTFs at its box and pixel size."""
        model, frames = morph_frames(read_model(OPEN), read_model(CLOSED), 4)
        src = os.path.join(self.tmp, "src")
        simulate(src, model, frames, SimulationSettings(n=40, box=40, apix=2.5, snr_db=None,
                                                        shift_std=2.0, seed=5), log=quiet)
        like = read_particles(os.path.join(src, "particles.star"))
        ref = read_model(os.path.join(src, "reference.pdb"))  # docked in the map frame
        out = os.path.join(self.tmp, "like")
        simulate(out, ref, ref.coords[None], SimulationSettings(n=None, snr_db=None),
                 like=like, log=quiet)
        t2 = read_particles(os.path.join(out, "particles.star"))
        np.testing.assert_array_equal(t2.euler, like.euler)
        np.testing.assert_array_equal(t2.origin, like.origin)
        np.testing.assert_array_equal(t2.defocus_u, like.defocus_u)
        # particles of frame 0 are identical images in both datasets
        g = np.load(os.path.join(src, "ground_truth.npz"))["frame"]
        sel = np.flatnonzero(g == 0)
        self.assertGreater(len(sel), 3)
        with ImageStack(like) as a, ImageStack(t2) as b:
            np.testing.assert_allclose(b.read(sel), a.read(sel), atol=1e-4 * np.abs(a.read(sel)).max())

    def test_refuses_to_overwrite(self):
        out = os.path.join(self.tmp, "d")
        a = read_model(OPEN)
        st = SimulationSettings(n=5, box=32, apix=3.0)
        simulate(out, a, a.coords[None], st, log=quiet)
        with self.assertRaises(NmaemError) as cm:
            simulate(out, a, a.coords[None], st, log=quiet)
        self.assertIn("--overwrite", str(cm.exception))
        simulate(out, a, a.coords[None], st, log=quiet, overwrite=True)


class TestSimulationSettings(unittest.TestCase):
    def test_validate_names_the_option(self):
        """Each rule of a dataset's settings gives one line naming its option."""
        self.assertEqual(SimulationSettings().validate().n, 1000)
        SimulationSettings(n=None, snr_db=None).validate()      # n None: a --like file's
        cases = [(dict(n=0), "--n must be at least 1"),
                 (dict(box=30 + 1), "--box must be even"), (dict(box=6), "at least 8"),
                 (dict(apix=0.0), "--apix must be a positive number"),
                 (dict(snr_db=float("nan")), "--snr-db must be a finite number"),
                 (dict(snr_db=float("inf")), "--no-noise"),
                 (dict(defocus_mean=0.0), "defocus mean must be > 0"),
                 (dict(defocus_std=-0.1), "std >= 0"),
                 (dict(distribution="bimodal"), "unknown distribution 'bimodal'")]
        for kw, msg in cases:
            with self.assertRaises(NmaemError, msg=kw) as cm:
                SimulationSettings(**kw).validate()
            self.assertIn(msg, str(cm.exception))
            self.assertNotIn("\n", str(cm.exception))

    def test_settings_are_frozen(self):
        st = SimulationSettings(seed=3)
        with self.assertRaises(Exception):
            st.seed = 4
        self.assertEqual((st.with_(seed=4).seed, st.seed), (4, 3))


class TestSimulateCommand(SimTestCase):
    def run_cli(self, *args):
        return subprocess.run(NMAEM + list(args), capture_output=True, text=True)

    def test_bad_input_one_line_errors(self):
        bad_pdb = os.path.join(self.tmp, "bad.pdb")
        with open(bad_pdb, "w") as f:
            f.write("ATOM      1  CA  ALA A   1      nan    0.000   0.000  1.00  0.00           C\n")
        unknown = os.path.join(self.tmp, "unknown.pdb")
        with open(unknown, "w") as f:
            f.write("ATOM      1  CA  ALA A   1       1.000   0.000   0.000  1.00  0.00           Qx\n")
        other = os.path.join(self.tmp, "other.pdb")
        with open(other, "w") as f:
            f.write("ATOM      1  CA  ALA Z 900       1.000   0.000   0.000  1.00  0.00           C\n")
        missing = os.path.join(self.tmp, "missing.pdb")
        cases = [
            (["--ref", missing], "no such model file"),
            (["--ref", unknown], "unknown element"),
            (["--ref", OPEN, "--target", other], "share no atoms"),
            (["--ref", OPEN, "--like", os.path.join(self.tmp, "none.star")], "no such particle file"),
        ]
        for extra, msg in cases:
            p = self.run_cli("simulate", "-o", os.path.join(self.tmp, "o"), "--n", "2",
                             "--box", "32", *extra)
            self.assertEqual(p.returncode, 2, (extra, p.stderr))
            # (--box with --like: also a warning that it does nothing there)
            lines = [ln for ln in p.stderr.strip().splitlines()
                     if not ln.startswith("nmaem: warning: ")]
            self.assertEqual(len(lines), 1, p.stderr)
            self.assertTrue(lines[0].startswith("nmaem: error: "), lines[0])
            self.assertIn(msg, lines[0])

    def test_help(self):
        for cmd in ([], ["simulate"]):
            p = self.run_cli(*cmd, "--help")
            self.assertEqual(p.returncode, 0)
            self.assertIn("usage: nmaem", p.stdout)

    def test_memory_bounded_20000_images_192px(self):
        """A 20,000-image run at 192 px stays under 1 GiB of resident memory."""
        out = os.path.join(self.tmp, "big")
        # VmHWM (the peak RSS of this process image), not getrusage's ru_maxrss, which on
        # Linux keeps the parent's peak from before the fork: the test runner is large
        code = ("import sys\n"
                "from nmaem_plugin.core.cli.main import main\n"
                "rc = main(sys.argv[1:])\n"
                "hwm = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
                "print('MAXRSS_KB', hwm)\n"
                "sys.exit(rc)\n")
        p = subprocess.run([sys.executable, "-c", code, "simulate", "--ref", OPEN, "--n", "20000",
                            "--box", "192", "--apix", "0.8", "-o", out, "--device", "cpu"],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr[-2000:])
        kb = int(p.stdout.split("MAXRSS_KB")[1].split()[0])
        size = sum(os.path.getsize(os.path.join(out, "stacks", f))
                   for f in os.listdir(os.path.join(out, "stacks")))
        self.assertGreater(size, 20000 * 192 * 192 * 4)      # the images are all there
        self.assertLess(kb * 1024, 1 << 30, "peak RSS %.0f MiB" % (kb / 1024))
        last = sorted(os.listdir(os.path.join(out, "stacks")))[-1]
        with mrcfile.mmap(os.path.join(out, "stacks", last), permissive=True) as m:
            self.assertEqual(m.data.shape[1:], (192, 192))
            self.assertTrue(np.isfinite(m.data[-1]).all() and m.data[-1].std() > 0)


if __name__ == "__main__":
    unittest.main()
