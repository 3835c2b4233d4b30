"""The data behind the figures and viewers (core.analysis.labels, core.analysis.thumbnails,
core.learn.convergence, core.report.figures; no Scipion): positions along a PC
in RMSD units and their range check, the atoms of a modes file, the particle counts and
labels of the density maxima, the true islands of a ground truth, the convergence note
of a training log and reading a log that is still being written.

    python -m unittest nmaem_plugin.tests.core.test_plots
"""
import os
import shutil
import tempfile
import unittest

import matplotlib
matplotlib.use("Agg")

import numpy as np

from nmaem_plugin.core.analysis.labels import (MAX_FRAME_GROUPS, frame_groups, frame_islands,
                                               maxima_counts, maxima_labels, modes_atom_count,
                                               pc_position, pc_range)
from nmaem_plugin.core.analysis.thumbnails import (THUMBNAIL_PX, model_projections,
                                                   model_thumbnail, thumbnail_frame)
from nmaem_plugin.core.learn.convergence import convergence
from nmaem_plugin.core.report.figures import latent_landscape, training_curves
from nmaem_plugin.core.analysis.kde import density_maxima
from nmaem_plugin.core.base.errors import NmaemError


def _orthonormal_modes(m, d, seed=0):
    """U (d, M, 3): d orthonormal 3M-vectors (float64)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3 * m, d)))
    return q.T.reshape(d, m, 3)


def _rmsd(a, b):
    return float(np.sqrt(((a - b) ** 2).sum(-1).mean()))


class TestPcPositions(unittest.TestCase):
    def test_range_in_rmsd_units_hand_made(self):
        # z along z1 from 30 to 280 A of amplitude, M = 100 atoms: RMSD 3 to 28 A
        z = np.zeros((26, 3))
        z[:, 0] = np.linspace(30.0, 280.0, 26)
        lo, hi = pc_range(z, n_atoms=100)
        self.assertAlmostEqual(lo, 3.0, places=12)
        self.assertAlmostEqual(hi, 28.0, places=12)
        self.assertEqual(pc_range(z), (30.0, 280.0))      # no M: amplitude units
        point = pc_position(z, 10.0, n_atoms=100)
        np.testing.assert_allclose(point, [100.0, 0.0, 0.0], atol=1e-12)

    def test_default_zero_is_refused_with_the_range(self):
        z = np.zeros((26, 3))
        z[:, 0] = np.linspace(30.0, 280.0, 26)
        with self.assertRaises(NmaemError) as cm:
            pc_position(z, 0.0, n_atoms=100)
        msg = str(cm.exception)
        self.assertIn("PC1 = 0 is outside the particles' range 3 to 28", msg)
        self.assertIn("RMSD along PC1", msg)
        for bad in (28.01, np.nan, "x"):
            with self.assertRaises(NmaemError):
                pc_position(z, bad, n_atoms=100)
        pc_position(z, 28.0, n_atoms=100)                 # the ends are inside

    def test_positions_are_rmsd_between_models(self):
        """Two models at positions a and b along PC1 differ by |a - b| A RMSD, measured
        on the deformed coordinates X0 + U z themselves (float64)."""
        m, d = 40, 3
        u = _orthonormal_modes(m, d, seed=1)
        x0 = np.random.default_rng(2).normal(0, 10, (m, 3))
        rng = np.random.default_rng(3)
        z = rng.normal(0, 1, (500, d)) * [8.0, 2.0, 0.5] + [20.0, -3.0, 1.0]
        lo, hi = pc_range(z, n_atoms=m)
        a, b = lo + 0.2 * (hi - lo), lo + 0.9 * (hi - lo)
        xa = x0 + np.tensordot(pc_position(z, a, n_atoms=m), u, 1)
        xb = x0 + np.tensordot(pc_position(z, b, n_atoms=m), u, 1)
        self.assertAlmostEqual(_rmsd(xa, xb), b - a, places=9)
        # and a position is the signed RMSD from the reference of the PC1 component
        zero_pc = pc_position(z, a, n_atoms=m)
        v = np.linalg.eigh(np.cov(z.T))[1][:, -1]
        self.assertAlmostEqual(abs(zero_pc @ v) / np.sqrt(m), abs(a), places=9)

    def test_d1(self):
        z = np.linspace(-2.0, 4.0, 7)[:, None]
        self.assertEqual(pc_range(z, n_atoms=4), (-1.0, 2.0))
        np.testing.assert_allclose(pc_position(z, 1.5, n_atoms=4), [3.0])

    def test_modes_atom_count(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        fn = os.path.join(tmp, "modes.npz")
        np.savez(fn, modes=np.zeros((2, 37, 3), np.float32), eigenvalues=np.ones(2))
        self.assertEqual(modes_atom_count(fn), 37)
        bad = os.path.join(tmp, "bad.npz")
        np.savez(bad, eigenvalues=np.ones(2))
        with self.assertRaisesRegex(NmaemError, "no 'modes'"):
            modes_atom_count(bad)
        with open(os.path.join(tmp, "text.npz"), "w") as fh:
            fh.write("not a zip")
        with self.assertRaisesRegex(NmaemError, "not a readable modes file"):
            modes_atom_count(os.path.join(tmp, "text.npz"))


def _two_islands(seed=0):
    """100 particles at 0 and 300 at 10 (sd 0.1): counts known by construction."""
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(0, 0.1, 100), rng.normal(10, 0.1, 300)]


class TestMaximaLabels(unittest.TestCase):
    def test_counts_hand_made(self):
        x = _two_islands()
        m = density_maxima(x, bandwidth=1.0)
        near, basin = maxima_counts(x, m)
        np.testing.assert_array_equal(basin, [100, 300])
        np.testing.assert_array_equal(near, [100, 300])      # all within h = 1 of the peak
        self.assertEqual(maxima_labels(x, m),
                         ["maximum_01\n100 near / 100 in basin",
                          "maximum_02\n300 near / 300 in basin"])

    def test_counts_of_all_particles_when_maxima_come_from_a_subsample(self):
        x = _two_islands()
        m = density_maxima(x[::4], bandwidth=1.0)                # 25 + 75 particles
        np.testing.assert_array_equal(m.basin_counts, [25, 75])
        near, basin = maxima_counts(x, m)
        np.testing.assert_array_equal(basin, [100, 300])

    def test_counts_agree_with_density_maxima(self):
        rng = np.random.default_rng(4)
        x = np.r_[rng.normal(-3, 1, 700), rng.normal(2, 0.7, 400), rng.normal(6, 0.5, 200)]
        m = density_maxima(x)
        self.assertEqual(len(m), 3)
        near, basin = maxima_counts(x, m)
        np.testing.assert_array_equal(basin, m.basin_counts)
        np.testing.assert_array_equal(near, [len(k) for k in m.near])

    def test_landscape_labels_and_equal_aspect(self):
        rng = np.random.default_rng(5)
        z = np.c_[_two_islands(), rng.normal(0, 0.3, 400)]
        fig = latent_landscape(z, maxima_kwargs={"bandwidth": 1.0}, n_atoms=25)
        hist_ax = [a for a in fig.axes if a.get_xlabel() == "PC1 (A)"][0]
        labels = [t.get_text() for t in hist_ax.texts if t.get_gid() == "maximum_label"]
        self.assertEqual(labels, maxima_labels(z[:, 0], density_maxima(
            z[:, 0], bandwidth=1.0)))
        self.assertEqual(len(labels), 2)
        hex_ax = [a for a in fig.axes if a.get_ylabel() == "PC2 (A)"][0]
        self.assertEqual(hex_ax.get_aspect(), 1.0)
        # the RMSD axis: PC1 coordinate t shown as t / sqrt(25)
        sec = [a for a in hist_ax.child_axes if "RMSD along PC1" in a.get_xlabel()]
        self.assertEqual(len(sec), 1)
        fig.canvas.draw()
        lo, hi = hist_ax.get_xlim()
        np.testing.assert_allclose(sec[0].get_xlim(), (lo / 5.0, hi / 5.0), rtol=1e-12)


class TestFrameIslands(unittest.TestCase):
    def test_islands_hand_made(self):
        frames = np.r_[np.arange(0, 10), np.arange(20, 30), np.arange(40, 50)].repeat(3)
        self.assertEqual(frame_islands(frames), [(0, 9), (20, 29), (40, 49)])
        groups = frame_groups(frames)
        self.assertEqual([g[0] for g in groups], ["island 1: frames 0-9",
                                                  "island 2: frames 20-29",
                                                  "island 3: frames 40-49"])
        for (_, mask), (a, b) in zip(groups, [(0, 9), (20, 29), (40, 49)]):
            np.testing.assert_array_equal(mask, (frames >= a) & (frames <= b))

    def test_continuous_and_few_frames(self):
        frames = np.arange(50)
        self.assertEqual(frame_islands(frames), [(0, 49)])
        groups = frame_groups(frames)
        self.assertEqual(len(groups), MAX_FRAME_GROUPS)
        self.assertEqual(sum(int(m.sum()) for _, m in groups), 50)
        self.assertEqual([g[0] for g in frame_groups(np.array([3, 1, 3, 7]))],
                         ["frame 1", "frame 3", "frame 7"])


class TestConvergence(unittest.TestCase):
    def _rows(self, val, train=None):
        return [dict(epoch=e + 1, train_loss=(train or val)[e], val_loss=v,
                     images_per_s=100.0, seconds=1.0) for e, v in enumerate(val)]

    def test_levelled_off(self):
        val = [10.0, 8.0, 6.0, 5.0, 5.0, 5.0, 4.98, 4.97, 4.96]
        c = convergence(self._rows(val))
        # by hand: mean(4.98, 4.97, 4.96) = 4.97 against mean(5, 5, 5) = 5
        self.assertAlmostEqual(c.change, -0.03 / 5.0, places=12)
        self.assertTrue(c.converged)
        self.assertEqual(c.epochs, ((4, 6), (7, 9)))
        self.assertIn("-0.60 %", c.note)
        self.assertIn("epochs 7-9 vs 4-6", c.note)
        self.assertIn("levelled off", c.note)

    def test_still_decreasing_and_rising(self):
        c = convergence(self._rows([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))
        self.assertAlmostEqual(c.change, (2.0 - 5.0) / 5.0, places=12)
        self.assertFalse(c.converged)
        self.assertIn("still decreasing", c.note)
        c = convergence(self._rows([1.0, 1.0, 1.0, 1.5, 1.5, 1.5]))
        self.assertAlmostEqual(c.change, 0.5, places=12)
        self.assertIn("rising", c.note)

    def test_too_few_epochs_and_no_validation(self):
        c = convergence(self._rows([3.0, 2.0, 1.0]))
        self.assertIsNone(c.change)
        self.assertFalse(c.converged)
        self.assertIn("6 needed", c.note)
        rows = self._rows([np.nan] * 6, train=[4.0, 4.0, 4.0, 2.0, 2.0, 2.0])
        c = convergence(rows)
        self.assertEqual(c.key, "train_loss")
        self.assertAlmostEqual(c.change, -0.5, places=12)
        self.assertIn("no validation particles", c.note)

    def test_validation_stall_warned(self):
        """The validation loss flat from epoch 3 while the training loss falls: one
        warning, in the note of the figure (and the training's log, train.py); by hand:
        the floor 2.0 is first reached at epoch 3, the training loss falls from 2.0 there
        to 1.4, 30 %."""
        from nmaem_plugin.core.learn.convergence import validation_stall
        val = [5.0, 3.0, 2.0, 2.01, 2.0, 2.005, 2.0]
        train = [5.0, 3.0, 2.0, 1.8, 1.6, 1.5, 1.4]
        w = validation_stall(self._rows(val, train=train))
        self.assertIsNotNone(w)
        self.assertIn("has not fallen since epoch 3", w)
        self.assertIn("fell by 30 %", w)
        self.assertIn(w, convergence(self._rows(val, train=train)).note)
        fig = training_curves(self._rows(val, train=train))
        self.assertIn("overfitting", fig.axes[0].get_title())
        # rising after its floor: warned too
        self.assertIsNotNone(validation_stall(self._rows(
            [5.0, 3.0, 2.0, 2.2, 2.4, 2.6], train=[5.0, 3.0, 2.0, 1.8, 1.6, 1.4])))
        # both falling; the training loss flat too; a stall shorter than 3 epochs
        for v, t in (([5, 4, 3, 2.5, 2.2, 2.0], [5, 4, 3, 2.5, 2.2, 2.0]),
                     ([5, 3, 2, 2, 2, 2], [5, 3, 2, 1.99, 1.98, 1.98]),
                     ([5, 3, 2, 2, 2], [5, 3, 2, 1.5, 1.0])):
            self.assertIsNone(validation_stall(self._rows([float(x) for x in v],
                                                          train=[float(x) for x in t])),
                              (v, t))

    def test_curves_title_and_note(self):
        rows = self._rows([10.0, 8.0, 6.0, 5.0, 5.0, 5.0, 4.98, 4.97, 4.96])
        fig = training_curves(rows, title="train AK")
        self.assertEqual(fig._suptitle.get_text(), "train AK")
        self.assertIn(convergence(rows).note, fig.axes[0].get_title())

    def test_log_being_written(self):
        """A training in progress: no log yet, the header only, a partial last line."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        fn = os.path.join(tmp, "log.csv")
        header = "epoch,train_loss,val_loss,images_per_s,seconds\n"
        cases = {"missing": None, "empty": "", "header": header,
                 "partial": header + "1,2.0,2.5,50,1\n2,1.0,1.5,60,1\n3,0.9"}
        for name, text in cases.items():
            if text is None:
                if os.path.exists(fn):
                    os.remove(fn)
            else:
                with open(fn, "w") as fh:
                    fh.write(text)
            fig = training_curves(fn, title=name)
            loss_ax = fig.axes[0]
            n_lines = len(loss_ax.get_lines())
            if name == "partial":
                # epoch 3 has no validation loss yet: the curves have 2 and 3 points
                ys = {ln.get_label(): ln.get_ydata() for ln in loss_ax.get_lines()}
                np.testing.assert_allclose(ys["validation loss"][:2], [2.5, 1.5])
                self.assertEqual(n_lines, 2)
                self.assertIn("2 epoch(s) with a validation loss", loss_ax.get_title())
            else:
                self.assertEqual(n_lines, 0, name)
                self.assertIn("no epoch finished yet",
                              [t.get_text() for t in loss_ax.texts])



def _two_peaks(img):
    """(row, col) of the two largest local maxima of an image, sorted."""
    inner = img[1:-1, 1:-1]
    is_max = np.ones_like(inner, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                is_max &= inner > img[1 + dy:img.shape[0] - 1 + dy, 1 + dx:img.shape[1] - 1 + dx]
    rows, cols = np.nonzero(is_max)
    top = np.argsort(inner[rows, cols])[::-1][:2]
    return sorted((int(rows[k]) + 1, int(cols[k]) + 1) for k in top)


class TestModelThumbnail(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nmaem-thumb-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def test_two_atoms_land_where_a_hand_computation_puts_them(self):
        """Carbon atoms at A = (0, 0, 0) and B = (10, -6, 4) A, 1 A pixels, box 64: the
        centroid (5, -3, 2) lands on pixel (32, 32), so along z (image x, y = model x, y)
        A is at column 32 - 5 = 27, row 32 + 3 = 35 and B at column 37, row 29; along y
        (image x, y = model x, z) A at (row 30, col 27), B at (34, 37); along x (image
        x, y = model y, z) A at (row 30, col 35), B at (34, 29)."""
        coords = np.array([[0.0, 0.0, 0.0], [10.0, -6.0, 4.0]])
        imgs = model_projections(coords, ["C", "C"], views=("z", "y", "x"), box=64,
                                 apix=1.0)
        self.assertEqual(imgs.shape, (3, 64, 64))
        self.assertEqual(_two_peaks(imgs[0]), [(29, 37), (35, 27)])
        self.assertEqual(_two_peaks(imgs[1]), [(30, 27), (34, 37)])
        self.assertEqual(_two_peaks(imgs[2]), [(30, 35), (34, 29)])
        # the two atoms are alike: equal peak heights, and the rest of the image far below
        for img in imgs:
            (r1, c1), (r2, c2) = _two_peaks(img)
            self.assertAlmostEqual(img[r1, c1], img[r2, c2], delta=1e-3 * img.max())
            self.assertLess(np.median(np.abs(img)), 0.05 * img.max())

    def test_default_frame_holds_the_model(self):
        """Without centre/apix the frame is the centroid and a pixel size that keeps every
        atom inside the box: atoms at x = -40 and +40 A land symmetrically, inside."""
        coords = np.array([[-40.0, 0.0, 0.0], [40.0, 0.0, 0.0]])
        centre, apix = thumbnail_frame(coords, box=96)
        np.testing.assert_allclose(centre, 0.0)
        self.assertGreater(apix, 40.0 / 44)        # 40 A within 48 - margin pixels
        img = model_projections(coords, ["C", "C"], box=96)[0]
        (r1, c1), (r2, c2) = _two_peaks(img)
        self.assertEqual((r1, r2), (48, 48))
        self.assertEqual(c1 + c2, 96)               # symmetric about column 48
        self.assertLess(abs(c2 - 48 - 40.0 / apix), 1.0)

    def test_png_size_and_content(self):
        import matplotlib.image as mpimg
        rng = np.random.default_rng(0)
        coords = rng.normal(0.0, 8.0, (60, 3))
        path = os.path.join(self.tmp, "state_01.png")
        self.assertEqual(model_thumbnail(coords, ["C"] * 40 + ["N"] * 20, path), path)
        img = mpimg.imread(path)
        self.assertEqual(img.shape[:2], (THUMBNAIL_PX, 3 * THUMBNAIL_PX))
        grey = img[..., :3].mean(-1)
        self.assertGreater(grey.std(), 0.02)
        # each view holds the model: its middle brighter than its corners
        for k in range(3):
            view = grey[:, k * THUMBNAIL_PX:(k + 1) * THUMBNAIL_PX]
            self.assertGreater(view[60:100, 60:100].mean(), view[-20:, -20:].mean() + 0.05)
        one = os.path.join(self.tmp, "one.png")
        model_thumbnail(coords, ["C"] * 60, one, views=("z",), px=100)
        self.assertEqual(mpimg.imread(one).shape[:2], (100, 100))
        self.assertEqual([f for f in os.listdir(self.tmp) if f.startswith(".")], [])


if __name__ == "__main__":
    unittest.main()


class TestUncertaintyFigures(unittest.TestCase):
    """The shrinkage check's figure and the per-particle uncertainty landscape."""

    def _check(self, best):
        from nmaem_plugin.core.io.latent import ShrinkageCheck
        s = np.exp(np.linspace(np.log(0.25), np.log(4.0), 41))
        ll = -50.0 * np.log(s / best) ** 2 + 50.0 * np.log(best) ** 2   # 0 at s = 1
        inside = s[ll >= ll.max() - 1.92]
        return ShrinkageCheck(s, ll, best, float(inside.min()), float(inside.max()))

    def test_shrinkage_figure_draws_the_profile_and_says_the_verdict(self):
        from nmaem_plugin.core.report.uncertainty import shrinkage_figure
        for best, word in ((2.0, "shrunk"), (1.0, "consistent"), (0.5, "wider")):
            check = self._check(best)
            fig = shrinkage_figure(check)
            ax = fig.axes[0]
            self.assertIn(word, ax.get_title())
            line = [ln for ln in ax.get_lines() if "log-likelihood" in ln.get_label()][0]
            np.testing.assert_array_equal(line.get_xdata(), check.scales)
            np.testing.assert_array_equal(line.get_ydata(), check.loglik)
            self.assertEqual(ax.get_xscale(), "log")

    def test_uncertainty_landscape_colours_by_the_posterior_sd(self):
        from nmaem_plugin.core.report.uncertainty import uncertainty_landscape
        rng = np.random.default_rng(0)
        z = rng.normal(size=(500, 3)) * [5.0, 2.0, 1.0]
        sd = 0.5 + (z[:, 0] > 0)            # uncertain on one side of PC1
        fig = uncertainty_landscape(z, sd)
        hexes = fig.axes[0].collections[0]
        values = np.asarray(hexes.get_array())
        # medians of the particles' sd per hexagon: both sides' values, nothing else
        self.assertTrue(((values >= 0.5) & (values <= 1.5)).all())
        self.assertIn(0.5, values)
        self.assertIn(1.5, values)
        with self.assertRaises(NmaemError):
            uncertainty_landscape(z, sd[:10])
