"""The elastic network of an atomic model: its coarse-grained nodes (``cg_selection``) and the
ANM Hessian of the nodes (``sparse_hessian``, the same matrix as ProDy's ``ANM.buildHessian``,
vectorised over the KD-tree's contact pairs), with the checks of its parameters and of its
connectivity (``count_pieces``)."""
from typing import TYPE_CHECKING

import numpy as np

from ..base.choices import CG_CHOICES
from ..base.errors import NmaemError
from ..physics.structure import AtomicModel

if TYPE_CHECKING:                   # scipy is imported where a sparse matrix is built
    from scipy.sparse import csr_matrix

__all__ = ["cg_selection", "sparse_hessian", "check_network_parameters", "count_pieces",
           "PROTEIN_BACKBONE", "NUCLEIC_BACKBONE"]


PROTEIN_BACKBONE = frozenset(["N", "CA", "C", "O"])
# sugar-phosphate backbone of nucleotides (both PDB v3 and old phosphate oxygen names)
NUCLEIC_BACKBONE = frozenset(["P", "OP1", "OP2", "OP3", "O1P", "O2P", "O3P", "O5'", "C5'",
                              "C4'", "O4'", "C3'", "O3'", "C2'", "O2'", "C1'"])


# ----------------------------------------------------------------------------------------
# coarse graining

def _residue_kinds(model):
    """Per atom: 'protein', 'nucleic' or '' (other), from the residue name (gemmi's table),
    falling back on atom names for residues gemmi does not know."""
    import gemmi
    kind_of_name = {}
    for name in np.unique(model.resname):
        info = gemmi.find_tabulated_residue(str(name))
        if info is not None and info.is_amino_acid():
            kind_of_name[name] = "protein"
        elif info is not None and info.is_nucleic_acid():
            kind_of_name[name] = "nucleic"
        else:
            kind_of_name[name] = None
    kinds = np.array([kind_of_name[n] or "" for n in model.resname], dtype=object)
    unknown = np.array([kind_of_name[n] is None for n in model.resname])
    if unknown.any():
        # residues not in gemmi's table: amino acid if it has N and CA (carbon), nucleotide
        # if it has C4' or P
        keys = _residue_keys(model)
        for key in np.unique(keys[unknown]):
            rows = np.nonzero(keys == key)[0]
            names = set(model.atom_name[rows])
            ca_c = any(model.atom_name[r] == "CA" and model.elements[r] == "C" for r in rows)
            if ca_c and "N" in names:
                kinds[rows] = "protein"
            elif "C4'" in names or "P" in names:
                kinds[rows] = "nucleic"
    return kinds.astype(str)


def _residue_keys(model):
    return np.array(["%s:%d:%s" % t for t in zip(model.chain, model.resnum, model.icode)])


def cg_selection(model: AtomicModel, cg: str = "ca") -> np.ndarray:
    """Indices of the coarse-grained nodes of ``model`` (sorted, in file order).

    ``ca``: CA of every amino acid and C4' of every nucleotide (P when C4' is missing), one
    node per polymer residue; ``backbone``: N, CA, C, O of amino acids and the sugar-phosphate
    atoms of nucleotides; ``heavy``: every atom of the model (hydrogens are not read).
    """
    if cg not in CG_CHOICES:
        raise NmaemError("unknown coarse-graining %r (choose from %s)" % (cg, ", ".join(CG_CHOICES)))
    n = model.n_atoms
    if cg == "heavy":
        return np.nonzero(model.elements != "H")[0]
    kinds = _residue_kinds(model)
    prot = kinds == "protein"
    nuc = kinds == "nucleic"
    names = model.atom_name
    if cg == "backbone":
        is_bb = np.array([a in PROTEIN_BACKBONE for a in names]) & prot
        is_bb |= np.array([a in NUCLEIC_BACKBONE for a in names]) & nuc
        return np.nonzero(is_bb)[0]
    mask = prot & (names == "CA") & (model.elements == "C")
    c4 = nuc & (names == "C4'")
    mask |= c4
    # nucleotides without C4': their P
    p_rows = np.nonzero(nuc & (names == "P"))[0]
    if len(p_rows):
        keys = _residue_keys(model)
        has_c4 = set(keys[c4])
        for r in p_rows:
            if keys[r] not in has_c4:
                mask[r] = True
    idx = np.nonzero(mask)[0]
    assert idx.max(initial=-1) < n
    return idx


def check_network_parameters(cutoff: float, gamma: float) -> None:
    """A one-line NmaemError unless the ANM cutoff and gamma are positive and finite."""
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise NmaemError("the cutoff must be a positive distance in Angstrom, not %r" % cutoff)
    if not (np.isfinite(gamma) and gamma > 0):
        raise NmaemError("gamma (the spring constant) must be positive, not %r" % gamma)


def sparse_hessian(cg_coords: np.ndarray, cutoff: float = 15.0, gamma: float = 1.0
                   ) -> "csr_matrix":
    """ANM Hessian (3N x 3N scipy CSR) of nodes ``cg_coords`` (N,3), built in vectorised form.

    The same matrix as ProDy's ``ANM.buildHessian`` (a test compares them): for every pair
    closer than ``cutoff`` (KD-tree), the off-diagonal block -gamma r r^T / |r|^2 with
    r = x_j - x_i, and each diagonal block minus the sum of its row's off-diagonal blocks.
    Memory and time grow with the number of contacts (about 60 per CA node at 15 A); numpy
    and scipy only, a few seconds for 20,000 nodes where ProDy's node-by-node loop takes
    about a minute.
    """
    from scipy.sparse import coo_matrix
    from scipy.spatial import cKDTree
    check_network_parameters(cutoff, gamma)
    x = np.asarray(cg_coords, dtype=np.float64)
    n = len(x)
    pairs = cKDTree(x).query_pairs(float(cutoff), output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    r = x[j] - x[i]
    block = (-float(gamma) / (r * r).sum(1))[:, None, None] * r[:, :, None] * r[:, None, :]
    diag = np.zeros((n, 3, 3))
    np.add.at(diag, i, -block)
    np.add.at(diag, j, -block)
    a = np.arange(3)
    ri = (3 * i[:, None, None] + a[None, :, None]) + 0 * a[None, None, :]    # (P, 3, 3) rows
    ci = (3 * j[:, None, None] + a[None, None, :]) + 0 * a[None, :, None]    # columns
    di = (3 * np.arange(n)[:, None, None] + a[None, :, None]) + 0 * a[None, None, :]
    dj = (3 * np.arange(n)[:, None, None] + a[None, None, :]) + 0 * a[None, :, None]
    rows = np.concatenate([ri.ravel(), ci.transpose(0, 2, 1).ravel(), di.ravel()])
    cols = np.concatenate([ci.ravel(), ri.transpose(0, 2, 1).ravel(), dj.ravel()])
    vals = np.concatenate([block.ravel(), block.transpose(0, 2, 1).ravel(), diag.ravel()])
    return coo_matrix((vals, (rows, cols)), shape=(3 * n, 3 * n)).tocsr()


def count_pieces(cg_coords: np.ndarray, cutoff: float) -> int:
    """Number of connected pieces of the contact graph (nodes closer than ``cutoff``)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree
    n = len(cg_coords)
    pairs = cKDTree(cg_coords).query_pairs(cutoff, output_type="ndarray")
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[0]
