"""The exact Jacobian of the rendered transform (``Renderer.render_ft_jvp``,
``Decoder.render_ft_jacobian``) against central finite differences of
``Renderer.render_ft`` in float64.

The model is small (40 atoms of three elements, listed out of element order so that the
renderer's reordering matters), the box 32 px, with random rotations, shifts, a CTF and
three random orthonormal modes. The reference renders each parameter at +-h (float64,
h = 1e-4 Angstrom of amplitude or of shift): its truncation error is of order
(h q)^2 ~ 1e-9 and its rounding error 1e-11, far below the bounds tested.
"""
import unittest

import numpy as np
import torch

from nmaem_plugin.core.physics.chunks import JVP_WORK
from nmaem_plugin.core.physics.ctf import CTFParams
from nmaem_plugin.core.physics.nufft import nufft_available
from nmaem_plugin.core.physics.renderer import Renderer
from nmaem_plugin.core.physics.rotations import correct_rotations, euler_to_matrix
from nmaem_plugin.core.learn.network import Decoder

D, APIX, B, NMODES = 32, 2.0, 3, 3
STEP = 1e-4                       # Angstrom: the reference's central-difference step


def small_model(seed=0):
    """(elements (40,), coords (40, 3) Angstrom, centre (3,), modes (3, 40, 3) orthonormal)."""
    rng = np.random.default_rng(seed)
    elements = np.array(["C"] * 20 + ["N"] * 12 + ["O"] * 8)[rng.permutation(40)]
    centre = np.array([31.3, 32.6, 30.8])
    coords = centre + rng.normal(0, 6.0, (40, 3))
    q, _ = np.linalg.qr(rng.normal(size=(40 * 3, NMODES)))
    return elements, coords, centre, q.T.reshape(NMODES, 40, 3)


def random_pose(rng, n=B):
    ang = rng.uniform([-180, 0, -180], [180, 180, 180], (n, 3))
    A = torch.tensor(euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]))
    return A, torch.tensor(rng.normal(0, 3.0, (n, 2)))


def ctf_params(n=B):
    return CTFParams(defocus_u=torch.linspace(6000.0, 12000.0, n),
                     defocus_v=torch.linspace(5500.0, 11000.0, n),
                     defocus_angle=torch.linspace(-40.0, 70.0, n), voltage=300.0,
                     cs=2.7, amp_contrast=0.1, bfactor=20.0)


def reference(renderer, X, U, A, shift, ctf, h=STEP):
    """float64 (F, J): render_ft and its central differences along each tangent U (T, M, 3)
    and each shift axis."""
    def F(x, s):
        return renderer.render_ft(x, A, s, ctf)
    rows = [(F(X + h * u, shift) - F(X - h * u, shift)) / (2 * h) for u in U]
    for axis in range(2):
        e = torch.zeros_like(shift)
        e[:, axis] = h
        rows.append((F(X, shift + e) - F(X, shift - e)) / (2 * h))
    return F(X, shift), torch.stack(rows)


def relative_errors(J, ref):
    """Relative L2 error of each row (parameter) of J against the reference."""
    J, ref = J.to(torch.complex128), ref.to(torch.complex128)
    return [float(torch.linalg.norm(a - b) / torch.linalg.norm(b)) for a, b in zip(J, ref)]


class TestRendererJvp(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.elements, cls.X0, cls.centre, cls.modes = small_model()
        rng = np.random.default_rng(5)
        cls.A, cls.shift = random_pose(rng)
        cls.X = torch.tensor(cls.X0) + torch.einsum(
            "bd,dmk->bmk", torch.tensor(rng.normal(0, 3.0, (B, NMODES))),
            torch.tensor(cls.modes))
        cls.U = torch.tensor(cls.modes)
        cls.r64 = Renderer(cls.elements, D, APIX, centre=cls.centre, dtype=torch.float64,
                           route="gemm")
        cls.ctf = cls.r64.ctf(ctf_params().to(dtype=torch.float64))
        cls.ref = reference(cls.r64, cls.X, cls.U, cls.A, cls.shift, cls.ctf)

    def test_float64_equals_central_differences(self):
        """float64: F is render_ft's to rounding, each row of J within 1e-8 of the
        reference (modes and shifts), with and without the CTF."""
        F, J = self.r64.render_ft_jvp(self.X, self.A, self.shift, self.ctf, self.U)
        self.assertEqual(tuple(J.shape), (NMODES + 2, B, D, D // 2 + 1))
        self.assertEqual(J.dtype, torch.complex128)
        err = float(torch.linalg.norm(F - self.ref[0]) / torch.linalg.norm(self.ref[0]))
        self.assertLess(err, 1e-13)
        errs = relative_errors(J, self.ref[1])
        self.assertLess(max(errs), 1e-8, errs)
        F0, J0 = self.r64.render_ft_jvp(self.X, self.A, self.shift, None, self.U)
        ref0 = reference(self.r64, self.X, self.U, self.A, self.shift, None)
        errs = relative_errors(J0, ref0[1])
        self.assertLess(max(errs), 1e-8, errs)

    def test_chunks_give_the_same_jacobian(self):
        """A budget that forces one image and a few atoms per chunk (several chunks per
        element, several weight groups): the same F and J as one chunk, to rounding."""
        whole = self.r64.jvp_chunks(B, NMODES)
        self.assertEqual((whole.batch, whole.atoms), (B, 40))
        budget = JVP_WORK + (7 + 2 * NMODES + 6) * D * D * 8 + 5 * (2 * D + 12) * 8
        tiny = Renderer(self.elements, D, APIX, centre=self.centre, dtype=torch.float64,
                        route="gemm", memory_budget=budget)
        ch = tiny.jvp_chunks(B, NMODES)
        self.assertEqual((ch.batch, ch.atoms), (1, 5))
        F1, J1 = self.r64.render_ft_jvp(self.X, self.A, self.shift, self.ctf, self.U)
        F2, J2 = tiny.render_ft_jvp(self.X, self.A, self.shift, self.ctf, self.U)
        self.assertLess(float((F1 - F2).abs().max() / F1.abs().max()), 1e-13)
        self.assertLess(max(relative_errors(J2, J1)), 1e-13)
        # and in float32 with a 1-byte budget: 1 image and 1 atom per chunk
        r32 = Renderer(self.elements, D, APIX, centre=self.centre, route="gemm")
        one = Renderer(self.elements, D, APIX, centre=self.centre, route="gemm",
                       memory_budget=1)
        self.assertEqual((one.jvp_chunks(B, NMODES).batch, one.jvp_chunks(B, NMODES).atoms),
                         (1, 1))
        args = (self.X.float(), self.A.float(), self.shift.float(), self.ctf.float(),
                self.U.float())
        self.assertLess(max(relative_errors(one.render_ft_jvp(*args)[1],
                                            r32.render_ft_jvp(*args)[1])), 1e-5)

    def test_per_image_tangents(self):
        """Tangents (T, B, M, 3), one set per image: image b's rows are its own."""
        scale = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        U = self.U[:, None] * scale[None, :, None, None]
        _, J = self.r64.render_ft_jvp(self.X, self.A, self.shift, self.ctf, U)
        _, J1 = self.r64.render_ft_jvp(self.X, self.A, self.shift, self.ctf, self.U)
        expect = torch.cat([J1[:NMODES] * scale[None, :, None, None], J1[NMODES:]])
        self.assertLess(max(relative_errors(J, expect)), 1e-13)

    def test_no_tangents(self):
        """T = 0: only the shift rows."""
        F, J = self.r64.render_ft_jvp(self.X, self.A, self.shift, self.ctf)
        self.assertEqual(tuple(J.shape), (2, B, D, D // 2 + 1))
        self.assertLess(max(relative_errors(J, self.ref[1][NMODES:])), 1e-8)


class TestDecoderJacobian(unittest.TestCase):
    """The float32 production path, ``Decoder.render_ft_jacobian``, against the float64
    reference of the same (float32-rounded) inputs."""

    @classmethod
    def setUpClass(cls):
        cls.elements, cls.X0, cls.centre, cls.modes = small_model(1)
        cls.offset = (0.5, -0.25)
        cls.dec = Decoder(cls.elements, cls.X0, cls.modes, D, APIX, cls.centre,
                          offset=cls.offset, route="gemm")
        cls.r64 = Renderer(cls.elements, D, APIX, centre=cls.centre, dtype=torch.float64,
                           route="gemm")
        rng = np.random.default_rng(7)
        A, shift = random_pose(rng)
        cls.A, cls.shift = A.float(), shift.float()
        cls.z = torch.tensor(rng.normal(0, 3.0, (B, NMODES)), dtype=torch.float32)
        cls.rotvec = torch.tensor(rng.normal(0, 0.05, (B, 3)), dtype=torch.float32)
        cls.ctf = cls.dec.ctf(ctf_params())

    def reference(self, rotations):
        U = self.dec.modes.double()
        X = self.dec.coords.double() + torch.einsum("bd,dmk->bmk", self.z.double(), U)
        shift = self.shift.double() + torch.tensor(self.offset, dtype=torch.float64)
        return reference(self.r64, X, U, rotations, shift, self.ctf.double())

    def check(self, rotvec, rotations):
        F, J = self.dec.render_ft_jacobian(self.z, self.A, self.shift, self.ctf, rotvec)
        self.assertEqual(tuple(J.shape), (NMODES + 2, B, D, D // 2 + 1))
        self.assertEqual((F.dtype, J.dtype), (torch.complex64, torch.complex64))
        F_ref, J_ref = self.reference(rotations)
        err = float(torch.linalg.norm(F.to(torch.complex128) - F_ref)
                    / torch.linalg.norm(F_ref))
        self.assertLess(err, 1e-5)
        errs = relative_errors(J, J_ref)
        self.assertLess(max(errs), 3e-5, errs)
        # the F returned is render_ft's
        self.assertTrue(torch.allclose(F, self.dec.render_ft(self.z, self.A, self.shift,
                                                             self.ctf, rotvec=rotvec),
                                       rtol=0, atol=1e-6 * float(F.abs().max())))

    def test_float32_equals_float64_reference(self):
        self.check(None, self.A.double())

    def test_with_pose_correction(self):
        """With a pose correction v the modes move with the rotation rendered, A R(v)."""
        self.check(self.rotvec, correct_rotations(self.A.double(), self.rotvec.double()))

    def rotation_reference(self, rotvec, h=1e-5):
        """float64 central differences of render_ft along a rotation A R(v) R(w) of the
        model, about each model axis, at w = 0 (h radians)."""
        base = correct_rotations(self.A.double(), rotvec.double())
        X = self.dec.coords.double() + torch.einsum("bd,dmk->bmk", self.z.double(),
                                                      self.dec.modes.double())
        shift = self.shift.double() + torch.tensor(self.offset, dtype=torch.float64)
        rows = []
        for k in range(3):
            e = torch.zeros(B, 3, dtype=torch.float64)
            e[:, k] = h
            plus = self.r64.render_ft(X, correct_rotations(base, e), shift, self.ctf.double())
            minus = self.r64.render_ft(X, correct_rotations(base, -e), shift,
                                       self.ctf.double())
            rows.append((plus - minus) / (2 * h))
        return torch.stack(rows)

    def test_rotation_rows(self):
        """``rotation=True`` adds the derivatives along a rotation of the model applied
        last (per radian about the model's x, y, z), after the modes and the shifts, which
        are unchanged; checked against float64 central differences, with a pose
        correction."""
        F, J = self.dec.render_ft_jacobian(self.z, self.A, self.shift, self.ctf, self.rotvec,
                                           rotation=True)
        self.assertEqual(tuple(J.shape), (NMODES + 5, B, D, D // 2 + 1))
        _, J2 = self.dec.render_ft_jacobian(self.z, self.A, self.shift, self.ctf, self.rotvec)
        self.assertLess(max(relative_errors(J[:NMODES + 2], J2)), 1e-6)
        errs = relative_errors(J[NMODES + 2:], self.rotation_reference(self.rotvec))
        self.assertLess(max(errs), 3e-5, errs)

    def test_no_modes(self):
        dec = Decoder(self.elements, self.X0, np.zeros((0, 40, 3)), D, APIX, self.centre,
                      route="gemm")
        F, J = dec.render_ft_jacobian(torch.zeros(B, 0), self.A, self.shift, self.ctf)
        self.assertEqual(tuple(J.shape), (2, B, D, D // 2 + 1))

    @unittest.skipUnless(nufft_available(), "FINUFFT is not installed (optional)")
    def test_nufft_route_falls_back_to_differences(self):
        """The NUFFT route keeps forward differences: within their truncation error (a few
        percent with the FD_RMSD and FD_SHIFT steps) of the exact Jacobian."""
        dec = Decoder(self.elements, self.X0, self.modes, D, APIX, self.centre,
                      offset=self.offset, route="nufft")
        F, J = dec.render_ft_jacobian(self.z, self.A, self.shift, self.ctf)
        F_ref, J_ref = self.reference(self.A.double())
        self.assertEqual(J.shape, J_ref.shape)
        self.assertLess(max(relative_errors(J, J_ref)), 0.1)
        _, J = dec.render_ft_jacobian(self.z, self.A, self.shift, self.ctf, self.rotvec,
                                      rotation=True)
        ref = self.rotation_reference(self.rotvec)
        self.assertLess(max(relative_errors(J[NMODES + 2:], ref)), 0.1)


if __name__ == "__main__":
    unittest.main()
