"""Tests of core/particles.py, star.py, cryosparc.py and stacks.py: RELION STAR and
cryoSPARC .cs particles, image stacks.

Expectations come from the files themselves, through a plain parse written here (no code
of these modules), from values typed by hand from the files, or from an independent
implementation (scipy's rotation vectors for the cryoSPARC poses).
"""
import os
import shutil
import tempfile
import unittest

import mrcfile
import numpy as np

from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.io.poses import euler_to_matrix
from nmaem_plugin.core.io.particles import read_particles
from nmaem_plugin.core.io.stacks import ImageStack, write_stack
from nmaem_plugin.core.io.star import write_star

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def data(name):
    return os.path.join(DATA, name)


def plain_star(path, block):
    """Independent minimal STAR parse: {label: [str values]} of one loop block."""
    with open(path) as fh:
        lines = [ln.strip() for ln in fh]
    i = lines.index("data_%s" % block)
    labels, rows = [], []
    for ln in lines[i + 1:]:
        if ln.startswith("data_"):
            break
        if not ln or ln.startswith("#") or ln.startswith("loop_"):
            continue
        if ln.startswith("_"):
            labels.append(ln.split()[0][1:])
        else:
            rows.append(ln.split())
    return {lab: [r[k] for r in rows] for k, lab in enumerate(labels)}


def fl(values):
    return np.array([float(v) for v in values])


def rodrigues_scipy(v):
    from scipy.spatial.transform import Rotation
    return Rotation.from_rotvec(np.asarray(v, dtype=np.float64)).as_matrix()


def save_cs(path, arr):
    with open(path, "wb") as fh:   # np.save on a file object keeps the .cs name
        np.save(fh, arr)


class TmpDirCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nmaem_meta_")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def assertOneLineError(self, cm, *parts):
        msg = str(cm.exception)
        self.assertNotIn("\n", msg)
        for p in parts:
            self.assertIn(p, msg)


# =============================================================================== RELION

class TestReadRelion(unittest.TestCase):

    def test_relion31_first_row_by_hand(self):
        t = read_particles(data("relion31.star"))
        self.assertEqual(t.n, 5)
        self.assertEqual(t.image_names[0], "000001@relion31.mrcs")
        self.assertEqual(t.stack_paths[0], os.path.abspath(data("relion31.mrcs")))
        np.testing.assert_array_equal(t.stack_index, [0, 1, 2, 3, 4])
        np.testing.assert_array_equal(t.euler[0], [-102.30296, 82.318041, 124.706463])
        np.testing.assert_array_equal(t.origin[0], [0.019324, -0.64686])
        self.assertEqual(t.defocus_u[0], 13108.082418)
        self.assertEqual(t.defocus_v[0], 12845.582418)
        self.assertEqual(t.defocus_angle[0], -160.39)
        self.assertEqual(t.voltage[0], 300.0)
        self.assertEqual(t.cs[0], 0.01)
        self.assertEqual(t.amp_contrast[0], 0.1)
        self.assertEqual(t.apix[0], 2.806)
        self.assertEqual(t.box[0], 256)
        self.assertEqual(t.optics_group[0], 1)
        self.assertEqual(t.phase_shift[0], 0.0)
        self.assertEqual(t.ctf_bfactor[0], 0.0)
        self.assertIn("rlnMicrographName", t.extra.columns)
        t.require(poses=True, ctf=True, images=True)

    def _check_against_plain(self, name):
        t = read_particles(data(name))
        p = plain_star(data(name), "particles")
        o = plain_star(data(name), "optics")
        self.assertEqual(t.n, len(p["rlnImageName"]))
        np.testing.assert_array_equal(t.image_names, p["rlnImageName"])
        np.testing.assert_array_equal(t.stack_index,
                                      [int(s.split("@")[0]) - 1 for s in p["rlnImageName"]])
        for k, lab in enumerate(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]):
            np.testing.assert_array_equal(t.euler[:, k], fl(p[lab]))
        np.testing.assert_array_equal(t.origin[:, 0], fl(p["rlnOriginXAngst"]))
        np.testing.assert_array_equal(t.origin[:, 1], fl(p["rlnOriginYAngst"]))
        np.testing.assert_array_equal(t.defocus_u, fl(p["rlnDefocusU"]))
        np.testing.assert_array_equal(t.defocus_v, fl(p["rlnDefocusV"]))
        np.testing.assert_array_equal(t.defocus_angle, fl(p["rlnDefocusAngle"]))
        np.testing.assert_array_equal(t.phase_shift, fl(p["rlnPhaseShift"]))
        groups = [int(g) for g in p["rlnOpticsGroup"]]
        np.testing.assert_array_equal(t.optics_group, groups)
        row = {int(g): k for k, g in enumerate(o["rlnOpticsGroup"])}
        for field, lab in [("apix", "rlnImagePixelSize"), ("voltage", "rlnVoltage"),
                           ("cs", "rlnSphericalAberration"),
                           ("amp_contrast", "rlnAmplitudeContrast"), ("box", "rlnImageSize")]:
            expect = [float(o[lab][row[g]]) for g in groups]
            np.testing.assert_array_equal(getattr(t, field), expect, err_msg=field)
        return t

    def test_relion31_all_rows(self):
        self._check_against_plain("relion31.star")

    def test_relion31_six_optics_groups(self):
        t = self._check_against_plain("relion31.6opticsgroups.star")
        self.assertEqual(t.n, 139)
        self.assertEqual(sorted(set(t.optics_group.tolist())), [1, 2, 3, 4, 5, 6])
        # by hand: group 4 is the one with Cs 2.6, group 6 has 1.25 A/px
        self.assertTrue(np.all(t.cs[t.optics_group == 4] == 2.6))
        self.assertTrue(np.all(t.cs[t.optics_group != 4] == 2.7))
        self.assertTrue(np.all(t.apix[t.optics_group == 6] == 1.25))
        self.assertTrue(np.all(t.apix[t.optics_group == 2] == 1.24))
        self.assertEqual(t.image_names[0], "3@Polish/job520/Micrographs/0003_shiny.mrcs")
        np.testing.assert_array_equal(t.origin[0], [13.284554, -3.21701])

    def test_relion5(self):
        t = self._check_against_plain("relion5.star")
        self.assertEqual(t.n, 17)
        np.testing.assert_array_equal(t.euler[0], [111.508618, 36.742536, 141.158035])
        np.testing.assert_array_equal(t.origin[0], [-3.12578, -1.41031])
        self.assertEqual((t.apix[0], t.box[0], t.voltage[0], t.cs[0]), (0.89, 448, 100.0, 1.6))
        self.assertEqual(t.image_names[1], "2@toy_images_b.mrcs")
        self.assertEqual(t.stack_index[1], 1)

    def test_relion30_pixels_to_angstrom(self):
        t = read_particles(data("FinalRefinement-OriginalParticles-PfCRT.star"))
        self.assertEqual(t.n, 5)
        # 1.035 um detector pixel at magnification 10000 -> 1.035 A
        np.testing.assert_allclose(t.apix, 1.035 * 1e4 / 10000.0, rtol=1e-15)
        # rlnOriginX/Y are pixels: -0.14063, -0.04688 -> Angstrom
        np.testing.assert_allclose(t.origin[0], [-0.14063 * 1.035, -0.04688 * 1.035],
                                   rtol=1e-14)
        np.testing.assert_allclose(t.origin[4], [-0.04688 * 1.035, 0.203125 * 1.035],
                                   rtol=1e-14)
        np.testing.assert_array_equal(t.euler[0], [16.093530, 86.352776, 98.225690])
        self.assertEqual((t.defocus_u[0], t.defocus_v[0], t.defocus_angle[0]),
                         (15686.0, 17521.4, 87.629070))
        self.assertEqual((t.voltage[0], t.cs[0]), (300.0, 0.001))
        self.assertEqual(t.stack_index[4], 4)
        self.assertTrue(t.stack_paths[0].endswith(
            os.path.join("Extract", "job012", "FinalRefinement-OriginalParticles-PfCRT.mrcs")))
        # this file has no rlnAmplitudeContrast: CTF incomplete
        self.assertIsNone(t.amp_contrast)
        with self.assertRaises(NmaemError) as cm:
            t.require(poses=True, ctf=True)
        msg = str(cm.exception)
        self.assertTrue(msg.startswith(data("FinalRefinement-OriginalParticles-PfCRT.star")))
        self.assertIn("rlnAmplitudeContrast", msg)
        t.require(poses=True, ctf=False)

    def test_relion30_no_poses(self):
        t = read_particles(data("empiar_10076_7.star"))
        self.assertEqual(t.n, 7)
        np.testing.assert_allclose(t.apix, 5 * 1e4 / 38168, rtol=1e-15)
        self.assertEqual(t.defocus_u[6], 15177.4)
        self.assertIsNone(t.euler)
        self.assertIsNone(t.origin)
        with self.assertRaises(NmaemError) as cm:
            t.require(poses=True, ctf=False)
        msg = str(cm.exception)
        self.assertEqual(msg.split(": ")[0], data("empiar_10076_7.star"))
        self.assertIn("no poses", msg)
        self.assertIn("rlnAngleRot", msg)
        t.require(poses=False, ctf=True)

    def test_rotation_matrices_use_relion_matrix(self):
        t = read_particles(data("relion31.star"))
        A = t.rotation_matrices()
        self.assertEqual(A.shape, (5, 3, 3))
        # RELION's A for (rot, tilt, psi) = (0, 90, 0) is the passive Ry(90)
        t2 = t.subset([0])
        t2.euler = np.array([[0.0, 90.0, 0.0]])
        np.testing.assert_allclose(t2.rotation_matrices()[0],
                                   [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-15)
        np.testing.assert_allclose(A[2], euler_to_matrix(-99.556, 74.982413, 132.223679),
                                   atol=1e-15)

    def test_subset(self):
        t = read_particles(data("relion31.6opticsgroups.star"))
        s = t.subset([5, 0, 5])
        self.assertEqual(s.n, 3)
        np.testing.assert_array_equal(s.euler, t.euler[[5, 0, 5]])
        np.testing.assert_array_equal(s.apix, t.apix[[5, 0, 5]])
        self.assertEqual(list(s.extra["rlnMicrographName"]),
                         list(t.extra["rlnMicrographName"].iloc[[5, 0, 5]]))
        mask = t.optics_group == 4
        m = t.subset(mask)
        self.assertEqual(m.n, int(mask.sum()))
        self.assertTrue(np.all(m.cs == 2.6))


# =============================================================================== cryoSPARC

class TestReadCryosparc(TmpDirCase):

    def test_refinement_poses_against_scipy(self):
        path = data("cryosparc_P12_J24_001_particles.cs")
        raw = np.load(path)
        t = read_particles(path)
        self.assertEqual(t.n, len(raw))
        # RELION's A is the transpose of the Rodrigues matrix of the pose (peers: pyem
        # csparc2star, cryoDRGN parse_pose_csparc)
        expect = np.swapaxes(rodrigues_scipy(raw["alignments3D/pose"]), -1, -2)
        np.testing.assert_allclose(t.rotation_matrices(), expect, atol=1e-12)
        # origin (A) = +shift (px) * psize
        np.testing.assert_allclose(
            t.origin, raw["alignments3D/shift"].astype(float)
            * raw["alignments3D/psize_A"].astype(float)[:, None], rtol=1e-12)
        # first row by hand: shift (11.334375, -1.828125) px at 2.95 A/px
        np.testing.assert_allclose(t.origin[0], [11.334375 * 2.95, -1.828125 * 2.95], rtol=1e-6)
        np.testing.assert_array_equal(t.defocus_u, raw["ctf/df1_A"].astype(float))
        np.testing.assert_array_equal(t.defocus_v, raw["ctf/df2_A"].astype(float))
        np.testing.assert_allclose(t.defocus_angle,
                                   raw["ctf/df_angle_rad"].astype(float) * 180 / np.pi,
                                   rtol=1e-14)
        self.assertEqual((t.voltage[0], t.cs[0]), (200.0, 2.0))
        self.assertAlmostEqual(t.amp_contrast[0], 0.07, places=7)
        self.assertAlmostEqual(t.apix[0], 2.95, places=6)
        self.assertEqual(t.box[0], 180)
        np.testing.assert_array_equal(t.stack_index, raw["blob/idx"])
        self.assertTrue(t.stack_paths[0].endswith(
            "J19/extract/20150917_05196_DNA-TET-25k-DE20_raw.region_000.sum-all_003-072"
            "_particles.mrc"))
        t.require(poses=True, ctf=True, images=True)

    def _write_cs(self, name, poses, shifts, psize=1.5, path="J3/extract/s.mrcs"):
        n = len(poses)
        dt = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"),
              ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"),
              ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
              ("alignments3D/psize_A", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
              ("ctf/df_angle_rad", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
              ("ctf/amp_contrast", "<f4"), ("ctf/phase_shift_rad", "<f4")]
        a = np.zeros(n, dtype=dt)
        a["blob/path"] = path.encode()
        a["blob/idx"] = np.arange(n)
        a["blob/shape"] = 64
        a["blob/psize_A"] = psize
        a["alignments3D/psize_A"] = psize
        a["alignments3D/pose"] = poses
        a["alignments3D/shift"] = shifts
        a["ctf/df1_A"], a["ctf/df2_A"] = 10000, 9000
        a["ctf/df_angle_rad"] = np.pi / 4
        a["ctf/phase_shift_rad"] = np.pi / 2
        a["ctf/accel_kv"], a["ctf/cs_mm"], a["ctf/amp_contrast"] = 300, 2.7, 0.1
        p = os.path.join(self.tmp, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        save_cs(p, a)
        return p

    def test_hand_derived_poses_and_shifts(self):
        th = np.deg2rad(30.0)
        p = self._write_cs("a.cs", [[0, 0, th], [0, np.pi / 2, 0]], [[2, -4], [0.5, 0]])
        t = read_particles(p)
        c, s = np.cos(th), np.sin(th)
        # rotation vector about z by 30 deg: Rodrigues [[c,-s,0],[s,c,0],[0,0,1]];
        # RELION's A is its transpose, i.e. rot + psi = 30, tilt = 0
        A = t.rotation_matrices()
        np.testing.assert_allclose(A[0], [[c, s, 0], [-s, c, 0], [0, 0, 1]], atol=1e-7)
        self.assertAlmostEqual(t.euler[0, 1], 0.0, places=5)
        self.assertAlmostEqual((t.euler[0, 0] + t.euler[0, 2]) % 360, 30.0, places=5)
        # 90 deg about y: RELION tilt = 90, rot = psi = 0
        np.testing.assert_allclose(t.euler[1], [0, 90, 0], atol=1e-5)
        np.testing.assert_allclose(t.origin, [[3.0, -6.0], [0.75, 0.0]], rtol=1e-7)
        np.testing.assert_allclose(t.defocus_angle, 45.0, rtol=1e-6)
        np.testing.assert_allclose(t.phase_shift, 90.0, rtol=1e-6)

    def test_paths_relative_to_project_folder_and_root(self):
        p = self._write_cs(os.path.join("proj", "J5", "particles.cs"), [[0, 0, 0]], [[0, 0]])
        stack = os.path.join(self.tmp, "proj", "J3", "extract", "s.mrcs")
        # not there: taken relative to the file's folder
        t = read_particles(p)
        self.assertEqual(t.stack_paths[0],
                         os.path.join(self.tmp, "proj", "J5", "J3", "extract", "s.mrcs"))
        os.makedirs(os.path.dirname(stack))
        write_stack(stack, np.zeros((1, 64, 64)), 1.5)
        t = read_particles(p)                        # found in a parent folder
        self.assertEqual(t.stack_paths[0], stack)
        other = os.path.join(self.tmp, "elsewhere")
        os.makedirs(os.path.join(other, "J3", "extract"))
        write_stack(os.path.join(other, "J3", "extract", "s.mrcs"), np.ones((1, 64, 64)), 1.5)
        t = read_particles(p, root=other)            # root wins
        self.assertEqual(t.stack_paths[0], os.path.join(other, "J3", "extract", "s.mrcs"))
        self.assertEqual(ImageStack(t).read([0])[0, 0, 0], 1.0)

    def test_exported_2d_file(self):
        path = data("cryosparc_J2_particles_exported.cs")
        raw = np.load(path)
        t = read_particles(path)
        self.assertEqual(t.n, 22)
        self.assertIsNone(t.euler)
        self.assertIsNone(t.origin)
        first = raw["blob/path"][0].decode()
        self.assertTrue(first.startswith(">"))
        self.assertTrue(t.stack_paths[0].endswith(first[1:]))
        self.assertNotIn(">", t.stack_paths[0])
        np.testing.assert_array_equal(t.stack_index, raw["blob/idx"])
        self.assertAlmostEqual(t.apix[0], 1.345, places=6)
        self.assertEqual(t.box[0], 300)
        np.testing.assert_array_equal(t.defocus_u, raw["ctf/df1_A"].astype(float))
        with self.assertRaises(NmaemError) as cm:
            t.require(poses=True, ctf=True)
        self.assertOneLineError(cm, path, "no poses")

    def test_cs_without_blobs(self):
        raw = np.load(data("empiar_10076_7.cs"))
        keep = [n for n in raw.dtype.names if not n.startswith("blob/") or n == "blob/psize_A"]
        p = os.path.join(self.tmp, "noblob.cs")
        save_cs(p, raw[keep])
        t = read_particles(p)
        self.assertIsNone(t.stack_paths)
        np.testing.assert_array_equal(t.defocus_u, raw["ctf/df1_A"].astype(float))
        with self.assertRaises(NmaemError) as cm:
            ImageStack(t)
        self.assertOneLineError(cm, p, "no particle images")

    def test_empiar_10076_star_and_cs_agree(self):
        """The same 7 particles exported by RELION 3.0 (STAR) and cryoSPARC (.cs).

        Neither file has poses or shifts, so only images, CTF and pixel size can be
        compared; the pose convention is tested above (scipy, hand-derived cases).
        """
        s = read_particles(data("empiar_10076_7.star"))
        c = read_particles(data("empiar_10076_7.cs"))
        self.assertEqual(s.n, c.n)
        np.testing.assert_array_equal(s.stack_paths, c.stack_paths)
        np.testing.assert_array_equal(s.stack_index, c.stack_index)
        # .cs values are float32 copies of the STAR's
        np.testing.assert_allclose(c.defocus_u, s.defocus_u, rtol=1e-7)
        np.testing.assert_allclose(c.defocus_v, s.defocus_v, rtol=1e-7)
        np.testing.assert_allclose(c.defocus_angle, s.defocus_angle, rtol=1e-7)
        np.testing.assert_allclose(c.voltage, s.voltage, rtol=1e-7)
        np.testing.assert_allclose(c.cs, s.cs, rtol=1e-7)
        np.testing.assert_allclose(c.amp_contrast, s.amp_contrast, rtol=1e-7)
        # cryoSPARC's pixel size agrees with DetectorPixelSize * 1e4 / Magnification
        np.testing.assert_allclose(c.apix, s.apix, rtol=1e-7)
        self.assertIsNone(s.euler)
        self.assertIsNone(c.euler)


# =============================================================================== writing

class TestWriteStar(TmpDirCase):

    def assertTablesEqual(self, a, b, same_groups=True):
        self.assertEqual(a.n, b.n)
        for f in ["stack_paths", "stack_index", "euler", "origin", "defocus_u", "defocus_v",
                  "defocus_angle", "phase_shift", "ctf_bfactor", "voltage", "cs",
                  "amp_contrast", "apix", "box"]:
            va, vb = getattr(a, f), getattr(b, f)
            if va is None:
                self.assertIsNone(vb, f)
            else:
                np.testing.assert_array_equal(va, vb, err_msg=f)
        if same_groups:
            np.testing.assert_array_equal(a.optics_group, b.optics_group)

    def test_round_trip_six_optics_groups(self):
        t = read_particles(data("relion31.6opticsgroups.star"))
        out = os.path.join(self.tmp, "out.star")
        write_star(out, t, extra_columns={"rlnNmaemZ1": np.arange(t.n) * 0.1})
        r = read_particles(out)
        self.assertTablesEqual(t, r)
        # unknown particle and optics columns are carried through
        for c in ["rlnMicrographName", "rlnCoordinateX", "rlnClassNumber", "rlnGroupNumber"]:
            np.testing.assert_array_equal(r.extra[c].to_numpy(), t.extra[c].to_numpy(), c)
        np.testing.assert_array_equal(r.extra["rlnNmaemZ1"], np.arange(t.n) * 0.1)
        for c in ["rlnOpticsGroupName", "rlnBeamTiltX", "rlnOddZernike", "rlnMagMat11"]:
            np.testing.assert_array_equal(r.optics[c].to_numpy(), t.optics[c].to_numpy(), c)
        # the written file, read by the independent parse
        p = plain_star(out, "particles")
        o = plain_star(out, "optics")
        self.assertEqual(sorted(int(g) for g in o["rlnOpticsGroup"]), [1, 2, 3, 4, 5, 6])
        self.assertEqual(p["rlnImageName"][0], "000003@" + os.path.abspath(
            data("Polish/job520/Micrographs/0003_shiny.mrcs")))

    def test_round_trip_full_precision_and_relative_names(self):
        t = read_particles(data("relion31.star"))
        rng = np.random.default_rng(1)
        t.euler = rng.uniform(-180, 180, (t.n, 3))
        t.origin = rng.normal(size=(t.n, 2)) * 7.123456789
        t.defocus_u = rng.uniform(5000, 30000, t.n)
        t.phase_shift = rng.uniform(0, 180, t.n)
        t.ctf_bfactor = rng.uniform(0, 100, t.n)
        d = os.path.join(self.tmp, "job")
        os.makedirs(os.path.join(d, "stacks"))
        shutil.copy(data("relion31.mrcs"), os.path.join(d, "stacks", "p.mrcs"))
        t.stack_paths = np.array([os.path.join(d, "stacks", "p.mrcs")] * t.n)
        out = os.path.join(d, "particles.star")
        write_star(out, t)
        self.assertEqual(sorted(os.listdir(d)), ["particles.star", "stacks"])  # no tmp left
        r = read_particles(out)
        self.assertTablesEqual(t, r)
        np.testing.assert_array_equal(r.image_names,
                                      ["%06d@stacks/p.mrcs" % (i + 1) for i in range(t.n)])

    def test_round_trip_relion30_and_cs(self):
        t = read_particles(data("FinalRefinement-OriginalParticles-PfCRT.star"))
        out = os.path.join(self.tmp, "from30.star")
        write_star(out, t)
        r = read_particles(out)
        self.assertTablesEqual(t, r)
        p = plain_star(out, "particles")
        self.assertNotIn("rlnOriginX", p)   # written as rlnOriginXAngst
        np.testing.assert_allclose(fl(p["rlnOriginXAngst"]), t.origin[:, 0], rtol=0)

        c = read_particles(data("cryosparc_P12_J24_001_particles.cs"))
        out = os.path.join(self.tmp, "fromcs.star")
        write_star(out, c)
        r = read_particles(out)
        self.assertTablesEqual(c, r)
        np.testing.assert_allclose(r.rotation_matrices(), c.rotation_matrices(), atol=1e-15)

    def test_inconsistent_optics_groups_are_split(self):
        t = read_particles(data("relion31.star"))
        t.apix = t.apix.copy()
        t.apix[3:] = 1.5          # same group id 1, two pixel sizes
        out = os.path.join(self.tmp, "split.star")
        write_star(out, t)
        r = read_particles(out)
        self.assertTablesEqual(t, r, same_groups=False)
        o = plain_star(out, "optics")
        self.assertEqual(len(o["rlnOpticsGroup"]), 2)
        self.assertEqual(len(set(r.optics_group[:3])), 1)
        self.assertNotEqual(r.optics_group[0], r.optics_group[4])

    def test_write_is_atomic_on_error(self):
        t = read_particles(data("relion31.star"))
        out = os.path.join(self.tmp, "x.star")
        with self.assertRaises(ValueError):
            write_star(out, t, extra_columns={"rlnBad": np.zeros(t.n + 1)})
        self.assertEqual(os.listdir(self.tmp), [])


# =============================================================================== images

class TestImageStack(TmpDirCase):

    def _star(self, name, rows_text, optics_box=256, stack_dir=None):
        """A copy of relion31.star with its particle rows edited."""
        with open(data("relion31.star")) as fh:
            text = fh.read()
        text = text.replace("     1.403000          256 ", "     1.403000          %d "
                            % optics_box)
        for old, new in rows_text:
            text = text.replace(old, new)
        p = os.path.join(self.tmp, name)
        with open(p, "w") as fh:
            fh.write(text)
        return p

    def test_reads_the_right_images(self):
        t = read_particles(data("relion31.star"))
        st = ImageStack(t)
        self.assertEqual(len(st), 5)
        self.assertEqual(st.shape, (256, 256))
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(data("relion31.mrcs"), permissive=True) as m:
                ref = np.array(m.data)
        idx = [4, 0, 2, 2]
        got = st.read(idx)
        self.assertEqual(got.dtype, np.float32)
        self.assertEqual(got.shape, (4, 256, 256))
        np.testing.assert_array_equal(got, ref[idx])
        self.assertFalse(np.array_equal(got[0], got[1]))
        st.close()

    def test_many_stacks_bounded_open_maps(self):
        d = self.tmp
        rng = np.random.default_rng(0)
        imgs = {}
        names = []
        for s in range(5):
            im = rng.normal(size=(3, 16, 16)).astype(np.float32)
            write_stack(os.path.join(d, "s%d.mrcs" % s), im, 2.0)
            imgs[s] = im
            names += ["%d@s%d.mrcs" % (i + 1, s) for i in range(3)]
        t = read_particles(data("relion31.star"))
        t = t.subset(np.zeros(len(names), dtype=int))
        t.stack_paths = np.array([os.path.join(d, nm.split("@")[1]) for nm in names])
        t.stack_index = np.array([int(nm.split("@")[0]) - 1 for nm in names])
        t.box = np.full(t.n, 16)
        st = ImageStack(t, max_open=2)
        order = rng.permutation(t.n)
        got = st.read(order)
        expect = np.stack([imgs[int(names[k].split("@")[1][1])][int(names[k][0]) - 1]
                           for k in order])
        np.testing.assert_array_equal(got, expect)
        self.assertLessEqual(len(st._open), 2)

    def test_bounded_memory(self):
        """Reading 3 images of a 128 MiB stack must not load the stack, and reading all of
        it, batch by batch in a shuffled order (an epoch), must not either: the resident
        memory stays within 32 MiB of where it was (memory maps would keep every page
        read, 128 MiB)."""
        status = "/proc/self/status"
        if not os.path.exists(status):
            self.skipTest("needs /proc/self/status (Linux) to measure resident memory")

        def rss():
            with open(status) as fh:
                for ln in fh:
                    if ln.startswith("VmRSS:"):
                        return int(ln.split()[1]) * 1024
        n, D = 2048, 128
        big = os.path.join(self.tmp, "big.mrcs")
        with mrcfile.new_mmap(big, shape=(n, D, D), mrc_mode=2, overwrite=True) as m:
            for i in range(0, n, 256):
                m.data[i:i + 256] = np.arange(i, i + 256, dtype=np.float32)[:, None, None]
            m.set_image_stack()
        t = read_particles(data("relion31.star")).subset(np.zeros(n, dtype=int))
        t.stack_paths = np.array([big] * n)
        t.stack_index = np.arange(n)
        t.box = np.full(n, D)
        before = rss()
        st = ImageStack(t)
        got = st.read([2000, 7, 1024])
        grown = rss() - before
        np.testing.assert_array_equal(got[:, 5, 5], [2000, 7, 1024])
        self.assertLess(grown, 32 * 2 ** 20,
                        "resident memory grew by %.0f MiB for a %.0f MiB stack"
                        % (grown / 2 ** 20, n * D * D * 4 / 2 ** 20))
        order = np.random.default_rng(0).permutation(n)
        most = 0
        for i in range(0, n, 64):                   # batches of 4 MiB
            got = st.read(order[i:i + 64])
            np.testing.assert_array_equal(got[:, 3, 4], order[i:i + 64])
            most = max(most, rss() - before)
        self.assertLess(most, 32 * 2 ** 20,
                        "resident memory grew by %.0f MiB reading all of a %.0f MiB stack"
                        % (most / 2 ** 20, n * D * D * 4 / 2 ** 20))
        st.close()

    def test_missing_stack(self):
        p = self._star("nostack.star", [])
        t = read_particles(p)
        with self.assertRaises(NmaemError) as cm:
            ImageStack(t)
        self.assertOneLineError(cm, os.path.join(self.tmp, "relion31.mrcs"), "missing", p)

    def test_index_past_end(self):
        shutil.copy(data("relion31.mrcs"), self.tmp)
        p = self._star("past.star", [("000005@relion31.mrcs", "000009@relion31.mrcs")])
        t = read_particles(p)
        with self.assertRaises(NmaemError) as cm:
            ImageStack(t)
        self.assertOneLineError(cm, os.path.join(self.tmp, "relion31.mrcs"), "9", "holds 5")

    def test_optics_box_disagrees(self):
        shutil.copy(data("relion31.mrcs"), self.tmp)
        p = self._star("box.star", [], optics_box=128)
        t = read_particles(p)
        self.assertEqual(t.box[0], 128)
        with self.assertRaises(NmaemError) as cm:
            ImageStack(t)
        self.assertOneLineError(cm, os.path.join(self.tmp, "relion31.mrcs"), "256", "128")

    def test_non_square(self):
        with mrcfile.new(os.path.join(self.tmp, "relion31.mrcs")) as m:
            m.set_data(np.zeros((5, 256, 200), dtype=np.float32))
            m.set_image_stack()
        p = self._star("rect.star", [])
        with self.assertRaises(NmaemError) as cm:
            ImageStack(read_particles(p))
        self.assertOneLineError(cm, os.path.join(self.tmp, "relion31.mrcs"), "not square")

    def test_truncated_stack(self):
        with open(data("relion31.mrcs"), "rb") as fh:
            blob = fh.read()
        with open(os.path.join(self.tmp, "relion31.mrcs"), "wb") as fh:
            fh.write(blob[:len(blob) // 2])
        p = self._star("trunc.star", [])
        with self.assertRaises(NmaemError) as cm:
            ImageStack(read_particles(p))
        self.assertOneLineError(cm, os.path.join(self.tmp, "relion31.mrcs"), "truncated")

    def test_unknown_mode(self):
        """A header of an MRC mode that has no data type (3: complex int16, which mrcfile
        does not read) is named as such, with the mode."""
        import struct
        with open(data("relion31.mrcs"), "rb") as fh:
            blob = bytearray(fh.read())
        blob[12:16] = struct.pack("<i", 3)               # MODE, the 4th header word
        with open(os.path.join(self.tmp, "relion31.mrcs"), "wb") as fh:
            fh.write(bytes(blob))
        p = self._star("mode3.star", [])
        with self.assertRaises(NmaemError) as cm:
            ImageStack(read_particles(p))
        self.assertOneLineError(cm, os.path.join(self.tmp, "relion31.mrcs"),
                                "unsupported or corrupt MRC header (mode 3")

    def test_write_stack(self):
        rng = np.random.default_rng(3)
        im = rng.normal(size=(4, 24, 24))
        p = os.path.join(self.tmp, "w.mrcs")
        write_stack(p, im, 1.7)
        self.assertEqual(os.listdir(self.tmp), ["w.mrcs"])
        with mrcfile.open(p) as m:
            np.testing.assert_array_equal(m.data, im.astype(np.float32))
            self.assertAlmostEqual(float(m.voxel_size.x), 1.7, places=6)
            self.assertTrue(m.is_image_stack())


# =============================================================================== bad STAR

class TestBadStar(TmpDirCase):

    def _write(self, name, text, mode="w"):
        p = os.path.join(self.tmp, name)
        with open(p, mode) as fh:
            fh.write(text)
        return p

    def test_truncated_row(self):
        with open(data("relion31.star")) as fh:
            text = fh.read()
        p = self._write("cut.star", text[:len(text) - 150])
        with self.assertRaises(NmaemError) as cm:
            read_particles(p)
        self.assertOneLineError(cm, p, "line", "values for 26 columns")

    def test_binary_garbage(self):
        p = self._write("junk.star", bytes(range(256)) * 4, mode="wb")
        with self.assertRaises(NmaemError) as cm:
            read_particles(p)
        self.assertOneLineError(cm, p)

    def test_not_a_star(self):
        p = self._write("text.star", "hello world\nthis is not STAR\n")
        with self.assertRaises(NmaemError) as cm:
            read_particles(p)
        self.assertOneLineError(cm, p, "data_")

    def test_non_numeric_angles(self):
        with open(data("relion31.star")) as fh:
            text = fh.read()
        p = self._write("nan.star", text.replace("   -102.30296 ", "   abc "))
        with self.assertRaises(NmaemError) as cm:
            read_particles(p)
        self.assertOneLineError(cm, p, "rlnAngleRot", "non-numeric")

    def test_missing_file_and_bad_extension(self):
        with self.assertRaises(NmaemError) as cm:
            read_particles(os.path.join(self.tmp, "none.star"))
        self.assertOneLineError(cm, "none.star", "no such particle file")
        p = self._write("x.txt", "data_\n")
        with self.assertRaises(NmaemError) as cm:
            read_particles(p)
        self.assertOneLineError(cm, p, ".txt")

    def test_corrupt_cs(self):
        p = self._write("bad.cs", b"\x93NUMPY garbage", mode="wb")
        with self.assertRaises(NmaemError) as cm:
            read_particles(p)
        self.assertOneLineError(cm, p)

    def test_unknown_optics_group(self):
        with open(data("relion31.star")) as fh:
            text = fh.read()
        p = self._write("og.star", text.replace(
            "000001@relion31.mrcs            1 ", "000001@relion31.mrcs            7 "))
        with self.assertRaises(NmaemError) as cm:
            read_particles(p)
        self.assertOneLineError(cm, p, "optics group 7")

    def test_no_ctf_columns(self):
        with open(data("relion31.star")) as fh:
            # rename the optics voltage column: the file then has no voltage
            text = fh.read().replace("_rlnVoltage #5", "_rlnNotVoltage #5")
        p = self._write("noctf.star", text)
        t = read_particles(p)
        with self.assertRaises(NmaemError) as cm:
            t.require(poses=False, ctf=True)
        self.assertOneLineError(cm, p, "no CTF", "rlnVoltage")


if __name__ == "__main__":
    unittest.main()
