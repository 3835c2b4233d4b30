"""Tests of nmaem_plugin.core.modes.shift_invert: the sparse eigensolver's two routes (MUMPS +
block Lanczos, SuperLU + ARPACK) against a dense float64 ``numpy.linalg.eigh`` of the same
Hessian: eigenvalues, the principal angles between the eigenvector subspaces, and the rigid-body
subspace against the analytic rigid motions of the nodes."""
import os
import unittest

import numpy as np
from scipy.linalg import subspace_angles
from scipy.sparse import csr_matrix

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.modes.anm import cg_selection, sparse_hessian
from nmaem_plugin.core.modes.basis import rigid_body_basis
from nmaem_plugin.core.modes.shift_invert import (block_lanczos, factorise_shifted,
                                                  lowest_eigenpairs, mumps_available)
from nmaem_plugin.core.physics.structure import read_model, tile_model

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
K = 22          # 6 rigid-body modes + d = 16, as nmaem modes asks by default


def ca_network(copies, spacing):
    """CA nodes of ``copies`` adenylate kinases on a cubic lattice of ``spacing`` A."""
    ak = read_model(OPEN)
    model = ak if copies == 1 else tile_model(ak, copies, spacing=spacing)[0]
    return model.coords[cg_selection(model, "ca")]


class TestShiftInvert(unittest.TestCase):
    """Networks small enough for a dense reference: AK alone (214 nodes) and four copies
    packed 36 A apart, so that they touch (856 nodes, 2,568 rows)."""

    @classmethod
    def setUpClass(cls):
        cls.cases = {}
        for name, copies in (("ak", 1), ("ak x4, 36 A", 4)):
            x = ca_network(copies, 36.0)
            H = sparse_hessian(x)
            w, v = np.linalg.eigh(H.toarray())           # the float64 reference
            cls.cases[name] = (x, H, w, v)

    def check_route(self, factoriser):
        for name, (x, H, w, v) in self.cases.items():
            with self.subTest(case=name, factoriser=factoriser):
                scale = float(H.diagonal().mean())
                # the comparison means something only with a gap after the K-th eigenvalue
                self.assertGreater(w[K] - w[K - 1], 1e-3 * w[K - 1])
                self.assertLess(abs(w[5]), 1e-10 * scale)
                self.assertGreater(w[6], 1e-4 * scale)
                got = lowest_eigenpairs(H, K, factoriser=factoriser)
                self.assertIn({"mumps": "MUMPS", "superlu": "SuperLU"}[factoriser], got.route)
                np.testing.assert_allclose(got.values[6:], w[6:K], rtol=1e-9)
                self.assertLess(np.abs(got.values[:6]).max(), 1e-10 * scale)
                self.assertLess(got.residual, 1e-9)
                np.testing.assert_allclose(got.vectors.T @ got.vectors, np.eye(K), atol=1e-10)
                # the subspaces: the 16 non-rigid modes, all 22, and the rigid ones against
                # the analytic translations and rotations of the nodes
                self.assertLess(subspace_angles(got.vectors[:, 6:], v[:, 6:K]).max(), 1e-7)
                self.assertLess(subspace_angles(got.vectors, v[:, :K]).max(), 1e-7)
                self.assertLess(subspace_angles(got.vectors[:, :6], rigid_body_basis(x)).max(),
                                1e-7)
                # each eigenvector of a simple eigenvalue, up to its sign
                simple = [j for j in range(6, K) if min(w[j] - w[j - 1], w[j + 1] - w[j])
                          > 1e-3 * w[j]]
                self.assertGreater(len(simple), 8)
                cos = np.abs((got.vectors[:, simple] * v[:, simple]).sum(0))
                np.testing.assert_allclose(cos, 1.0, atol=1e-9)

    @unittest.skipUnless(mumps_available(), "python-mumps is not installed")
    def test_mumps_block_lanczos_matches_dense(self):
        self.check_route("mumps")

    def test_superlu_arpack_matches_dense(self):
        self.check_route("superlu")

    @unittest.skipUnless(mumps_available(), "python-mumps is not installed")
    def test_one_mode_past_the_six_rigid_ones(self):
        """k = 7 (nmaem modes --n-modes 1): the block is wider than the six-fold zero
        eigenvalue, so all six rigid modes and the first internal one are found."""
        x, H, w, v = self.cases["ak x4, 36 A"]
        got = lowest_eigenpairs(H, 7, factoriser="mumps")
        np.testing.assert_allclose(got.values[6], w[6], rtol=1e-9)
        self.assertLess(subspace_angles(got.vectors[:, :6], rigid_body_basis(x)).max(), 1e-7)
        self.assertGreater(abs(got.vectors[:, 6] @ v[:, 6]), 1 - 1e-9)

    @unittest.skipUnless(mumps_available(), "python-mumps is not installed")
    def test_block_lanczos_exhausting_the_space(self):
        """A matrix so small that the Krylov basis fills the whole space (and the block's
        directions run out): still its exact lowest eigenpairs, repeated eigenvalues
        included."""
        rng = np.random.default_rng(3)
        q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
        lam = np.concatenate([[0.0, 0.0], np.linspace(1.0, 3.0, 26), [5.0, 5.0]])
        A = csr_matrix((q * lam) @ q.T)
        with factorise_shifted(A, -0.01, "mumps") as f:
            values, vectors, solves, blocks = block_lanczos(A, 10, f, block=7)
        np.testing.assert_allclose(values, lam[:10], atol=1e-9)
        self.assertLess(subspace_angles(vectors, q[:, :10]).max(), 1e-7)
        self.assertLessEqual(solves, 35)

    @unittest.skipUnless(mumps_available(), "python-mumps is not installed")
    def test_block_lanczos_gives_up_beyond_its_basis(self):
        x, H, w, v = self.cases["ak x4, 36 A"]
        with factorise_shifted(H, -1e-3 * float(H.diagonal().mean()), "mumps") as f:
            self.assertIsNone(block_lanczos(H, K, f, max_basis=2 * 11))
            self.assertIsNotNone(block_lanczos(H, K, f))

    def test_bad_requests(self):
        x, H, w, v = self.cases["ak"]
        with self.assertRaises(NmaemError):
            lowest_eigenpairs(H, H.shape[0] - 1)
        with self.assertRaises(NmaemError):
            lowest_eigenpairs(H, 0)
        with self.assertRaises(NmaemError) as cm:
            lowest_eigenpairs(H, K, factoriser="cholmod")
        self.assertIn("cholmod", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
