"""Tests of nmaem_plugin.core.modes: ANM modes, interpolation, basis, files, diagnostics.

Expectations come from independent computations: ProDy's own ANM, numpy least squares,
a dense numpy evaluation of the interpolation formula, ProDy's collectivity.
"""
import os
import shutil
import tempfile
import unittest

import numpy as np

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.modes.anm import cg_selection, sparse_hessian
from nmaem_plugin.core.modes.compute import compute_modes
from nmaem_plugin.core.modes.diagnostics import fit_amplitudes, floor_rmsd, target_diagnostics
from nmaem_plugin.core.modes.interpolation import interpolate_modes
from nmaem_plugin.core.modes.modesfile import check_modes_match, load_modes, save_modes
from nmaem_plugin.core.modes.solver import collectivity
from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.physics.structure import AtomicModel, read_model, read_trajectory, superpose

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")


def _synthetic_model(coords, resname="ALA", atom_name="CA", chain="A"):
    n = len(coords)
    return AtomicModel(coords=np.asarray(coords, dtype=np.float64),
                       elements=np.array(["C"] * n), chain=np.array([chain] * n),
                       resnum=np.arange(1, n + 1), icode=np.array([""] * n),
                       resname=np.array([resname] * n), atom_name=np.array([atom_name] * n),
                       b_factor=np.zeros(n), occupancy=np.ones(n), source="synthetic")


def _subspace_overlap(A, B):
    """Mean squared overlap of two sets of orthonormal columns (1 = same subspace)."""
    return float(((A.T @ B) ** 2).sum() / A.shape[1])



def prody_hessian(cg_coords, cutoff, gamma, sparse=False):
    """ProDy's ANM Hessian (3N x 3N) of nodes ``cg_coords``: dense, or with ProDy's KD-tree
    contact search as a CSR matrix (the reference for modes.sparse_hessian)."""
    import prody
    anm = prody.ANM("reference")
    prody.confProDy(verbosity="none")
    if sparse:
        anm.buildHessian(np.asarray(cg_coords, dtype=np.float64), float(cutoff), float(gamma),
                         sparse=True, kdtree=True)
        return anm.getHessian().tocsr()
    anm.buildHessian(np.asarray(cg_coords, dtype=np.float64), float(cutoff), float(gamma))
    return np.asarray(anm.getHessian(), dtype=np.float64)

class TestModes(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        os.environ.setdefault("KEOPS_CACHE_FOLDER",
                              os.path.join(tempfile.gettempdir(), "nmaem_keops_cache"))
        cls.open = read_model(OPEN)
        cls.closed = read_model(CLOSED)
        cls.nm = compute_modes(cls.open, n_modes=16)
        cls.tmp = tempfile.mkdtemp(prefix="nmaem_modes_test_")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def assertOneLineError(self, fn, *words):
        with self.assertRaises(NmaemError) as cm:
            fn()
        msg = str(cm.exception)
        self.assertNotIn("\n", msg)
        for w in words:
            self.assertIn(w, msg)
        return msg

    # ------------------------------------------------------------------ basis

    def test_contract_shapes_and_orthonormality(self):
        nm = self.nm
        m = self.open.n_atoms
        self.assertEqual(nm.coords.shape, (m, 3))
        self.assertEqual(nm.coords.dtype, np.float32)
        self.assertEqual(nm.modes.shape, (16, m, 3))
        self.assertEqual(nm.modes.dtype, np.float32)
        self.assertEqual(nm.eigenvalues.shape, (16,))
        np.testing.assert_array_equal(nm.atom_ids, self.open.atom_ids)
        np.testing.assert_allclose(nm.coords, self.open.coords, atol=1e-4)
        U = nm.modes.reshape(16, -1).astype(np.float64)
        self.assertLess(np.abs(U @ U.T - np.eye(16)).max(), 1e-5)
        # rigid-body motions of all atoms are projected out: no translation component
        self.assertLess(np.abs(nm.modes.astype(np.float64).sum(1)).max(), 1e-4)
        self.assertTrue(np.all(np.diff(nm.eigenvalues) >= 0))
        self.assertTrue(np.all(nm.eigenvalues > 0))

    def test_cg_modes_span_prody_subspace(self):
        import prody
        ca = np.nonzero(self.open.atom_name == "CA")[0]
        np.testing.assert_array_equal(self.nm.info["cg_index"], ca)
        anm = prody.ANM("reference")
        anm.buildHessian(self.open.coords[ca], cutoff=15.0, gamma=1.0)
        anm.calcModes(n_modes=16, zeros=False)
        ref = anm.getEigvecs()  # (3N, 16)
        ours = self.nm.info["cg_modes"].astype(np.float64).reshape(16, -1).T
        ours /= np.linalg.norm(ours, axis=0)
        ov = _subspace_overlap(ref, ours)
        self.assertGreater(ov, 0.999)
        np.testing.assert_allclose(self.nm.eigenvalues, anm.getEigvals(), rtol=1e-6)

    def test_vectorised_hessian_is_prodys(self):
        """sparse_hessian (vectorised over contact pairs) = ProDy's ANM Hessian, dense and
        sparse builders, on AK's CA nodes and on 3 tiled copies (contacts between copies),
        at two cutoffs and spring constants."""
        from nmaem_plugin.core.physics.structure import tile_model
        ca = np.nonzero(self.open.atom_name == "CA")[0]
        three = tile_model(self.open, 3, spacing=40.0)[0]
        ca3 = np.nonzero(three.atom_name == "CA")[0]
        for x, cutoff, gamma in ((self.open.coords[ca], 15.0, 1.0),
                                 (self.open.coords[ca], 9.5, 2.5),
                                 (three.coords[ca3], 15.0, 1.0)):
            ours = sparse_hessian(x, cutoff, gamma)
            self.assertEqual(ours.shape, (3 * len(x), 3 * len(x)))
            dense = prody_hessian(x, cutoff, gamma)
            sparse = prody_hessian(x, cutoff, gamma, sparse=True)
            scale = np.abs(dense).max()
            self.assertLess(np.abs(ours.toarray() - dense).max(), 1e-12 * scale)
            self.assertLess(abs(ours - sparse).max(), 1e-12 * scale)
            self.assertGreater(ours.nnz, 9 * len(x))            # not the trivial case

    def test_interpolation_matches_cg_modes_and_dense_formula(self):
        info = self.nm.info
        y = info["cg_coords"].astype(np.float64)
        v = info["cg_modes"].astype(np.float64)
        sigma = info["sigma"]
        x = self.open.coords
        raw = interpolate_modes(y, v, x, sigma)
        at_nodes = raw[:, info["cg_index"], :].reshape(16, -1)
        vf = v.reshape(16, -1)
        cos = (at_nodes * vf).sum(1) / np.linalg.norm(at_nodes, axis=1) / np.linalg.norm(vf, axis=1)
        self.assertGreater(cos.min(), 0.99)
        # the same formula evaluated densely with numpy (fine for this small test system)
        d2y = ((y[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        K = np.exp(-0.5 * d2y / sigma ** 2)
        V = v.transpose(1, 0, 2).reshape(len(y), -1)
        a = np.linalg.solve(K, K.sum(1, keepdims=True) * V)
        d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        W = np.exp(-0.5 * (d2 - d2.min(1, keepdims=True)) / sigma ** 2)
        W /= W.sum(1, keepdims=True)
        expect = (W @ a).reshape(len(x), 16, 3).transpose(1, 0, 2)
        self.assertLess(np.abs(raw - expect).max(), 1e-6 * np.abs(expect).max())
        # both methods (all pairs with KeOps; the KD-tree's close pairs), the default first
        for method in ("keops", "sparse"):
            out = interpolate_modes(y, v, x, sigma, method=method)
            self.assertLess(np.abs(out - expect).max(), 1e-6 * np.abs(expect).max(), method)
            # Shepard smoothing (not node-exact) is a different, smoother field
            smooth = interpolate_modes(y, v, x, sigma, exact=False, method=method)
            np.testing.assert_allclose(smooth.reshape(16, len(x), 3),
                                       (W @ V).reshape(len(x), 16, 3).transpose(1, 0, 2),
                                       atol=1e-9, err_msg=method)

    def test_dense_and_sparse_solvers_agree(self):
        sub = self.open.select(self.open.resnum <= 120)
        dense = compute_modes(sub, n_modes=10, solver="dense")
        sparse = compute_modes(sub, n_modes=10, solver="sparse")
        self.assertEqual(dense.info["solver"], "dense")
        self.assertEqual(sparse.info["solver"], "sparse")
        np.testing.assert_allclose(sparse.eigenvalues, dense.eigenvalues, rtol=1e-7)
        A = dense.info["cg_modes"].astype(np.float64).reshape(10, -1).T
        B = sparse.info["cg_modes"].astype(np.float64).reshape(10, -1).T
        self.assertGreater(_subspace_overlap(A / np.linalg.norm(A, axis=0),
                                             B / np.linalg.norm(B, axis=0)), 0.99999)
        self.assertGreater(_subspace_overlap(dense.basis, sparse.basis), 0.9999)

    def test_collectivity_matches_prody(self):
        import prody
        cg = self.nm.info["cg_modes"].astype(np.float64)
        ours = collectivity(cg)
        ref = np.array([prody.calcCollectivity(c.reshape(-1), is3d=True) for c in cg])
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
        self.assertEqual(self.nm.info["collectivity"].shape, (16,))

    # ------------------------------------------------------------------ target diagnostics

    def test_open_to_closed_overlap_and_floor_rmsd(self):
        diag = target_diagnostics(self.nm, self.open, self.closed, CLOSED)
        self.assertEqual(diag["n_matched"], 1656)
        # independent: superpose closed on open, project on the orthonormal basis, lstsq
        b = superpose(self.closed.coords, self.open.coords)
        x0 = self.nm.coords.astype(np.float64)
        disp = (b - x0).reshape(-1)
        U = self.nm.basis
        proj = U.T @ disp
        np.testing.assert_allclose(diag["overlap"], proj / np.linalg.norm(disp), atol=1e-6)
        np.testing.assert_allclose(diag["cumulative_overlap"],
                                   np.sqrt(np.cumsum(proj ** 2)) / np.linalg.norm(disp),
                                   atol=1e-6)
        self.assertGreaterEqual(diag["cumulative_overlap"][-1], 0.9)
        z, *_ = np.linalg.lstsq(U, disp, rcond=None)
        floor = np.sqrt(((U @ z - disp) ** 2).sum() / len(x0))
        self.assertAlmostEqual(diag["floor_rmsd"], floor, places=6)
        self.assertLess(diag["floor_rmsd"], diag["rmsd"])
        self.assertAlmostEqual(diag["rmsd"], np.sqrt(((b - x0) ** 2).sum(1).mean()), places=6)
        # several frames at once, as training/evaluation uses it
        frames = np.stack([x0, b, 0.5 * (x0 + b)])
        floors = floor_rmsd(self.nm.modes, x0, frames)
        self.assertEqual(floors.shape, (3,))
        self.assertAlmostEqual(floors[0], 0.0, places=6)
        self.assertAlmostEqual(floors[1], floor, places=6)
        self.assertAlmostEqual(floors[2], floor / 2, places=6)
        # amplitudes: X0 + U z reaches the floor
        zz = fit_amplitudes(self.nm.modes, x0, b)
        np.testing.assert_allclose(zz, z, atol=1e-6)

    def test_floor_rmsd_on_subset_of_atoms(self):
        # the modes restricted to a subset are not orthonormal: still an exact least squares
        rows = np.arange(0, self.open.n_atoms, 3)
        x0 = self.nm.coords[rows].astype(np.float64)
        b = superpose(self.closed.coords[rows], x0)
        U = self.nm.modes[:, rows, :].astype(np.float64).reshape(16, -1).T
        z, *_ = np.linalg.lstsq(U, (b - x0).reshape(-1), rcond=None)
        expect = np.sqrt(((U @ z - (b - x0).reshape(-1)) ** 2).sum() / len(rows))
        self.assertAlmostEqual(floor_rmsd(self.nm.modes[:, rows], x0, b), expect, places=6)

    # ------------------------------------------------------------------ selections

    def test_cg_selections_mixed_protein_nucleic(self):
        # two amino acids then two nucleotides (the second without C4', so its P is used)
        rows = [("ALA", 1, "N"), ("ALA", 1, "CA"), ("ALA", 1, "C"), ("ALA", 1, "O"),
                ("ALA", 1, "CB"), ("GLY", 2, "N"), ("GLY", 2, "CA"), ("GLY", 2, "C"),
                ("GLY", 2, "O"), ("A", 3, "P"), ("A", 3, "OP1"), ("A", 3, "C4'"),
                ("A", 3, "N9"), ("U", 4, "P"), ("U", 4, "O5'"), ("U", 4, "N1")]
        n = len(rows)
        model = AtomicModel(coords=np.random.default_rng(0).normal(size=(n, 3)) * 5,
                            elements=np.array([r[2][0] for r in rows]),
                            chain=np.array(["A"] * n), resnum=np.array([r[1] for r in rows]),
                            icode=np.array([""] * n), resname=np.array([r[0] for r in rows]),
                            atom_name=np.array([r[2] for r in rows]), b_factor=np.zeros(n),
                            occupancy=np.ones(n))
        names = lambda idx: [model.atom_name[i] for i in idx]
        self.assertEqual(names(cg_selection(model, "ca")), ["CA", "CA", "C4'", "P"])
        self.assertEqual(names(cg_selection(model, "backbone")),
                         ["N", "CA", "C", "O", "N", "CA", "C", "O", "P", "OP1", "C4'", "P",
                          "O5'"])
        self.assertEqual(len(cg_selection(model, "heavy")), n)
        self.assertOneLineError(lambda: cg_selection(model, "nope"), "nope")

    def test_backbone_and_heavy_on_ak(self):
        sub = self.open.select(self.open.resnum <= 30)
        nm = compute_modes(sub, n_modes=4, cg="backbone")
        self.assertEqual(nm.info["n_cg"], 4 * 30)
        nm = compute_modes(sub, n_modes=4, cg="heavy")
        self.assertEqual(nm.info["n_cg"], sub.n_atoms)
        self.assertGreater(nm.info["node_cosine"].min(), 0.99)

    # ------------------------------------------------------------------ bad input

    def test_fewer_than_four_cg_atoms(self):
        sub = self.open.select(self.open.resnum <= 3)
        self.assertOneLineError(lambda: compute_modes(sub, n_modes=1), "3 atom(s)",
                                "at least 4")

    def test_no_atom_matches_selection(self):
        side = self.open.select(~np.isin(self.open.atom_name, ["N", "CA", "C", "O"]))
        self.assertOneLineError(lambda: compute_modes(side, cg="ca"), "no atom matches")
        self.assertOneLineError(lambda: compute_modes(side, cg="backbone"), "no atom matches")

    def test_nan_coordinates(self):
        x = self.open.coords.copy()
        x[10, 1] = np.nan
        self.assertOneLineError(lambda: compute_modes(self.open.with_coords(x)), "non-finite")
        path = os.path.join(self.tmp, "nan.pdb")
        with open(OPEN) as f, open(path, "w") as g:
            for line in f:
                if line.startswith("ATOM") and line[6:11].strip() == "11":
                    line = line[:38] + "     nan" + line[46:]
                g.write(line)
        self.assertOneLineError(lambda: compute_modes(read_model(path)), "non-finite")

    def test_disconnected_network(self):
        x = self.open.coords.copy()
        x[self.open.resnum > 120] += 500.0
        moved = self.open.with_coords(x)
        self.assertOneLineError(lambda: compute_modes(moved), "disconnected", "--cutoff")

    def test_floppy_network_extra_zero_modes(self):
        # two rigid tetrahedra (edges 4 A) that touch through one contact only: connected,
        # but the single spring leaves 5 extra zero-frequency (hinge) modes
        tet = np.array([[0, 0, 0], [4, 0, 0], [2, 3.46, 0], [2, 1.15, 3.27]], dtype=float)
        x = np.vstack([tet, tet + [9.0, 0, 0]])  # only node 1 (4,0,0) and node 4 (9,0,0) touch
        model = _synthetic_model(x)
        msg = self.assertOneLineError(lambda: compute_modes(model, n_modes=6, cutoff=5.5),
                                      "zero-frequency", "--cutoff")
        self.assertIn(" 11 zero-frequency", msg)  # all 12 eigenvalues computed, 11 are zero
        msg = self.assertOneLineError(lambda: compute_modes(model, n_modes=2, cutoff=5.5),
                                      "at least 8 zero-frequency")
        # with a long enough cutoff every node sees every other node: fine
        nm = compute_modes(model, n_modes=2, cutoff=20.0)
        self.assertEqual(nm.n_modes, 2)

    def test_more_modes_than_network(self):
        n = 214
        self.assertOneLineError(lambda: compute_modes(self.open, n_modes=3 * n - 5),
                                "%d non-rigid" % (3 * n - 6))
        self.assertOneLineError(lambda: compute_modes(self.open, n_modes=0), "at least 1")

    def test_target_sharing_no_atoms(self):
        other = AtomicModel(self.closed.coords, self.closed.elements,
                            np.array(["Z"] * self.closed.n_atoms), self.closed.resnum,
                            self.closed.icode, self.closed.resname, self.closed.atom_name,
                            self.closed.b_factor, self.closed.occupancy, "other.pdb")
        self.assertOneLineError(lambda: target_diagnostics(self.nm, self.open, other),
                                "share no atoms")

    def test_bad_parameters(self):
        self.assertOneLineError(lambda: compute_modes(self.open, cutoff=-1), "cutoff")
        self.assertOneLineError(lambda: compute_modes(self.open, gamma=0), "gamma")
        self.assertOneLineError(lambda: compute_modes(self.open, solver="magic"), "solver")

    # ------------------------------------------------------------------ files

    def test_save_load_roundtrip_and_match(self):
        path = os.path.join(self.tmp, "roundtrip.npz")
        save_modes(path, self.nm)
        self.assertEqual([f for f in os.listdir(self.tmp) if ".tmp" in f], [])
        with np.load(path, allow_pickle=False) as z:  # the contract, read without our code
            self.assertEqual(z["coords"].dtype, np.float32)
            self.assertEqual(z["modes"].shape, (16, 1656, 3))
            self.assertEqual(z["atom_ids"][1], "A:1::MET:CA")
        nm = load_modes(path)
        np.testing.assert_array_equal(nm.modes, self.nm.modes)
        np.testing.assert_array_equal(nm.coords, self.nm.coords)
        np.testing.assert_array_equal(nm.eigenvalues, self.nm.eigenvalues)
        np.testing.assert_array_equal(nm.atom_ids, self.nm.atom_ids)
        self.assertEqual(nm.info["cg"], "ca")
        self.assertEqual(nm.info["cutoff"], 15.0)
        check_modes_match(nm, self.open)
        # same atoms, other conformation / frame
        self.assertOneLineError(lambda: check_modes_match(nm, self.closed), "different model")
        # other atoms
        sub = self.open.select(np.arange(1, self.open.n_atoms))
        self.assertOneLineError(lambda: check_modes_match(nm, sub), "different model")
        renamed = AtomicModel(self.open.coords, self.open.elements, self.open.chain,
                              self.open.resnum + 1, self.open.icode, self.open.resname,
                              self.open.atom_name, self.open.b_factor, self.open.occupancy)
        self.assertOneLineError(lambda: check_modes_match(nm, renamed), "different model",
                                "row 0")

    def test_load_rejects_corrupt_files(self):
        bad = os.path.join(self.tmp, "garbage.npz")
        with open(bad, "wb") as f:
            f.write(b"this is not a zip archive at all")
        self.assertOneLineError(lambda: load_modes(bad), bad)
        good = os.path.join(self.tmp, "good.npz")
        save_modes(good, self.nm)
        with open(good, "rb") as f:
            blob = f.read()
        trunc = os.path.join(self.tmp, "truncated.npz")
        with open(trunc, "wb") as f:
            f.write(blob[: len(blob) // 2])
        self.assertOneLineError(lambda: load_modes(trunc), trunc)
        missing = os.path.join(self.tmp, "missing.npz")
        np.savez(missing, coords=self.nm.coords, modes=self.nm.modes)
        self.assertOneLineError(lambda: load_modes(missing), "eigenvalues", "atom_ids")
        skew = os.path.join(self.tmp, "skew.npz")
        np.savez(skew, coords=self.nm.coords, modes=self.nm.modes * 2,
                 eigenvalues=self.nm.eigenvalues, atom_ids=self.nm.atom_ids)
        self.assertOneLineError(lambda: load_modes(skew), "orthonormal")
        shape = os.path.join(self.tmp, "shape.npz")
        np.savez(shape, coords=self.nm.coords, modes=self.nm.modes[:, :-1],
                 eigenvalues=self.nm.eigenvalues, atom_ids=self.nm.atom_ids)
        self.assertOneLineError(lambda: load_modes(shape), "modes has shape")
        self.assertOneLineError(lambda: load_modes(os.path.join(self.tmp, "none.npz")),
                                "no such")

    def test_command_line_with_target_and_export(self):
        from nmaem_plugin.core.cli.main import build_parser
        parser = build_parser()
        out = os.path.join(self.tmp, "cli_modes.npz")
        export = os.path.join(self.tmp, "export")
        args = parser.parse_args(["modes", OPEN, "-o", out, "--n-modes", "4", "--target",
                                  CLOSED, "--export", export, "--amplitude", "2.5"])
        self.assertEqual(args.cutoff, 15.0)
        self.assertEqual(args.cg, "ca")
        self.assertEqual(args.func(args), 0)
        nm = load_modes(out)
        self.assertEqual(nm.n_modes, 4)
        self.assertEqual(nm.info["target_cumulative_overlap"].shape, (4,))
        self.assertGreater(nm.info["target_floor_rmsd"], 0)
        with open(os.path.join(export, "modes.nmd")) as f:
            nmd = f.read().splitlines()
        self.assertEqual(sum(line.startswith("mode ") for line in nmd), 4)
        coords_line = [line for line in nmd if line.startswith("coordinates ")][0]
        self.assertEqual(len(coords_line.split()) - 1, 3 * 1656)
        first, frames = read_trajectory(os.path.join(export, "mode_01.pdb"))
        self.assertEqual(frames.shape, (20, 1656, 3))
        disp = np.linalg.norm(frames - nm.coords[None].astype(np.float64), axis=2).max()
        self.assertAlmostEqual(disp, 2.5, delta=0.01)
        # the animation moves along mode 1 only
        step = (frames[5] - frames[0]).reshape(-1)
        u = nm.modes[0].reshape(-1).astype(np.float64)
        self.assertGreater(abs(step @ u) / np.linalg.norm(step), 0.9999)
        bad = parser.parse_args(["modes", OPEN, "-o", os.path.join(self.tmp, "no", "x.npz")])
        self.assertOneLineError(lambda: bad.func(bad), "does not exist")


if __name__ == "__main__":
    unittest.main()
