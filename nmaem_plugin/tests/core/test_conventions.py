"""Convention tests: poses, rotation centre, shifts, CTF, image layout, cropping, SNR.

Each expectation here is independent of the code under test: positions worked out by hand
from RELION's definition of the Euler matrix (src/euler.cpp, ``Euler_angles2matrix``) and
of the origin offsets, RELION's matrix element formulas typed in, a second renderer
(gemmi's ``DensityCalculatorE``, a real-space 3D map summed along z), and the CTF written
out from RELION's ``CTF::getCTF`` with the electron wavelength computed from physical
constants. docs/conventions.md derives every hand case.
"""
import math
import os
import unittest

import gemmi
import numpy as np
import torch

from nmaem_plugin.core.physics.fourier import FourierGrid, fourier_crop
from nmaem_plugin.core.physics.renderer import Renderer
from nmaem_plugin.core.physics.white_noise import add_noise, noise_sigma
from nmaem_plugin.core.physics.ctf import ctf_2d, electron_wavelength
from nmaem_plugin.core.physics.rotations import euler_to_matrix, matrix_to_euler
from nmaem_plugin.core.physics.structure import read_model

from nmaem_plugin import DATA_DIR  # noqa: E402

AK_OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")

# 3-4-5 triangle: cos = 0.8, sin = 0.6, so hand-worked positions stay simple
ANG_345 = math.degrees(math.atan2(3.0, 4.0))


# ----------------------------------------------------------------------------- helpers

def relion_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix, element by element (src/euler.cpp), degrees in."""
    a, b, g = (math.radians(v) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = (math.cos(a), math.sin(a), math.cos(b), math.sin(b),
                              math.cos(g), math.sin(g))
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([[cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
                     [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
                     [sc, ss, cb]])


def wavelength_from_constants(voltage_kv):
    """Relativistic electron wavelength (Angstrom) from h, m0, e, c (CODATA 2018)."""
    h, m0, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    V = voltage_kv * 1e3
    return h / math.sqrt(2.0 * m0 * e * V * (1.0 + e * V / (2.0 * m0 * c * c))) * 1e10


def wavelength_relion(voltage_kv):
    """The same with RELION's constants (ctf.cpp): 12.2643247 / sqrt(V (1 + 0.978466e-6 V)).

    They are older values of h / sqrt(2 m0 e) and e / (2 m0 c^2): the wavelength is
    6.4e-6 (relative) longer than the CODATA 2018 one at 300 kV.
    """
    V = voltage_kv * 1e3
    return 12.2643247 / math.sqrt(V * (1.0 + 0.978466e-6 * V))


def relion_ctf(X, Y, U, V, angle, kv, cs_mm, q0, phase_deg=0.0, bfac=0.0):
    """CTF written out as RELION's CTF::getCTF (ctf.h / ctf.cpp), numpy, frequencies 1/A."""
    lam = wavelength_relion(kv)
    K1 = math.pi * lam
    K2 = math.pi / 2.0 * cs_mm * 1e7 * lam ** 3
    K3 = math.atan(q0 / math.sqrt(1.0 - q0 * q0))
    K4 = -bfac / 4.0
    K5 = math.radians(phase_deg)
    avg, dev = -(U + V) / 2.0, -(U - V) / 2.0
    u2 = X * X + Y * Y
    deltaf = avg + dev * np.cos(2.0 * (np.arctan2(Y, X) - math.radians(angle)))
    deltaf = np.where(u2 == 0, 0.0, deltaf)
    arg = K1 * deltaf * u2 + K2 * u2 * u2 - K5 - K3
    return -np.sin(arg) * np.exp(K4 * u2)


def upsample(img, factor):
    """Band-limited (sinc) interpolation of a real image [y, x] by zero-padding its DFT."""
    D = img.shape[-1]
    U = D * factor
    ft = np.fft.rfft2(img)
    big = np.zeros((U, U // 2 + 1), dtype=complex)
    h = D // 2
    big[:h, :h + 1] = ft[:h, :h + 1]
    big[U - h:, :h + 1] = ft[D - h:, :h + 1]
    return np.fft.irfft2(big, s=(U, U)) * factor ** 2


def peak_xy(img, factor=16):
    """(x, y) in pixels of the maximum of a band-limited image, to 1/factor pixel."""
    up = upsample(np.asarray(img, dtype=np.float64), factor)
    iy, ix = np.unravel_index(np.argmax(up), up.shape)
    return np.array([ix, iy], dtype=np.float64) / factor


def pearson(a, b):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


def as_t(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


# ----------------------------------------------------------------------------- poses

class TestEulerMatrices(unittest.TestCase):
    """euler_to_matrix is RELION's Euler_angles2matrix; matrix_to_euler inverts it."""

    def test_matches_relion_element_formulas(self):
        rng = np.random.default_rng(1)
        angles = np.column_stack([rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50),
                                  rng.uniform(-180, 180, 50)])
        angles = np.vstack([angles, [[90, 0, 0], [0, 90, 0], [0, 0, 90], [30, 180, 50]]])
        ours = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
        for (r, t, p), A in zip(angles, ours):
            np.testing.assert_allclose(A, relion_matrix(r, t, p), atol=1e-12)
        # torch input gives the same matrices
        ours_t = euler_to_matrix(as_t(angles[:, 0]), as_t(angles[:, 1]), as_t(angles[:, 2]))
        np.testing.assert_allclose(ours_t.numpy(), ours, atol=1e-12)

    def test_hand_matrices(self):
        # rot = 90: A = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]] (x -> -y, y -> +x)
        np.testing.assert_allclose(euler_to_matrix(90.0, 0.0, 0.0),
                                   [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
        # tilt = 90: A = [[0, 0, -1], [0, 1, 0], [1, 0, 0]] (z -> -x, x -> +z)
        np.testing.assert_allclose(euler_to_matrix(0.0, 90.0, 0.0),
                                   [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-12)

    def test_round_trip(self):
        rng = np.random.default_rng(2)
        n = 200
        rot, tilt, psi = (rng.uniform(-179, 179, n), rng.uniform(0.5, 179.5, n),
                          rng.uniform(-179, 179, n))
        A = euler_to_matrix(rot, tilt, psi)
        r2, t2, p2 = matrix_to_euler(A)
        # regular tilts: the angles themselves come back (rot, psi in (-180, 180])
        np.testing.assert_allclose(r2, rot, atol=1e-8)
        np.testing.assert_allclose(t2, tilt, atol=1e-8)
        np.testing.assert_allclose(p2, psi, atol=1e-8)
        np.testing.assert_allclose(euler_to_matrix(r2, t2, p2), A, atol=1e-10)

    def test_round_trip_tilt_0_and_180(self):
        # tilt = 0: A = Rz(rot + psi); rot is reported as 0 and psi as rot + psi
        r, t, p = matrix_to_euler(euler_to_matrix(30.0, 0.0, 50.0))
        self.assertAlmostEqual(float(r), 0.0, places=8)
        self.assertAlmostEqual(float(t), 0.0, places=8)
        self.assertAlmostEqual(float(p), 80.0, places=8)
        # tilt = 180: Ry(180) Rz(rot) = Rz(-rot) Ry(180), so A = Rz(psi - rot) Ry(180)
        r, t, p = matrix_to_euler(euler_to_matrix(30.0, 180.0, 50.0))
        self.assertAlmostEqual(float(r), 0.0, places=8)
        self.assertAlmostEqual(float(t), 180.0, places=8)
        self.assertAlmostEqual(float(p), 20.0, places=8)
        for ang in [(30.0, 0.0, 50.0), (-120.0, 180.0, 75.0), (0.0, 0.0, 0.0),
                    (10.0, 1e-9, 20.0), (10.0, 180.0 - 1e-9, 20.0)]:
            A = euler_to_matrix(*ang)
            np.testing.assert_allclose(euler_to_matrix(*matrix_to_euler(A)), A, atol=1e-7)


class TestPoseConvention(unittest.TestCase):
    """An L of atoms rendered at hand-worked poses lands where RELION's A r says.

    The body, relative to the rotation centre (Angstrom): P0 = (0, 0, 0), P1 = (10, 0, 0),
    P2 = (0, 5, 0), P3 = (0, 0, 7). Each atom is rendered alone (one batch item each), so
    each peak is known to belong to its atom. Expected image-plane positions (x, y) in
    Angstrom from the image centre are derived in docs/conventions.md ("Poses").
    """
    D, APIX = 48, 1.0
    BODY = np.array([[0, 0, 0], [10, 0, 0], [0, 5, 0], [0, 0, 7]], dtype=np.float64)
    CASES = [
        # (rot, tilt, psi), expected (x, y) of P0, P1, P2, P3
        ((90.0, 0.0, 0.0), [(0, 0), (0, -10), (5, 0), (0, 0)]),
        ((0.0, 90.0, 0.0), [(0, 0), (0, 0), (0, 5), (-7, 0)]),
        ((0.0, 0.0, 90.0), [(0, 0), (0, -10), (5, 0), (0, 0)]),
        ((90.0, 90.0, 0.0), [(0, 0), (0, -10), (0, 0), (-7, 0)]),
        ((0.0, 90.0, 90.0), [(0, 0), (0, 0), (5, 0), (0, 7)]),
        ((ANG_345, 90.0, 0.0), [(0, 0), (0, -6), (0, 4), (-7, 0)]),
        ((90.0, 90.0, ANG_345), [(0, 0), (-6, -8), (0, 0), (-5.6, 4.2)]),
    ]

    def render_body(self, angles):
        D, apix = self.D, self.APIX
        centre = (D // 2) * apix
        ren = Renderer(["C"], D, apix, dtype=torch.float64)
        coords = as_t(self.BODY[:, None, :] + centre)                  # (4, 1, 3)
        A = as_t(euler_to_matrix(*angles))[None].expand(len(self.BODY), 3, 3)
        return ren.render(coords, A).numpy()

    def test_hand_cases(self):
        c = self.D // 2
        for angles, expected in self.CASES:
            imgs = self.render_body(angles)
            for k, (img, exp) in enumerate(zip(imgs, expected)):
                want = np.array([c + exp[0] / self.APIX, c + exp[1] / self.APIX])
                got = peak_xy(img)
                with self.subTest(angles=angles, atom=k):
                    np.testing.assert_allclose(got, want, atol=0.1)

    def test_cases_discriminate(self):
        # The hand cases tell the convention from its look-alikes: with A^T (the inverse
        # rotation), an image mirrored in x or in y, or x and y swapped (a transposed
        # image), at least one atom of every case would land more than 2 pixels away.
        for angles, expected in self.CASES:
            exp = np.array(expected, dtype=np.float64)
            inverse = (self.BODY @ euler_to_matrix(*angles))[:, :2]     # rows: A^T r
            for name, alt in [("A^T", inverse), ("mirror x", exp * [-1, 1]),
                              ("mirror y", exp * [1, -1]), ("swap x, y", exp[:, ::-1])]:
                with self.subTest(angles=angles, alternative=name):
                    self.assertGreater(np.abs(alt - exp).max() / self.APIX, 2.0)


class TestRotationCentre(unittest.TestCase):
    """The rotation centre is the consensus-map box centre, (D0//2)*apix0 in x, y, z."""

    def test_atom_at_box_centre_stays_at_image_centre(self):
        rng = np.random.default_rng(3)
        A = as_t(euler_to_matrix(rng.uniform(0, 360, 3), rng.uniform(0, 180, 3),
                                 rng.uniform(0, 360, 3)))
        # rendered box = original box
        ren = Renderer(["O"], 40, 1.25, dtype=torch.float64)
        imgs = ren.render(as_t([[20 * 1.25] * 3]), A).numpy()
        for img in imgs:
            np.testing.assert_allclose(peak_xy(img), [20, 20], atol=0.1)
        # rendered at a smaller box/larger pixel than the consensus map (65 px at 1 A):
        # centre (65 // 2) * 1.0 = 32 A, which is pixel 16 of a 32 px, 2 A box
        ren = Renderer(["O"], 32, 2.0, box0=65, apix0=1.0, dtype=torch.float64)
        imgs = ren.render(as_t([[32.0] * 3]), A).numpy()
        for img in imgs:
            np.testing.assert_allclose(peak_xy(img), [16, 16], atol=0.1)
        # a point 6 A along x from that centre, identity pose: 3 px to the right
        img = ren.render(as_t([[38.0, 32.0, 32.0]]), as_t(np.eye(3))[None]).numpy()[0]
        np.testing.assert_allclose(peak_xy(img), [19, 16], atol=0.1)


# ----------------------------------------------------------------------------- gemmi

class TestAgainstGemmi(unittest.TestCase):
    """Our projection of the AK model equals gemmi's 3D map summed along z."""

    D, APIX, BLUR = 64, 1.5, 40.0

    @classmethod
    def setUpClass(cls):
        model = read_model(AK_OPEN)
        c = (cls.D // 2) * cls.APIX
        # docked at the box centre, as a model fitted into the consensus map would be
        cls.coords = model.coords - model.coords.mean(0) + c
        cls.elements = model.elements
        cls.centre = c

    def gemmi_projection(self, A):
        D, apix, c = self.D, self.APIX, self.centre
        st = gemmi.Structure()
        st.cell = gemmi.UnitCell(D * apix, D * apix, D * apix, 90, 90, 90)
        st.spacegroup_hm = "P 1"
        mdl = gemmi.Model(1)
        ch = gemmi.Chain("A")
        moved = (self.coords - c) @ A.T + c          # r -> A r about the centre
        for i, (p, el) in enumerate(zip(moved, self.elements)):
            res = gemmi.Residue()
            res.name = "UNK"
            res.seqid = gemmi.SeqId(i + 1, " ")
            at = gemmi.Atom()
            at.name = str(el)
            at.element = gemmi.Element(str(el))
            at.pos = gemmi.Position(*p)
            at.b_iso = 0.0
            at.occ = 1.0
            res.add_atom(at)
            ch.add_residue(res)
        mdl.add_chain(ch)
        st.add_model(mdl)
        dc = gemmi.DensityCalculatorE()
        dc.grid.unit_cell = st.cell
        dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
        dc.grid.set_size(D, D, D)                    # spacing = apix, point i at i*apix
        dc.blur = self.BLUR
        dc.add_model_density_to_grid(st[0])
        vol = np.array(dc.grid, copy=True)           # axes [x][y][z]
        self.assertEqual(vol.shape, (D, D, D))
        # line integral along z (dz = apix), then [x, y] -> [y, x]
        return vol.sum(axis=2).T * apix

    def ours(self, A):
        ren = Renderer(self.elements, self.D, self.APIX, dtype=torch.float64)
        ft = ren.render_ft(as_t(self.coords), as_t(A)[None])[0]
        g = ren.grid
        ft = ft * torch.exp(-self.BLUR * (g.fx ** 2 + g.fy ** 2) / 4.0)
        return torch.fft.irfft2(ft, s=(self.D, self.D)).numpy()

    def test_random_poses(self):
        rng = np.random.default_rng(4)
        for _ in range(2):
            angles = (rng.uniform(0, 360), rng.uniform(0, 180), rng.uniform(0, 360))
            A = euler_to_matrix(*angles)
            ref, img = self.gemmi_projection(A), self.ours(A)
            with self.subTest(angles=angles):
                self.assertGreater(pearson(img, ref), 0.99)
                # the same units: projected potential in gemmi's c4322 units (A)
                slope = float((img * ref).sum() / (ref * ref).sum())
                self.assertAlmostEqual(slope, 1.0, delta=0.03)
                # a transposed or mirrored image would not pass
                self.assertLess(pearson(img.T, ref), 0.9)
                self.assertLess(pearson(img[:, ::-1], ref), 0.9)
                self.assertLess(pearson(img[::-1, :], ref), 0.9)
                # nor would the inverse rotation (A^T instead of A)
                self.assertLess(pearson(self.ours(A.T), ref), 0.9)


# ----------------------------------------------------------------------------- shifts

class TestShiftConvention(unittest.TestCase):
    """rlnOriginX/YAngst = (ox, oy): particle centre at image centre - origin."""

    def test_origin_hand_case(self):
        D, apix = 32, 1.0
        c = D // 2
        ren = Renderer(["C"], D, apix, dtype=torch.float64)
        origin = np.array([3.0, -2.0])
        img = ren.render(as_t([[c * apix] * 3]), as_t(np.eye(3))[None],
                         as_t(-origin)[None]).numpy()[0]
        # x = centre - 3 A = column 13, y = centre + 2 A = row 18
        np.testing.assert_allclose(peak_xy(img), [13, 18], atol=0.1)
        self.assertEqual(np.unravel_index(np.argmax(img), img.shape), (18, 13))

    def test_origin_in_pixels_of_other_size_and_after_rotation(self):
        D, apix = 40, 0.5
        c = D // 2
        ren = Renderer(["C"], D, apix, dtype=torch.float64)
        origin = np.array([3.0, -2.0])
        # shift is applied in the image plane after the rotation (it is not rotated):
        # rot = 90 moves P1 = (10, 0, 0) to (0, -10); then -origin = (-3, +2) A
        coords = as_t([[c * apix + 5.0, c * apix, c * apix]])        # P = (5, 0, 0)
        img = ren.render(coords, as_t(euler_to_matrix(90.0, 0.0, 0.0))[None],
                         as_t(-origin)[None]).numpy()[0]
        # (0 - 3, -5 + 2) A = (-6, -6) px at 0.5 A/px
        np.testing.assert_allclose(peak_xy(img), [c - 6, c - 6], atol=0.1)


# ----------------------------------------------------------------------------- CTF

class TestCTF(unittest.TestCase):
    KV, CS, Q0 = 300.0, 2.7, 0.1

    def test_wavelength(self):
        for kv, by_hand in [(300.0, 0.019687), (200.0, 0.025079), (100.0, 0.037014)]:
            lam = wavelength_from_constants(kv)
            self.assertAlmostEqual(lam, by_hand, delta=2e-6)
            # RELION's constants are older CODATA values: 6e-6 relative
            self.assertAlmostEqual(float(electron_wavelength(kv)), lam, delta=lam * 1e-5)
            self.assertAlmostEqual(float(electron_wavelength(kv)), wavelength_relion(kv),
                                   delta=lam * 1e-12)
        # the non-relativistic wavelength (0.022422 A at 300 kV) would fail
        self.assertGreater(abs(float(electron_wavelength(300.0)) - 0.022422), 1e-3)

    def predicted_zeros(self, dz, n_max):
        lam = wavelength_from_constants(self.KV)
        cs = self.CS * 1e7
        k3 = math.atan(self.Q0 / math.sqrt(1.0 - self.Q0 ** 2))
        a = math.pi / 2.0 * cs * lam ** 3      # a u^2 - b u + (n pi - k3) = 0, u = s^2
        b = math.pi * lam * dz
        out = []
        for n in range(1, n_max + 1):
            disc = b * b - 4.0 * a * (n * math.pi - k3)
            out.append(math.sqrt((b - math.sqrt(disc)) / (2.0 * a)))
        return np.array(out)

    def measured_zeros(self, dz, s_max, direction=0.0, U=None, V=None, angle=0.0):
        s = torch.linspace(1e-4, s_max, 200001, dtype=torch.float64)
        fx, fy = s * math.cos(direction), s * math.sin(direction)
        U = dz if U is None else U
        V = dz if V is None else V
        ctf = ctf_2d(fx, fy, defocus_u=U, defocus_v=V, defocus_angle=angle, voltage=self.KV,
                     cs=self.CS, amp_contrast=self.Q0).numpy()
        s = s.numpy()
        i = np.nonzero(np.sign(ctf[:-1]) != np.sign(ctf[1:]))[0]
        return s[i] - ctf[i] * (s[i + 1] - s[i]) / (ctf[i + 1] - ctf[i])

    def test_zeros(self):
        for dz in (8000.0, 15000.0, 25000.0):
            pred = self.predicted_zeros(dz, 8)
            got = self.measured_zeros(dz, pred[-1] + 0.5 * (pred[-1] - pred[-2]))
            with self.subTest(dz=dz):
                self.assertEqual(len(got), len(pred))
                np.testing.assert_allclose(got, pred, rtol=1e-5)
        # by hand for 15000 A, 300 kV, Cs 2.7 mm, Q0 0.1: without Cs the first zero is at
        # s^2 = (1 - atan(0.1/sqrt(0.99))/pi) / (lambda dz) = 0.96813 / 295.31, 1/s = 17.465 A;
        # Cs moves it out to 17.455 A
        self.assertAlmostEqual(1.0 / self.predicted_zeros(15000.0, 1)[0], 17.455, delta=0.002)

    def test_zero_frequency_is_amplitude_contrast(self):
        for q0 in (0.07, 0.1, 0.2):
            g = FourierGrid(32, 1.0, dtype=torch.float64)
            v = float(g.ctf(defocus_u=12000.0, defocus_v=11000.0, defocus_angle=20.0,
                            voltage=self.KV, cs=self.CS, amp_contrast=q0)[0, 0])
            self.assertAlmostEqual(v, q0, places=10)     # positive: protein is white

    def test_protein_white_at_low_frequency(self):
        model = read_model(AK_OPEN)
        D, apix = 64, 1.5
        coords = model.coords - model.coords.mean(0) + (D // 2) * apix
        ren = Renderer(model.elements, D, apix, dtype=torch.float64)
        A = as_t(euler_to_matrix(40.0, 70.0, 10.0))[None]
        ctf = ren.ctf(defocus_u=15000.0, defocus_v=14000.0, defocus_angle=0.0,
                      voltage=self.KV, cs=self.CS, amp_contrast=self.Q0)
        ft0 = ren.render_ft(as_t(coords), A)
        s = torch.sqrt(ren.grid.fx ** 2 + ren.grid.fy ** 2)
        low = (s < 0.5 * self.predicted_zeros(14000.0, 1)[0]).to(torch.float64)
        clean = torch.fft.irfft2(ft0 * low, s=(D, D)).numpy()
        with_ctf = torch.fft.irfft2(ft0 * ctf * low, s=(D, D)).numpy()
        # below half the first zero the CTF is positive (0.1 .. 0.8): the images correlate
        # positively (RELION's sign reversed would give the negative of this)
        self.assertGreater(pearson(with_ctf, clean), 0.8)
        self.assertGreater(clean.max(), -clean.min())           # density itself positive

    def test_astigmatism_axes_on_grid(self):
        # defocus-U axis along (kx, ky) = (3, 1): angle atan2(1, 3) = 18.43 deg from x
        D, apix = 64, 1.0
        U, V = 20000.0, 12000.0
        angle = math.degrees(math.atan2(1.0, 3.0))
        g = FourierGrid(D, apix, dtype=torch.float64)
        ctf = g.ctf(defocus_u=U, defocus_v=V, defocus_angle=angle, voltage=self.KV,
                    cs=self.CS, amp_contrast=self.Q0).numpy()
        for m in range(1, 8):
            s = math.sqrt(10.0) * m / (D * apix)
            iso_u = relion_ctf(np.array(s), np.array(0.0), U, U, 0.0, self.KV, self.CS,
                               self.Q0)
            iso_v = relion_ctf(np.array(s), np.array(0.0), V, V, 0.0, self.KV, self.CS,
                               self.Q0)
            # along U: kx = 3m, ky = +m (row m); perpendicular: (kx, ky) = (m, -3m),
            # row D - 3m (the rfft half plane holds kx >= 0; the CTF is even)
            self.assertAlmostEqual(ctf[m, 3 * m], float(iso_u), delta=1e-8)
            self.assertAlmostEqual(ctf[D - 3 * m, m], float(iso_v), delta=1e-8)
        # the test can fail: swapping x and y (or the sign of the angle) moves U away
        swapped = relion_ctf(np.array(1.0 / D), np.array(3.0 / D), U, V, angle, self.KV,
                             self.CS, self.Q0)
        self.assertGreater(abs(float(swapped) - ctf[1, 3]), 0.05)

    def test_full_grid_phase_shift_bfactor(self):
        D, apix = 64, 1.2
        g = FourierGrid(D, apix, dtype=torch.float64)
        ky = np.array([i if i < D // 2 else i - D for i in range(D)], dtype=np.float64)
        kx = np.arange(D // 2 + 1, dtype=np.float64)
        X, Y = np.meshgrid(kx / (D * apix), ky / (D * apix))        # [ky, kx]
        for (U, V, ang, ps, bf) in [(18000.0, 15000.0, 63.0, 0.0, 0.0),
                                    (9000.0, 11000.0, -25.0, 90.0, 0.0),
                                    (14000.0, 13000.0, 130.0, 35.0, 80.0)]:
            ours = g.ctf(defocus_u=U, defocus_v=V, defocus_angle=ang, voltage=self.KV,
                         cs=self.CS, amp_contrast=self.Q0, phase_shift=ps,
                         bfactor=bf).numpy()
            ref = relion_ctf(X, Y, U, V, ang, self.KV, self.CS, self.Q0, ps, bf)
            with self.subTest(U=U, V=V, angle=ang, phase=ps, bfactor=bf):
                np.testing.assert_allclose(ours, ref, atol=1e-8)
        # hand cases: phase shift 90 deg, Q0 0.1 -> CTF(0) = cos(asin 0.1) = 0.994987
        v = ctf_2d(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                   defocus_u=1e4, defocus_v=1e4, defocus_angle=0.0, voltage=self.KV,
                   cs=self.CS, amp_contrast=0.1, phase_shift=90.0)
        self.assertAlmostEqual(float(v), 0.994987, places=5)
        # B = 100 A^2 at s = 0.1 1/A: envelope exp(-100 * 0.01 / 4) = 0.778801
        fx = torch.tensor([0.1], dtype=torch.float64)
        fy = torch.zeros(1, dtype=torch.float64)
        kw = dict(defocus_u=1e4, defocus_v=1e4, defocus_angle=0.0, voltage=self.KV,
                  cs=self.CS, amp_contrast=0.1)
        ratio = float(ctf_2d(fx, fy, bfactor=100.0, **kw) / ctf_2d(fx, fy, **kw))
        self.assertAlmostEqual(ratio, 0.778801, places=5)


# ----------------------------------------------------------------------------- layout

class TestImageLayout(unittest.TestCase):
    """Images are [y, x] with the centre at pixel (D//2, D//2)."""

    def test_x_is_columns_y_is_rows(self):
        D, apix = 32, 1.0
        c = D // 2
        ren = Renderer(["N"], D, apix, dtype=torch.float64)
        I3 = as_t(np.eye(3))[None]
        coords = as_t([[c + 6.0, c, c], [c, c + 6.0, c], [c, c, c]])[:, None, :]
        imgs = ren.render(coords, I3.expand(3, 3, 3)).numpy()
        self.assertEqual(np.unravel_index(np.argmax(imgs[0]), (D, D)), (c, c + 6))
        self.assertEqual(np.unravel_index(np.argmax(imgs[1]), (D, D)), (c + 6, c))
        self.assertEqual(np.unravel_index(np.argmax(imgs[2]), (D, D)), (c, c))
        # a shift of +x (A) also moves along the columns
        img = ren.render(coords[2:], I3, as_t([[4.0, 0.0]])).numpy()[0]
        self.assertEqual(np.unravel_index(np.argmax(img), (D, D)), (c, c + 4))


# ----------------------------------------------------------------------------- crop, SNR

class TestFourierCrop(unittest.TestCase):
    """Cropping D -> d keeps the centre and the values; new pixel size apix * D / d."""

    def test_crop_equals_render_at_new_pixel_size(self):
        model = read_model(AK_OPEN)
        D, apix, d = 64, 1.5, 32
        coords = as_t(model.coords - model.coords.mean(0) + (D // 2) * apix)
        A = as_t(euler_to_matrix(10.0, 100.0, -30.0))[None]
        big = Renderer(model.elements, D, apix, dtype=torch.float64)
        small = Renderer(model.elements, d, apix * D / d, dtype=torch.float64)
        cropped = fourier_crop(big.render(coords, A), d)
        # same band limit (the small box's disc |k| < d/2) on both sides
        ft = torch.fft.rfft2(cropped) * small.grid.mask
        cropped = torch.fft.irfft2(ft, s=(d, d)).numpy()[0]
        direct = small.render(coords, A).numpy()[0]
        np.testing.assert_allclose(cropped, direct, atol=1e-6 * np.abs(direct).max())

    def test_atom_position_after_crop(self):
        D, apix, d = 64, 1.0, 32
        ren = Renderer(["S"], D, apix, dtype=torch.float64)
        img = ren.render(as_t([[32.0 + 9.0, 32.0 - 4.0, 32.0]]), as_t(np.eye(3))[None])
        small = fourier_crop(img, d).numpy()[0]
        # 9 A and -4 A at 2 A/px from the centre pixel 16
        np.testing.assert_allclose(peak_xy(small), [16 + 4.5, 16 - 2.0], atol=0.1)


class TestSNR(unittest.TestCase):
    """SNR in dB = 10 log10(var(clean image) / var(noise))."""

    def test_noise_sigma_by_hand(self):
        clean = torch.tensor(np.indices((16, 16)).sum(0) % 2 * 2.0 - 1.0)[None]  # var 1
        self.assertAlmostEqual(noise_sigma(clean, 10.0), math.sqrt(0.1), places=10)
        self.assertAlmostEqual(noise_sigma(3.0 * clean, -20.0), 30.0, places=8)
        self.assertAlmostEqual(noise_sigma(clean, 0.0), 1.0, places=10)

    def test_measured_snr(self):
        gen = torch.Generator().manual_seed(5)
        clean = torch.randn(8, 128, 128, generator=gen, dtype=torch.float64) * 0.3
        sigma = noise_sigma(clean, -5.0)
        noisy = add_noise(clean, sigma, generator=gen)
        snr = 10 * math.log10(float(clean.var()) / float((noisy - clean).var()))
        self.assertAlmostEqual(snr, -5.0, delta=0.05)


if __name__ == "__main__":
    unittest.main()
