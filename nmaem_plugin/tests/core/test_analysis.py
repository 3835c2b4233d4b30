"""Latent analysis: PCA, k-means, density maxima, ``nmaem export`` and ``nmaem evaluate``.

A tiny noise-free dataset (a 20-frame open -> closed adenylate kinase morph, 200 particles
of 32 px) and 4 normal modes of its reference are made once per module with the command
line. Training runs and latent files are built by hand (config.json + reference + modes),
with amplitudes whose expected results the tests compute independently: coordinates are
read back with gemmi and least squares are done with numpy here, not with the package.
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import gemmi
import matplotlib
matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import numpy as np

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.analysis import kde as K
from nmaem_plugin.core.analysis import landscape as A
from nmaem_plugin.core.base.errors import NmaemError

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")
NMAEM = [sys.executable, "-m", "nmaem_plugin"]
N_PART, N_FRAMES, D = 200, 20, 4

_tmp = None


def setUpModule():
    global _tmp
    os.environ.setdefault("KEOPS_CACHE_FOLDER",
                          os.path.join(tempfile.gettempdir(), "nmaem_keops_cache"))
    _tmp = tempfile.mkdtemp(prefix="nmaem-analysis-")
    sim = os.path.join(_tmp, "sim")
    for args in (["simulate", "--ref", OPEN, "--target", CLOSED, "--frames", str(N_FRAMES),
                  "--n", str(N_PART), "--box", "32", "--apix", "3", "--no-noise",
                  "--device", "cpu", "-o", sim],
                 ["modes", os.path.join(sim, "reference.pdb"), "--n-modes", str(D),
                  "--device", "cpu", "-o", os.path.join(_tmp, "modes.npz")]):
        p = subprocess.run(NMAEM + args, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError("nmaem %s failed: %s" % (args[0], p.stderr))


def tearDownModule():
    shutil.rmtree(_tmp, ignore_errors=True)


def gemmi_atoms(path, model=0):
    """(keys [(chain, resnum, icode, resname, atom)], coords (M,3)) read with gemmi alone."""
    st = gemmi.read_structure(path)
    keys, xyz = [], []
    for ch in st[model]:
        for res in ch:
            for at in res:
                keys.append((ch.name, res.seqid.num, res.seqid.icode.strip(), res.name, at.name))
                xyz.append([at.pos.x, at.pos.y, at.pos.z])
    return keys, np.array(xyz)


def make_run(folder, reference=None, modes=None, config=None):
    """A training run folder as the trainer writes it (config.json, reference, modes)."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(reference or os.path.join(_tmp, "sim", "reference.pdb"),
                os.path.join(folder, "reference.pdb"))
    if modes is not False:
        shutil.copy(modes or os.path.join(_tmp, "modes.npz"), os.path.join(folder, "modes.npz"))
    cfg = {"reference": "reference.pdb", "modes": "modes.npz", "epochs": 1}
    cfg.update(config or {})
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return folder


def save_latent(path, z, index, shift=None):
    z = np.asarray(z, dtype=np.float32)
    n = len(index)
    np.savez(path, z=z.reshape(n, -1), index=np.asarray(index),
             shift=np.zeros((n, 2), np.float32) if shift is None else shift)
    return path


def run_cli(*args):
    """``nmaem`` in-process: (return code, stdout, stderr)."""
    from nmaem_plugin.core.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


class Data:
    """The module's dataset seen independently of the package: reference, frames, modes."""

    def __init__(self):
        sim = os.path.join(_tmp, "sim")
        self.ref_keys, self.x0 = gemmi_atoms(os.path.join(sim, "reference.pdb"))
        st = gemmi.read_structure(os.path.join(sim, "frames.pdb"))
        frames = []
        for k in range(len(st)):
            keys, xyz = gemmi_atoms(os.path.join(sim, "frames.pdb"), k)
            pos = {key: i for i, key in enumerate(keys)}
            frames.append(xyz[[pos[key] for key in self.ref_keys]])
        self.frames = np.array(frames)
        with np.load(os.path.join(_tmp, "modes.npz")) as f:
            self.U = f["modes"].astype(np.float64)          # (d, M, 3)
        with np.load(os.path.join(sim, "ground_truth.npz")) as f:
            self.frame = f["frame"].astype(int)
        self.M = len(self.x0)
        Umat = self.U.reshape(D, -1).T                       # (3M, d)
        rhs = (self.frames - self.x0).reshape(len(self.frames), -1).T
        self.z_fit = np.linalg.lstsq(Umat, rhs, rcond=None)[0].T    # (F, d)
        resid = rhs - Umat @ self.z_fit.T
        self.floor = np.sqrt((resid ** 2).sum(0) / self.M)           # (F,)
        self.ref_rmsd = np.sqrt(((self.frames - self.x0) ** 2).sum((1, 2)) / self.M)


_data = None


def data():
    global _data
    if _data is None:
        _data = Data()
    return _data


class TmpCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="case-", dir=_tmp)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def assertCliError(self, *args, words=()):
        rc, out, err = run_cli(*args)
        self.assertEqual(rc, 2, err)
        # one error line; warnings (e.g. a latent without a fingerprint) may precede it
        lines = [l for l in err.strip().splitlines() if not l.startswith("nmaem: warning: ")]
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith("nmaem: error: "), err)
        for w in words:
            self.assertIn(w, lines[0])
        return lines[0]


# ------------------------------------------------------------------------------- statistics

class TestPCA(unittest.TestCase):
    def test_known_covariance(self):
        """Explained variance ratios and axes of a sample with a known covariance."""
        rng = np.random.default_rng(3)
        Q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
        var = np.array([9.0, 4.0, 1.0, 0.25])
        z = rng.normal(size=(40000, 4)) * np.sqrt(var) @ Q.T + np.array([5, -2, 0, 1])
        p = A.pca(z)
        np.testing.assert_allclose(p.explained_variance_ratio, var / var.sum(), atol=0.006)
        np.testing.assert_allclose(p.explained_variance, var, rtol=0.03)
        # axes: the columns of Q, up to sign
        np.testing.assert_allclose(np.abs(np.sum(p.components * Q.T, axis=1)), 1.0, atol=2e-3)
        # coordinates from z = 0 along the axes, and back
        np.testing.assert_allclose(p.inverse(p.transform(z)), z, atol=1e-9)
        np.testing.assert_allclose(np.linalg.norm(p.transform(z), axis=1),
                                   np.linalg.norm(z, axis=1), rtol=1e-10)

    def test_one_dimension(self):
        """d = 1: the identity; PC1 is z itself and explains everything."""
        z = -np.abs(np.random.default_rng(0).normal(size=(50, 1)))
        p = A.pca(z)
        np.testing.assert_array_equal(p.components, [[1.0]])
        np.testing.assert_array_equal(p.transform(z)[:, 0], z[:, 0])
        np.testing.assert_allclose(p.explained_variance_ratio, [1.0])

    def test_no_amplitudes(self):
        with self.assertRaises(NmaemError):
            A.pca(np.zeros((10, 0)))
        with self.assertRaises(NmaemError):
            A.pca(np.zeros((1, 3)))


class TestKMeans(unittest.TestCase):
    def test_separated_clusters(self):
        """Three well-separated blobs of different sizes are recovered exactly."""
        rng = np.random.default_rng(5)
        means = np.array([[0, 0, 0, 0], [10, 0, -5, 0], [0, 12, 0, 6.0]])
        sizes = [120, 60, 90]
        truth = np.repeat(np.arange(3), sizes)
        z = means[truth] + rng.normal(0, 0.7, (len(truth), 4))
        perm = rng.permutation(len(z))
        z, truth = z[perm], truth[perm]
        c, labels, counts = A.kmeans(z, 3, seed=1)
        # clusters numbered by decreasing size
        np.testing.assert_array_equal(counts, [120, 90, 60])
        for j, t in enumerate([0, 2, 1]):
            np.testing.assert_array_equal(labels == j, truth == t)
            np.testing.assert_allclose(c[j], z[truth == t].mean(0), atol=1e-9)
        c2, labels2, _ = A.kmeans(z, 3, seed=1)
        np.testing.assert_array_equal(labels, labels2)
        np.testing.assert_array_equal(c, c2)

    def test_lloyd_fixed_point(self):
        """On unclustered data the result is a converged Lloyd partition: every point is
        labelled with its nearest centre and every centre is the mean of its points."""
        z = np.random.default_rng(9).normal(size=(500, 3))
        c, labels, counts = A.kmeans(z, 5, seed=0)
        d2 = ((z[:, None, :] - c[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(labels, np.argmin(d2, axis=1))
        for j in range(5):
            np.testing.assert_allclose(c[j], z[labels == j].mean(0), atol=1e-12)
        np.testing.assert_array_equal(counts, np.bincount(labels, minlength=5))
        self.assertTrue(np.all(np.diff(counts) <= 0))

    def test_too_many_clusters(self):
        z = np.repeat(np.eye(2), 5, axis=0)       # 2 distinct points
        with self.assertRaises(NmaemError):
            A.kmeans(z, 3)


class TestMaxima(unittest.TestCase):
    def test_trimodal(self):
        """A trimodal sample: three maxima at the modes, particles near each from its mode."""
        rng = np.random.default_rng(7)
        modes = np.array([-4.0, 0.5, 3.0])
        sizes = [150, 80, 120]
        comp = np.repeat(np.arange(3), sizes)
        x = modes[comp] + rng.normal(0, 0.4, len(comp))
        mx = K.density_maxima(x)
        self.assertEqual(len(mx), 3)
        np.testing.assert_allclose(mx.positions, modes, atol=0.25)
        for k in range(3):
            self.assertGreater(len(mx.near[k]), 0.3 * sizes[k])
            self.assertTrue(np.all(comp[mx.near[k]] == k))
        # every particle in a basin, and basins follow the components
        np.testing.assert_array_equal(mx.basin, comp)
        # the densest mode has the highest density
        self.assertEqual(int(np.argmax(mx.densities)), 0)

    def test_unimodal(self):
        """No spurious maxima for unimodal samples (normal and skewed, small and large)."""
        for seed in range(6):
            rng = np.random.default_rng(100 + seed)
            for x in (rng.normal(2.0, 1.5, 200), rng.normal(0, 1, 3000),
                      rng.gamma(4.0, 1.0, 500)):
                mx = K.density_maxima(x)
                self.assertEqual(len(mx), 1, (seed, len(x), mx.positions))
                self.assertEqual(len(mx.near), 1)
                np.testing.assert_array_equal(mx.basin, 0)

    def test_noise_bumps_are_not_maxima(self):
        """A flat density (uniform sample) gives one maximum, though without the
        significance test its KDE shows several noise bumps; a small but real mode (150 of
        2,150 particles, 6 sd away) is kept."""
        bumps = 0
        for seed in range(5):
            rng = np.random.default_rng(seed)
            x = rng.uniform(0, 10, 3000)
            bumps += len(K.density_maxima(x, min_significance=0)) - 1
            self.assertEqual(len(K.density_maxima(x)), 1, seed)
            y = np.concatenate([rng.normal(0, 1, 2000), rng.normal(6, 0.5, 150)])
            mx = K.density_maxima(y)
            self.assertEqual(len(mx), 2, seed)
            np.testing.assert_allclose(mx.positions, [0, 6], atol=0.3)
        self.assertGreater(bumps, 5)       # the case is not trivial

    def test_bandwidth_rules(self):
        """On a normal sample the plug-in bandwidth is near the normal-reference optimum
        (1.06 sd n^-1/5) and Silverman's rule is 0.9 sd n^-1/5; on three separated modes the
        plug-in follows the width of one mode while the normal-reference rules do not."""
        x = np.random.default_rng(0).normal(0, 2.0, 10000)
        self.assertAlmostEqual(K.kde_bandwidth(x, "silverman"), 0.9 * 2.0 * 10000 ** -0.2,
                               delta=0.02)
        self.assertAlmostEqual(K.kde_bandwidth(x, "scott"), 1.06 * 2.0 * 10000 ** -0.2,
                               delta=0.02)
        self.assertAlmostEqual(K.kde_bandwidth(x), 1.06 * 2.0 * 10000 ** -0.2, delta=0.06)
        rng = np.random.default_rng(1)
        y = np.concatenate([rng.normal(m, 0.2, 1000) for m in (-5, 0, 5)])
        # per-mode normal-reference optimum: 1.06 * 0.2 * 1000^-1/5 = 0.053
        self.assertLess(K.kde_bandwidth(y), 0.1)
        self.assertGreater(K.kde_bandwidth(y), 0.03)
        self.assertGreater(K.kde_bandwidth(y, "silverman"), 0.5)


# ------------------------------------------------------------------------------- export

class TestExport(TmpCase):
    def test_given_z_rmsd_and_names(self):
        """Models at given z: RMSD to X0 = |z|/sqrt(M), read back with gemmi; names kept."""
        dat = data()
        run = make_run(os.path.join(self.tmp, "run"))
        zs = [np.array([3.0, -1.5, 0.0, 2.0]), np.array([0.0, 0.0, -20.0, 7.5])]
        for fmt in ("pdb", "cif"):
            out = os.path.join(self.tmp, "out_" + fmt)
            rc, _, err = run_cli("export", "--no-refine", "--model", run, "-o", out, "--format", fmt,
                                 *sum([["--z", ",".join("%g" % v for v in z)] for z in zs], []))
            self.assertEqual(rc, 0, err)
            for j, z in enumerate(zs):
                keys, xyz = gemmi_atoms(os.path.join(out, "z_%02d.%s" % (j + 1, fmt)))
                self.assertEqual(keys, dat.ref_keys)
                r = np.sqrt(((xyz - dat.x0) ** 2).sum() / dat.M)
                self.assertAlmostEqual(r, np.linalg.norm(z) / np.sqrt(dat.M), delta=1e-3)
                # and the coordinates are X0 + U z atom by atom (3 decimals in the file)
                np.testing.assert_allclose(xyz, dat.x0 + np.tensordot(z, dat.U, 1), atol=2e-3)
            with open(os.path.join(out, "models.json")) as fh:
                listing = json.load(fh)
            self.assertEqual([m["file"] for m in listing["models"]],
                             ["z_01.%s" % fmt, "z_02.%s" % fmt])
            np.testing.assert_allclose(listing["models"][1]["z"], zs[1])
            # a thumbnail beside each model, listed, three views wide, and the two differ
            self.assertEqual([m["thumbnail"] for m in listing["models"]],
                             ["z_01.png", "z_02.png"])
            thumbs = [mpimg.imread(os.path.join(out, "z_%02d.png" % (j + 1))) for j in (0, 1)]
            self.assertEqual(thumbs[0].shape[:2], (160, 480))
            self.assertGreater(thumbs[0][..., :3].std(), 0.02)
            # the models are |z1 - z2| / sqrt(M) = 0.5 A RMSD apart: a faint difference
            self.assertGreater(np.abs(thumbs[0] - thumbs[1]).max(), 0.03)
        # the mmCIF keeps chain, residue and atom names as gemmi reads them
        st = gemmi.read_structure(os.path.join(self.tmp, "out_cif", "z_01.cif"))
        ref = gemmi.read_structure(os.path.join(_tmp, "sim", "reference.pdb"))
        self.assertEqual([ch.name for ch in st[0]], [ch.name for ch in ref[0]])
        self.assertEqual([r.name for r in st[0][0]][:10], [r.name for r in ref[0][0]][:10])

    def test_traversal_clusters_maxima(self):
        """PC1 traversal spans the 5th-95th percentiles; cluster and maximum counts add up."""
        dat = data()
        run = make_run(os.path.join(self.tmp, "run"))
        rng = np.random.default_rng(0)
        # three groups of two frames -> trimodal along PC1: the noise (10 A per amplitude)
        # blurs the two frames of a group (about 15 A apart) into one mode
        groups = [(2, 3), (9, 10), (16, 17)]
        idx = np.flatnonzero(np.isin(dat.frame, sum(map(list, groups), [])))
        z = dat.z_fit[dat.frame[idx]] + rng.normal(0, 10.0, (len(idx), D))
        lat = save_latent(os.path.join(self.tmp, "latent.npz"), z, idx)
        out = os.path.join(self.tmp, "out")
        rc, _, err = run_cli("export", "--no-refine", "--latent", lat, "--model", run, "-o", out,
                             "--pcs", "1", "--steps", "5", "--kmeans", "3", "--maxima")
        self.assertEqual(rc, 0, err)
        with open(os.path.join(out, "models.json")) as fh:
            models = json.load(fh)["models"]
        kinds = [m["kind"] for m in models]
        self.assertEqual(kinds, ["pc"] * 5 + ["cluster"] * 3 + ["maximum"] * 3)
        # PC1 by an independent SVD of the centred z (float32 as stored)
        zz = z.astype(np.float32).astype(np.float64)
        v1 = np.linalg.svd(zz - zz.mean(0), full_matrices=False)[2][0]
        pc1 = zz @ v1
        trav = np.array([np.array(m["z"]) @ v1 for m in models[:5]])
        sign = np.sign(trav[-1] - trav[0])
        trav, pc1 = sign * trav, sign * pc1
        np.testing.assert_allclose(trav, np.percentile(pc1, np.linspace(5, 95, 5)), atol=1e-6)
        self.assertEqual(sum(m["n_particles"] for m in models[5:8]), len(idx))
        # the three maxima sit at the three groups: mean frame fit of each group
        zmax = np.array([m["z"] for m in models[8:]])
        for g, zm in zip(groups, zmax[np.argsort(sign * zmax @ v1)]):
            target = dat.z_fit[list(g)].mean(0)
            self.assertLess(np.linalg.norm(zm - target), np.linalg.norm(
                dat.z_fit[g[1]] - dat.z_fit[g[0]]))
        # every written model is X0 + U z of its listed z
        for m in models:
            keys, xyz = gemmi_atoms(os.path.join(out, m["file"]))
            np.testing.assert_allclose(xyz, dat.x0 + np.tensordot(m["z"], dat.U, 1), atol=2e-3)

    def test_no_thumbnails_and_states_thumbnails(self):
        """export --no-thumbnails writes no PNG; states --model draws each state's model,
        lists it in states.json, and report --states shows it in the table."""
        from nmaem_plugin.core.io.runfolder import write_log
        run = make_run(os.path.join(self.tmp, "run"))
        out = os.path.join(self.tmp, "out")
        rc, _, err = run_cli("export", "--no-refine", "--no-thumbnails", "--model", run, "-o",
                             out, "--z", "1,2,3,4")
        self.assertEqual(rc, 0, err)
        self.assertEqual(sorted(f for f in os.listdir(out) if not f.startswith(".nmaem-")),
                         ["models.csv", "models.json", "z_01.pdb"])
        z = np.concatenate([np.full((4, D), -15.0), np.full((3, D), 15.0)])
        z += np.random.default_rng(0).normal(0, 0.5, z.shape)
        lat = save_latent(os.path.join(self.tmp, "latent.npz"), z, np.arange(len(z)))
        states = os.path.join(self.tmp, "states")
        rc, _, err = run_cli("states", "--latent", lat, "--kmeans", "2", "--model", run,
                             "-o", states)
        self.assertEqual(rc, 0, err)
        with open(os.path.join(states, "states.json")) as fh:
            listing = json.load(fh)
        self.assertEqual([s["thumbnail"] for s in listing["states"]],
                         ["state_01.png", "state_02.png"])
        a, b = (mpimg.imread(os.path.join(states, "state_%02d.png" % k)) for k in (1, 2))
        self.assertEqual(a.shape[:2], (160, 480))
        self.assertGreater(np.abs(a - b).max(), 0.1)     # z = -15 and +15: other models
        write_log(run, [dict(epoch=1, train_loss=1.0, val_loss=1.0, images_per_s=1.0,
                             seconds=1.0)])
        rep = os.path.join(self.tmp, "report")
        rc, _, err = run_cli("report", run, "-o", rep, "--states", states, "--models", out)
        self.assertEqual(rc, 0, err)
        with open(os.path.join(rep, "index.html")) as fh:
            page = fh.read()
        # copied into the report: its links stay inside its folder
        self.assertIn('<img class="thumb" src="states/state_01.png"', page)
        self.assertIn('<img class="thumb" src="states/state_02.png"', page)
        for k in (1, 2):
            with open(os.path.join(rep, "states", "state_%02d.png" % k), "rb") as fa, \
                    open(os.path.join(states, "state_%02d.png" % k), "rb") as fb:
                self.assertEqual(fa.read(), fb.read())
        self.assertIn("<td>-</td></tr>", page)      # the model without a thumbnail

    def test_overwrite(self):
        run = make_run(os.path.join(self.tmp, "run"))
        out = os.path.join(self.tmp, "out")
        self.assertEqual(run_cli("export", "--no-refine", "--model", run, "-o", out, "--z", "1,2,3,4")[0], 0)
        before = os.path.getmtime(os.path.join(out, "z_01.pdb"))
        self.assertCliError("export", "--no-refine", "--model", run, "-o", out, "--z", "4,3,2,1",
                            words=["z_01.pdb", "--overwrite"])
        _, xyz = gemmi_atoms(os.path.join(out, "z_01.pdb"))
        np.testing.assert_allclose(xyz, data().x0 + np.tensordot([1, 2, 3, 4], data().U, 1),
                                   atol=2e-3)
        self.assertEqual(before, os.path.getmtime(os.path.join(out, "z_01.pdb")))
        self.assertEqual(run_cli("export", "--no-refine", "--model", run, "-o", out, "--z", "4,3,2,1",
                                 "--overwrite")[0], 0)
        _, xyz = gemmi_atoms(os.path.join(out, "z_01.pdb"))
        np.testing.assert_allclose(xyz, data().x0 + np.tensordot([4, 3, 2, 1], data().U, 1),
                                   atol=2e-3)


# ------------------------------------------------------------------------------- evaluate

class TestEvaluate(TmpCase):
    def evaluate(self, z, index):
        run = make_run(os.path.join(self.tmp, "run"))
        lat = save_latent(os.path.join(self.tmp, "latent.npz"), z, index)
        pp = os.path.join(self.tmp, "pp.npz")
        rc, out, err = run_cli("evaluate", "--latent", lat, "--truth",
                               os.path.join(_tmp, "sim"), "--model", run,
                               "--per-particle", pp)
        self.assertEqual(rc, 0, err)
        with np.load(pp) as f:
            per = {k: f[k] for k in f.files}
        return json.loads(out), per

    def test_least_squares_amplitudes_reach_the_floor(self):
        """z = lstsq amplitudes of the true frame: per-particle RMSD = that frame's floor."""
        dat = data()
        rng = np.random.default_rng(1)
        index = rng.permutation(N_PART)[:150]       # a shuffled subset: index maps rows
        res, per = self.evaluate(dat.z_fit[dat.frame[index]], index)
        np.testing.assert_array_equal(per["frame"], dat.frame[index])
        np.testing.assert_allclose(per["rmsd"], dat.floor[dat.frame[index]], atol=2e-3)
        np.testing.assert_allclose(res["floor_rmsd_per_frame"], dat.floor, atol=1e-6)
        np.testing.assert_allclose(res["reference_rmsd_per_frame"], dat.ref_rmsd, atol=1e-6)
        self.assertAlmostEqual(res["floor_rmsd"]["median"],
                               np.median(dat.floor[dat.frame[index]]), delta=1e-6)
        self.assertAlmostEqual(res["rmsd"]["median"],
                               np.median(dat.floor[dat.frame[index]]), delta=2e-3)
        # a linear morph: PC1 follows the frame
        self.assertGreater(res["abs_corr_pc1_frame"], 0.99)
        self.assertGreater(res["pc1_explained_variance"], 0.99)
        self.assertEqual(res["summary"]["n_particles"], 150)
        self.assertEqual(res["n_matched_atoms"], dat.M)
        # the morph's end is far from the reference but within the modes' reach
        self.assertGreater(dat.ref_rmsd[-1], 5.0)

    def test_zero_amplitudes(self):
        """z = 0: per-particle RMSD is the RMSD of X0 to the particle's frame."""
        dat = data()
        index = np.arange(N_PART)
        res, per = self.evaluate(np.zeros((N_PART, D)), index)
        np.testing.assert_allclose(per["rmsd"], dat.ref_rmsd[dat.frame], atol=1e-6)
        self.assertIsNone(res["abs_corr_pc1_frame"])   # z constant: no correlation

    def test_maxima_on_trimodal_latent(self):
        """Three groups of frames: three maxima at those frames, model RMSD near the floor."""
        dat = data()
        groups = [(2, 3), (9, 10), (16, 17)]
        index = np.flatnonzero(np.isin(dat.frame, sum(map(list, groups), [])))
        noise = np.random.default_rng(2).normal(0, 10.0, (len(index), D))
        res, _ = self.evaluate(dat.z_fit[dat.frame[index]] + noise, index)
        pts = res["maxima"]["points"]
        self.assertEqual(len(pts), 3)
        step = dat.ref_rmsd[1]        # RMSD of one morph step
        for p, g in zip(sorted(pts, key=lambda p: p["frame"]), groups):
            self.assertIn(p["frame"], g)
            self.assertAlmostEqual(p["floor_rmsd"], dat.floor[p["frame"]], delta=1e-6)
            self.assertLessEqual(p["rmsd"], p["floor_rmsd"] + step)
        self.assertEqual(res["summary"]["n_maxima"], 3)
        self.assertEqual(sorted(res["summary"]["maxima_frames"]),
                         sorted(p["frame"] for p in pts))


def write_relion31(path, ids, origins):
    """A RELION 3.1 particle STAR written by hand: ids (rlnImageId, or no column when None)
    and origins (A); images 1..N of one stack, 32 px at 3 A."""
    lines = ["data_optics", "loop_", "_rlnOpticsGroup #1", "_rlnImagePixelSize #2",
             "_rlnImageSize #3", "_rlnImageDimensionality #4", "1 3.0 32 2", "",
             "data_particles", "loop_", "_rlnImageName #1", "_rlnOpticsGroup #2",
             "_rlnOriginXAngst #3", "_rlnOriginYAngst #4"]
    if ids is not None:
        lines.append("_rlnImageId #5")
    for k, (ox, oy) in enumerate(origins):
        row = "%06d@stack.mrcs 1 %r %r" % (k + 1, float(ox), float(oy))
        lines.append(row + ("" if ids is None else " %d" % ids[k]))
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


class TestMatchToSimulation(TmpCase):
    """``nmaem evaluate --particles``: rows found in the simulation by rlnImageId, shifts
    from the origins (evaluate.match_to_simulation)."""

    def test_hand_built_case(self):
        from nmaem_plugin import constants
        from nmaem_plugin.core.analysis.evaluate import match_to_simulation
        from nmaem_plugin.core.io.latent import Latent
        from nmaem_plugin.core.io.table import ID_COLUMN
        from nmaem_plugin.core.io.particles import read_particles
        self.assertEqual(ID_COLUMN, constants.STAR_ID_COLUMN)   # one column, both sides
        sim = read_particles(write_relion31(os.path.join(self.tmp, "sim.star"),
                                            [10, 20, 30], [(1, 2), (3, 4), (5, 6)]))
        parts = read_particles(write_relion31(os.path.join(self.tmp, "p.star"),
                                              [30, 10], [(0.5, 6), (1, 1)]))
        # latent rows: particle file rows 1 (id 10) and 0 (id 30)
        lat = Latent(np.zeros((2, 1)), np.array([[0.25, 0.0], [0.0, -1.0]]),
                     np.array([1, 0]), "lat.npz")
        out = match_to_simulation(lat, parts, sim)
        np.testing.assert_array_equal(out.index, [0, 2])
        # latent shift + simulated origin - the file's origin:
        # id 10: (0.25, 0) + (1, 2) - (1, 1);  id 30: (0, -1) + (5, 6) - (0.5, 6)
        np.testing.assert_allclose(out.shift, [[0.25, 1.0], [4.5, -1.0]])
        np.testing.assert_array_equal(out.z, lat.z)
        # a simulation without rlnImageId: ids are its rows 1..N
        plain = read_particles(write_relion31(os.path.join(self.tmp, "plain.star"), None,
                                              [(0, 0)] * 40))
        np.testing.assert_array_equal(match_to_simulation(lat, parts, plain).index, [9, 29])
        # a particle that is not simulated: one line naming the particle file
        stray = read_particles(write_relion31(os.path.join(self.tmp, "stray.star"),
                                              [30, 40], [(0, 0), (0, 0)]))
        with self.assertRaises(NmaemError) as cm:
            match_to_simulation(lat, stray, sim)
        msg = str(cm.exception)
        self.assertTrue(msg.startswith(stray.path + ": particle 40 is not among the 3"), msg)
        self.assertNotIn("\n", msg)
        with self.assertRaises(NmaemError):           # a row beyond the particle file
            match_to_simulation(Latent(np.zeros((1, 1)), np.zeros((1, 2)), np.array([2]),
                                       "lat.npz"), parts, sim)

    def test_evaluate_with_particles_equals_evaluate_with_rows(self):
        """A permuted subset with its own ids and refined origins, evaluated with
        --particles, gives the figures of the same z evaluated by simulation rows, and the
        shift error of the origins' offsets (the simulation's origins are zero)."""
        from nmaem_plugin.core.io.table import ID_COLUMN
        from nmaem_plugin.core.io.particles import read_particles
        from nmaem_plugin.core.io.star import write_star
        import pandas as pd
        dat = data()
        rng = np.random.default_rng(5)
        rows = rng.permutation(N_PART)[:60]
        offset = rng.normal(0.0, 1.5, (60, 2))
        sim = read_particles(os.path.join(_tmp, "sim", "particles.star"))
        sub = sim.subset(rows)
        sub.extra = pd.DataFrame({ID_COLUMN: rows + 1})     # the simulation's ids are 1..N
        sub.origin = sim.origin_or_zero()[rows] - offset   # refined: the shift folded in
        pstar = os.path.join(self.tmp, "p.star")
        write_star(pstar, sub)
        z = dat.z_fit[dat.frame[rows]] + rng.normal(0.0, 1.0, (60, D))
        run = make_run(os.path.join(self.tmp, "run"))
        results = []
        for name, index, extra in (("by_rows", rows, []),
                                   ("by_ids", np.arange(60), ["--particles", pstar])):
            lat = save_latent(os.path.join(self.tmp, name + ".npz"), z, index,
                              shift=(offset.astype(np.float32) if name == "by_rows"
                                     else None))
            pp = os.path.join(self.tmp, name + "_pp.npz")
            rc, out, err = run_cli("evaluate", "--latent", lat, "--truth",
                                   os.path.join(_tmp, "sim"), "--model", run,
                                   "--per-particle", pp, *extra)
            self.assertEqual(rc, 0, err)
            with np.load(pp) as f:
                results.append((json.loads(out), {k: f[k] for k in f.files}))
        (a, pa), (b, pb) = results
        np.testing.assert_array_equal(pb["index"], rows)
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k], k)
        self.assertEqual(b.pop("particles"), os.path.abspath(pstar))
        # the shifts: float32 in one latent, from the STAR's origins in the other
        ea, eb = a.pop("shift_error"), b.pop("shift_error")
        for k in ("rmse", "median", "p95"):
            self.assertAlmostEqual(ea[k], eb[k], delta=1e-5)
        sa, sb = a["summary"].pop("shift_rmse"), b["summary"].pop("shift_rmse")
        self.assertAlmostEqual(sa, sb, delta=1e-5)
        for r in (a, b):
            r.pop("latent")
            r.pop("per_particle_file")
        self.assertEqual(a, b)
        rmse = np.sqrt((offset ** 2).sum(1).mean())
        self.assertAlmostEqual(eb["rmse"], rmse, delta=1e-5)
        self.assertEqual(eb["compared_to"], "zero (origins in the particle file)")
        # a particle id that is not simulated: one line naming the particle file
        sub.extra = pd.DataFrame({ID_COLUMN: rows + 1 + N_PART})
        write_star(pstar, sub)
        lat = save_latent(os.path.join(self.tmp, "stray.npz"), z, np.arange(60))
        self.assertCliError("evaluate", "--latent", lat, "--truth", os.path.join(_tmp, "sim"),
                            "--model", run, "--particles", pstar,
                            words=(pstar, "not among the %d simulated particles" % N_PART))


# ------------------------------------------------------------------------------- errors

class TestErrors(TmpCase):
    def test_bad_inputs(self):
        """Missing files, mismatches and impossible requests: one-line errors, status 2."""
        dat = data()
        sim = os.path.join(_tmp, "sim")
        run = make_run(os.path.join(self.tmp, "run"))
        good = save_latent(os.path.join(self.tmp, "good.npz"), np.zeros((10, D)), np.arange(10))
        out = os.path.join(self.tmp, "out")
        self.assertCliError("evaluate", "--latent", os.path.join(self.tmp, "nope.npz"),
                            "--truth", sim, "--model", run, words=["nope.npz"])
        self.assertCliError("evaluate", "--latent", good, "--truth", self.tmp, "--model", run,
                            words=["ground_truth.npz"])
        self.assertCliError("evaluate", "--latent", good, "--truth", sim, "--model", self.tmp,
                            words=["config.json"])
        no_modes = make_run(os.path.join(self.tmp, "run_nomodes"), modes=False)
        self.assertCliError("export", "--no-refine", "--latent", good, "--model", no_modes, "-o", out,
                            words=["modes.npz", "missing"])
        # modes computed on another conformation (same atoms, original file frame)
        other = make_run(os.path.join(self.tmp, "run_other"), reference=self.moved_reference())
        self.assertCliError("export", "--no-refine", "--latent", good, "--model", other, "-o", out,
                            words=["different"])
        d3 = save_latent(os.path.join(self.tmp, "d3.npz"), np.zeros((10, 3)), np.arange(10))
        self.assertCliError("export", "--no-refine", "--latent", d3, "--model", run, "-o", out,
                            words=["d = 3", "4 modes"])
        self.assertCliError("evaluate", "--latent", d3, "--truth", sim, "--model", run,
                            words=["d = 3"])
        beyond = save_latent(os.path.join(self.tmp, "beyond.npz"), np.zeros((3, D)),
                             [0, 5, N_PART])
        self.assertCliError("evaluate", "--latent", beyond, "--truth", sim, "--model", run,
                            words=["beyond", str(N_PART)])
        d0 = save_latent(os.path.join(self.tmp, "d0.npz"), np.zeros((10, 0)), np.arange(10))
        run0 = make_run(os.path.join(self.tmp, "run0"), modes=False, config={"modes": None})
        self.assertCliError("export", "--no-refine", "--latent", d0, "--model", run0, "-o", out,
                            words=["d = 0"])
        self.assertCliError("export", "--no-refine", "--latent", d0, "--model", run, "-o", out,
                            words=["d = 0"])
        self.assertCliError("export", "--no-refine", "--model", run, "-o", out, "--z", "1,2",
                            words=["d = 4"])
        self.assertCliError("export", "--no-refine", "--latent", good, "--model", run, "-o", out,
                            "--kmeans", "2", words=["distinct"])
        self.assertFalse(os.path.exists(os.path.join(out, "models.json")))
        # a d = 0 run is evaluated as the reference alone
        rc, text, err = run_cli("evaluate", "--latent", d0, "--truth", sim, "--model", run0)
        self.assertEqual(rc, 0, err)
        res = json.loads(text)
        self.assertAlmostEqual(res["rmsd"]["median"],
                               np.median(dat.ref_rmsd[dat.frame[:10]]), delta=1e-6)
        self.assertIsNone(res["pc1_explained_variance"])
        # the trainer's layout for d = 0: modes.npz present, config n_modes 0
        run0b = make_run(os.path.join(self.tmp, "run0b"), config={"n_modes": 0})
        rc, text, err = run_cli("evaluate", "--latent", d0, "--truth", sim, "--model", run0b)
        self.assertEqual(rc, 0, err)
        self.assertEqual(json.loads(text)["rmsd"]["median"], res["rmsd"]["median"])
        # config n_modes 2: the first 2 modes of the file are the run's
        run2 = make_run(os.path.join(self.tmp, "run2"), config={"n_modes": 2})
        self.assertCliError("export", "--no-refine", "--latent", good, "--model", run2, "-o", out,
                            words=["d = 4", "2 modes"])
        out2 = os.path.join(self.tmp, "out2")
        self.assertEqual(run_cli("export", "--no-refine", "--model", run2, "-o", out2, "--z", "3,-2")[0], 0)
        _, xyz = gemmi_atoms(os.path.join(out2, "z_01.pdb"))
        np.testing.assert_allclose(xyz, dat.x0 + 3 * dat.U[0] - 2 * dat.U[1], atol=2e-3)

    def moved_reference(self):
        st = gemmi.read_structure(os.path.join(_tmp, "sim", "reference.pdb"))
        for ch in st[0]:
            for res in ch:
                for at in res:
                    at.pos = gemmi.Position(at.pos.x + 1.0, at.pos.y, at.pos.z)
        path = os.path.join(self.tmp, "moved.pdb")
        st.write_pdb(path)
        return path

    def test_subprocess_exit_status(self):
        """The installed command: exit status 2 and exactly one stderr line."""
        run = make_run(os.path.join(self.tmp, "run"))
        p = subprocess.run(NMAEM + ["evaluate", "--latent", os.path.join(self.tmp, "x.npz"),
                                    "--truth", os.path.join(_tmp, "sim"), "--model", run],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        self.assertIn("x.npz: no such latent file", p.stderr)


if __name__ == "__main__":
    unittest.main()
