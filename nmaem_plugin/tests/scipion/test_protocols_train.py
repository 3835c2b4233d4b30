"""Scipion protocol tests of training, inference, model export and evaluation:

    python -m scipion tests nmaem_plugin.tests.scipion.test_protocols_train

The data are made here (no internet, no Scipion data server): the shared chain of
``chain.py`` (built once per test run, also used by test_viewers): the bundled adenylate
kinase models imported with ProtImportPdb, 200 particles of 32 px simulated from a
4-frame morph, 3 modes computed on the simulation's reference, the small encoder trained
for 2 epochs on the CPU, inference.
"""
import json
import os
import re

import numpy as np
from pwem.constants import ALIGN_NONE
from pwem.objects import FlexInfo, SetOfParticles

from nmaem_plugin.tests.scipion import chain, scipion_base
from nmaem_plugin.constants import ATTR_FRAME, PROGRAM_NAME
from nmaem_plugin.core.base.choices import RENDER_ROUTES
from nmaem_plugin.protocols import (NmaemProtEvaluate,
                                    NmaemProtExport, NmaemProtInfer, NmaemProtStates,
                                    NmaemProtTrain)
from nmaem_plugin.protocols.protocol_states import STATES_KMEANS, stateParticlesName
from nmaem_plugin.protocols.protocol_export import EXPORT_KMEANS, EXPORT_PCS, EXPORT_Z
from nmaem_plugin.protocols.protocol_flex_common import (ATTR_FLOOR_RMSD, ATTR_N_PARTICLES,
                                                         ATTR_RMSD, ATTR_RMSD_REF, ATTR_RUN_DIR,
                                                         ATTR_Z, runDirOf)

from nmaem_plugin.tests.scipion.chain import APIX, BOX, EPOCHS, N_MODES, N_PARTICLES  # noqa: F401
PC_STEPS = 5
N_STATES = 3


def _logText(prot):
    out = []
    for path in prot.getLogPaths():
        if os.path.exists(path):
            with open(path) as fh:
                out.append(fh.read())
    return "".join(out)


class TestNmaemTrainProtocols(scipion_base.NmaemBaseTest):
    @classmethod
    def setUpClass(cls):
        chain.use(cls)        # sim, modes, train, infer: built once per test run

        cls.export = cls.newProtocol(NmaemProtExport, objLabel="export PC1",
                                     exportMode=EXPORT_PCS, pcs="1", steps=PC_STEPS,
                                     refineGeometry=False)
        cls.export.inputParticles.set(cls.infer.outputParticles)
        cls._launch(cls.export)

        cls.states = cls.newProtocol(NmaemProtStates, objLabel="states k-means",
                                     statesMode=STATES_KMEANS, numberOfClusters=N_STATES,
                                     refineGeometry=False)
        cls.states.inputParticles.set(cls.infer.outputParticles)
        cls._launch(cls.states)

        cls.evaluate = cls.newProtocol(NmaemProtEvaluate, objLabel="evaluate",
                                       minProminence=0.05, minSignificance=2.5)
        cls.evaluate.inputParticles.set(cls.infer.outputParticles)
        cls.evaluate.simulatedParticles.set(cls.sim.outputParticles)
        cls._launch(cls.evaluate)

    @classmethod
    def _newTrain(cls, label, epochs, **kwargs):
        return chain.NmaemTrainedChain.newTrain(label, epochs, **kwargs)

    def _runDir(self):
        return self.train._getExtraPath("run")

    # ------------------------------------------------------------------ train
    def test_train_output(self):
        info = self.train.outputNetwork
        self.assertEqual(info.getProgName(), PROGRAM_NAME)
        run = runDirOf(info)
        self.assertEqual(run, self._runDir())
        self.assertTrue(os.path.isfile(os.path.join(run, "checkpoints", "last.pt")))
        with open(os.path.join(run, "config.json")) as fh:
            cfg = json.load(fh)
        self.assertEqual(cfg["n_modes"], N_MODES)
        self.assertEqual(cfg["encoder"], "small")
        self.assertEqual(cfg["n_particles"], N_PARTICLES)
        self.assertEqual(info._nmaem_epochs.get(), EPOCHS)
        self.assertEqual(info._nmaem_latentDim.get(), N_MODES)
        summary = " ".join(self.train.summary())
        self.assertIn("%d of %d epochs on %d particles" % (EPOCHS, EPOCHS, N_PARTICLES),
                      summary)
        self.assertTrue(self.train.methods())

    def test_train_step_resumes_from_files(self):
        """Pressing Continue on a trained run runs the command with --resume, never a
        fresh training over the existing run."""
        prot = self.train
        prot._createFilenameTemplates()
        calls = []
        prot.runJob = lambda *a, **k: calls.append(a)
        try:
            prot.trainStep(EPOCHS + 1, 32, 1e-3)
        finally:
            del prot.runJob
        self.assertEqual(len(calls), 1)
        self.assertIn("--resume", calls[0][1])
        self.assertIn("--epochs 3", calls[0][1])
        self.assertNotIn("--particles", calls[0][1])
        for flag in ("--memory-budget", "--renderer", "--checkpoint-minutes"):
            self.assertNotIn(flag, calls[0][1])      # unset expert options: not passed

    def test_continue_previous_training(self):
        """A continued training, with the renderer's expert settings (which a resumed run
        may change) set: they reach nmaem train, its log and the run's config.json."""
        prot = self.newProtocol(NmaemProtTrain, objLabel="continue", doContinue=True,
                                numberOfEpochs=EPOCHS + 1, autoBatch=False, batchSize=32,
                                useGpu=False, autoMemory=False, memoryBudget=0.25,
                                renderer=RENDER_ROUTES.index("gemm"),
                                checkpointInEpochs=True, checkpointMinutes=30.0)
        prot.continueNetwork.set(self.train.outputNetwork)
        self.assertEqual(prot.validate(), [])
        self._launch(prot)
        log = _logText(prot)
        self.assertIn("RESUME: continuing", log)
        self.assertIn("--memory-budget 0.25 --renderer gemm --checkpoint-minutes 30.0", log)
        self.assertIn("renderer: gemm route", log)
        budget = re.search(r"renderer: gemm route.*working memory <= ([0-9.]+) GiB", log)
        self.assertIsNotNone(budget, log[-2000:])
        self.assertLessEqual(float(budget.group(1)), 0.25)
        with open(os.path.join(prot._getExtraPath("run"), "config.json")) as fh:
            cfg = json.load(fh)
        self.assertEqual((cfg["memory_budget"], cfg["renderer"], cfg["checkpoint_minutes"]),
                         (0.25, "gemm", 30.0))
        self.assertEqual(prot.outputNetwork._nmaem_epochs.get(), EPOCHS + 1)
        # the previous run is left as it was
        self.assertEqual(self.train.outputNetwork._nmaem_epochs.get(), EPOCHS)
        with open(os.path.join(self._runDir(), "log.csv")) as fh:
            self.assertEqual(len(fh.readlines()), EPOCHS + 1)   # header + epochs

    def test_validate_continue_without_checkpoint(self):
        folder = self.proj.getTmpPath("run_without_checkpoint")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(self._runDir(), "config.json")) as src, \
                open(os.path.join(folder, "config.json"), "w") as dst:
            dst.write(src.read())
        info = FlexInfo(PROGRAM_NAME)
        info.setAttr(ATTR_RUN_DIR, folder)
        prot = self.newProtocol(NmaemProtTrain, doContinue=True)
        prot.continueNetwork.set(info)
        errors = prot.validate()
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("no checkpoint", errors[0])
        self.assertIn("start a fresh training", errors[0])
        prot = self.newProtocol(NmaemProtTrain, doContinue=True)
        self.assertIn("Choose the training to continue", " ".join(prot.validate()))

    def test_validate_train_inputs(self):
        src = self.sim.outputParticles
        bad = SetOfParticles(filename=self.proj.getTmpPath("train_bad.sqlite"))
        bad.copyInfo(src)
        bad.setAlignment(ALIGN_NONE)
        bad.setHasCTF(False)
        for p in src.iterItems(limit=5):
            p.setTransform(None)
            bad.append(p)
        bad.write()
        prot = self._newTrain("bad", 1)
        self.assertEqual(prot.validate(), [])
        prot.inputParticles.set(bad)
        errors = " ".join(prot.validate())
        self.assertIn("no 3D alignment", errors)
        self.assertIn("no CTF", errors)
        bad.close()
        # box larger than the images, odd box
        prot = self._newTrain("big box", 1, cropImages=True, boxSize=BOX + 8)
        self.assertIn("larger than the particle images", " ".join(prot.validate()))
        prot = self._newTrain("odd box", 1, cropImages=True, boxSize=BOX - 3)
        self.assertIn("must be even", " ".join(prot.validate()))
        # modes computed on another model (the original frame of the reference)
        prot = self._newTrain("other model", 1)
        prot.inputStructure.set(self.ref.outputPdb)
        errors = " ".join(prot.validate())
        self.assertIn("do not belong to the reference model", errors)
        prot = self._newTrain("too many modes", 1, useAllModes=False,
                              numberOfModes=N_MODES + 1)
        self.assertIn("Number of modes", " ".join(prot.validate()))

    # ------------------------------------------------------------------ infer
    def test_infer_output(self):
        src = self.sim.outputParticles
        out = self.infer.outputParticles
        self.assertEqual(out.getSize(), N_PARTICLES)
        self.assertEqual(out.getFlexInfo().getProgName(), PROGRAM_NAME)
        self.assertEqual(runDirOf(out), self._runDir())
        latent = np.load(self.infer._getExtraPath("latent.npz"))
        z, shift = latent["z"], latent["shift"]
        self.assertEqual(z.shape, (N_PARTICLES, N_MODES))
        from nmaem_plugin.convert import matricesToRelion
        srcById = {q.getObjId(): q.clone() for q in src.iterItems(orderBy="id")}
        ids, mats, srcMats = [], [], []
        for k, p in enumerate(out.iterItems(orderBy="id")):
            ids.append(p.getObjId())
            zf = p.getZFlex()
            self.assertEqual(len(zf), N_MODES)
            np.testing.assert_allclose(zf, z[k], rtol=1e-5, atol=1e-5)
            self.assertEqual(p.getFlexInfo().getProgName(), PROGRAM_NAME)
            mats.append(p.getTransform().getMatrix())
            q = srcById[p.getObjId()]
            srcMats.append(q.getTransform().getMatrix())
            self.assertAlmostEqual(p.getCTF().getDefocusU(), q.getCTF().getDefocusU())
            self.assertEqual(getattr(p, ATTR_FRAME).get(), getattr(q, ATTR_FRAME).get())
        self.assertEqual(ids, [p.getObjId() for p in src.iterItems(orderBy="id")])
        euler, origin = matricesToRelion(np.asarray(mats), APIX)
        srcEuler, srcOrigin = matricesToRelion(np.asarray(srcMats), APIX)
        # rotations unchanged, origins refined by the predicted shift (origin - shift)
        np.testing.assert_allclose(np.asarray(mats)[:, :3, :3],
                                   np.asarray(srcMats)[:, :3, :3], atol=1e-9)
        np.testing.assert_allclose(srcOrigin - origin, shift, atol=1e-4)
        self.assertGreater(np.abs(shift).max(), 1e-3)
        self.assertGreater(np.abs(origin - srcOrigin).max(), 1e-3)
        self.assertIn("%d particles" % N_PARTICLES, " ".join(self.infer.summary()))

    def test_infer_best_weights(self):
        """Weights 'lowest validation loss' runs nmaem infer --checkpoint best: the latent
        file equals the command's own output with those weights."""
        from nmaem_plugin.core.inference.infer import infer
        from nmaem_plugin.protocols.protocol_infer import WEIGHTS
        prot = self.newProtocol(NmaemProtInfer, objLabel="infer best", batchSize=64,
                                useGpu=False, weights=WEIGHTS.index("lowest validation loss"))
        prot.inputNetwork.set(self.train.outputNetwork)
        prot.inputParticles.set(self.sim.outputParticles)
        self._launch(prot)
        self.assertIn("--checkpoint best", _logText(prot))
        # the per-particle fit ran (a whitened network; the default iterations)
        from nmaem_plugin.core.base.choices import FIT_ITERATIONS_DEFAULT
        self.assertIn("--fit-iterations %d" % FIT_ITERATIONS_DEFAULT, _logText(prot))
        self.assertIn("infer: fit: posterior energy lower for", _logText(prot))
        self.assertIn("infer: the images' envelope: B = ", _logText(prot))
        # this short training's models leave the images' fine detail unexplained: the
        # envelope may run to the search's bound, and then the log says so
        from nmaem_plugin.core.inference.particle_fit import BFACTOR_MAX, BFACTOR_TOL
        b = float(_logText(prot).split("envelope: B = ")[1].split()[0])
        self.assertEqual("the envelope reached the search's bound" in _logText(prot),
                         b >= BFACTOR_MAX - 2 * BFACTOR_TOL, b)
        ref = os.path.join(self.getOutputPath(), "latent_best.npz")
        infer(prot._getExtraPath("input_particles.star"), self._runDir(), ref, checkpoint="best",
              batch=64, log=lambda *a: None)
        # float32 sums (FFTs, convolutions, matrix products) differ in their last bits
        # between the protocol's process and this one (threads), and the per-particle fit
        # carries such differences on; where one of its damped steps is accepted in one
        # process and refused in the other, a particle ends a little elsewhere (clean-clone
        # runs: median 4e-7 A RMSD, 99th percentile 2e-4 A, largest 3e-3 A of 200). The
        # models (|dz| / sqrt(M), orthonormal modes) must agree to 1e-4 A RMSD for most
        # particles and 0.05 A for every one, the shifts likewise to 1e-4 and 0.05 A
        from nmaem_plugin.core.physics.structure import read_model
        M = read_model(os.path.join(self._runDir(), "reference.pdb")).n_atoms
        with np.load(prot._getExtraPath("latent.npz")) as a, np.load(ref) as b:
            rmsd = np.linalg.norm(a["z"].astype(float) - b["z"], axis=1) / np.sqrt(M)
            dshift = np.linalg.norm(a["shift"].astype(float) - b["shift"], axis=1)
        for d in (rmsd, dshift):
            self.assertLess(np.median(d), 1e-4)
            self.assertLess(d.max(), 0.05)

    def test_infer_fit_pose(self):
        """'Refine the rotations in the fit' runs nmaem infer --fit-pose: each output
        particle's rotation is its input rotation corrected by the latent's
        pose_correction on the model side (A R(v), checked here with scipy's rotation
        vectors, independent of core.poses), and the corrections are of a few degrees."""
        from scipy.spatial.transform import Rotation
        prot = self.newProtocol(NmaemProtInfer, objLabel="infer fit pose", batchSize=64,
                                useGpu=False, fitPose=True, fitEnvelope=False)
        prot.inputNetwork.set(self.train.outputNetwork)
        prot.inputParticles.set(self.sim.outputParticles)
        self._launch(prot)
        self.assertIn("--fit-pose", _logText(prot))
        self.assertIn("--fit-bfactor 0", _logText(prot))          # envelope: No
        self.assertNotIn("the images' envelope", _logText(prot))
        self.assertIn("infer: rotation prior: sd", _logText(prot))
        with np.load(prot._getExtraPath("latent.npz")) as f:
            v = f["pose_correction"].astype(np.float64)
        angle = np.degrees(np.linalg.norm(v, axis=1))
        self.assertGreater(np.median(angle), 0.01)
        self.assertLess(angle.max(), 20.0)
        src = {p.getObjId(): p.getTransform().getMatrix()
               for p in self.sim.outputParticles.iterItems()}
        from nmaem_plugin.convert import starRowIds
        row = {int(i): k for k, i in enumerate(starRowIds(prot._getExtraPath(
            "input_particles.star")))}
        out = prot.outputParticles
        for p in out.iterItems():
            k = row[p.getObjId()]
            # Scipion's transform T has T^-1 = [[A, -origin], [0, 1]] (convert.py)
            A = np.linalg.inv(src[p.getObjId()])[:3, :3]
            expect = A @ Rotation.from_rotvec(v[k]).as_matrix()
            got = np.linalg.inv(p.getTransform().getMatrix())[:3, :3]
            np.testing.assert_allclose(got, expect, atol=1e-6)
        self.assertIn("refined each particle's rotation", " ".join(prot.methods()))
        prot2 = self.newProtocol(NmaemProtInfer, fitPose=True, fitIterations=0)
        prot2.inputNetwork.set(self.train.outputNetwork)
        prot2.inputParticles.set(self.sim.outputParticles)
        self.assertIn("needs the per-particle fit", " ".join(prot2.validate()))

    def test_infer_validate_box(self):
        prot = self.newProtocol(NmaemProtInfer)
        prot.inputNetwork.set(self.train.outputNetwork)
        prot.inputParticles.set(self.sim.outputParticles)
        self.assertEqual(prot.validate(), [])
        prot.fitIterations.set(5)           # the network has the whitened loss: fine
        self.assertEqual(prot.validate(), [])
        prot.inputNetwork.set(None)
        self.assertIn("Choose the trained network", " ".join(prot.validate()))

    # ------------------------------------------------------------------ export
    def _checkModels(self, atoms, n_expected, refined=False):
        from nmaem_plugin.core.physics.structure import read_model
        x0 = read_model(os.path.join(self._runDir(), "reference.pdb"))
        M = x0.n_atoms
        self.assertEqual(atoms.getSize(), n_expected)
        total = 0
        for a in atoms:
            m = read_model(a.getFileName())
            self.assertEqual(m.n_atoms, M)
            self.assertEqual(list(m.atom_ids), list(x0.atom_ids))
            z = np.asarray(getattr(a, ATTR_Z), dtype=float)
            self.assertEqual(len(z), N_MODES)
            rmsd = float(np.sqrt(((m.coords - x0.coords) ** 2).sum(1).mean()))
            expected = float(np.linalg.norm(z) / np.sqrt(M))
            self.assertAlmostEqual(getattr(a, ATTR_RMSD_REF).get(), expected, places=5)
            if refined:     # geometry refinement moves atoms by at most 0.5 A rms
                plain = x0.coords + np.tensordot(z, self._modes()[:len(z)], 1)
                moved = float(np.sqrt(((m.coords - plain) ** 2).sum(1).mean()))
                self.assertLessEqual(moved, 0.5)
                self.assertGreater(moved, 0.0)
            else:
                self.assertAlmostEqual(rmsd, expected, delta=2e-3 + 1e-3 * expected)
            total += getattr(a, ATTR_N_PARTICLES).get()
        return total

    def _modes(self):
        from nmaem_plugin.core.modes.modesfile import load_modes
        return load_modes(os.path.join(self._runDir(), "modes.npz")).modes

    def test_export_pc_traversal(self):
        atoms = self.export.outputAtomStructs
        total = self._checkModels(atoms, PC_STEPS)
        self.assertEqual(total, N_PARTICLES)
        kinds = {a._nmaem_kind.get() for a in atoms}
        self.assertEqual(kinds, {"pc"})
        summary = " ".join(self.export.summary())
        self.assertIn("%d all-atom models" % PC_STEPS, summary)

    def test_export_kmeans_and_given_z(self):
        prot = self.newProtocol(NmaemProtExport, objLabel="export k-means",
                                exportMode=EXPORT_KMEANS, numberOfClusters=3,
                                refineGeometry=False)
        prot.inputParticles.set(self.infer.outputParticles)
        prot.inputNetwork.set(self.train.outputNetwork)
        self._launch(prot)
        self.assertEqual(self._checkModels(prot.outputAtomStructs, 3), N_PARTICLES)
        prot = self.newProtocol(NmaemProtExport, objLabel="export z",
                                exportMode=EXPORT_Z, amplitudes="1, 2, 3\n0,0,0")
        prot.inputParticles.set(self.infer.outputParticles)
        self.assertEqual(prot.validate(), [])
        self._launch(prot)
        out = prot.outputAtomStructs
        self.assertEqual(self._checkModels(out, 2, refined=True), N_PARTICLES)
        first = out.getFirstItem()
        np.testing.assert_allclose(np.asarray(getattr(first, ATTR_Z), dtype=float), [1, 2, 3])
        # refined by default: chemistry restored, figures in models.json and the summary
        with open(prot._getExtraPath("models", "models.json")) as fh:
            rows = json.load(fh)["models"]
        for row in rows:
            self.assertLessEqual(row["validation"]["bond_rmsd"], 0.02)
            self.assertLessEqual(row["validation"]["rmsd_to_plain"], 0.5)
        self.assertIn("Refined geometry", " ".join(prot.summary()))
        bad = self.newProtocol(NmaemProtExport, exportMode=EXPORT_Z, amplitudes="1, 2")
        bad.inputParticles.set(self.infer.outputParticles)
        self.assertIn("need %d numbers" % N_MODES, " ".join(bad.validate()))

    # ------------------------------------------------------------------ states
    def test_states_classes(self):
        """Classes partition the particles, each representative carries its class's z
        (the mean z of its members: k-means centres) and is X0 + U z; the outputs are
        the Flexibility Hub's classes."""
        from pwem.objects import (AtomStructFlex, ClassStructFlex, SetOfAtomStructFlex,
                                  SetOfClassesStructFlex, SetOfParticles)
        from nmaem_plugin.constants import HUB_MODES_FILE, HUB_N_MODES, HUB_REF_STRUCT
        from nmaem_plugin.core.physics.structure import read_model
        classes = self.states.outputClasses
        self.assertIs(type(classes), SetOfClassesStructFlex)
        self.assertIs(type(self.states.outputStructures), SetOfAtomStructFlex)
        self.assertEqual(classes.getSize(), N_STATES)
        zOf = {p.getObjId(): np.asarray(p.getZFlex(), dtype=float)
               for p in self.infer.outputParticles.iterItems(orderBy="id")}
        x0 = read_model(os.path.join(self._runDir(), "reference.pdb"))
        U = self._modes()[:N_MODES]
        seen = []
        for cls in classes.iterItems(orderBy="id"):
            self.assertIs(type(cls), ClassStructFlex)
            ids = [p.getObjId() for p in cls.iterItems(orderBy="id")]
            self.assertTrue(ids)
            seen += ids
            rep = cls.getRepresentative()
            self.assertIs(type(rep), AtomStructFlex)
            zc = np.mean([zOf[i] for i in ids], axis=0)
            np.testing.assert_allclose(rep.getZFlex(), zc, atol=1e-4)
            info = rep.getFlexInfo()
            self.assertEqual(info.getProgName(), PROGRAM_NAME)
            self.assertEqual(info.getAttr(HUB_N_MODES), N_MODES)
            self.assertTrue(os.path.samefile(info.getAttr(HUB_REF_STRUCT),
                                             os.path.join(self._runDir(), "reference.pdb")))
            self.assertTrue(os.path.isfile(info.getAttr(HUB_MODES_FILE)))
            m = read_model(rep.getFileName())
            np.testing.assert_allclose(m.coords, x0.coords + np.tensordot(rep.getZFlex(), U, 1),
                                       atol=2e-3)
            plain = getattr(self.states, stateParticlesName(cls.getObjId()))
            self.assertIs(type(plain), SetOfParticles)
            self.assertEqual([p.getObjId() for p in plain.iterItems(orderBy="id")], ids)
        # a partition of the input particles: every one once
        self.assertEqual(sorted(seen), sorted(zOf))
        self.assertEqual(len(seen), len(set(seen)))
        models = list(self.states.outputStructures)
        self.assertEqual(len(models), N_STATES)
        self.assertIn("%d states" % N_STATES, " ".join(self.states.summary()))
        # the infer particles carry zRed (PC coordinates) and the hub attributes too
        first = self.infer.outputParticles.getFirstItem()
        self.assertEqual(len(first.getZRed()), N_MODES)
        self.assertEqual(self.infer.outputParticles.getFlexInfo().getAttr(HUB_N_MODES), N_MODES)

    def test_states_refined_against_their_particles(self):
        """The states protocol's refinement option: nmaem refine-states on one state of
        every particle (one round); the refined model (or the start, when the held-out
        half refused) as a SetOfAtomStructs with its state and held-out gain, and the
        summary saying what happened."""
        prot = self.newProtocol(NmaemProtStates, objLabel="states refined",
                                statesMode=STATES_KMEANS, numberOfClusters=1,
                                refineGeometry=False, doReconstruct=False,
                                refineStates=True, refineRounds=1)
        prot.inputParticles.set(self.infer.outputParticles)
        self._launch(prot)
        out = prot.outputRefinedStructures
        self.assertEqual(out.getSize(), 1)
        a = out.getFirstItem()
        self.assertTrue(os.path.isfile(a.getFileName()))
        self.assertEqual(a._nmaem_state.get(), 1)
        with open(prot._getExtraPath("refined", "refine.json")) as fh:
            row = json.load(fh)["states"][0]
        self.assertEqual(row["n_particles"], N_PARTICLES)
        self.assertEqual(a._nmaem_refined.get(), row["refined"])
        self.assertAlmostEqual(a._nmaem_heldoutGain.get(), row["heldout_gain"], places=3)
        self.assertGreaterEqual(row["heldout_gain"], 0.0)
        from nmaem_plugin.core.physics.structure import read_model
        ref = read_model(os.path.join(self._runDir(), "reference.pdb"))
        np.testing.assert_array_equal(read_model(a.getFileName()).atom_ids, ref.atom_ids)
        self.assertIn("State 1 refined against %d particles" % N_PARTICLES,
                      " ".join(prot.summary()))

    def test_state_maps(self):
        """With RELION installed the states protocol reconstructs each state by default:
        a SetOfVolumes whose maps carry their half-maps (RELION's files, the particles'
        pixel size and box) and a SetOfFSCs whose curves are those of fsc.json; the
        viewer draws each map's sections with its model's contour and the curves."""
        from pwem.objects import SetOfFSCs, SetOfVolumes
        from nmaem_plugin.core.base.relion import find_relion
        from nmaem_plugin.core.analysis.statemaps import read_fsc_json
        from nmaem_plugin.core.io.maps import read_map
        if find_relion() is None:
            self.skipTest("needs RELION (relion_reconstruct): apt-get install relion")
        self.assertTrue(self.states.doReconstruct.get())
        vols, fscs = self.states.outputVolumes, self.states.outputFSCs
        self.assertIs(type(vols), SetOfVolumes)
        self.assertIs(type(fscs), SetOfFSCs)
        listing = self.states._readJsonResult("statesJson")
        mapped = [r for r in listing["states"] if r.get("map")]
        self.assertTrue(mapped)
        self.assertEqual(vols.getSize(), len(mapped))
        self.assertEqual(fscs.getSize(), 2 * len(mapped))
        for vol, row in zip(vols.iterItems(orderBy="id"), mapped):
            self.assertEqual(vol.getObjId(), row["state"])
            self.assertAlmostEqual(vol.getSamplingRate(), APIX)
            halves = vol.getHalfMaps(asList=True)
            self.assertEqual(len(halves), 2)
            for fn in [vol.getFileName()] + list(halves):
                data, apix = read_map(fn)
                self.assertEqual(data.shape, (BOX,) * 3)
                self.assertAlmostEqual(apix, APIX, places=3)
        curves = {}         # (a set's iteration reuses one item: copy its data)
        for f in fscs.iterItems():
            x, y = f.getData()
            curves[f.getObjLabel()] = ([float(v) for v in x], [float(v) for v in y])
        folder = self.states._getExtraPath("states")
        for row in mapped:
            info = read_fsc_json(os.path.join(folder, row["fsc"]))
            x, y = curves["%s: half maps" % row["name"]]
            np.testing.assert_allclose(y, info["half_map_fsc"]["fsc"])
            np.testing.assert_allclose(x, info["half_map_fsc"]["frequency"])
            x, y = curves["%s: map vs model" % row["name"]]
            np.testing.assert_allclose(y, info["model_map_fsc"]["fsc"])
        self.assertIn("half maps, FSC 0.143", " ".join(self.states.summary()))
        from pwem.viewers.plotter import EmPlotter
        from nmaem_plugin.viewers import NmaemStatesViewer
        viewer = NmaemStatesViewer(project=self.proj, protocol=self.states)
        viewer.setProtocol(self.states)     # as Scipion does: the form's parameters made
        viewer.stateNumber.set(mapped[0]["state"])
        views = viewer._showMap()
        self.assertIsInstance(views[0], EmPlotter)
        fig = views[0].getFigure()
        self.assertEqual(len(fig.axes), 4)
        self.assertTrue(any(c.get_label().startswith("half maps")
                            for c in fig.axes[3].get_lines()))
        self.assertIsInstance(viewer._showCurves()[0], EmPlotter)
        self.assertIn("map \\ model", viewer._showTable()[0].getMessage())
        import matplotlib.pyplot as plt
        plt.close("all")

    def test_state_particles_through_relion_writer(self):
        """One state's particles written by scipion-em-relion's own writer: the ids,
        angles and origins of the infer particles (our RELION glue) come back."""
        try:
            import relion.convert as rconv
        except Exception:
            self.skipTest("scipion-em-relion is not installed")
        from nmaem_plugin.convert import matricesToRelion
        from nmaem_plugin.core.io.poses import euler_to_matrix
        from nmaem_plugin.core.io.star import read_star_blocks
        plain = getattr(self.states, stateParticlesName(1))
        star = os.path.join(self.getOutputPath(), "state_01_relion.star")
        rconv.writeSetOfParticles(plain, star)
        b = read_star_blocks(star)["particles"]
        byId = {p.getObjId(): p.getTransform().getMatrix()
                for p in self.infer.outputParticles.iterItems(orderBy="id")}
        ids = b["rlnImageId"].to_numpy().astype(int)
        self.assertEqual(sorted(ids.tolist()),
                         [p.getObjId() for p in plain.iterItems(orderBy="id")])
        euler, origin = matricesToRelion(np.asarray([byId[i] for i in ids]), APIX)
        eb = b[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=float)
        np.testing.assert_allclose(euler_to_matrix(*eb.T), euler_to_matrix(*euler.T),
                                   atol=1e-5)
        ob = b[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=float)
        np.testing.assert_allclose(ob, origin, atol=1e-4)

    # ------------------------------------------------------------------ forms
    def test_forms_help_outputs_and_menu(self):
        """Every parameter has help text, outputs are declared, and protocols.conf lists
        the protocols in workflow order."""
        classes = [NmaemProtTrain, NmaemProtInfer, NmaemProtExport, NmaemProtStates,
                   NmaemProtEvaluate]
        for cls in classes:
            prot = self.newProtocol(cls)
            for name, param in prot._definition.iterAllParams():
                if name in ("runName", "runMode", "comment", "hostName", "numberOfThreads",
                            "numberOfMpi", "useQueue", "queueParams", "_useQueue",
                            "_queueParams"):
                    continue
                self.assertTrue(param.help.get(), "%s.%s has no help" % (cls.__name__, name))
                # an installed package has no docs/ folder: the help gives the address
                self.assertIsNone(re.search(r"(?<!main/)docs/\w+\.md", param.help.get()),
                                  "%s.%s" % (cls.__name__, name))
            self.assertTrue(list(cls._possibleOutputs))
            self.assertIn("Nashed2022", prot._citations())
        from nmaem_plugin import protocols as nmaem_protocols
        conf = os.path.join(os.path.dirname(nmaem_protocols.__file__), "..", "protocols.conf")
        with open(conf) as fh:
            text = fh.read()
        order = ["NmaemProtImportParticles", "NmaemProtSimulate", "NmaemProtTrain",
                 "NmaemProtInfer", "NmaemProtExport", "NmaemProtStates", "NmaemProtEvaluate"]
        positions = [text.index(n) for n in order]
        self.assertEqual(positions, sorted(positions))
        self.assertEqual(text.count("NmaemProtTrain"), 2)
        # each entry has its own short text: "default" shows Scipion's "nmaem_plugin - <label>",
        # seven entries cut to the same "nmaem_plugin" in the tree's column
        import configparser
        from pwem import Domain
        cp = configparser.ConfigParser()
        cp.optionxform = str
        cp.read(conf)
        protocols = Domain.getProtocols()
        # every protocol of the plugin (but the base class), once in each view
        ours = sorted(n for n, c in vars(nmaem_protocols).items()
                      if isinstance(c, type) and n.startswith("NmaemProt")
                      and n != "NmaemProtBase")
        for view in cp.options("PROTOCOLS"):
            entries = []

            def walk(items):
                for item in items:
                    if item.get("tag") == "protocol":
                        entries.append(item)
                    walk(item.get("children", []))
            walk(json.loads(cp.get("PROTOCOLS", view)))
            texts = [e["text"] for e in entries]
            self.assertEqual(sorted(e["value"] for e in entries), ours, view)
            self.assertEqual(len(set(texts)), len(texts), texts)
            for e in entries:
                self.assertIn(e["value"], protocols)
                self.assertNotEqual(e["text"], "default")
                self.assertLessEqual(len(e["text"]), 20, e["text"])
                self.assertTrue(e["text"].startswith("nmaem "), e["text"])

    def test_no_number_means_automatic(self):
        """The training form's settings that have an automatic choice say so with a Yes/No
        (their number is asked only when it is used), instead of -1 or 0 meaning "auto";
        the command gets the number only then."""
        toggles = {"numberOfModes": ("useAllModes", True, "--n-modes"),
                   "boxSize": ("cropImages", False, "--box"),
                   "batchSize": ("autoBatch", True, "--batch"),
                   "encoderBox": ("autoEncoderBox", True, "--encoder-box"),
                   "resolutionHigh": ("limitHighResolution", False, "--resolution-high"),
                   "resolutionLow": ("limitLowResolution", False, "--resolution-low"),
                   "maskRadius": ("useMask", False, "--mask-radius"),
                   "memoryBudget": ("autoMemory", True, "--memory-budget"),
                   "checkpointMinutes": ("checkpointInEpochs", False, "--checkpoint-minutes")}
        prot = self.newProtocol(NmaemProtTrain)
        for field, (toggle, auto, _) in toggles.items():
            param = prot.getParam(field)
            self.assertIn(toggle, param.condition.get(), field)
            self.assertGreater(float(param.default.get()), 0, field)
            self.assertIsNone(re.search(r"(^|[ (])(-1|0)[:)]| -1 | 0 \(", param.help.get()),
                              "%s: %s" % (field, param.help.get()))
            self.assertEqual(prot.getAttributeValue(toggle), auto, toggle)
        self.assertEqual((prot._batch(), prot._nModes(), prot._box(), prot._encoderBox()),
                         (None, None, None, None))
        prot.autoBatch.set(False)
        prot.batchSize.set(48)
        prot.cropImages.set(True)
        prot.boxSize.set(24)
        self.assertEqual((prot._batch(), prot._box()), (48, 24))

    def test_analyze_results_opens_the_right_viewer(self):
        """"Analyze results" (the first viewer Scipion finds for the protocol, as
        ``ProtocolsView._analyzeResults`` takes it): the training curves for a training;
        for states the states' thumbnails with their counts, not a metadata table."""
        import matplotlib.pyplot as plt
        from pwem import Domain
        from pyworkflow.viewer import DESKTOP_TKINTER
        from nmaem_plugin.core.analysis.states import read_states
        from nmaem_plugin.viewers.viewer_states import NmaemStatesViewer
        from nmaem_plugin.viewers.viewer_training import NmaemTrainingViewer
        self.assertIs(Domain.findViewers(self.train, DESKTOP_TKINTER)[0], NmaemTrainingViewer)
        first = Domain.findViewers(self.states, DESKTOP_TKINTER)[0]
        self.assertIs(first, NmaemStatesViewer)
        views = first(project=self.proj, protocol=self.states)._visualize(self.states)
        fig = views[0].getFigure()
        _, _, _, count = read_states(self.states._getExtraPath("states", "states.npz"))
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        self.assertEqual(len(titles), N_STATES)
        for k, (title, ax) in enumerate(zip(titles, [a for a in fig.axes if a.get_title()])):
            self.assertTrue(title.startswith("state_%02d: %d particles (" % (k + 1, count[k])),
                            title)
            self.assertEqual(len(ax.get_images()), 1)          # the model's thumbnail
            n_out = getattr(self.states, "outputParticlesState%02d" % (k + 1)).getSize()
            self.assertEqual(n_out, count[k])
        plt.close("all")

    # ------------------------------------------------------------------ evaluate
    def test_evaluate(self):
        prot = self.evaluate
        with open(prot._getExtraPath("evaluation.json")) as fh:
            result = json.load(fh)
        s = result["summary"]
        self.assertEqual(s["n_particles"], N_PARTICLES)
        # the form's maxima settings reach the command (not its defaults)
        self.assertEqual((result["maxima"]["min_prominence"],
                          result["maxima"]["min_significance"]), (0.05, 2.5))
        self.assertEqual(s["d"], N_MODES)
        summary = " ".join(prot.summary())
        self.assertIn("Median RMSD to the true conformation: %.3f A" % s["median_rmsd"],
                      summary)
        self.assertIn("floor", summary)
        self.assertTrue(prot.methods())
        out = prot.outputParticles
        self.assertEqual(out.getSize(), N_PARTICLES)
        rmsd = [getattr(p, ATTR_RMSD).get() for p in out.iterItems(orderBy="id")]
        floor = [getattr(p, ATTR_FLOOR_RMSD).get() for p in out.iterItems(orderBy="id")]
        self.assertAlmostEqual(float(np.median(rmsd)), s["median_rmsd"], places=5)
        self.assertTrue(all(r >= f - 1e-6 for r, f in zip(rmsd, floor)))
        self.assertEqual([p.getObjId() for p in out.iterItems(orderBy="id")],
                         [p.getObjId() for p in self.infer.outputParticles.iterItems(
                             orderBy="id")])
        # the shifts come back from the flex particles' refined origins (Scipion transforms,
        # rows matched by id): the same shift error as nmaem evaluate on infer's own
        # latent.npz, whose rows are its input STAR's (the simulation's exact origins)
        from nmaem_plugin.core.analysis.evaluate import evaluate
        from nmaem_plugin.protocols.protocol_flex_common import findSimulationDir
        direct = evaluate(self.infer._getExtraPath("latent.npz"),
                          findSimulationDir(self.sim.outputParticles), self._runDir(),
                          particles=self.infer._getExtraPath("input_particles.star"))["summary"]
        self.assertGreater(direct["shift_rmse"], 0.0)
        self.assertAlmostEqual(s["shift_rmse"], direct["shift_rmse"], places=5)

    def test_evaluate_validate_needs_simulation(self):
        prot = self.newProtocol(NmaemProtEvaluate)
        prot.inputParticles.set(self.infer.outputParticles)
        prot.simulatedParticles.set(self.infer.outputParticles)   # has frames, is a copy
        self.assertEqual(prot.validate(), [])
        src = self.sim.outputParticles
        other = SetOfParticles(filename=self.proj.getTmpPath("not_simulated.sqlite"))
        other.copyInfo(src)
        for p in src.iterItems(limit=3):
            q = p.clone()
            if q.hasAttribute(ATTR_FRAME):
                delattr(q, ATTR_FRAME)
            other.append(q)
        other.write()
        prot.simulatedParticles.set(other)
        self.assertIn("synthetic data only", " ".join(prot.validate()))
        other.close()
