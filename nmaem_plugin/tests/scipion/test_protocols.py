"""Scipion protocol tests of nmaem (pyworkflow BaseTest, run by Scipion's own runner):

    python -m scipion tests nmaem_plugin.tests.scipion.test_protocols

Data are made here: the bundled adenylate kinase models are imported with pwem's
ProtImportPdb, particles are simulated (tiny: 40 px, 120 particles, no noise) and modes
computed (4 modes). No internet and no Scipion data server are needed.
"""
import os

import numpy as np
from pwem.constants import ALIGN_NONE, ALIGN_PROJ
from pwem.objects import SetOfParticles
from pyworkflow.tests import setupTestProject

from nmaem_plugin.tests.scipion import scipion_base
from nmaem_plugin.constants import ATTR_FRAME, SIM_LIKE, SIM_MORPH, SIM_TRAJECTORY
from nmaem_plugin.protocols import NmaemProtComputeModes, NmaemProtSimulate

N_PARTICLES = 120
N_FRAMES = 4
BOX = 40
APIX = 2.0


class TestNmaemProtocols(scipion_base.NmaemBaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls._simulateMorph(
            numberOfFrames=N_FRAMES, numberOfParticles=N_PARTICLES, boxSize=BOX,
            samplingRate=APIX, shiftStd=1.5, defocusMean=1.2, defocusStd=0.2, voltage=200.0,
            sphericalAberration=2.0, amplitudeContrast=0.08, seed=3)

    # ------------------------------------------------------------------ simulate
    def test_simulate_outputs(self):
        parts = self.sim.outputParticles
        self.assertEqual(parts.getSize(), N_PARTICLES)
        self.assertEqual(parts.getAlignment(), ALIGN_PROJ)
        self.assertTrue(parts.hasCTF())
        self.assertAlmostEqual(parts.getSamplingRate(), APIX)
        acq = parts.getAcquisition()
        self.assertAlmostEqual(acq.getVoltage(), 200.0)
        self.assertAlmostEqual(acq.getSphericalAberration(), 2.0)
        self.assertAlmostEqual(acq.getAmplitudeContrast(), 0.08)
        truth = np.load(self.sim._getExtraPath("dataset", "ground_truth.npz"))
        frames, defocus = [], []
        for k, p in enumerate(parts.iterItems(orderBy="id")):
            self.assertEqual(p.getObjId(), k + 1)
            self.assertIsNotNone(p.getTransform())
            self.assertTrue(os.path.exists(p.getFileName()))
            self.assertEqual(p.getIndex(), k + 1)   # one stack, 1-based
            frames.append(getattr(p, ATTR_FRAME).get())
            defocus.append(p.getCTF().getDefocusU())
        np.testing.assert_array_equal(frames, truth["frame"])
        np.testing.assert_allclose(defocus, truth["defocus_u"])
        self.assertTrue(set(frames) <= set(range(N_FRAMES)))
        self.assertGreater(len(set(frames)), 1)
        # the images themselves: BOX x BOX, N_PARTICLES of them, not blank
        import mrcfile
        with mrcfile.open(parts.getFirstItem().getFileName(), permissive=True) as m:
            self.assertEqual(m.data.shape, (N_PARTICLES, BOX, BOX))
            self.assertGreater(float(np.std(m.data[0])), 0.0)
        # ground-truth frames and reference
        self.assertEqual(self.sim.outputFrames.getSize(), N_FRAMES)
        for a in self.sim.outputFrames:
            self.assertTrue(os.path.exists(a.getFileName()))
        from nmaem_plugin.core.physics.structure import read_model
        m0 = read_model(self.sim.outputFrames.getFirstItem().getFileName())
        ref = read_model(self.sim.outputReference.getFileName())
        self.assertEqual(m0.n_atoms, ref.n_atoms)
        np.testing.assert_allclose(m0.coords, ref.coords, atol=2e-3)  # frame 0 = reference
        summary = " ".join(self.sim.summary())
        self.assertIn("%d particles" % N_PARTICLES, summary)

    def test_steps_resume_from_files(self):
        """A continued run skips a step whose result file exists (no runJob call), and
        the output step rebuilds the outputs from the files alone."""
        prot = self.sim
        prot._createFilenameTemplates()
        calls = []
        prot.runJob = lambda *a, **k: calls.append(a)
        prot.simulateStep()
        self.assertEqual(calls, [])
        os.rename(prot._getFileName("star"), prot._getFileName("star") + ".bak")
        try:
            prot.simulateStep()
        finally:
            os.rename(prot._getFileName("star") + ".bak", prot._getFileName("star"))
        self.assertEqual(len(calls), 1)
        self.assertIn("simulate", calls[0][1])
        self.assertIn("--overwrite", calls[0][1])

    def test_simulate_like_reuses_poses_ctf_and_ids(self):
        src = self.sim.outputParticles
        prot = self.newProtocol(NmaemProtSimulate, objLabel="simulate like",
                                inputSource=SIM_LIKE, numberOfParticles=50, addNoise=True,
                                snrDb=0.0, useGpu=False)
        prot.referenceStructure.set(self.sim.outputReference)
        prot.inputParticles.set(src)
        self._launch(prot)
        out = prot.outputParticles
        self.assertEqual(out.getSize(), 50)
        self.assertAlmostEqual(out.getSamplingRate(), APIX)
        self.assertEqual(out.getAlignment(), ALIGN_PROJ)
        for p in out.iterItems(orderBy="id"):
            q = src[p.getObjId()]
            np.testing.assert_allclose(p.getTransform().getMatrix(),
                                       q.getTransform().getMatrix(), atol=1e-6)
            self.assertAlmostEqual(p.getCTF().getDefocusU(), q.getCTF().getDefocusU())
            self.assertEqual(getattr(p, ATTR_FRAME).get(), 0)   # one model: frame 0
        self.assertEqual(out.getFirstItem().getObjId(), src.getFirstItem().getObjId())
        self.assertEqual(prot.outputFrames.getSize(), 1)

    def test_simulate_trajectory(self):
        prot = self.newProtocol(NmaemProtSimulate, objLabel="simulate trajectory",
                                inputSource=SIM_TRAJECTORY, numberOfParticles=30, boxSize=BOX,
                                samplingRate=APIX, addNoise=False, useGpu=False)
        traj = self._importPdb(os.path.abspath(self.sim._getExtraPath("dataset", "frames.pdb")),
                               "trajectory")
        prot.trajectoryStructure.set(traj.outputPdb)
        self.assertEqual(prot.validate(), [])
        self._launch(prot)
        self.assertEqual(prot.outputParticles.getSize(), 30)
        self.assertEqual(prot.outputFrames.getSize(), N_FRAMES)

    def test_validate_particles_without_alignment_or_ctf(self):
        src = self.sim.outputParticles
        path = self.proj.getTmpPath("noalign_nocft.sqlite")
        bad = SetOfParticles(filename=path)
        bad.copyInfo(src)
        bad.setAlignment(ALIGN_NONE)
        for p in src.iterItems(limit=5):
            p.setTransform(None)
            bad.append(p)
        bad.write()
        prot = self.newProtocol(NmaemProtSimulate, inputSource=SIM_LIKE)
        prot.referenceStructure.set(self.sim.outputReference)
        prot.inputParticles.set(bad)
        errors = " ".join(prot.validate())
        self.assertIn("no 3D alignment", errors)
        self.assertNotIn("no CTF", errors)
        bad.setHasCTF(False)
        errors = " ".join(prot.validate())
        self.assertIn("no 3D alignment", errors)
        self.assertIn("no CTF", errors)
        bad.setAlignmentProj()
        errors = prot.validate()
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("no CTF", errors[0])
        bad.close()
        # a morph without a target is refused too
        prot = self.newProtocol(NmaemProtSimulate, inputSource=SIM_MORPH)
        prot.referenceStructure.set(self.ref.outputPdb)
        self.assertTrue(any("target" in e.lower() for e in prot.validate()))

    def test_validate_structure_that_is_a_map_or_unreadable(self):
        """An AtomStruct pointing at a map, or at a file with no atoms, is refused in the form."""
        from pwem.objects import AtomStruct
        import mrcfile
        import numpy as np
        mapfile = self.proj.getTmpPath("volume.mrc")
        with mrcfile.new(mapfile, overwrite=True) as m:
            m.set_data(np.zeros((8, 8, 8), dtype=np.float32))
        junk = self.proj.getTmpPath("junk.pdb")
        with open(junk, "w") as fh:
            fh.write("REMARK nothing but a remark\nEND\n")
        for path, msg in ((mapfile, "is a map"), (junk, "no atom records"),
                          (self.proj.getTmpPath("absent.pdb"), "does not exist")):
            prot = self.newProtocol(NmaemProtComputeModes, numberOfModes=4)
            prot.inputStructure.set(AtomStruct(filename=path))
            errors = " ".join(prot.validate())
            self.assertIn(msg, errors, path)
            self.assertIn(os.path.basename(path), errors)
        prot = self.newProtocol(NmaemProtComputeModes, numberOfModes=4)
        prot.inputStructure.set(self.ref.outputPdb)
        self.assertEqual(prot.validate(), [])

    # ------------------------------------------------------------------ modes
    def test_compute_modes(self):
        prot = self.newProtocol(NmaemProtComputeModes, objLabel="modes", numberOfModes=4,
                                useGpu=False)
        prot.inputStructure.set(self.ref.outputPdb)
        prot.targetStructure.set(self.target.outputPdb)
        self._launch(prot)
        modes = prot.outputModes
        self.assertEqual(modes.getSize(), 4)
        self.assertEqual(modes.getPdb().getFileName(), self.ref.outputPdb.getFileName())
        from nmaem_plugin.core.modes.modesfile import load_modes
        from nmaem_plugin.core.physics.structure import read_model
        first = modes.getFirstItem()
        nm = load_modes(first.getModeFile())
        self.assertEqual(nm.n_modes, 4)
        self.assertEqual(nm.n_atoms, read_model(self.ref.outputPdb.getFileName()).n_atoms)
        for k, m in enumerate(modes.iterItems(orderBy="id")):
            self.assertEqual(m._nmaem_modeIndex.get(), k)
            self.assertAlmostEqual(m._nmaem_eigenvalue.get(), float(nm.eigenvalues[k]), 6)
            self.assertAlmostEqual(m.getCollectivity(), float(nm.info["collectivity"][k]), 6)
            self.assertTrue(0 < m.getCollectivity() <= 1)
            self.assertTrue(os.path.exists(m._nmaem_animation.get()))
            self.assertTrue(-1 <= m._nmaem_overlap.get() <= 1)
        ev = [m._nmaem_eigenvalue.get() for m in modes.iterItems(orderBy="id")]
        self.assertEqual(ev, sorted(ev))
        summary = " ".join(prot.summary())
        self.assertIn("4 normal modes", summary)
        self.assertIn("floor RMSD", summary)
        self.assertIn("cumulative overlap", summary)
        self.assertTrue(prot.methods())
