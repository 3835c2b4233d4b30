"""Figures (core.report.figures), ``nmaem report`` and the Scipion viewers, all headless (Agg):

    python -m scipion tests nmaem_plugin.tests.scipion.test_viewers

The figure and report tests use synthetic arrays. The viewer tests use the real
protocols of the shared chain (``chain.py``, built once per test run with
test_protocols_train: 200 noise-free 32-px particles of a 4-frame morph of the bundled
adenylate kinase models, 3 modes with the closed form as target, 2 training epochs of
the small encoder on the CPU, inference), build every viewer's figures for each target
class and launch an export from the latent viewer.
"""
import io
import json
import os
import shutil
import tempfile
import time
import unittest
from contextlib import redirect_stderr, redirect_stdout

import matplotlib
matplotlib.use("Agg")

import numpy as np

from nmaem_plugin.core.analysis.labels import MAX_FRAME_GROUPS
from nmaem_plugin.core.report.figures import (HIST_BINS, latent_landscape, mode_amplitudes,
                                              modes_overview, residue_fluctuation,
                                              training_curves)
from nmaem_plugin.core.io.runfolder import read_log_columns
from nmaem_plugin.core.analysis.kde import density_maxima
from nmaem_plugin.core.analysis.landscape import pca


def _trimodal(n, d=3, seed=0, centres=(-6.0, 0.0, 6.0)):
    """z (n,d) with PC1 along z1 at three separated populations; frames 0,1,2."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, len(centres), n)
    z = rng.normal(0, 0.3, (n, d))
    z[:, 0] = np.asarray(centres)[frames] + rng.normal(0, 0.5, n)
    return z, frames


def _axis(fig, xlabel_prefix):
    axes = [a for a in fig.axes if a.get_xlabel().startswith(xlabel_prefix)]
    return axes


def _maxima_markers(ax):
    return [ln for ln in ax.get_lines() if ln.get_gid() == "maxima"]


def _modes_dict(d=3, n_res=12, target=True, seed=0):
    """A small modes.npz-like dict: 3 atoms per residue, one chain."""
    rng = np.random.default_rng(seed)
    m = 3 * n_res
    q, _ = np.linalg.qr(rng.normal(size=(3 * m, d)))
    data = {"coords": rng.normal(size=(m, 3)).astype(np.float32),
            "modes": q.T.reshape(d, m, 3).astype(np.float32),
            "eigenvalues": np.linspace(0.1, 1.0, d),
            "atom_ids": np.array(["A:%d::ALA:%s" % (i // 3 + 1, ("N", "CA", "C")[i % 3])
                                  for i in range(m)]),
            "collectivity": np.linspace(0.6, 0.2, d)}
    if target:
        data.update(target_overlap=np.array([0.8, -0.3, 0.1][:d]),
                    target_cumulative_overlap=np.array([0.8, 0.85, 0.86][:d]),
                    target_rmsd=np.array(7.2), target_floor_rmsd=np.array(2.15))
    return data


class TestLatentFigures(unittest.TestCase):
    def test_d1_histogram_with_maxima(self):
        z, frames = _trimodal(900, d=1)
        fig = latent_landscape(z)
        ax = _axis(fig, "z1")[0]
        self.assertEqual(ax.get_ylabel(), "particles per bin")
        bars = [p for p in ax.patches]
        self.assertEqual(len(bars), HIST_BINS)
        self.assertEqual(int(round(sum(b.get_height() for b in bars))), 900)
        m = density_maxima(z[:, 0])
        self.assertEqual(len(m), 3)
        pos = _maxima_markers(ax)[0].get_xdata()
        np.testing.assert_allclose(np.sort(pos), np.sort(m.positions), atol=1e-9)
        self.assertEqual(len(fig.axes), 1)        # no frames: one panel
        fig2 = latent_landscape(z, frames=frames)
        self.assertEqual(len(fig2.axes), 2)

    def test_small_sample_has_fewer_bins(self):
        z, _ = _trimodal(60, d=1)
        ax = latent_landscape(z).axes[0]
        self.assertEqual(len(ax.patches), 20)     # about 3 particles per bin

    def test_pca_panels(self):
        z, frames = _trimodal(1500, d=4, seed=1)
        fig = latent_landscape(z, frames=frames)
        p = pca(z)
        pc1 = p.transform(z)[:, 0]
        ev_ax = _axis(fig, "principal component")[0]
        self.assertEqual(ev_ax.get_ylabel(), "explained variance ratio")
        heights = [b.get_height() for b in ev_ax.patches]
        np.testing.assert_allclose(heights, p.explained_variance_ratio, atol=1e-12)
        hist_ax, hex_ax, frame_ax = _axis(fig, "PC1")
        self.assertEqual(len(hist_ax.patches), HIST_BINS)
        m = density_maxima(pc1)
        self.assertEqual(len(m), 3)
        np.testing.assert_allclose(_maxima_markers(hist_ax)[0].get_xdata(), m.positions,
                                   atol=1e-9)
        self.assertEqual(hex_ax.get_ylabel(), "PC2 (A)")
        self.assertEqual(hex_ax.collections[0].get_array().sum(), 1500)
        groups = [p for p in frame_ax.patches if p.get_gid() == "frame_group"]
        self.assertEqual(len(groups), 3)
        self.assertIn("|corr|", frame_ax.get_title())

    def test_many_frames_are_grouped(self):
        rng = np.random.default_rng(2)
        frames = rng.integers(0, 50, 3000)
        z = np.c_[frames * 0.2 + rng.normal(0, 0.3, 3000), rng.normal(0, 0.3, 3000)]
        fig = latent_landscape(z, frames=frames)
        frame_ax = _axis(fig, "PC1")[2]
        self.assertEqual(len([p for p in frame_ax.patches if p.get_gid() == "frame_group"]),
                         MAX_FRAME_GROUPS)

    def test_large_n_is_binned(self):
        n = 300000
        z, _ = _trimodal(n, d=16, seed=3)
        t0 = time.time()
        fig = latent_landscape(z)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        elapsed = time.time() - t0
        hist_ax, hex_ax = _axis(fig, "PC1")[:2]
        hexbin = hex_ax.collections[0]
        self.assertEqual(hexbin.get_array().sum(), n)       # every particle binned
        self.assertLess(len(hexbin.get_offsets()), 5000)    # hexagons, not points
        for ax in fig.axes:
            for c in ax.collections:
                self.assertLess(len(c.get_offsets()), 5000)
        self.assertIn("maxima from 50,000", hist_ax.get_title())
        self.assertEqual(len(_maxima_markers(hist_ax)[0].get_xdata()), 3)
        self.assertLess(elapsed, 30.0)

    def test_mode_amplitudes(self):
        z, _ = _trimodal(500, d=5)
        fig = mode_amplitudes(z)
        used = [a for a in fig.axes if a.get_xlabel()]
        self.assertEqual([a.get_xlabel() for a in used], ["z%d (A)" % i for i in range(1, 6)])
        for l, ax in enumerate(used):
            self.assertEqual(int(round(sum(p.get_height() for p in ax.patches))), 500)

    def test_rejects_bad_input(self):
        from nmaem_plugin.core.base.errors import NmaemError
        with self.assertRaises(NmaemError):
            latent_landscape(np.zeros((1, 3)))
        with self.assertRaises(NmaemError):
            latent_landscape(np.zeros((10, 2)), frames=np.zeros(3))


class TestOtherFigures(unittest.TestCase):
    def test_training_curves(self):
        rows = [dict(epoch=e, train_loss=10.0 / e, val_loss=11.0 / e, images_per_s=100 + e,
                     seconds=3.0) for e in range(1, 6)]
        fig = training_curves(rows)
        loss_ax, speed_ax = fig.axes
        self.assertEqual((loss_ax.get_xlabel(), loss_ax.get_ylabel()), ("epoch", "loss"))
        self.assertEqual(speed_ax.get_ylabel(), "images/s")
        lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
        np.testing.assert_allclose(lines["training loss"].get_ydata(),
                                   [r["train_loss"] for r in rows])
        np.testing.assert_allclose(lines["validation loss"].get_ydata(),
                                   [r["val_loss"] for r in rows])
        np.testing.assert_allclose(speed_ax.get_lines()[0].get_ydata(), [101, 102, 103, 104, 105])
        empty = training_curves([])
        self.assertEqual(len(empty.axes), 2)

    def test_training_curves_from_csv(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        fn = os.path.join(tmp, "log.csv")
        with open(fn, "w") as fh:
            fh.write("epoch,train_loss,val_loss,images_per_s,seconds\n1,2.0,2.5,50,1\n"
                     "2,1.0,1.5,60,1\n")
        ax = training_curves(fn).axes[0]
        self.assertEqual(len(ax.get_lines()), 2)
        np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), [2.5, 1.5])

    def test_modes_overview(self):
        data = _modes_dict()
        fig = modes_overview(data)
        ev_ax, coll_ax, fl_ax, ov_ax = fig.axes
        ev = [ln for ln in ev_ax.get_lines() if ln.get_gid() == "eigenvalues"][0]
        np.testing.assert_allclose(ev.get_ydata(), data["eigenvalues"])
        self.assertEqual(ev_ax.get_yscale(), "log")
        np.testing.assert_allclose([b.get_height() for b in coll_ax.patches],
                                   data["collectivity"])
        keys, fl = residue_fluctuation(data)
        self.assertEqual(len(keys), 12)
        per_atom = ((data["modes"].astype(float) ** 2).sum(-1)
                    / data["eigenvalues"][:, None]).sum(0)
        np.testing.assert_allclose(fl, per_atom.reshape(12, 3).mean(1), rtol=1e-6)
        line = [ln for ln in fl_ax.get_lines() if ln.get_gid() == "fluctuation"][0]
        np.testing.assert_allclose(line.get_ydata(), fl)
        np.testing.assert_allclose([b.get_height() for b in ov_ax.patches], [0.8, 0.3, 0.1])
        self.assertIn("floor RMSD 2.15 A", ov_ax.get_title())
        texts = [t.get_text() for t in ov_ax.texts if t.get_gid() == "floor"]
        self.assertTrue(texts and "2.15" in texts[0])
        fig = modes_overview(_modes_dict(target=False))
        self.assertFalse(fig.axes[3].axison)


class TestReport(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="nmaem-report-")
        cls.runDir = os.path.join(cls.tmp, "run")
        os.makedirs(cls.runDir)
        with open(os.path.join(cls.runDir, "log.csv"), "w") as fh:
            fh.write("epoch,train_loss,val_loss,images_per_s,seconds\n")
            for e in range(1, 4):
                fh.write("%d,%g,%g,%g,%g\n" % (e, 1.0 / e, 1.2 / e, 100 + e, 2.0))
        np.savez(os.path.join(cls.runDir, "modes.npz"), **_modes_dict())
        with open(os.path.join(cls.runDir, "config.json"), "w") as fh:
            json.dump({"modes": "modes.npz", "reference": "reference.pdb", "n_modes": 3}, fh)
        z, frames = _trimodal(600, d=3)
        cls.latent = os.path.join(cls.tmp, "latent.npz")
        np.savez(cls.latent, z=z.astype(np.float32), shift=np.zeros((600, 2), np.float32),
                 index=np.arange(600))
        cls.truth = os.path.join(cls.tmp, "sim")
        os.makedirs(cls.truth)
        np.savez(os.path.join(cls.truth, "ground_truth.npz"), frame=frames,
                 shift=np.zeros((600, 2)))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def _cli(self, *argv):
        from nmaem_plugin.core.cli.main import main
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def test_report_writes_figures_and_index(self):
        out = os.path.join(self.tmp, "report")
        rc, stdout, err = self._cli("report", self.runDir, "-o", out, "--latent", self.latent,
                                    "--truth", self.truth)
        self.assertEqual(rc, 0, err)
        pngs = ["training.png", "modes.png", "latent.png", "amplitudes.png"]
        with open(os.path.join(out, "index.html")) as fh:
            index = fh.read()
        for name in pngs:
            fn = os.path.join(out, name)
            with open(fn, "rb") as fh:
                self.assertEqual(fh.read(8), b"\x89PNG\r\n\x1a\n")
            self.assertIn('<img src="%s"' % name, index)
            self.assertIn("wrote %s" % fn, stdout)
        self.assertEqual(index.count("<figcaption>"), 4)
        self.assertIn("ground-truth frame", index)

    def test_report_without_latent(self):
        out = os.path.join(self.tmp, "report_run_only")
        rc, _, err = self._cli("report", self.runDir, "-o", out)
        self.assertEqual(rc, 0, err)
        self.assertEqual(sorted(f for f in os.listdir(out) if f.endswith(".png")),
                         ["modes.png", "training.png"])

    def test_report_errors(self):
        out = os.path.join(self.tmp, "bad")
        cases = [(("report", os.path.join(self.tmp, "nope"), "-o", out),
                  "no such training run folder"),
                 (("report", self.truth, "-o", out), "log.csv: missing"),
                 (("report", self.runDir, "-o", out, "--latent", self.latent + ".x"),
                  "no such latent file"),
                 (("report", self.runDir, "-o", out, "--modes", "/nonexistent/modes.npz"),
                  "no such modes file"),
                 (("report", self.runDir, "-o", out, "--latent", self.latent, "--truth",
                   self.runDir), "ground_truth.npz: missing")]
        for argv, message in cases:
            rc, _, err = self._cli(*argv)
            self.assertEqual(rc, 2, argv)
            self.assertTrue(err.startswith("nmaem: error: "), err)
            self.assertIn(message, err)
            self.assertEqual(err.count("\n"), 1, err)
        self.assertFalse(os.path.exists(out))       # nothing written on bad input


# ---------------------------------------------------------------------- Scipion viewers

try:
    from pyworkflow.tests import BaseTest
except ImportError:      # the figure tests above run without Scipion
    BaseTest = None

if BaseTest is not None:
    from pwem.viewers.plotter import EmPlotter
    from pyworkflow.viewer import MessageView

    from nmaem_plugin.protocols import NmaemProtExport
    from nmaem_plugin.viewers import NmaemLatentViewer, NmaemModesViewer
    from nmaem_plugin.viewers.viewer_training import NmaemTrainingViewer
    from nmaem_plugin.viewers.viewer_latent import POINT_CLUSTER, POINT_PC1, POINT_Z

    from nmaem_plugin.tests.scipion import chain, scipion_base
    _tail = scipion_base.log_tail

    class TestNmaemViewers(scipion_base.NmaemBaseTest):
        """Each viewer on each class it targets, on the outputs of real protocols."""

        @classmethod
        def setUpClass(cls):
            chain.use(cls)    # the trained chain of test_protocols_train, built once

        def tearDown(self):
            import matplotlib.pyplot as plt
            plt.close("all")

        def _viewer(self, cls, obj):
            self.assertTrue(cls.can_handle_this(type(obj).mro(), instance=obj),
                            "%s does not handle %s" % (cls.__name__, type(obj).__name__))
            return cls(project=self.proj, protocol=obj)

        def _figure(self, views):
            self.assertEqual(len(views), 1, views)
            self.assertIsInstance(views[0], EmPlotter,
                                  getattr(views[0], "getMessage", lambda: views)())
            return views[0].getFigure()

        # -------------------------------------------------------------- latent
        def test_latent_viewer_targets(self):
            from nmaem_plugin.protocols import NmaemProtInfer
            from nmaem_plugin.protocols.protocol_flex_common import runDirOf
            run = runDirOf(self.train.outputNetwork)
            for obj in (self.infer, self.infer.outputParticles, self.train):
                viewer = self._viewer(NmaemLatentViewer, obj)
                parts = viewer.getParticles()
                if obj is self.train:
                    # the output of the last inference made with its network (the
                    # shared project may hold more than self.infer's)
                    infers = [r for r in self.proj.getRuns(refresh=False)
                              if isinstance(r, NmaemProtInfer) and r.hasAttribute(
                                  "outputParticles")
                              and runDirOf(r.outputParticles) == run]
                    self.assertEqual(parts.getFileName(),
                                     infers[-1].outputParticles.getFileName())
                else:
                    self.assertEqual(parts.getFileName(),
                                     self.infer.outputParticles.getFileName())
                z = np.array([p.getZFlex() for p in parts.iterItems(orderBy="id")],
                             dtype=float)
                expected = density_maxima(pca(z).transform(z)[:, 0]).positions
                fig = self._figure(viewer._visualize(obj))
                hist_ax = _axis(fig, "PC1")[0]
                self.assertEqual(int(round(sum(p.get_height() for p in hist_ax.patches))),
                                 chain.N_PARTICLES)
                np.testing.assert_allclose(_maxima_markers(hist_ax)[0].get_xdata(), expected,
                                           atol=1e-9)
                # simulated particles carry their frame: the frame panel is there
                self.assertTrue(any("ground-truth frame" in a.get_title() for a in fig.axes))
                labels = [t.get_text() for t in hist_ax.texts
                          if t.get_gid() == "maximum_label"]
                self.assertEqual(len(labels), len(expected))
                self.assertTrue(labels[0].startswith("maximum_01\n"), labels)
                hex_ax = [a for a in fig.axes if a.get_ylabel() == "PC2 (A)"][0]
                self.assertEqual(hex_ax.get_aspect(), 1.0)
                # the RMSD axis of the run's modes: M atoms from the modes file itself
                sec = [a for a in hist_ax.child_axes
                       if "RMSD along PC1" in a.get_xlabel()]
                self.assertEqual(len(sec), 1)
                amp = self._figure(viewer._showAmplitudes())
                self.assertEqual(len([a for a in amp.axes if a.get_xlabel()]),
                                 chain.N_MODES)
            viewer = self._viewer(NmaemLatentViewer, self.infer)
            viewer.setProtocol(self.infer)
            viewer.colourByFrame.set(False)
            fig = self._figure(viewer._showLandscape())
            self.assertFalse(any("frame" in a.get_title() for a in fig.axes))
            # the simulated particles are not nmaem Flexibility Hub particles
            self.assertFalse(NmaemLatentViewer.can_handle_this(
                type(self.sim.outputParticles).mro(), instance=self.sim.outputParticles))

        def _nAtoms(self):
            """M of the run's modes, read with numpy (the viewer reads only the header)."""
            run = os.path.join(self.proj.getPath(), self.train._getExtraPath("run"))
            with np.load(os.path.join(run, "modes.npz")) as f:
                return f["modes"].shape[1]

        def test_latent_chosen_points(self):
            viewer = self._viewer(NmaemLatentViewer, self.infer)
            viewer.setProtocol(self.infer)
            _, z, _ = viewer.getLatent()
            p = pca(z)
            m = self._nAtoms()
            self.assertEqual(viewer.nAtoms(), m)
            pc1_rmsd = p.transform(z)[:, 0] / np.sqrt(m)
            lo, hi, mid, unit = viewer.pcRangeForForm()
            self.assertAlmostEqual(lo, pc1_rmsd.min(), places=9)
            self.assertAlmostEqual(hi, pc1_rmsd.max(), places=9)
            self.assertIn("RMSD along PC1", unit)
            # the form's default is inside the data (the median particle), not 0.0
            self.assertTrue(lo <= viewer.pc1Value.get() <= hi, (lo, viewer.pc1Value.get(), hi))
            self.assertIn("%.3g to %.3g" % (lo, hi),
                          viewer._definition.getParam("pc1Value").help.get())
            viewer.pointKind.set(POINT_PC1)
            value = lo + 0.25 * (hi - lo)
            viewer.pc1Value.set(value)
            point, label = viewer.chosenPoint()
            self.assertAlmostEqual(float(p.transform(point[None])[0, 0]) / np.sqrt(m), value,
                                   places=6)
            np.testing.assert_allclose(p.transform(point[None])[0, 1:],
                                       p.transform(p.mean[None])[0, 1:], atol=1e-9)
            self.assertIn("RMSD", label)
            viewer.pc1Value.set(hi + 1.0)
            views = viewer._showModel()
            self.assertIsInstance(views[0], MessageView)
            self.assertIn("outside the particles' range", views[0].getMessage())
            viewer.pointKind.set(POINT_CLUSTER)
            viewer.numberOfClusters.set(2)
            viewer.clusterNumber.set(1)
            point, label = viewer.chosenPoint()
            self.assertIn("cluster 1 of 2", label)
            viewer.pointKind.set(POINT_Z)
            viewer.amplitudes.set("1")
            views = viewer._showModel()
            self.assertIsInstance(views[0], MessageView)
            self.assertIn("1 amplitudes given", views[0].getMessage())

        def test_latent_uncertainty_and_shrinkage(self):
            """An inference with the population estimated from the particles gives each
            particle its posterior sd (the latent's z_cov, read here with numpy) and the
            shrinkage check: both drawn by the latent viewer; the summary says the check's
            verdict. The default inference (the encoder's population) has neither, and
            the viewer and summary say so."""
            from nmaem_plugin.protocols import NmaemProtInfer
            from nmaem_plugin.viewers.viewer_latent import uncertaintyOfParticles
            infer = self.newProtocol(NmaemProtInfer, objLabel="infer em", batchSize=64,
                                     population=0, useGpu=False)
            infer.inputNetwork.set(self.train.outputNetwork)
            infer.inputParticles.set(self.sim.outputParticles)
            self._launch(infer)
            viewer = self._viewer(NmaemLatentViewer, infer)
            viewer.setProtocol(infer)
            fn = os.path.join(self.proj.getPath(), infer._getExtraPath("latent.npz"))
            with np.load(fn) as f:
                cov, index = f["z_cov"].astype(np.float64), f["index"]
            self.assertEqual(cov.shape[1:], (chain.N_MODES, chain.N_MODES))
            sd = uncertaintyOfParticles(infer.outputParticles)
            # the particles in id order are the latent's rows in STAR order
            want = np.sqrt(np.trace(cov, axis1=1, axis2=2))[np.argsort(index)]
            np.testing.assert_allclose(sd, want, rtol=1e-5)
            fig = self._figure(viewer._showUncertainty())
            self.assertTrue(any("posterior sd" in a.get_xlabel() for a in fig.axes))
            fig = self._figure(viewer._showShrinkage())
            self.assertTrue(any("spread of the landscape" in a.get_xlabel()
                                for a in fig.axes))
            summary = " ".join(infer.summary())
            self.assertIn("Posterior sd of z", summary)
            self.assertIn("Landscape scale", summary)
            # the default inference: no z_cov, said in the viewer and the summary
            viewer = self._viewer(NmaemLatentViewer, self.infer)
            viewer.setProtocol(self.infer)
            self.assertIsInstance(viewer._showUncertainty()[0], MessageView)
            self.assertIn("No per-particle uncertainty", " ".join(self.infer.summary()))

        def test_latent_model_through_export(self):
            viewer = self._viewer(NmaemLatentViewer, self.infer)
            viewer.setProtocol(self.infer)
            viewer.pointKind.set(POINT_Z)
            viewer.amplitudes.set("2.0, -1.0, 0.5")
            n_before = len([r for r in self.proj.getRuns() if isinstance(r, NmaemProtExport)])
            cwd = os.getcwd()
            os.chdir(self.proj.getPath())
            try:
                views = viewer._showModel()
            finally:
                os.chdir(cwd)
            exports = [r for r in self.proj.getRuns(refresh=True)
                       if isinstance(r, NmaemProtExport)]
            self.assertEqual(len(exports), n_before + 1)
            prot = exports[-1]
            self.assertTrue(prot.isFinished(), _tail(prot))
            self.assertIn("nmaem model at z = 2.00, -1.00, 0.50", prot.getObjLabel())
            model = prot.outputAtomStructs.getFirstItem()
            self.assertEqual(model._nmaem_z.get(), "2.0,-1.0,0.5")
            self.assertEqual(len(views), 1)
            # no chimera plugin here: a message with the file's path
            msg = views[0].getMessage() if isinstance(views[0], MessageView) else ""
            self.assertIn(os.path.basename(model.getFileName()), msg)

        def test_model_export_that_fails_points_to_existing_logs(self):
            """'Show model' when Scipion cannot start the export (an interpreter without
            Scipion, as a GUI opened without SCIPION_PYTHON had): the error names that
            interpreter and no log file; for a run with logs, the logs it names exist."""
            import pyworkflow
            from pyworkflow.viewer import MSG_ERROR
            from nmaem_plugin.viewers.viewer_common import launchFailureMessage
            viewer = self._viewer(NmaemLatentViewer, self.infer)
            viewer.setProtocol(self.infer)
            viewer.pointKind.set(POINT_Z)
            viewer.amplitudes.set("1.0, 0.0, 0.0")
            cwd, python = os.getcwd(), pyworkflow.PYTHON
            os.chdir(self.proj.getPath())
            pyworkflow.PYTHON = "/bin/false"      # exits at once and writes nothing
            try:
                views = viewer._showModel()
            finally:
                pyworkflow.PYTHON = python
                os.chdir(cwd)
            prot = [r for r in self.proj.getRuns(refresh=True)
                    if isinstance(r, NmaemProtExport)][-1]
            self.assertFalse(any(os.path.exists(p) for p in prot.getLogPaths()))
            self.assertEqual(len(views), 1)
            self.assertEqual(views[0]._msgType, MSG_ERROR)
            msg = views[0].getMessage()
            self.assertIn("did not start", msg)
            self.assertIn("'/bin/false' (SCIPION_PYTHON)", msg)
            self.assertNotIn("logs:", msg)
            # a run that wrote its logs: every line naming a file names one that exists
            msg = launchFailureMessage(self.infer, self.proj)
            named = [ln for ln in msg.splitlines() if ln.startswith(os.sep)]
            self.assertIn(os.path.join(self.proj.getPath(), self.infer.getStdoutLog()), named)
            for path in named:
                self.assertTrue(os.path.isfile(path), path)

        # -------------------------------------------------------------- training
        def test_training_viewer_targets(self):
            rows = read_log_columns(
                os.path.join(self.proj.getPath(), self.train._getExtraPath("run", "log.csv")))
            for obj in (self.train, self.train.outputNetwork):
                viewer = self._viewer(NmaemTrainingViewer, obj)
                fig = self._figure(viewer._visualize(obj))
                # titled with the run's name, not a path; the convergence note
                self.assertEqual(fig._suptitle.get_text(), self.train.getObjLabel())
                loss_ax = fig.axes[0]
                self.assertIn("%d epoch(s) with a validation loss" % chain.EPOCHS,
                              loss_ax.get_title())
                self.assertEqual(loss_ax.get_xlabel(), "epoch")
                lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
                np.testing.assert_allclose(lines["training loss"].get_ydata(),
                                           rows["train_loss"])
                np.testing.assert_allclose(lines["validation loss"].get_ydata(),
                                           rows["val_loss"])
                views = viewer._showLog()
                self.assertTrue(views[0].getFileList()[0].endswith("log.csv"))

        # -------------------------------------------------------------- modes
        def test_modes_viewer_targets(self):
            for obj in (self.modes, self.modes.outputModes):
                viewer = self._viewer(NmaemModesViewer, obj)
                fig = self._figure(viewer._visualize(obj))
                ev_ax, coll_ax, fl_ax, ov_ax = fig.axes
                fn = viewer.modesFile()
                with np.load(fn) as f:
                    np.testing.assert_allclose(
                        [ln for ln in ev_ax.get_lines()
                         if ln.get_gid() == "eigenvalues"][0].get_ydata(), f["eigenvalues"])
                    np.testing.assert_allclose([b.get_height() for b in coll_ax.patches],
                                               f["collectivity"], rtol=1e-6)
                    self.assertIn("floor RMSD %.2f A" % float(f["target_floor_rmsd"]),
                                  ov_ax.get_title())
                viewer.modeNumber.set(2)
                views = viewer._showAnimation()
                self.assertIn("mode_02.pdb", views[0].getMessage())
                viewer.modeNumber.set(9)
                self.assertIn("No animation for mode 9",
                              viewer._showAnimation()[0].getMessage())


if __name__ == "__main__":
    unittest.main()
