"""Geometry refinement (core/refine.py) and validation (core/validation.py) of models.

Adenylate kinase: 16 normal modes of the open structure, amplitudes that bring it closest
to the closed one (z = U^T (X_closed superposed - X0)). The expected figures are computed
here independently of the code under test: bonds from a hand-written heavy-atom template of
the 20 amino acids plus the peptide bonds, angles from pairs of those bonds, contacts by
brute force with numpy, superposition by an SVD written here. One refinement (with
hydrogens) is shared by the tests (setUpClass).
"""
import os
import tempfile
import shutil
import unittest

import gemmi
import numpy as np

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.base.errors import NmaemError

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")

_RING6 = ["CB-CG", "CG-CD1", "CG-CD2", "CD1-CE1", "CD2-CE2", "CE1-CZ", "CE2-CZ"]
SIDE = {
    "ALA": [], "GLY": [], "CYS": ["CB-SG"], "SER": ["CB-OG"], "VAL": ["CB-CG1", "CB-CG2"],
    "THR": ["CB-OG1", "CB-CG2"], "ILE": ["CB-CG1", "CB-CG2", "CG1-CD1"],
    "LEU": ["CB-CG", "CG-CD1", "CG-CD2"], "MET": ["CB-CG", "CG-SD", "SD-CE"],
    "PRO": ["CB-CG", "CG-CD", "CD-N"], "ASN": ["CB-CG", "CG-OD1", "CG-ND2"],
    "ASP": ["CB-CG", "CG-OD1", "CG-OD2"], "GLN": ["CB-CG", "CG-CD", "CD-OE1", "CD-NE2"],
    "GLU": ["CB-CG", "CG-CD", "CD-OE1", "CD-OE2"], "LYS": ["CB-CG", "CG-CD", "CD-CE", "CE-NZ"],
    "ARG": ["CB-CG", "CG-CD", "CD-NE", "NE-CZ", "CZ-NH1", "CZ-NH2"],
    "HIS": ["CB-CG", "CG-ND1", "CG-CD2", "ND1-CE1", "CD2-NE2", "CE1-NE2"],
    "PHE": _RING6, "TYR": _RING6 + ["CZ-OH"],
    "TRP": ["CB-CG", "CG-CD1", "CG-CD2", "CD1-NE1", "NE1-CE2", "CD2-CE2", "CD2-CE3",
            "CE2-CZ2", "CE3-CZ3", "CZ2-CH2", "CZ3-CH2"],
}


def read_atoms(path):
    """[(chain, resnum, icode, resname, name, element)], coords (M,3), read with gemmi."""
    st = gemmi.read_structure(path)
    keys, xyz = [], []
    for ch in st[0]:
        for res in ch:
            for at in res:
                keys.append((ch.name, res.seqid.num, res.seqid.icode.strip(), res.name,
                             at.name, at.element.name))
                xyz.append((at.pos.x, at.pos.y, at.pos.z))
    return keys, np.array(xyz)


def template_bonds(keys):
    """Heavy-atom bonds of a protein from the template above (set of (i, j), i < j)."""
    idx = {(k[0], k[1], k[2], k[4]): i for i, k in enumerate(keys)}
    residues = []
    for k in keys:
        r = (k[0], k[1], k[2], k[3])
        if not residues or residues[-1] != r:
            residues.append(r)
    bonds = set()

    def add(r, a, b, r2=None):
        i, j = idx.get(r[:3] + (a,)), idx.get((r2 or r)[:3] + (b,))
        if i is not None and j is not None:
            bonds.add((min(i, j), max(i, j)))

    for n, r in enumerate(residues):
        for pair in ["N-CA", "CA-C", "C-O", "C-OXT"] + ([] if r[3] == "GLY" else ["CA-CB"]) \
                + SIDE[r[3]]:
            add(r, *pair.split("-"))
        if n + 1 < len(residues) and residues[n + 1][0] == r[0]:
            add(r, "C", "N", residues[n + 1])
    return bonds


def angles_from(bonds, n):
    nbr = [[] for _ in range(n)]
    for i, j in bonds:
        nbr[i].append(j)
        nbr[j].append(i)
    return [(a, c, b) for c in range(n) for a in nbr[c] for b in nbr[c] if a < b]


def bond_dev(X, X0, bonds):
    b = np.array(sorted(bonds))
    d = np.linalg.norm(X[b[:, 0]] - X[b[:, 1]], axis=1) - \
        np.linalg.norm(X0[b[:, 0]] - X0[b[:, 1]], axis=1)
    return np.sqrt(np.mean(d ** 2)), np.abs(d).max()


def contacts(X, bonds, n, cutoff=2.2):
    excl = set(bonds) | {(min(a, b), max(a, b)) for a, _, b in angles_from(bonds, n)}
    D = np.linalg.norm(X[:, None] - X[None], axis=-1)
    i, j = np.nonzero(np.triu(D < cutoff, 1))
    return sum(1 for p in zip(i.tolist(), j.tolist()) if p not in excl)


def fitted_rmsd(A, B):
    a, b = A - A.mean(0), B - B.mean(0)
    U, _, Vt = np.linalg.svd(a.T @ b)
    s = np.sign(np.linalg.det(U @ Vt))
    R = U @ np.diag([1, 1, s]) @ Vt
    return float(np.sqrt(((a @ R - b) ** 2).sum(1).mean()))


class TestGeometry(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        os.environ.setdefault("KEOPS_CACHE_FOLDER",
                              os.path.join(tempfile.gettempdir(), "nmaem_keops_cache"))
        from nmaem_plugin.core.physics.structure import read_model
        from nmaem_plugin.core.modes.compute import compute_modes
        from nmaem_plugin.core.analysis.refine import refine_models
        cls.tmp = tempfile.mkdtemp(prefix="nmaem-geometry-")
        cls.ref = read_model(OPEN)
        cls.keys, X0 = read_atoms(OPEN)
        _, Xc = read_atoms(CLOSED)
        cls.X0 = X0
        cls.bonds = template_bonds(cls.keys)
        # closed superposed on open (SVD here), amplitudes, the plain NM model
        a, b = Xc - Xc.mean(0), X0 - X0.mean(0)
        U_, _, Vt = np.linalg.svd(a.T @ b)
        R = U_ @ np.diag([1, 1, np.sign(np.linalg.det(U_ @ Vt))]) @ Vt
        cls.closed = a @ R + X0.mean(0)
        nm = compute_modes(cls.ref, 16, device="cpu")
        U = nm.modes.astype(np.float64)
        z = np.tensordot(U, cls.closed - X0, axes=([1, 2], [0, 1]))
        cls.z, cls.nm = z, nm
        cls.plain = X0 + np.tensordot(z, U, axes=(0, 0))
        cls.lines = []
        (cls.result, cls.entry), = refine_models([cls.plain], cls.ref, true_model=CLOSED,
                                                 hydrogens=True, log=cls.lines.append)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    # -- validation against independent figures
    def test_bonds_are_the_template_bonds(self):
        from nmaem_plugin.core.analysis.validation import covalent_bonds
        got = {tuple(b) for b in covalent_bonds(self.ref).tolist()}
        self.assertEqual(got, self.bonds)

    def test_validation_figures(self):
        from nmaem_plugin.core.analysis.validation import reference_geometry, validate
        v = validate(self.plain, reference_geometry(self.ref), true=self.closed)
        rms, mx = bond_dev(self.plain, self.X0, self.bonds)
        self.assertAlmostEqual(v["bond_rmsd"], rms, places=9)
        self.assertAlmostEqual(v["bond_max_deviation"], mx, places=9)
        self.assertGreater(rms, 0.15)      # linear modes stretch bonds (0.23 A measured)
        self.assertEqual(v["n_angles"], len(angles_from(self.bonds, len(self.X0))))
        self.assertEqual(v["close_contacts"], contacts(self.plain, self.bonds, len(self.X0)))
        self.assertGreater(v["close_contacts"], 0)
        self.assertAlmostEqual(v["rmsd_to_true"], fitted_rmsd(self.plain, self.closed), places=6)

    def test_dihedral_sign_and_ramachandran(self):
        from nmaem_plugin.core.analysis.validation import (dihedral, reference_geometry,
                                                           ramachandran)
        p = np.array([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 1]])
        self.assertAlmostEqual(float(dihedral(*[p[i:i + 1] for i in range(4)])[0]), -90.0)
        phi, psi, out, _ = ramachandran(self.X0, reference_geometry(self.ref))
        self.assertEqual(len(phi), 212)           # 214 residues less the two termini
        # AK is mostly alpha-helical: the most populated phi/psi is the right-handed helix
        helix = (np.abs(phi + 63) < 25) & (np.abs(psi + 42) < 25)
        self.assertGreater(helix.mean(), 0.4)
        self.assertLessEqual(out.sum(), 3)

    # -- refinement
    def test_refined_chemistry(self):
        X = self.result.coords
        self.assertTrue(self.result.ok, self.result.info)
        rms, mx = bond_dev(X, self.X0, self.bonds)
        self.assertLessEqual(rms, 0.02)
        self.assertLessEqual(mx, 0.2)
        n = len(X)
        self.assertLessEqual(contacts(X, self.bonds, n), contacts(self.X0, self.bonds, n))
        moved = np.sqrt(((X - self.plain) ** 2).sum(1).mean())
        self.assertLessEqual(moved, 0.5)
        before, after = fitted_rmsd(self.plain, self.closed), fitted_rmsd(X, self.closed)
        self.assertLessEqual(after, before + 0.1)
        print("\nAK open->closed, 16 modes: bonds %.4f A rms (max %.3f), moved %.3f A, "
              "RMSD to closed %.3f -> %.3f A, %.1f s"
              % (rms, mx, moved, before, after, self.result.info["seconds"]))
        v = self.entry["validation"]
        self.assertAlmostEqual(v["rmsd_to_plain"], moved, places=6)
        self.assertAlmostEqual(v["rmsd_to_true"], after, places=6)
        self.assertAlmostEqual(v["plain"]["rmsd_to_true"], before, places=6)
        self.assertTrue(any("iteration" in l or "done" in l for l in self.lines))

    def test_heavy_atom_output_keeps_names(self):
        from nmaem_plugin.core.physics.structure import write_model
        path = os.path.join(self.tmp, "refined.pdb")
        write_model(path, self.ref, self.result.coords)
        keys, X = read_atoms(path)
        self.assertEqual(keys, self.keys)
        np.testing.assert_allclose(X, self.result.coords, atol=1e-3)

    def test_hydrogens_on_request(self):
        from nmaem_plugin.core.physics.structure import write_model
        m = self.result.model_with_hydrogens(self.ref)
        path = os.path.join(self.tmp, "refined_h.cif")
        write_model(path, m)
        keys, X = read_atoms(path)
        heavy = [i for i, k in enumerate(keys) if k[5] != "H"]
        self.assertEqual([keys[i] for i in heavy], self.keys)
        n_h = len(keys) - len(heavy)
        self.assertGreater(n_h, 1500)           # AK has 1685 hydrogens at pH 7
        h = np.array([i for i, k in enumerate(keys) if k[5] == "H"])
        D = np.linalg.norm(X[h][:, None] - X[heavy][None], axis=-1)
        d = D.min(1)
        on_s = np.array([keys[heavy[j]][5] == "S" for j in D.argmin(1)])
        # X-H bonds: about 1.0-1.1 A on C, N, O; 1.34 A on S (cysteine HG)
        self.assertTrue(np.all((d[~on_s] > 0.95) & (d[~on_s] < 1.12)), (d.min(), d.max()))
        self.assertTrue(np.all((d[on_s] > 1.3) & (d[on_s] < 1.4)), d[on_s])

    def test_export_non_convergence_keeps_plain_model(self):
        """nmaem export's refinement path; one L-BFGS iteration cannot reach a minimum, so
        the plain model is written and models.json says why."""
        import json
        from nmaem_plugin.core.analysis.export import export
        from nmaem_plugin.core.modes.modesfile import save_modes
        run = os.path.join(self.tmp, "run")
        os.makedirs(run)
        shutil.copy(OPEN, os.path.join(run, "reference.pdb"))
        save_modes(os.path.join(run, "modes.npz"), self.nm)
        with open(os.path.join(run, "config.json"), "w") as fh:
            json.dump(dict(reference="reference.pdb", modes="modes.npz"), fh)
        out = os.path.join(self.tmp, "export")
        lines = []
        export(None, run, out, z_list=[self.z], refine=True,
               refine_options=dict(max_iterations=1), log=lines.append)
        with open(os.path.join(out, "models.json")) as fh:
            row = json.load(fh)["models"][0]
        self.assertFalse(row["refinement"]["refined"])
        self.assertIn("did not converge", row["refinement"]["message"])
        self.assertAlmostEqual(row["validation"]["rmsd_to_plain"], 0.0)
        keys, X = read_atoms(os.path.join(out, "z_01.pdb"))
        self.assertEqual(keys, self.keys)
        np.testing.assert_allclose(X, self.plain, atol=2e-3)
        self.assertTrue(any("did not converge" in l for l in lines))
        # the report shows every model's validation (nmaem report --models)
        from nmaem_plugin.core.report.report import write_report
        with open(os.path.join(run, "log.csv"), "w") as fh:
            fh.write("epoch,train_loss,val_loss,images_per_s,seconds\n1,1.0,1.0,10.0,1.0\n")
        rep = os.path.join(self.tmp, "report")
        write_report(run, rep, models=out, log=lambda *a: None)
        with open(os.path.join(rep, "index.html")) as fh:
            page = fh.read()
        self.assertIn("<td>z_01.pdb</td>", page)
        self.assertIn("<td>%.3f</td>" % row["validation"]["bond_rmsd"], page)
        self.assertIn("Ramachandran outliers", page)

    # -- bad input
    def _model_with(self, text_edit):
        from nmaem_plugin.core.physics.structure import read_model
        with open(OPEN) as fh:
            lines = fh.read().splitlines()
        path = os.path.join(self.tmp, "bad.pdb")
        with open(path, "w") as fh:
            fh.write("\n".join(text_edit(lines)) + "\n")
        return path, read_model(path, keep_ligands=True)

    def test_unknown_residue_is_named(self):
        from nmaem_plugin.core.analysis.refine import refine_coords

        def add_ligand(lines):
            end = [l for l in lines if not l.startswith(("TER", "END"))]
            return end + ["HETATM 1657  C1  LIG A 301      30.000  30.000  30.000  1.00  "
                          "0.00           C  ", "END"]
        path, m = self._model_with(add_ligand)
        with self.assertRaises(NmaemError) as cm:
            refine_coords(m, m.coords)
        msg = str(cm.exception)
        self.assertIn(path, msg)
        self.assertIn("A:301 LIG", msg)
        self.assertIn("--no-refine", msg)
        self.assertNotIn("\n", msg)

    def test_missing_backbone_is_refused(self):
        from nmaem_plugin.core.analysis.refine import refine_coords
        path, m = self._model_with(
            lambda lines: [l for l in lines if not (l[12:16] == " CA " and l[22:26] == "  10")])
        with self.assertRaises(NmaemError) as cm:
            refine_coords(m, m.coords)
        self.assertIn("A:10 ", str(cm.exception))
        self.assertIn("no CA", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
