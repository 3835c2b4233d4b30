"""Atomic models: reading, selection, writing, form factors, superposition, matching."""
import os
import shutil
import tempfile
import unittest

import gemmi
import numpy as np

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.physics.structure import (form_factor_table, kabsch, match_atoms,
                                                 read_model, read_trajectory, rmsd, superpose,
                                                 write_model, write_models)

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")

# A small hand-written PDB: an alternative location, a hydrogen, a water, a ligand,
# an insertion code, and a second model.
TOY = """\
MODEL        1
ATOM      1  N   ALA A  10       1.000   2.000   3.000  1.00 10.00           N
ATOM      2  CA AALA A  10       2.000   2.000   3.000  0.60 10.00           C
ATOM      3  CA BALA A  10       2.500   2.500   3.500  0.40 10.00           C
ATOM      4  H   ALA A  10       0.500   2.000   3.000  1.00 10.00           H
ATOM      5  CA  GLY A  10A      5.000   2.000   3.000  1.00 10.00           C
ATOM      6  SE  MSE B   1       7.000   1.000   0.000  1.00 10.00          SE
HETATM    7  O   HOH A 101       9.000   9.000   9.000  1.00 10.00           O
HETATM    8  C1  NAG A 201       8.000   8.000   8.000  1.00 10.00           C
ENDMDL
MODEL        2
ATOM      1  N   ALA A  10       1.100   2.000   3.000  1.00 10.00           N
ATOM      2  CA AALA A  10       2.100   2.000   3.000  0.60 10.00           C
ATOM      3  CA BALA A  10       2.500   2.500   3.500  0.40 10.00           C
ATOM      4  H   ALA A  10       0.600   2.000   3.000  1.00 10.00           H
ATOM      5  CA  GLY A  10A      5.100   2.000   3.000  1.00 10.00           C
ATOM      6  SE  MSE B   1       7.100   1.000   0.000  1.00 10.00          SE
HETATM    7  O   HOH A 101       9.100   9.000   9.000  1.00 10.00           O
HETATM    8  C1  NAG A 201       8.100   8.000   8.000  1.00 10.00           C
ENDMDL
END
"""


class TestStructure(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nmaem-st-")
        self.toy = os.path.join(self.tmp, "toy.pdb")
        with open(self.toy, "w") as f:
            f.write(TOY)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, name, text):
        p = os.path.join(self.tmp, name)
        with open(p, "w") as f:
            f.write(text)
        return p

    def test_bundled_models(self):
        a, b = read_model(OPEN), read_model(CLOSED)
        self.assertEqual((a.n_atoms, b.n_atoms), (1656, 1656))
        self.assertEqual(len(set(zip(a.chain, a.resnum))), 214)
        np.testing.assert_array_equal(a.atom_ids, b.atom_ids)
        self.assertEqual(a.atom_ids[1], "A:1::MET:CA")
        self.assertEqual(sorted(set(a.elements)), ["C", "N", "O", "S"])

    def test_selection_defaults_and_options(self):
        m = read_model(self.toy)
        # first model, first altloc (A), no H, no water, no ligand; MSE is a polymer residue
        self.assertEqual(list(m.atom_ids), ["A:10::ALA:N", "A:10::ALA:CA", "A:10:A:GLY:CA",
                                            "B:1::MSE:SE"])
        np.testing.assert_allclose(m.coords[1], [2.0, 2.0, 3.0])
        self.assertEqual(list(m.elements), ["N", "C", "C", "Se"])
        m2 = read_model(self.toy, model=1, keep_hydrogens=True, keep_waters=True,
                        keep_ligands=True)
        self.assertEqual(m2.n_atoms, 7)
        np.testing.assert_allclose(m2.coords[0], [1.1, 2.0, 3.0])
        self.assertIn("A:101::HOH:O", list(m2.atom_ids))
        self.assertIn("A:201::NAG:C1", list(m2.atom_ids))
        first, frames = read_trajectory(self.toy)
        self.assertEqual(frames.shape, (2, 4, 3))
        np.testing.assert_allclose(frames[1] - frames[0], [[0.1, 0, 0]] * 3 + [[0.1, 0, 0]], atol=1e-9)

    def test_write_pdb_and_mmcif_round_trip(self):
        a = read_model(OPEN)
        rng = np.random.default_rng(0)
        new = a.coords + rng.normal(0, 1, a.coords.shape)
        for ext in (".pdb", ".cif"):
            p = os.path.join(self.tmp, "out" + ext)
            write_model(p, a, new)
            b = read_model(p)
            np.testing.assert_array_equal(b.atom_ids, a.atom_ids)
            np.testing.assert_array_equal(b.elements, a.elements)
            np.testing.assert_allclose(b.coords, new, atol=6e-4)   # PDB has 3 decimals
            # an independent reader (gemmi directly) sees the same chain/residue/atom names
            st = gemmi.read_structure(p)
            names = [(ch.name, r.seqid.num, r.name, at.name)
                     for ch in st[0] for r in ch for at in r]
            self.assertEqual(names[1], ("A", 1, "MET", "CA"))
            self.assertEqual(len(names), 1656)
        p = os.path.join(self.tmp, "multi.pdb")
        write_models(p, a, [a.coords, new])
        _, frames = read_trajectory(p)
        self.assertEqual(frames.shape, (2, 1656, 3))
        with self.assertRaises(NmaemError):
            write_model(os.path.join(self.tmp, "x.xyz"), a)

    def test_form_factors_from_gemmi(self):
        names, a, b, index = form_factor_table(np.array(["C", "O", "C", "Se"]))
        self.assertEqual(list(names), ["C", "O", "Se"])
        self.assertEqual(list(index), [0, 1, 0, 2])
        # International Tables C 4.3.2.2, carbon (typed from the table)
        np.testing.assert_allclose(a[0], [0.0893, 0.2563, 0.7570, 1.0487, 0.3575])
        np.testing.assert_allclose(b[0], [0.2465, 1.7100, 6.4094, 18.6113, 50.2523])
        with self.assertRaises(NmaemError):
            form_factor_table(np.array(["C", "Xx"]))

    def test_kabsch_superpose_rmsd(self):
        rng = np.random.default_rng(4)
        P = rng.normal(0, 5, (50, 3))
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        q *= np.sign(np.linalg.det(q))
        Q = P @ q.T + [1.0, -2.0, 3.0]
        R, t = kabsch(P, Q)
        np.testing.assert_allclose(R, q, atol=1e-10)
        np.testing.assert_allclose(t, [1.0, -2.0, 3.0], atol=1e-10)
        self.assertLess(rmsd(superpose(P, Q), Q), 1e-10)
        # hand case: two points 2 A apart vs 0 -> rmsd = sqrt((4 + 0)/2)
        self.assertAlmostEqual(rmsd([[0, 0, 0], [0, 0, 0]], [[2, 0, 0], [0, 0, 0]]), np.sqrt(2))
        # a mirror image cannot be superposed by a rotation
        M = P * [1, 1, -1]
        self.assertGreater(rmsd(superpose(M, P), P), 1.0)
        # bundled open/closed: CA RMSD after superposition (shared/README: 7.13 A)
        a, b = read_model(OPEN), read_model(CLOSED)
        ca = a.atom_name == "CA"
        self.assertAlmostEqual(rmsd(superpose(a.coords[ca], b.coords[ca]), b.coords[ca]), 7.13,
                               delta=0.01)

    def test_match_atoms(self):
        m = read_model(self.toy)
        other = self.write("other.pdb", (
            "ATOM      1  CA  GLY A  10A      0.000   0.000   0.000  1.00 10.00           C\n"
            "ATOM      2  CA  SER A  10       0.000   0.000   0.000  1.00 10.00           C\n"
            "ATOM      3  CB  SER A  10       0.000   0.000   0.000  1.00 10.00           C\n"))
        o = read_model(other)
        ia, ib = match_atoms(m, o)
        # A:10 CA matches across a point mutation; A:10A CA by insertion code; CB unmatched
        self.assertEqual(list(zip(ia, ib)), [(1, 1), (2, 0)])
        lone = self.write("lone.pdb",
                          "ATOM      1  CA  ALA Z 900       0.000   0.000   0.000  1.00 10.00           C\n")
        with self.assertRaises(NmaemError) as cm:
            match_atoms(m, read_model(lone))
        self.assertIn("share no atoms", str(cm.exception))

    def test_bad_files(self):
        cases = {
            "missing.pdb": (None, "no such model file"),
            "garbage.cif": ("data_x\nloop_\n_atom_site.id\n\x00\x01 broken 'quote\n", "cannot be read"),
            "empty.pdb": ("REMARK nothing here\nEND\n", "holds no atoms"),
            "water.pdb": ("HETATM    1  O   HOH A 101       9.000   9.000   9.000  1.00 10.00           O\n",
                          "no atoms left"),
            "unknown.pdb": ("ATOM      1  CA  ALA A   1       1.000   0.000   0.000  1.00  0.00           Qx\n",
                            "unknown element"),
            "nan.pdb": ("ATOM      1  CA  ALA A   1          nan   0.000   0.000  1.00  0.00           C\n",
                        "non-finite"),
        }
        for name, (text, msg) in cases.items():
            p = os.path.join(self.tmp, name) if text is None else self.write(name, text)
            with self.assertRaises(NmaemError, msg=name) as cm:
                read_model(p)
            err = str(cm.exception)
            self.assertIn(msg, err, name)
            self.assertIn(name, err)
            self.assertNotIn("\n", err)


if __name__ == "__main__":
    unittest.main()
