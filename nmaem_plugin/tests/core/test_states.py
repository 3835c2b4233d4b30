"""State assignment (``core/states.py``, ``nmaem states``) on hand-made landscapes whose
answer is known without the package: well-separated clusters, a symmetric two-peak sample
split at its centre, boxes in coordinates built to be the PC axes."""
import contextlib
import io
import json
import os
import shutil
import tempfile
import unittest

import numpy as np

from nmaem_plugin.core.analysis import states as S
from nmaem_plugin.core.cli.main import main
from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.io.latent import write_latent
from nmaem_plugin.core.io.particles import read_particles

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")


def islands(n=90, seed=0, centres=(-6.0, 0.0, 6.0)):
    """(z (n, 2), truth (n,)): three tight islands along the first axis (spread 0.4, the
    second axis 0.2), so PC1 is the first axis (its sign: the positive direction)."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % len(centres)
    z = np.stack([np.asarray(centres)[truth] + 0.4 * rng.standard_normal(n),
                  0.2 * rng.standard_normal(n)], axis=1)
    return z, truth


class TestAssignment(unittest.TestCase):
    def _partition(self, st, n):
        self.assertEqual(st.label.shape, (n,))
        self.assertEqual(int(st.counts.sum()), int((st.label >= 0).sum()))
        rows = np.concatenate([st.members(k) for k in range(len(st))])
        self.assertEqual(len(rows), len(np.unique(rows)))          # no particle twice

    def test_maxima_basins_are_the_islands(self):
        z, truth = islands()
        st = S.assign_maxima(z)
        self.assertEqual(len(st), 3)
        self._partition(st, len(z))
        self.assertTrue(np.all(st.label >= 0))                     # basins cover the line
        np.testing.assert_array_equal(st.label, truth)              # ordered by PC1 position
        for k in range(3):              # within one island spread of the island's centre
            np.testing.assert_allclose(st.z[k], z[truth == k].mean(0), atol=0.4)

    def test_two_peaks_split_at_the_symmetric_dip(self):
        """Two equal point masses at -3 and +3 and a fixed bandwidth: the KDE is symmetric,
        so the basin boundary is 0 (to the grid spacing); points at -0.2 and +0.2 fall on
        either side."""
        x = np.concatenate([np.full(40, -3.0), np.full(40, 3.0), [-0.2, 0.2]])
        z = np.stack([x, np.zeros_like(x)], axis=1)
        z[:, 1] = 1e-3 * np.sin(np.arange(len(x)))                  # a non-degenerate PCA
        st = S.assign_maxima(z, bandwidth=1.0, min_significance=0.0)
        self.assertEqual(len(st), 2)
        self.assertEqual(list(st.label[-2:]), [0, 1])
        self.assertEqual(list(st.counts), [41, 41])
        # the representative: the mean z of the basin within one bandwidth of its maximum
        np.testing.assert_allclose(st.z[0], z[:40].mean(0), atol=1e-9)
        np.testing.assert_allclose(st.z[1], z[40:80].mean(0), atol=1e-9)

    def test_kmeans_states(self):
        z, truth = islands(seed=1)
        st = S.assign_kmeans(z, 3, seed=0)
        self._partition(st, len(z))
        self.assertTrue(np.all(st.label >= 0))
        for k in range(3):
            rows = st.members(k)
            self.assertEqual(len(np.unique(truth[rows])), 1)        # one island per cluster
            np.testing.assert_allclose(st.z[k], z[rows].mean(0), atol=1e-9)

    def test_ranges(self):
        rng = np.random.default_rng(2)
        z = np.stack([rng.uniform(-10, 10, 200), rng.uniform(-1, 1, 200)], axis=1)
        z -= z.mean(0)
        # make the axes the exact principal axes (zero covariance between the columns)
        z[:, 1] -= z[:, 0] * (z[:, 0] @ z[:, 1]) / (z[:, 0] @ z[:, 0])
        st = S.assign_ranges(z, ["1:-2:2", "1:0:6,2:-5:5", "1:50:60"])
        self._partition(st, len(z))
        x = z[:, 0]
        first = (x >= -2) & (x <= 2)
        second = ~first & (x >= 0) & (x <= 6)
        np.testing.assert_array_equal(st.members(0), np.flatnonzero(first))
        np.testing.assert_array_equal(st.members(1), np.flatnonzero(second))
        self.assertEqual(st.counts[2], 0)
        np.testing.assert_array_equal(st.label[~(first | second)], -1)
        np.testing.assert_allclose(st.z[1], z[second].mean(0), atol=1e-12)
        np.testing.assert_allclose(st.z[2], [55.0, 0.0], atol=1e-9)   # empty: box centre
        self.assertEqual(st.info[0]["box"], [[1, -2.0, 2.0]])
        lo, hi = st.info[0]["data_range"][0]
        self.assertAlmostEqual(lo, x.min())
        self.assertAlmostEqual(hi, x.max())

    def test_bad_ranges(self):
        for bad in ("1:2", "0:-1:1", "1:3:2", "a:b:c", ""):
            with self.assertRaises(NmaemError):
                S.parse_range(bad)
        with self.assertRaisesRegex(NmaemError, "PC3"):
            S.assign_ranges(np.random.default_rng(0).normal(size=(10, 2)), ["3:-1:1"])


class TestStatesCommand(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nmaem-states-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def _cli(self, *argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main([str(a) for a in argv])
        return rc, err.getvalue()

    def test_states_files_and_star_per_state(self):
        star = os.path.join(DATA, "relion31.star")
        table = read_particles(star)
        n = table.n
        # latent rows in a shuffled order of the STAR rows: state files follow 'index'
        index = np.array([3, 0, 4, 1, 2])[:n]
        z = np.array([[-5.0, 0.1], [-4.8, -0.1], [5.0, 0.0], [5.2, 0.2], [4.9, -0.2]])[:n]
        latent = os.path.join(self.tmp, "latent.npz")
        write_latent(latent, z, index=index)
        out = os.path.join(self.tmp, "states")
        rc, err = self._cli("states", "--latent", latent, "--kmeans", 2, "-o", out,
                            "--particles", star)
        self.assertEqual(rc, 0, err)
        label, idx, zs, count = S.read_states(os.path.join(out, "states.npz"))
        np.testing.assert_array_equal(idx, index)
        # hand-derived: the two groups by the sign of z1, the bigger one first
        big = z[:, 0] > 0
        np.testing.assert_array_equal(label, np.where(big, 0, 1))
        np.testing.assert_allclose(zs[0], z[big].mean(0), atol=1e-9)
        with open(os.path.join(out, "states.json")) as fh:
            listing = json.load(fh)
        self.assertEqual([s["n_particles"] for s in listing["states"]], [3, 2])
        self.assertEqual(listing["states"][0]["star"], "state_01.star")
        for k, name in enumerate(("state_01.star", "state_02.star")):
            sub = read_particles(os.path.join(out, name))
            rows = index[label == k]
            self.assertEqual(list(sub.stack_index), list(table.stack_index[rows]))
            np.testing.assert_allclose(sub.euler, table.euler[rows])
            np.testing.assert_allclose(sub.defocus_u, table.defocus_u[rows])
        # an existing output is refused, and the refusal is one line naming it
        rc, err = self._cli("states", "--latent", latent, "--kmeans", 2, "-o", out)
        self.assertEqual(rc, 2)
        self.assertRegex(err, r"^nmaem: error: .*states: already holds the output of an "
                              r"earlier nmaem states .*--force")
        self.assertEqual(len(err.strip().splitlines()), 1)
        rc, err = self._cli("states", "--latent", latent, "-o", out + "2")
        self.assertEqual(rc, 2)
        self.assertIn("choose one of --maxima, --kmeans K or --range", err)

    def test_report_table_of_states(self):
        """nmaem report --states: one row per state with its count, share and file."""
        from nmaem_plugin.core.io.runfolder import write_log
        z = np.array([[-5.0, 0.1], [-4.8, -0.1], [5.0, 0.0], [5.2, 0.2], [4.9, -0.2]])
        latent = os.path.join(self.tmp, "latent.npz")
        write_latent(latent, z)
        out = os.path.join(self.tmp, "states")
        self.assertEqual(self._cli("states", "--latent", latent, "--kmeans", 2, "-o", out)[0], 0)
        run = os.path.join(self.tmp, "run")
        os.makedirs(run)
        write_log(run, [dict(epoch=e, train_loss=1.0 / e, val_loss=1.1 / e, images_per_s=10.0,
                             seconds=1.0) for e in (1, 2, 3)])
        rep = os.path.join(self.tmp, "report")
        rc, err = self._cli("report", run, "-o", rep, "--states", out)
        self.assertEqual(rc, 0, err)
        with open(os.path.join(rep, "index.html")) as fh:
            page = fh.read()
        self.assertIn("<h2>States</h2>", page)
        self.assertIn("<tr><td>state_01</td><td>3</td><td>60.0%</td><td>-</td><td>-</td><td>-</td></tr>",
                      page)
        self.assertIn("<tr><td>state_02</td><td>2</td><td>40.0%</td>", page)
        rc, err = self._cli("report", run, "-o", rep, "--force", "--states", self.tmp)
        self.assertEqual(rc, 2)
        self.assertIn("states.json", err)

    def test_read_states_checks(self):
        bad = os.path.join(self.tmp, "bad.npz")
        np.savez(bad, label=np.array([0, 2]), index=np.arange(2), z=np.zeros((2, 1)),
                 count=np.array([1, 0]))
        with self.assertRaisesRegex(NmaemError, "labels must lie"):
            S.read_states(bad)


if __name__ == "__main__":
    unittest.main()
