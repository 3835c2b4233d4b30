"""Scipion <-> STAR conversion (nmaem_plugin/convert.py): poses, origins, CTF, acquisition,
ids, and the latent file on Flexibility Hub particles.

The pose convention is checked against pwem's own Euler matrix and the RELION plugin's
inverse-transform convention (T = M^-1, M = [[E(-rot,-tilt,-psi; szyz), -origin/apix]]),
derived in the convert module's docstring, and, when scipion-em-relion is installed,
against the RELION plugin's own writer.
"""
import os
import shutil
import tempfile
import unittest

import numpy as np

APIX = 1.7
BOX = 12
N = 40


def _random_rotations(rng, n):
    import pwem.convert.transformations as tfs
    return [tfs.random_rotation_matrix(rng.random(3))[:3, :3] for _ in range(n)]


def _make_set(folder, rng, n=N, apix=APIX, with_phase=True, ext=".mrcs"):
    """A SetOfParticles with random ALIGN_PROJ transforms (in-plane origins) and CTFs,
    images in one MRC stack. Returns (set, dict of the ground truth)."""
    import mrcfile
    from pwem.objects import Acquisition, CTFModel, Particle, SetOfParticles, Transform
    stack = os.path.join(folder, "parts" + ext)
    with mrcfile.new(stack, overwrite=True) as m:
        m.set_data(rng.normal(size=(n, BOX, BOX)).astype(np.float32))
        m.voxel_size = apix
    parts = SetOfParticles(filename=os.path.join(folder, "particles.sqlite"))
    parts.setSamplingRate(apix)
    acq = Acquisition(voltage=200.0, sphericalAberration=1.4, amplitudeContrast=0.07,
                      magnification=10000.0)
    parts.setAcquisition(acq)
    parts.setAlignmentProj()
    parts.setHasCTF(True)
    R = _random_rotations(rng, n)
    s = rng.normal(0, 3.0, (n, 2))                    # origins in pixels
    dfu = rng.uniform(8000, 30000, n)
    dfv = dfu - rng.uniform(0, 2000, n)
    ang = rng.uniform(-180, 180, n)
    ps = rng.uniform(0, 90, n) if with_phase else np.zeros(n)
    ids = np.arange(n) * 3 + 5                        # ids that are not 1..N
    T = np.zeros((n, 4, 4))
    for i in range(n):
        # T = [[A^T, A^T s], [0, 1]] with A = R^T: the RELION plugin's inverse transform
        T[i, :3, :3] = R[i]
        T[i, :3, 3] = R[i] @ np.array([s[i, 0], s[i, 1], 0.0])
        T[i, 3, 3] = 1.0
        p = Particle(location=(i + 1, stack))
        p.setObjId(int(ids[i]))
        p.setSamplingRate(apix)
        c = CTFModel(defocusU=float(dfu[i]), defocusV=float(dfv[i]),
                     defocusAngle=float(ang[i]))
        c.setPhaseShift(float(ps[i]))
        p.setCTF(c)
        p.setAcquisition(acq.clone())
        p.setTransform(Transform(T[i]))
        parts.append(p)
    parts.write()
    truth = dict(T=T, A=np.stack([r.T for r in R]), origin=s * apix, dfu=dfu, dfv=dfv,
                 ang=ang, ps=ps, ids=ids, stack=stack)
    return parts, truth


class TestPoseConvention(unittest.TestCase):
    """The matrix algebra, on its own."""

    def test_pwem_euler_matrix_is_relion_matrix(self):
        """E = pwem euler_matrix(-rot, -tilt, -psi, 'szyz') is RELION's A (derivation)."""
        import pwem.convert.transformations as tfs
        from nmaem_plugin.core.physics.rotations import euler_to_matrix
        rng = np.random.default_rng(1)
        e = np.stack([rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50),
                      rng.uniform(-180, 180, 50)], 1)
        A = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
        for k in range(50):
            E = tfs.euler_matrix(*np.deg2rad(-e[k]), axes="szyz")[:3, :3]
            np.testing.assert_allclose(E, A[k], atol=1e-12)

    def test_relion_to_matrix_matches_pwem_inverse_transform(self):
        """relionToMatrices gives inv([[E, -s], [0, 1]]) built with pwem, and
        matricesToRelion inverts it (angles and origins)."""
        import pwem.convert.transformations as tfs
        from nmaem_plugin.convert import matricesToRelion, relionToMatrices
        rng = np.random.default_rng(2)
        n = 60
        e = np.stack([rng.uniform(-180, 180, n), rng.uniform(1, 179, n),
                      rng.uniform(-180, 180, n)], 1)
        o = rng.normal(0, 5, (n, 2))
        T = relionToMatrices(e, o, APIX)
        for k in range(n):
            M = tfs.euler_matrix(*np.deg2rad(-e[k]), axes="szyz")
            M[:3, 3] = -np.array([o[k, 0], o[k, 1], 0.0]) / APIX
            np.testing.assert_allclose(T[k], np.linalg.inv(M), atol=1e-12)
        e2, o2 = matricesToRelion(T, APIX)
        np.testing.assert_allclose(e2, e, atol=1e-9)
        np.testing.assert_allclose(o2, o, atol=1e-12)

    def test_hand_case(self):
        """Identity rotation, origin (+3, -2) px: the transform's shift is (+3, -2) px;
        rot = 90 alone: A = Rz(-90) (RELION's passive rotation), T = A^T = Rz(+90)."""
        from nmaem_plugin.convert import matricesToRelion, relionToMatrices
        T = relionToMatrices([[0, 0, 0]], [[3 * APIX, -2 * APIX]], APIX)[0]
        np.testing.assert_allclose(T[:3, 3], [3, -2, 0], atol=1e-12)
        np.testing.assert_allclose(T[:3, :3], np.eye(3), atol=1e-12)
        T = relionToMatrices([[90, 0, 0]], None, APIX)[0]
        np.testing.assert_allclose(T[:3, :3], [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
        e, o = matricesToRelion(T, APIX)
        self.assertAlmostEqual((e[0] + e[2]) % 360, 90.0)
        np.testing.assert_allclose(o, 0, atol=1e-12)

    def test_fold_shift(self):
        """A rendering shift t (A) becomes origin - t; replace=True gives -t."""
        from nmaem_plugin.convert import foldShiftIntoMatrix, matricesToRelion, relionToMatrices
        e = np.array([[30.0, 60.0, -45.0]])
        o = np.array([[2.0, -1.5]])
        T = relionToMatrices(e, o, APIX)[0]
        t = np.array([0.7, 0.4])
        e2, o2 = matricesToRelion(foldShiftIntoMatrix(T, t, APIX), APIX)
        np.testing.assert_allclose(e2, e[0], atol=1e-9)
        np.testing.assert_allclose(o2, o[0] - t, atol=1e-12)
        _, o3 = matricesToRelion(foldShiftIntoMatrix(T, t, APIX, replace=True), APIX)
        np.testing.assert_allclose(o3, -t, atol=1e-12)


class TestConvertSets(unittest.TestCase):
    """SetOfParticles -> STAR -> core.metadata, and back."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="nmaem_convert_")
        cls.parts, cls.truth = _make_set(cls.tmp, np.random.default_rng(7))
        cls.star = os.path.join(cls.tmp, "out", "particles.star")
        os.makedirs(os.path.dirname(cls.star))
        from nmaem_plugin.convert import writeSetOfParticles
        cls.n = writeSetOfParticles(cls.parts, cls.star)

    @classmethod
    def tearDownClass(cls):
        cls.parts.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_star_read_by_nmaem(self):
        from nmaem_plugin.core.io.particles import read_particles
        t = self.truth
        self.assertEqual(self.n, N)
        tab = read_particles(self.star).require(poses=True, ctf=True, images=True)
        self.assertEqual(tab.n, N)
        # rotation: A = (T^-1)[:3,:3] = T[:3,:3]^T
        np.testing.assert_allclose(tab.rotation_matrices(), np.swapaxes(t["T"][:, :3, :3], 1, 2),
                                   atol=1e-9)
        np.testing.assert_allclose(tab.rotation_matrices(), t["A"], atol=1e-9)
        np.testing.assert_allclose(tab.origin, t["origin"], atol=1e-9)
        np.testing.assert_array_equal(tab.defocus_u, t["dfu"])
        np.testing.assert_array_equal(tab.defocus_v, t["dfv"])
        np.testing.assert_array_equal(tab.defocus_angle, t["ang"])
        np.testing.assert_allclose(tab.phase_shift, t["ps"])
        np.testing.assert_array_equal(tab.voltage, 200.0)
        np.testing.assert_array_equal(tab.cs, 1.4)
        np.testing.assert_array_equal(tab.amp_contrast, 0.07)
        np.testing.assert_array_equal(tab.apix, APIX)
        np.testing.assert_array_equal(tab.box, BOX)
        np.testing.assert_array_equal(tab.stack_index, np.arange(N))
        self.assertTrue(all(os.path.samefile(p, t["stack"]) for p in tab.stack_paths))
        np.testing.assert_array_equal(tab.extra["rlnImageId"].to_numpy(), t["ids"])
        self.assertEqual(len(tab.optics), 1)

    def test_read_back_into_scipion(self):
        from pwem.constants import ALIGN_PROJ
        from pwem.objects import SetOfParticles
        from nmaem_plugin.convert import readSetOfParticles
        t = self.truth
        out = SetOfParticles(filename=os.path.join(self.tmp, "back.sqlite"))
        readSetOfParticles(self.star, out, extraAttributes={"_nmaem_frame": np.arange(N) % 4})
        out.write()
        self.assertEqual(out.getSize(), N)
        self.assertEqual(out.getAlignment(), ALIGN_PROJ)
        self.assertTrue(out.hasCTF())
        self.assertAlmostEqual(out.getSamplingRate(), APIX)
        self.assertAlmostEqual(out.getAcquisition().getVoltage(), 200.0)
        self.assertAlmostEqual(out.getAcquisition().getSphericalAberration(), 1.4)
        self.assertAlmostEqual(out.getAcquisition().getAmplitudeContrast(), 0.07)
        byId = {int(i): k for k, i in enumerate(t["ids"])}
        seen = []
        for p in out.iterItems(orderBy="id"):
            k = byId[p.getObjId()]
            seen.append(p.getObjId())
            np.testing.assert_allclose(p.getTransform().getMatrix(), t["T"][k], atol=1e-9)
            self.assertEqual(p.getLocation(), (k + 1, os.path.abspath(t["stack"])))
            c = p.getCTF()
            self.assertEqual((c.getDefocusU(), c.getDefocusV(), c.getDefocusAngle()),
                             (t["dfu"][k], t["dfv"][k], t["ang"][k]))
            self.assertAlmostEqual(c.getPhaseShift(), t["ps"][k])
            self.assertEqual(p._nmaem_frame.get(), k % 4)
        self.assertEqual(sorted(seen), sorted(t["ids"].tolist()))
        out.close()

    def test_rejects_particles_without_alignment_or_ctf(self):
        from pwem.objects import SetOfParticles
        from nmaem_plugin.convert import writeSetOfParticles
        s = SetOfParticles(filename=os.path.join(self.tmp, "noalign.sqlite"))
        s.copyInfo(self.parts)
        s.setAlignment("None")
        with self.assertRaisesRegex(ValueError, "no 3D projection alignment"):
            writeSetOfParticles(s, os.path.join(self.tmp, "x.star"))
        s.setAlignmentProj()
        s.setHasCTF(False)
        with self.assertRaisesRegex(ValueError, "no CTF"):
            writeSetOfParticles(s, os.path.join(self.tmp, "x.star"))
        s.close()

    def test_latent_on_flex_particles(self):
        """A hand-made latent.npz (a shuffled subset of rows) on SetOfParticlesFlex: ids
        kept, z on each particle, FlexInfo 'nmaem', shift folded into the transform."""
        from pwem.objects import SetOfParticlesFlex
        from nmaem_plugin.convert import matricesToRelion, setOfParticlesFlexFromLatent
        from nmaem_plugin.core.io.latent import read_latent
        t = self.truth
        rng = np.random.default_rng(3)
        rows = rng.permutation(N)[:25]
        d = 3
        z = rng.normal(size=(len(rows), d)).astype(np.float32)
        shift = rng.normal(0, 1.0, (len(rows), 2)).astype(np.float32)
        latent = os.path.join(self.tmp, "latent.npz")
        np.savez(latent, z=z, shift=shift, index=rows)
        self.assertEqual(read_latent(latent).z.shape, (25, d))
        out = SetOfParticlesFlex(filename=os.path.join(self.tmp, "flex.sqlite"),
                                 progName="nmaem")
        count = setOfParticlesFlexFromLatent(self.parts, latent, out, starFile=self.star)
        out.write()
        self.assertEqual(count, 25)
        # the has-CTF flag survives (pwem's SetOfParticlesFlex.copyInfo skips it)
        self.assertTrue(self.parts.hasCTF())
        self.assertTrue(out.hasCTF())
        self.assertEqual(out.getSize(), 25)
        self.assertEqual(out.getFlexInfo().getProgName(), "nmaem")
        self.assertEqual(out.getFlexInfo().getAttr("_nmaem_latentDim"), d)
        self.assertAlmostEqual(out.getSamplingRate(), APIX)
        got = 0
        for p in out.iterItems():
            k = int(np.flatnonzero(t["ids"] == p.getObjId())[0])    # row of the input STAR
            j = int(np.flatnonzero(rows == k)[0])                   # row of the latent file
            self.assertEqual(p.getFlexInfo().getProgName(), "nmaem")
            np.testing.assert_allclose(p.getZFlex(), z[j], rtol=1e-6)
            e, o = matricesToRelion(p.getTransform().getMatrix(), APIX)
            np.testing.assert_allclose(o, t["origin"][k] - shift[j], atol=1e-5)
            from nmaem_plugin.core.physics.rotations import euler_to_matrix
            np.testing.assert_allclose(euler_to_matrix(*[np.array([v]) for v in e])[0],
                                       t["A"][k], atol=1e-9)
            self.assertEqual(p.getCTF().getDefocusU(), t["dfu"][k])
            got += 1
        self.assertEqual(got, 25)
        out.close()

    def test_latent_pose_correction_on_flex_particles(self):
        """A latent file with pose corrections (nmaem train --refine-pose): each transform
        gets the refined rotation A R(v) (built here from an independent Rodrigues series)
        and keeps the origin folded with the shift; foldPose=False keeps the rotation."""
        from pwem.objects import SetOfParticlesFlex
        from nmaem_plugin.convert import matricesToRelion, setOfParticlesFlexFromLatent
        from nmaem_plugin.core.physics.rotations import euler_to_matrix
        from nmaem_plugin.core.io.latent import write_latent
        from nmaem_plugin.tests.core.test_pose import rodrigues_reference as series
        t = self.truth
        rng = np.random.default_rng(4)
        v = rng.normal(0, 0.05, (N, 3))
        shift = rng.normal(0, 1.0, (N, 2))
        latent = os.path.join(self.tmp, "latent_pose.npz")
        write_latent(latent, np.zeros((N, 1)), shift, np.arange(N), pose_correction=v,
                     euler=np.zeros((N, 3)))
        for foldPose, name in ((True, "flex_pose.sqlite"), (False, "flex_nopose.sqlite")):
            out = SetOfParticlesFlex(filename=os.path.join(self.tmp, name), progName="nmaem")
            setOfParticlesFlexFromLatent(self.parts, latent, out, starFile=self.star,
                                         foldPose=foldPose)
            for p in out.iterItems():
                k = int(np.flatnonzero(t["ids"] == p.getObjId())[0])
                e, o = matricesToRelion(p.getTransform().getMatrix(), APIX)
                A = euler_to_matrix(*[np.array([x]) for x in e])[0]
                want = t["A"][k] @ series(v[k]) if foldPose else t["A"][k]
                np.testing.assert_allclose(A, want, atol=1e-7)   # stored transforms
                np.testing.assert_allclose(o, t["origin"][k] - shift[k], atol=1e-6)
            out.close()

    def test_z_cov_round_trip(self):
        """Each particle's posterior covariance (latent.npz z_cov) survives the Scipion
        round trip: latent -> SetOfParticlesFlex (sqlite, reopened) -> latent, equal to
        float32 precision, symmetric positive definite, with its total sd on the particle;
        a latent without z_cov gives particles without it and a latent without it."""
        from pwem.objects import SetOfParticlesFlex
        from nmaem_plugin.constants import ATTR_Z_COV, ATTR_Z_SD
        from nmaem_plugin.convert import latentFromParticlesFlex, setOfParticlesFlexFromLatent
        from nmaem_plugin.core.io.latent import read_latent, write_latent
        rng = np.random.default_rng(7)
        d = 4
        a = rng.normal(size=(N, d, d))
        cov = (a @ a.transpose(0, 2, 1) + 0.1 * np.eye(d)).astype(np.float32)
        z = rng.normal(size=(N, d))
        for withCov in (True, False):
            latent = os.path.join(self.tmp, "latent_cov%d.npz" % withCov)
            write_latent(latent, z, np.zeros((N, 2)), np.arange(N),
                         z_cov=cov if withCov else None)
            fn = os.path.join(self.tmp, "flex_cov%d.sqlite" % withCov)
            out = SetOfParticlesFlex(filename=fn, progName="nmaem")
            setOfParticlesFlexFromLatent(self.parts, latent, out, foldShift=False)
            out.write()
            out.close()
            again = SetOfParticlesFlex(filename=fn)
            ids = sorted(self.truth["ids"].tolist())
            for p in again.iterItems(orderBy="id"):
                k = ids.index(p.getObjId())
                if withCov:
                    self.assertAlmostEqual(getattr(p, ATTR_Z_SD).get(),
                                           float(np.sqrt(np.trace(cov[k].astype(float)))),
                                           places=4)
                else:
                    self.assertIsNone(getattr(p, ATTR_Z_COV, None))
            back = os.path.join(self.tmp, "back_cov%d.npz" % withCov)
            latentFromParticlesFlex(again, back)
            again.close()
            lat = read_latent(back)             # read_latent checks symmetry and SPD
            if withCov:
                np.testing.assert_array_equal(lat.z_cov, cov)
                self.assertTrue((np.linalg.eigvalsh(lat.z_cov.astype(float)) > 0).all())
            else:
                self.assertIsNone(lat.z_cov)
                self.assertIsNone(lat.z_sd())
            np.testing.assert_allclose(lat.z, z, atol=1e-6)

    def test_latent_without_star_uses_id_order(self):
        from pwem.objects import SetOfParticlesFlex
        from nmaem_plugin.convert import setOfParticlesFlexFromLatent
        z = np.arange(N, dtype=np.float32)[:, None]
        latent = os.path.join(self.tmp, "latent_all.npz")
        np.savez(latent, z=z, shift=np.zeros((N, 2), np.float32), index=np.arange(N))
        out = SetOfParticlesFlex(filename=os.path.join(self.tmp, "flex2.sqlite"),
                                 progName="nmaem")
        setOfParticlesFlexFromLatent(self.parts, latent, out, foldShift=False)
        ids = sorted(self.truth["ids"].tolist())
        for p in out.iterItems():
            self.assertEqual(p.getZFlex()[0], ids.index(p.getObjId()))
            np.testing.assert_array_equal(
                p.getTransform().getMatrix(),
                self.truth["T"][int(np.flatnonzero(self.truth["ids"] == p.getObjId())[0])])
        out.close()

    def test_non_mrc_stacks_are_converted_with_image_handler(self):
        """Stacks that are not MRC go through pwem's ImageHandler.convert (replaced here by
        a stand-in that copies MRC data, xmipp's image library not being installed)."""
        import mrcfile
        from pwem.emlib.image import ImageHandler
        from nmaem_plugin.convert import particlesToTable
        folder = os.path.join(self.tmp, "spider")
        os.makedirs(folder)
        parts, truth = _make_set(folder, np.random.default_rng(11), n=5, ext=".stk")
        calls = []

        def fake_convert(self_, inputObj, outputObj, *a, **k):
            (i, src), (j, dst) = inputObj, outputObj
            calls.append((i, j))
            with mrcfile.open(src, permissive=True) as m:
                img = np.asarray(m.data[i - 1])
            if os.path.exists(dst):
                with mrcfile.open(dst, permissive=True) as m:
                    data = np.concatenate([np.asarray(m.data).reshape(-1, BOX, BOX), img[None]])
            else:
                data = img[None]
            with mrcfile.new(dst, overwrite=True) as m:
                m.set_data(data.astype(np.float32))
        real = ImageHandler.convert
        ImageHandler.convert = fake_convert
        try:
            tab = particlesToTable(parts, os.path.join(folder, "p.star"),
                                   stackDir=os.path.join(folder, "mrc"))
        finally:
            ImageHandler.convert = real
            parts.close()
        self.assertEqual(calls, [(i, i) for i in range(1, 6)])
        self.assertEqual(len(set(tab.stack_paths.tolist())), 1)
        self.assertTrue(tab.stack_paths[0].endswith(".mrcs"))
        np.testing.assert_array_equal(tab.stack_index, np.arange(5))
        np.testing.assert_array_equal(tab.box, BOX)


def _relion_plugin():
    try:
        import relion.convert  # noqa: F401
        return True
    except Exception:
        return False


@unittest.skipUnless(_relion_plugin(), "scipion-em-relion is not installed: the cross-check "
                     "against the RELION plugin's own writer is skipped "
                     "(pip install scipion-em-relion)")
class TestAgainstRelionPlugin(unittest.TestCase):
    """The RELION plugin's writer and ours write the same poses, origins and CTFs."""

    def test_same_angles_origins_ctf(self):
        import relion.convert as rconv
        from nmaem_plugin.convert import writeSetOfParticles
        from nmaem_plugin.core.physics.rotations import euler_to_matrix
        from nmaem_plugin.core.io.star import read_star_blocks
        tmp = tempfile.mkdtemp(prefix="nmaem_relion_")
        try:
            parts, truth = _make_set(tmp, np.random.default_rng(5))
            ours, theirs = os.path.join(tmp, "ours.star"), os.path.join(tmp, "relion.star")
            writeSetOfParticles(parts, ours)
            rconv.writeSetOfParticles(parts, theirs)
            parts.close()
            a = read_star_blocks(ours)["particles"]
            b = read_star_blocks(theirs)["particles"]
            self.assertEqual(len(a), N)
            self.assertEqual(len(b), N)
            b = b.set_index("rlnImageId").loc[a["rlnImageId"].to_numpy()]
            ea = a[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
            eb = b[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
            # same matrices, and the same angles (tilt away from 0 and 180 here); the
            # RELION plugin writes 6 decimals
            np.testing.assert_allclose(euler_to_matrix(*ea.T), euler_to_matrix(*eb.T),
                                       atol=1e-6)
            d = (ea - eb + 180.0) % 360.0 - 180.0
            np.testing.assert_allclose(d, 0, atol=1e-5)
            for c in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV",
                      "rlnDefocusAngle", "rlnPhaseShift"):
                np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), atol=1e-6,
                                           err_msg=c)
            if "rlnOriginZAngst" in b.columns:
                np.testing.assert_allclose(b["rlnOriginZAngst"].to_numpy(), 0, atol=1e-9)
            oa = read_star_blocks(ours)["optics"]
            ob = read_star_blocks(theirs)["optics"]
            for c in ("rlnImagePixelSize", "rlnImageSize", "rlnVoltage",
                      "rlnSphericalAberration", "rlnAmplitudeContrast"):
                self.assertAlmostEqual(float(oa[c].iloc[0]), float(ob[c].iloc[0]), msg=c)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


    def test_refined_angles_read_by_relion(self):
        """Refined angles as nmaem infer writes them (core.star.write_star of A R(v)'s
        Euler angles) read back through our reader and through the RELION plugin's reader
        (its particle transforms) to the same matrices, A R(v)."""
        import relion.convert as rconv
        from pwem.objects import SetOfParticles
        from pwem.constants import ALIGN_PROJ
        from nmaem_plugin.convert import writeSetOfParticles
        from nmaem_plugin.core.io import poses
        from nmaem_plugin.core.io.particles import read_particles
        from nmaem_plugin.core.io.star import write_star
        from dataclasses import replace
        tmp = tempfile.mkdtemp(prefix="nmaem_relion_pose_")
        try:
            parts, _ = _make_set(tmp, np.random.default_rng(6))
            star = os.path.join(tmp, "in.star")
            writeSetOfParticles(parts, star)
            parts.close()
            table = read_particles(star)
            v = np.random.default_rng(7).normal(0, 0.05, (table.n, 3))
            from nmaem_plugin.tests.core.test_pose import rodrigues_reference as series
            # A R(v) with R from an independent Rodrigues series, not correct_rotations
            want = np.stack([A @ series(vk) for A, vk in zip(table.rotation_matrices(), v)])
            np.testing.assert_allclose(poses.correct_rotations(table.rotation_matrices(), v),
                                       want, atol=1e-12)
            refined = os.path.join(tmp, "refined.star")
            write_star(refined, replace(table, euler=np.stack(poses.matrix_to_euler(want), 1)))
            np.testing.assert_allclose(read_particles(refined).rotation_matrices(), want,
                                       atol=1e-6)
            theirs = SetOfParticles(filename=os.path.join(tmp, "relion.sqlite"))
            rconv.readSetOfParticles(refined, theirs, alignType=ALIGN_PROJ)
            self.assertEqual(theirs.getSize(), table.n)
            got = []
            for p in theirs.iterItems(orderBy="id"):      # the rows' order
                got.append(np.linalg.inv(p.getTransform().getMatrix())[:3, :3])
            np.testing.assert_allclose(np.stack(got), want, atol=1e-6)
            theirs.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    unittest.main()
