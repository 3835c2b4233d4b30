"""Geometry restraints of an all-atom model as a differentiable energy (torch).

The refinement of states against their particles (``refine_states.py``) moves every
atom; what keeps the chemistry while it does is a prior on the geometry, written as an
energy in the units of the likelihood's -log L = chi2 / 2 (dimensionless), i.e. the
-log of a Gaussian prior on each restrained quantity with its standard deviation:

* bonds: the reference's covalent bonds (``validation.covalent_bonds``) at the
  reference's own lengths, sd ``BOND_SD`` (0.02 A, the spread of Engh & Huber's targets);
* angles: each bond angle as its 1-3 distance (``validation.bond_angles``) at the
  reference's value, sd ``ANGLE_SD`` (0.05 A, about 2 degrees at 1.5 A bonds);
* peptide planes: the 1-4 distances CA(i)-CA(i+1) and O(i)-CA(i+1) across every
  peptide bond, sd ``PLANE_SD`` (0.05 A: they fix omega near its reference value);
* contacts: heavy atoms that are neither 1-2, 1-3 nor 1-4 neighbours repel below
  r0 = ``CONTACT_DISTANCE`` (2.8 A; or their distance in the reference where that is
  shorter: hydrogen bonds and salt bridges stay allowed), (r0 - d)^2 / (2 ``CONTACT_SD``^2)
  with sd 0.1 A; the pairs are found again at every evaluation (``scipy.spatial.cKDTree``).

Chirality and the planarity of side-chain rings are not restrained here: small steps of a
minimiser cannot invert a centre held by its angles, and the OpenMM refinement that
follows (``refine.refine_coords``, amber99sb-ILDN) restores what distances cannot hold.
"""
from typing import TYPE_CHECKING, Dict

import numpy as np
import torch

if TYPE_CHECKING:
    from ..physics.structure import AtomicModel

__all__ = ["GeometryRestraints", "BOND_SD", "ANGLE_SD", "PLANE_SD", "CONTACT_DISTANCE",
           "CONTACT_SD"]

BOND_SD = 0.02            # A
ANGLE_SD = 0.05           # A, of the 1-3 distance
PLANE_SD = 0.05           # A, of the peptide 1-4 distances
CONTACT_DISTANCE = 2.8    # A, heavy atoms closer than this (not 1-2/1-3/1-4) repel
CONTACT_SD = 0.1          # A


def _pairs_14(bonds: np.ndarray, n_atoms: int) -> np.ndarray:
    """Pairs (K, 2), i < j, three bonds apart (1-4) through the bond graph."""
    nbr = [set() for _ in range(n_atoms)]
    for i, j in bonds:
        nbr[i].add(int(j))
        nbr[j].add(int(i))
    out = set()
    for b, c in bonds:
        for a in nbr[b] - {c}:
            for d in nbr[c] - {b}:
                if a != d:
                    out.add((min(a, d), max(a, d)))
    return np.array(sorted(out), dtype=np.int64).reshape(-1, 2)


class GeometryRestraints:
    """The restraint energy of a model of ``reference``'s atoms (module docstring):
    ``energy(X)`` for X (M, 3) a float64 tensor (differentiable), ``terms(X)`` the
    contributions by kind, ``ideal`` the reference's own restrained distances."""

    def __init__(self, reference: "AtomicModel") -> None:
        from .validation import reference_geometry
        geom = reference_geometry(reference)
        X0 = np.asarray(reference.coords, dtype=np.float64)
        M = reference.n_atoms
        self.n_atoms = M
        names = np.asarray(reference.atom_name).astype(str)
        pairs, sds, kinds = [geom.bonds], [np.full(len(geom.bonds), BOND_SD)], ["bond"]
        a13 = geom.angles[:, [0, 2]]
        pairs.append(a13)
        sds.append(np.full(len(a13), ANGLE_SD))
        plane = self._peptide_pairs(reference, geom.bonds, names)
        pairs.append(plane)
        sds.append(np.full(len(plane), PLANE_SD))
        self._kind_sizes = [len(geom.bonds), len(a13), len(plane)]
        self._kinds = kinds + ["angle", "plane"]
        P = np.concatenate(pairs).astype(np.int64)
        self.pairs = torch.as_tensor(P)
        self.ideal = torch.as_tensor(np.linalg.norm(X0[P[:, 0]] - X0[P[:, 1]], axis=1))
        self.weight = torch.as_tensor(1.0 / np.concatenate(sds) ** 2)
        p14 = _pairs_14(geom.bonds, M)
        excl = np.concatenate([geom.bonds, a13, p14]) if len(p14) else np.concatenate(
            [geom.bonds, a13])
        excl = np.sort(excl, axis=1)
        self._excluded = np.unique(excl[:, 0] * M + excl[:, 1])
        self.heavy = np.flatnonzero(geom.heavy)
        self._x0 = torch.as_tensor(X0)

    @staticmethod
    def _peptide_pairs(model, bonds, names):
        """CA(i)-CA(i+1) and O(i)-CA(i+1) of each bonded C(i)-N(i+1)."""
        chain = np.asarray(model.chain).astype(str)
        resnum = np.asarray(model.resnum)
        icode = np.asarray(model.icode).astype(str)
        key = list(zip(chain, resnum, icode))
        atoms: Dict[tuple, Dict[str, int]] = {}
        for i, k in enumerate(key):
            atoms.setdefault(k, {})[names[i]] = i
        out = []
        for i, j in bonds:
            a, b = (i, j) if names[i] == "C" and names[j] == "N" else (j, i)
            if names[a] != "C" or names[b] != "N" or key[a] == key[b]:
                continue
            r0, r1 = atoms[key[a]], atoms[key[b]]
            if "CA" in r1:
                for name in ("CA", "O"):
                    if name in r0:
                        out.append((min(r0[name], r1["CA"]), max(r0[name], r1["CA"])))
        return np.array(sorted(set(out)), dtype=np.int64).reshape(-1, 2)

    def contacts(self, X: np.ndarray) -> np.ndarray:
        """Heavy-atom pairs (K, 2) closer than ``CONTACT_DISTANCE`` that are not 1-2, 1-3
        or 1-4 neighbours, at coordinates ``X`` (M, 3)."""
        from scipy.spatial import cKDTree
        h = self.heavy
        found = cKDTree(np.asarray(X)[h]).query_pairs(CONTACT_DISTANCE, output_type="ndarray")
        if len(found) == 0:
            return np.zeros((0, 2), dtype=np.int64)
        found = np.sort(h[found], axis=1)
        keep = ~np.isin(found[:, 0] * self.n_atoms + found[:, 1], self._excluded)
        return found[keep]

    def terms(self, X: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The energy's parts (0-d tensors): ``bond``, ``angle``, ``plane``, ``contact``."""
        P = self.pairs
        d = (X[P[:, 0]] - X[P[:, 1]]).norm(dim=1)
        e = 0.5 * self.weight.to(X.dtype) * (d - self.ideal.to(X.dtype)) ** 2
        out, start = {}, 0
        for kind, n in zip(self._kinds, self._kind_sizes):
            out[kind] = e[start:start + n].sum()
            start += n
        C = torch.as_tensor(self.contacts(X.detach().cpu().numpy()), device=X.device)
        if len(C):
            dc = (X[C[:, 0]] - X[C[:, 1]]).norm(dim=1)
            x0 = self._x0.to(X.device, X.dtype)
            r0 = (x0[C[:, 0]] - x0[C[:, 1]]).norm(dim=1).clamp(max=CONTACT_DISTANCE)
            out["contact"] = (0.5 * ((r0 - dc).clamp_min(0) / CONTACT_SD) ** 2).sum()
        else:
            out["contact"] = X.new_zeros(())
        return out

    def energy(self, X: torch.Tensor) -> torch.Tensor:
        """The restraint energy (0-d tensor, dimensionless: -log of the prior)."""
        return sum(self.terms(X).values())
