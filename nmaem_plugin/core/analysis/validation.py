"""Geometry validation of all-atom models against the reference model's own geometry.

A deformed model X(z) = X0 + U z keeps the reference's atoms, so its chemistry is judged
against the reference itself: the covalent bonds and bond angles of the reference (found
once, from the reference coordinates) should keep their lengths and angles, atoms that are
not bonded (nor 1-3 through one atom) should not touch, and the backbone should stay in
the allowed Ramachandran regions.

Connectivity (:func:`covalent_bonds`): two atoms of one residue are bonded when their
distance in the reference is below the sum of their covalent radii (gemmi's table) plus
0.45 A; consecutive residues of a chain are joined by the peptide bond C(i)-N(i+1) when it
is shorter than 2.0 A in the reference (so chain breaks are not bonds) and nucleotides by
O3'(i)-P(i+1) under 2.2 A; cysteines by SG-SG under 2.5 A.

Ramachandran regions (:func:`ramachandran`): a simple approximation of MolProbity's
general-case "allowed" contour, in degrees. A non-glycine residue is allowed when either
phi <= -20 and psi is outside (-150, -110) unless phi < -150 (the left half of the plot:
beta, PPII, alpha-R and the bridge, less the empty strip below alpha-R), or 20 <= phi <= 110
and -60 <= psi <= 100 (alpha-L and gamma). Proline also needs -120 <= phi <= -30. Glycine is
never an outlier. It is a coarse screen (it flags about 1 % of well-refined crystal
residues), not MolProbity.
"""
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np

if TYPE_CHECKING:                   # hint-only (structure imports gemmi)
    from ..physics.structure import AtomicModel

__all__ = ["ReferenceGeometry", "reference_geometry", "covalent_bonds", "bond_angles",
           "dihedral", "ramachandran", "close_contacts", "validate", "CONTACT_CUTOFF"]

CONTACT_CUTOFF = 2.2      # A, non-bonded heavy-atom contacts shorter than this are clashes
_BOND_SLACK = 0.45        # A, added to the sum of covalent radii within a residue
_PEPTIDE_MAX = 2.0
_PHOSPHO_MAX = 2.2
_DISULFIDE_MAX = 2.5


def _covalent_radius(element):
    import gemmi
    r = gemmi.Element(str(element)).covalent_r
    return r if r > 0 else 0.77


def _residue_slices(model):
    """(start, stop) of each residue (consecutive rows with the same chain, number, icode)."""
    key = list(zip(model.chain, model.resnum, model.icode))
    starts = [0] + [i for i in range(1, len(key)) if key[i] != key[i - 1]]
    stops = starts[1:] + [len(key)]
    return list(zip(starts, stops))


def covalent_bonds(model: "AtomicModel", coords: Optional[np.ndarray] = None) -> np.ndarray:
    """Covalent bonds (B, 2) int, i < j, from the geometry of ``model`` (or ``coords``)."""
    X = np.asarray(model.coords if coords is None else coords, dtype=np.float64)
    radii = np.array([_covalent_radius(e) for e in model.elements])
    names = np.asarray(model.atom_name)
    bonds = []
    slices = _residue_slices(model)
    for a, b in slices:
        if b - a < 2:
            continue
        d = np.linalg.norm(X[a:b, None] - X[None, a:b], axis=-1)
        lim = radii[a:b, None] + radii[None, a:b] + _BOND_SLACK
        i, j = np.nonzero(np.triu(d < lim, 1))
        bonds.extend(zip(i + a, j + a))

    def find(a, b, name):
        hit = np.nonzero(names[a:b] == name)[0]
        return a + hit[0] if len(hit) else None

    for (a0, b0), (a1, b1) in zip(slices[:-1], slices[1:]):
        if model.chain[a0] != model.chain[a1]:
            continue
        for n0, n1, lim in (("C", "N", _PEPTIDE_MAX), ("O3'", "P", _PHOSPHO_MAX)):
            i, j = find(a0, b0, n0), find(a1, b1, n1)
            if i is not None and j is not None and np.linalg.norm(X[i] - X[j]) < lim:
                bonds.append((i, j))
    sg = np.nonzero((names == "SG") & (np.asarray(model.resname) == "CYS"))[0]
    for k, i in enumerate(sg):
        for j in sg[k + 1:]:
            if np.linalg.norm(X[i] - X[j]) < _DISULFIDE_MAX:
                bonds.append((i, j))
    bonds = np.array(sorted({(min(i, j), max(i, j)) for i, j in bonds}), dtype=np.int64)
    return bonds.reshape(-1, 2)


def bond_angles(bonds: np.ndarray, n_atoms: int) -> np.ndarray:
    """Bond angles (A, 3) int (i, centre, k), i < k, from pairs of bonds sharing an atom."""
    nbr = [[] for _ in range(n_atoms)]
    for i, j in bonds:
        nbr[i].append(j)
        nbr[j].append(i)
    out = []
    for c in range(n_atoms):
        ns = sorted(nbr[c])
        for p in range(len(ns)):
            for q in range(p + 1, len(ns)):
                out.append((ns[p], c, ns[q]))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def _lengths(X, bonds):
    return np.linalg.norm(X[bonds[:, 0]] - X[bonds[:, 1]], axis=1)


def _angles(X, angles):
    u = X[angles[:, 0]] - X[angles[:, 1]]
    v = X[angles[:, 2]] - X[angles[:, 1]]
    c = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def dihedral(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray) -> np.ndarray:
    """Dihedral angles in degrees of (K, 3) point arrays (IUPAC sign)."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * b1n).sum(-1, keepdims=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdims=True) * b1n
    x = (v * w).sum(-1)
    y = (np.cross(b1n, v) * w).sum(-1)
    return np.degrees(np.arctan2(y, x))


class ReferenceGeometry:
    """Bonds, angles, excluded pairs and backbone dihedral quadruples of a reference model."""

    def __init__(self, model: "AtomicModel") -> None:
        self.model = model
        self.n_atoms = model.n_atoms
        self.bonds = covalent_bonds(model)
        self.angles = bond_angles(self.bonds, self.n_atoms)
        self.bond_lengths = _lengths(model.coords, self.bonds)
        self.angle_values = _angles(model.coords, self.angles)
        M = self.n_atoms
        ex = set(int(i) * M + int(j) for i, j in self.bonds)
        ex.update(int(min(i, k)) * M + int(max(i, k)) for i, _, k in self.angles)
        self.excluded = np.array(sorted(ex), dtype=np.int64)
        self.rama = self._rama_quads()
        self.heavy = np.array([str(e).upper() not in ("H", "D") for e in model.elements])

    def _rama_quads(self):
        m = self.model
        names = np.asarray(m.atom_name)
        bonded = set(map(tuple, self.bonds.tolist()))
        rows = []
        slices = _residue_slices(m)
        idx = []
        for a, b in slices:
            d = {str(n): a + k for k, n in enumerate(names[a:b])}
            idx.append(d)
        for r in range(1, len(slices) - 1):
            p, c, n = idx[r - 1], idx[r], idx[r + 1]
            if not all(k in c for k in ("N", "CA", "C")) or "C" not in p or "N" not in n:
                continue
            if (min(p["C"], c["N"]), max(p["C"], c["N"])) not in bonded:
                continue
            if (min(c["C"], n["N"]), max(c["C"], n["N"])) not in bonded:
                continue
            rows.append((p["C"], c["N"], c["CA"], c["C"], n["N"], slices[r][0]))
        return np.array(rows, dtype=np.int64).reshape(-1, 6)


def reference_geometry(model: "AtomicModel") -> ReferenceGeometry:
    return ReferenceGeometry(model)


def ramachandran(coords: np.ndarray, geom: ReferenceGeometry
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[str]]:
    """(phi, psi, outlier, residue labels) for residues with both neighbours bonded."""
    X = np.asarray(coords, dtype=np.float64)
    q = geom.rama
    if len(q) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, bool), []
    phi = dihedral(X[q[:, 0]], X[q[:, 1]], X[q[:, 2]], X[q[:, 3]])
    psi = dihedral(X[q[:, 1]], X[q[:, 2]], X[q[:, 3]], X[q[:, 4]])
    m = geom.model
    resname = np.asarray(m.resname)[q[:, 5]]
    left = (phi <= -20) & ~((psi > -150) & (psi < -110) & (phi >= -150))
    alpha_l = (phi >= 20) & (phi <= 110) & (psi >= -60) & (psi <= 100)
    ok = left | alpha_l
    pro = resname == "PRO"
    ok[pro] &= (phi[pro] >= -120) & (phi[pro] <= -30)
    ok[resname == "GLY"] = True
    labels = ["%s:%d%s %s" % (m.chain[i], m.resnum[i], m.icode[i], m.resname[i]) for i in q[:, 5]]
    return phi, psi, ~ok, labels


def close_contacts(coords: np.ndarray, geom: ReferenceGeometry,
                   cutoff: float = CONTACT_CUTOFF) -> np.ndarray:
    """Pairs (K, 2) of heavy atoms closer than ``cutoff`` that are not 1-2 or 1-3 pairs."""
    from scipy.spatial import cKDTree
    X = np.asarray(coords, dtype=np.float64)
    heavy = np.nonzero(geom.heavy)[0]
    pairs = cKDTree(X[heavy]).query_pairs(cutoff, output_type="ndarray")
    if len(pairs) == 0:
        return pairs.reshape(0, 2)
    pairs = np.sort(heavy[pairs], axis=1)
    key = pairs[:, 0] * geom.n_atoms + pairs[:, 1]
    return pairs[~np.isin(key, geom.excluded)]


def _rmsd(a, b):
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.sqrt((d * d).sum() / len(d)))


def validate(coords: np.ndarray, geom: ReferenceGeometry, plain: Optional[np.ndarray] = None,
             true: Optional[np.ndarray] = None, true_plain: bool = True) -> Dict[str, Any]:
    """Geometry figures of one model (a dict for ``models.json``).

    ``coords`` (M, 3) in the reference's atom order; ``geom`` the reference's
    :class:`ReferenceGeometry`; ``plain`` the unrefined model (adds ``rmsd_to_plain``, the
    RMSD moved by refinement, no superposition, and the plain model's own figures under
    ``plain``); ``true`` a true model (M, 3) in the same atom order (adds
    ``rmsd_to_true`` after least-squares superposition, and ``plain.rmsd_to_true``).
    Lengths in A, angles in degrees.
    """
    from ..physics.structure import superpose
    X = np.asarray(coords, dtype=np.float64)
    dl = _lengths(X, geom.bonds) - geom.bond_lengths
    da = _angles(X, geom.angles) - geom.angle_values
    phi, psi, out, labels = ramachandran(X, geom)
    contacts = close_contacts(X, geom)
    worst = int(np.argmax(np.abs(dl))) if len(dl) else None
    ids = geom.model.atom_ids
    res = dict(
        n_bonds=int(len(dl)), n_angles=int(len(da)),
        bond_rmsd=float(np.sqrt(np.mean(dl ** 2))) if len(dl) else 0.0,
        bond_max_deviation=float(np.abs(dl).max()) if len(dl) else 0.0,
        worst_bond=None if worst is None else "%s - %s" % (ids[geom.bonds[worst, 0]],
                                                           ids[geom.bonds[worst, 1]]),
        angle_rmsd=float(np.sqrt(np.mean(da ** 2))) if len(da) else 0.0,
        angle_max_deviation=float(np.abs(da).max()) if len(da) else 0.0,
        close_contacts=int(len(contacts)), contact_cutoff=CONTACT_CUTOFF,
        ramachandran_residues=int(len(phi)), ramachandran_outliers=int(out.sum()),
        ramachandran_outlier_residues=[l for l, o in zip(labels, out) if o][:20],
    )
    if true is not None:
        T = np.asarray(true, dtype=np.float64)
        res["rmsd_to_true"] = _rmsd(superpose(X, T), T)
    if plain is not None:
        P = np.asarray(plain, dtype=np.float64)
        res["rmsd_to_plain"] = _rmsd(X, P)
        sub = validate(P, geom, None, true)
        res["plain"] = {k: sub[k] for k in ("bond_rmsd", "bond_max_deviation", "angle_rmsd",
                                            "close_contacts", "ramachandran_outliers")
                        + (("rmsd_to_true",) if true is not None else ())}
    return res
