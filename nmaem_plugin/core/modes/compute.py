"""Normal modes of an atomic model: ANM on a coarse-grained network, interpolated on all atoms.

The pipeline (``compute_modes``):

1. **Coarse graining** (``cg_selection``): one node per residue by default (``ca``: CA of amino
   acids, C4' of nucleotides, P where a nucleotide has no C4'), or the protein and nucleic
   backbones (``backbone``), or every heavy atom (``heavy``).
2. **ANM Hessian** of the nodes (``sparse_hessian``, vectorised over the KD-tree's contact
   pairs; the same matrix as ProDy's ``ANM.buildHessian``, cutoff 15 A, gamma 1).
3. **Diagonalisation**: dense ``torch.linalg.eigh`` (on the GPU when there is one) for small
   networks, or a sparse shift-invert Lanczos (scipy ``eigsh``, ARPACK) on the sparse Hessian
   for networks too large for a dense 3N x 3N matrix. ``solver='auto'`` chooses by size.
4. **Rigid-body modes**: the six zero eigenvalues are found by their gap to the first internal
   mode; more than six zero modes means the network is disconnected or floppy (an error).
5. **Interpolation** of the d lowest internal modes onto every atom with a normalised Gaussian
   kernel (Nadaraya-Watson / Shepard weights of the CG nodes), evaluated as a PyKeOps
   soft-max-weighted reduction: no M x N matrix is ever stored. See ``docs/modes.md``.
6. **Basis**: the all-atom rigid-body motions are projected out and the modes are made
   orthonormal over the 3M coordinates by symmetric (Loewdin) orthonormalisation, which keeps
   every mode as close as possible to its interpolated self.

``modes.npz`` (see ``save_modes`` / ``load_modes``) holds ``coords`` (M,3) float32,
``modes`` (d,M,3) float32 orthonormal over the flattened 3M coordinates, ``eigenvalues`` (d,),
``atom_ids`` (M,) and diagnostics/parameters. X(z) = coords + sum_l z_l modes[l].
"""
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple, Union

import numpy as np

from ..base.atomic import atomic_path, atomic_savez
from ..base.choices import CG_CHOICES
from ..io.npz import read_npz
from ..base.errors import NmaemError, fail
from ..physics.structure import AtomicModel, match_atoms, rmsd, superpose, write_models

if TYPE_CHECKING:                   # scipy is imported where a sparse matrix is built
    from scipy.sparse import csr_matrix

__all__ = ["CG_CHOICES", "NormalModes", "cg_selection", "sparse_hessian",
           "solve_modes",
           "interpolate_modes", "auto_sigma", "orthonormalise", "rigid_body_basis",
           "compute_modes", "collectivity", "floor_rmsd", "fit_amplitudes",
           "target_diagnostics", "save_modes", "load_modes", "check_modes_match",
           "export_modes"]


PROTEIN_BACKBONE = frozenset(["N", "CA", "C", "O"])
# sugar-phosphate backbone of nucleotides (both PDB v3 and old phosphate oxygen names)
NUCLEIC_BACKBONE = frozenset(["P", "OP1", "OP2", "OP3", "O1P", "O2P", "O3P", "O5'", "C5'",
                              "C4'", "O4'", "C3'", "O3'", "C2'", "O2'", "C1'"])

# the dense solver is used up to this many CG nodes (3N x 3N float64 Hessian + eigenvectors)
DENSE_MAX_NODES_CPU = 1000
DENSE_MAX_NODES_GPU = 4000
# an eigenvalue below ZERO_TOL * (mean diagonal of the Hessian) is a zero (rigid/floppy) mode
ZERO_TOL = 1e-6
# default interpolation width: SIGMA_FACTOR x median nearest-neighbour distance of CG nodes
SIGMA_FACTOR = 0.5
# modes per KeOps reduction call
CHUNK_MODES = 8
MODES_FORMAT_VERSION = 1
REQUIRED_KEYS = ("coords", "modes", "eigenvalues", "atom_ids")


@dataclass
class NormalModes:
    """An orthonormal all-atom mode basis and what it was computed from.

    ``coords`` (M,3) float32, ``modes`` (d,M,3) float32, ``eigenvalues`` (d,) float64,
    ``atom_ids`` (M,) str; ``info`` holds diagnostics and parameters (the extra keys of
    ``modes.npz``: numbers, strings and arrays).
    """
    coords: np.ndarray
    modes: np.ndarray
    eigenvalues: np.ndarray
    atom_ids: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return self.coords.shape[0]

    @property
    def n_modes(self) -> int:
        return self.modes.shape[0]

    @property
    def basis(self) -> np.ndarray:
        """U as a (3M, d) float64 matrix (columns orthonormal)."""
        return self.modes.reshape(self.n_modes, -1).T.astype(np.float64)

    def deform(self, z: np.ndarray) -> np.ndarray:
        """X(z) = coords + sum_l z_l modes[l] for z (d,) or (B, d): (M,3) or (B,M,3)."""
        z = np.asarray(z, dtype=np.float64)
        return self.coords + np.tensordot(z, self.modes.astype(np.float64), axes=(-1, 0))

    def __getitem__(self, key):
        if key in ("coords", "modes", "eigenvalues", "atom_ids"):
            return getattr(self, key)
        return self.info[key]


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


# ----------------------------------------------------------------------------------------
# Hessian and eigenproblem

class _quiet_prody:
    """ProDy's logger silenced for a block (without touching the user's ProDy config)."""

    def __enter__(self):
        import prody
        self.logger = prody.LOGGER
        self.old = self.logger.verbosity
        self.logger.verbosity = "warning"

    def __exit__(self, *exc):
        self.logger.verbosity = self.old


def _check_parameters(cutoff, gamma):
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
    _check_parameters(cutoff, gamma)
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


def _count_pieces(cg_coords, cutoff):
    """Number of connected pieces of the contact graph (nodes closer than ``cutoff``)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree
    n = len(cg_coords)
    pairs = cKDTree(cg_coords).query_pairs(cutoff, output_type="ndarray")
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[0]


def _choose_solver(n_nodes, n_wanted, solver, device):
    if solver not in ("auto", "dense", "sparse"):
        raise NmaemError("unknown solver %r (choose auto, dense or sparse)" % solver)
    if solver == "sparse" and n_wanted >= 3 * n_nodes - 1:
        # ARPACK needs k < 3N - 1
        return "dense", "sparse asked but %d eigenpairs of a %d x %d matrix need the dense " \
                        "solver" % (n_wanted, 3 * n_nodes, 3 * n_nodes)
    if solver != "auto":
        return solver, "asked"
    limit = DENSE_MAX_NODES_GPU if str(device).startswith("cuda") else DENSE_MAX_NODES_CPU
    if n_nodes <= limit or n_wanted >= 3 * n_nodes - 1:
        return "dense", "%d nodes <= %d (dense limit on %s)" % (n_nodes, limit, device)
    return "sparse", "%d nodes > %d (dense limit on %s)" % (n_nodes, limit, device)


def _default_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def solve_modes(hessian: Union[np.ndarray, "csr_matrix"], n_wanted: int, solver: str = "dense",
                device: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The ``n_wanted`` lowest eigenpairs of a symmetric Hessian: (values (k,), vectors (3N,k)).

    ``dense``: torch.linalg.eigh in float64 on ``device`` (numpy array input);
    ``sparse``: scipy eigsh (ARPACK) in shift-invert mode about a small negative shift, so
    that the wanted eigenvalues (the lowest, rigid-body zeros included) converge first. The
    shifted matrix is factorised once by SuperLU in its symmetric mode with a minimum-degree
    ordering of A + A^T (``MMD_AT_PLUS_A``, no pivoting: it is positive definite), which
    fills in far less than eigsh's default (COLAMD): 19,260 CA nodes of a 149,040-atom
    complex, 3.5x less time (docs/benchmarks.md).
    """
    if solver == "dense":
        import torch
        device = device or _default_device()
        H = hessian.toarray() if hasattr(hessian, "toarray") else np.asarray(hessian)
        Ht = torch.from_numpy(np.ascontiguousarray(H, dtype=np.float64)).to(device)
        w, v = torch.linalg.eigh(Ht)
        w = w[:n_wanted].cpu().numpy()
        v = v[:, :n_wanted].cpu().numpy()
        del Ht
        return w, v
    if solver == "sparse":
        from scipy.sparse import csc_matrix, identity
        from scipy.sparse.linalg import LinearOperator, eigsh, splu
        H = csc_matrix(hessian)
        n = H.shape[0]
        scale = max(float(H.diagonal().mean()), 1e-300)
        shift = -1e-3 * scale
        lu = splu(csc_matrix(H - shift * identity(n, format="csc")), permc_spec="MMD_AT_PLUS_A",
                  diag_pivot_thresh=0.0, options=dict(SymmetricMode=True))
        inverse = LinearOperator((n, n), matvec=lu.solve, dtype=np.float64)
        v0 = np.random.default_rng(0).standard_normal(n)
        w, v = eigsh(H, k=n_wanted, sigma=shift, which="LM", v0=v0, tol=0, OPinv=inverse,
                     maxiter=100 * n)
        order = np.argsort(w)
        return w[order], v[:, order]
    raise NmaemError("unknown solver %r" % solver)


def _fix_signs(vectors):
    """Deterministic sign: the largest-magnitude component of each column is positive."""
    idx = np.argmax(np.abs(vectors), axis=0)
    s = np.sign(vectors[idx, np.arange(vectors.shape[1])])
    s[s == 0] = 1
    return vectors * s


def collectivity(modes: np.ndarray) -> Union[float, np.ndarray]:
    """Collectivity (Brueschweiler 1995) of modes (d,M,3) or (M,3): exp(entropy of the
    per-atom squared displacements) / M, in (0, 1]."""
    u = np.asarray(modes, dtype=np.float64)
    single = u.ndim == 2
    if single:
        u = u[None]
    p = (u ** 2).sum(-1)
    p = p / p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    k = np.exp(ent) / u.shape[1]
    return float(k[0]) if single else k


# ----------------------------------------------------------------------------------------
# interpolation and orthonormalisation

def auto_sigma(cg_coords: np.ndarray) -> float:
    """Default kernel width: SIGMA_FACTOR (0.5) x the median distance of a CG node to its
    nearest other node (1.9 A for CA nodes, about 0.75 A for heavy atoms)."""
    from scipy.spatial import cKDTree
    d, _ = cKDTree(cg_coords).query(cg_coords, k=2)
    return SIGMA_FACTOR * float(np.median(d[:, 1]))


def interpolate_modes(cg_coords: np.ndarray, cg_modes: np.ndarray, coords: np.ndarray,
                      sigma: float, exact: bool = True, ridge: float = 1e-8,
                      device: Optional[str] = None, method: str = "auto") -> np.ndarray:
    """Modes of the CG nodes carried to arbitrary points by normalised Gaussian weights.

    u(x) = sum_j w_j(x) a_j with w_j(x) = exp(-|x - y_j|^2 / 2 sigma^2) / sum_k (same).
    With ``exact`` (default) the node weights ``a`` solve W a = v, i.e. (K + ridge I) a = D v
    with the Gaussian kernel matrix K of the nodes and its row sums D, so that the
    interpolant passes through the CG modes at the nodes (a partition of unity that is also
    interpolating); otherwise a = v (Shepard smoothing).
    ``cg_coords`` (N,3), ``cg_modes`` (d,N,3), ``coords`` (M,3) -> (d,M,3) float64.
    ``method``: ``keops`` (all pairs, PyKeOps reductions: the solve a conjugate gradient on
    kernel matrix-vector products, the evaluation one soft-max-weighted sum), ``sparse``
    (:func:`_interpolate_sparse`: the same sums over the pairs whose terms are not below
    1e-17 of the largest, from a KD-tree), or ``auto``: keops on a GPU, sparse on the CPU.
    Nothing of size M x N or N x N is stored.
    """
    import torch
    if not (np.isfinite(sigma) and sigma > 0):
        raise NmaemError("the interpolation width sigma must be positive, not %r" % sigma)
    device = device or _default_device()
    if method == "auto":
        method = "keops" if str(device).startswith("cuda") else "sparse"
    if method == "sparse":
        return _interpolate_sparse(cg_coords, cg_modes, coords, sigma, exact, ridge)
    if method != "keops":
        raise ValueError("unknown interpolation method %r" % method)
    from pykeops.torch import LazyTensor
    backend = "GPU" if str(device).startswith("cuda") else "CPU"
    cg_modes = np.asarray(cg_modes, dtype=np.float64)
    d, n, _ = cg_modes.shape
    x = torch.as_tensor(np.ascontiguousarray(coords, dtype=np.float64), device=device) / sigma
    y = torch.as_tensor(np.ascontiguousarray(cg_coords, dtype=np.float64), device=device) / sigma
    v = torch.as_tensor(np.ascontiguousarray(cg_modes.transpose(1, 0, 2).reshape(n, 3 * d)),
                        device=device)
    Yi = LazyTensor(y[:, None, :])
    Yj = LazyTensor(y[None, :, :])
    X = LazyTensor(x[:, None, :])
    K = (-0.5 * ((Yi - Yj) ** 2).sum(-1)).exp()
    S = -0.5 * ((X - Yj) ** 2).sum(-1)
    deg = K.sum(1, backend=backend) if exact else None  # (N, 1) row sums of node kernel
    out = np.empty((x.shape[0], 3 * d))
    # modes go through the reductions in chunks of CHUNK_MODES (zero-padded), so that one
    # compiled KeOps kernel serves every number of modes
    width = 3 * CHUNK_MODES
    for c0 in range(0, 3 * d, width):
        c1 = min(c0 + width, 3 * d)
        vc = torch.zeros((n, width), dtype=torch.float64, device=device)
        vc[:, :c1 - c0] = v[:, c0:c1]
        if exact:
            def matvec(p):
                return (K * LazyTensor(p[None, :, :])).sum(1, backend=backend) + ridge * p

            a = _conjugate_gradient(matvec, deg * vc)
        else:
            a = vc
        res = S.sumsoftmaxweight(LazyTensor(a[None, :, :]), axis=1, backend=backend)
        out[:, c0:c1] = res[:, :c1 - c0].cpu().numpy()
    out = out.reshape(-1, d, 3).transpose(1, 0, 2)
    return np.ascontiguousarray(out)


# terms of the Gaussian sums below this fraction of a row's largest are left out (sparse path)
KERNEL_EPS = 1e-17
# atoms per block of the sparse evaluation (memory: about 200 neighbours x 24 bytes each)
INTERP_BLOCK = 16384


def _gaussian_pairs(a, tree_b, radius):
    """(i, j, squared distance) of the points ``a`` and the tree's points closer than
    ``radius``."""
    from scipy.spatial import cKDTree
    p = cKDTree(a).sparse_distance_matrix(tree_b, radius, output_type="ndarray")
    return p["i"].astype(np.int64), p["j"].astype(np.int64), p["v"] ** 2


def _interpolate_sparse(cg_coords, cg_modes, coords, sigma, exact=True, ridge=1e-8):
    """:func:`interpolate_modes` over the pairs that matter (CPU, numpy/scipy/torch).

    The node kernel K keeps the pairs with exp(-d^2 / 2 sigma^2) >= KERNEL_EPS (d up to
    8.8 sigma; K_ii = 1, so a dropped term is below KERNEL_EPS of its row); the evaluation
    keeps, for each atom, the nodes with exp(-(d^2 - d0^2) / 2 sigma^2) >= KERNEL_EPS, where
    d0 is the atom's nearest node (a dropped weight is below KERNEL_EPS of the largest). The
    weights a solve (K + ridge I) a = D v by the same conjugate gradient as the KeOps path,
    on a sparse K. Time and memory grow as the number of close pairs: linear in M and N.
    """
    import torch
    from scipy.sparse import coo_matrix
    from scipy.spatial import cKDTree
    y = np.ascontiguousarray(cg_coords, dtype=np.float64)
    x = np.ascontiguousarray(coords, dtype=np.float64)
    v = np.asarray(cg_modes, dtype=np.float64)
    d, n, _ = v.shape
    V = np.ascontiguousarray(v.transpose(1, 0, 2).reshape(n, 3 * d))
    s2 = 2.0 * float(sigma) ** 2
    reach = s2 * np.log(1.0 / KERNEL_EPS)         # d^2 - d0^2 beyond which terms are dropped
    tree = cKDTree(y)
    if exact:
        i, j, d2 = _gaussian_pairs(y, tree, np.sqrt(reach))
        off = i != j
        K = coo_matrix((np.exp(-d2[off] / s2), (i[off], j[off])), shape=(n, n)).tocsr()
        deg = np.asarray(K.sum(1)).ravel() + 1.0

        def matvec(p):
            return torch.from_numpy(K @ p.numpy()) + (1.0 + ridge) * p

        a = _conjugate_gradient(matvec, torch.from_numpy(deg[:, None] * V)).numpy()
    else:
        a = V
    out = np.empty((len(x), 3 * d))
    for b0 in range(0, len(x), INTERP_BLOCK):
        xb = x[b0:b0 + INTERP_BLOCK]
        d0, _ = tree.query(xb, k=1)
        i, j, d2 = _gaussian_pairs(xb, tree, np.sqrt(d0.max() ** 2 + reach))
        e = d2 - d0[i] ** 2
        keep = e <= reach
        W = coo_matrix((np.exp(-e[keep] / s2), (i[keep], j[keep])), shape=(len(xb), n)).tocsr()
        out[b0:b0 + len(xb)] = (W @ a) / np.asarray(W.sum(1))
    return np.ascontiguousarray(out.reshape(-1, d, 3).transpose(1, 0, 2))


def _conjugate_gradient(matvec, B, rtol=1e-10, maxiter=2000):
    """Solve A X = B column by column (A symmetric positive definite, given by ``matvec``)."""
    import torch
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(0)
    stop = (rtol ** 2) * (B * B).sum(0)
    for _ in range(maxiter):
        if bool((rs <= stop).all()):
            break
        AP = matvec(P)
        pap = (P * AP).sum(0)
        alpha = torch.where(pap > 0, rs / torch.where(pap > 0, pap, torch.ones_like(pap)),
                            torch.zeros_like(pap))
        X += alpha * P
        R -= alpha * AP
        rs_new = (R * R).sum(0)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)),
                           torch.zeros_like(rs))
        P = R + beta * P
        rs = rs_new
    else:
        raise NmaemError("the interpolation weights did not converge (ill-conditioned kernel: "
                         "use a smaller --sigma)")
    return X


def rigid_body_basis(coords: np.ndarray) -> np.ndarray:
    """Orthonormal (3M, 6) basis of the rigid-body motions (3 translations, 3 infinitesimal
    rotations about the centroid) of points ``coords`` (M,3)."""
    x = np.asarray(coords, dtype=np.float64)
    x = x - x.mean(0)
    m = len(x)
    B = np.zeros((m, 3, 6))
    for a in range(3):
        B[:, a, a] = 1.0
    # rotation about axis a: e_a x r
    for a in range(3):
        e = np.zeros(3)
        e[a] = 1.0
        B[:, :, 3 + a] = np.cross(e, x)
    B = B.reshape(3 * m, 6)
    q, r = np.linalg.qr(B)
    keep = np.abs(np.diag(r)) > 1e-9 * np.abs(np.diag(r)).max()
    return q[:, keep]


def orthonormalise(modes: np.ndarray, coords: Optional[np.ndarray] = None) -> np.ndarray:
    """Orthonormal basis (d,M,3) from modes (d,M,3): rigid-body motions of ``coords``
    projected out (when given), then symmetric (Loewdin) orthonormalisation U (U^T U)^-1/2,
    the orthonormal set closest to the input in the least-squares sense."""
    u = np.asarray(modes, dtype=np.float64)
    d, m, _ = u.shape
    U = u.reshape(d, 3 * m).T.copy()
    if coords is not None:
        R = rigid_body_basis(coords)
        U -= R @ (R.T @ U)
    P, s, Qt = np.linalg.svd(U, full_matrices=False)
    if s.min() < 1e-6 * s.max():
        raise NmaemError("the interpolated modes are (nearly) linearly dependent "
                         "(singular values %.2g..%.2g); use a smaller interpolation sigma or "
                         "fewer modes" % (s.min(), s.max()))
    W = P @ Qt
    # a second pass removes the round-off left by the first (matters for large M)
    W = _lowdin_polish(W)
    return np.ascontiguousarray(W.T.reshape(d, m, 3))


def _lowdin_polish(W):
    G = W.T @ W
    w, V = np.linalg.eigh(G)
    return W @ (V @ np.diag(1.0 / np.sqrt(w)) @ V.T)


# ----------------------------------------------------------------------------------------
# the whole computation

def compute_modes(model: AtomicModel, n_modes: int = 16, cg: str = "ca", cutoff: float = 15.0,
                  gamma: float = 1.0, solver: str = "auto", sigma: Optional[float] = None,
                  device: Optional[str] = None, cg_index: Optional[np.ndarray] = None,
                  log: Optional[Callable[[str], None]] = None) -> NormalModes:
    """Normal modes of ``model`` (an :class:`AtomicModel`) interpolated on all its atoms.

    ``cg_index`` (indices into the model) overrides the ``cg`` selection. ``sigma`` is the
    interpolation kernel width in Angstrom (default: ``auto_sigma`` of the CG nodes).
    ``solver`` is ``auto``, ``dense`` or ``sparse``; ``device`` the torch device (default the
    GPU when present). ``log`` is a callable receiving progress lines. Returns
    :class:`NormalModes` with diagnostics in ``info``.
    """
    say = log or (lambda *a: None)
    t_all = time.time()
    src = model.source or "model"
    n_modes = int(n_modes)
    if n_modes < 1:
        raise NmaemError("--n-modes must be at least 1, not %d" % n_modes)
    _check_parameters(cutoff, gamma)
    coords = np.asarray(model.coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) == 0:
        fail(src, "no atom coordinates")
    if not np.all(np.isfinite(coords)):
        bad = np.nonzero(~np.isfinite(coords).all(1))[0]
        fail(src, "%d atom(s) with non-finite (NaN/inf) coordinates, e.g. %s"
             % (len(bad), model.atom_ids[bad[0]]))
    device = device or _default_device()

    if cg_index is None:
        cg_index = cg_selection(model, cg)
        cg_label = cg
    else:
        cg_index = np.unique(np.asarray(cg_index, dtype=int))
        cg_label = "custom"
    n_cg = len(cg_index)
    if n_cg == 0:
        fail(src, "no atom matches the coarse-graining selection %r (%s)"
             % (cg_label, _cg_help(cg_label)))
    if n_cg < 4:
        fail(src, "only %d atom(s) match the coarse-graining selection %r; an elastic network "
                  "needs at least 4 nodes (try --cg backbone or --cg heavy)" % (n_cg, cg_label))
    n_internal = 3 * n_cg - 6
    if n_modes > n_internal:
        fail(src, "%d modes asked but the %d-node network (--cg %s) has only %d non-rigid "
                  "modes" % (n_modes, n_cg, cg_label, n_internal))
    cg_coords = coords[cg_index]
    say("coarse graining: %s, %d of %d atoms" % (cg_label, n_cg, len(coords)))

    pieces = _count_pieces(cg_coords, cutoff)
    if pieces > 1:
        fail(src, "the elastic network is disconnected: %d separate pieces at cutoff %g A "
                  "(--cg %s); use a larger --cutoff" % (pieces, cutoff, cg_label))

    n_wanted = n_modes + 6
    method, why = _choose_solver(n_cg, n_wanted, solver, device)
    t0 = time.time()
    H = sparse_hessian(cg_coords, cutoff, gamma)
    if method == "dense":
        H = H.toarray()
    t_hessian = time.time() - t0
    scale = float(H.diagonal().mean())
    say("ANM Hessian (vectorised, cutoff %g A, gamma %g): %d x %d %s, %.1f s"
        % (cutoff, gamma, 3 * n_cg, 3 * n_cg, "sparse" if method == "sparse" else "dense",
           t_hessian))
    t0 = time.time()
    w, v = solve_modes(H, n_wanted, method, device)
    del H
    t_solve = time.time() - t0
    say("eigensolver: %s (%s; %s), %.1f s"
        % (method, "torch.linalg.eigh on " + str(device) if method == "dense"
           else "scipy eigsh shift-invert", why, t_solve))

    # rigid-body modes: the zero eigenvalues below the gap
    tol = ZERO_TOL * scale
    n_zero = int((w < tol).sum())
    if n_zero > 6:
        fail(src, "the elastic network has %s%d zero-frequency modes (6 expected): parts of it "
                  "are only loosely attached at cutoff %g A (--cg %s); use a larger --cutoff"
             % ("at least " if n_zero == len(w) else "", n_zero, cutoff, cg_label))
    if n_zero < 6:
        fail(src, "only %d zero-frequency modes found (6 expected: no clear gap after the "
                  "rigid-body modes, eigenvalues %s)"
             % (n_zero, " ".join("%.3g" % x for x in w[:8])))
    gap = float(w[6] / max(abs(w[5]), 1e-300 * scale, np.finfo(float).tiny))
    eigvals = w[6:6 + n_modes].copy()
    cg_vectors = _fix_signs(v[:, 6:6 + n_modes])
    cg_modes = cg_vectors.T.reshape(n_modes, n_cg, 3)
    say("rigid-body modes removed: |lambda_1..6| <= %.2g, lambda_7 = %.4g (gap x%.2g)"
        % (np.abs(w[:6]).max(), w[6], gap))

    if sigma is None:
        sigma = auto_sigma(cg_coords)
        sigma_how = "auto (%g x median nearest-node distance)" % SIGMA_FACTOR
    else:
        sigma = float(sigma)
        sigma_how = "asked"
    t0 = time.time()
    raw = interpolate_modes(cg_coords, cg_modes, coords, sigma, device=device)
    t_interp = time.time() - t0
    # fidelity at the nodes themselves, before orthonormalisation
    at_nodes = raw[:, cg_index, :].reshape(n_modes, -1)
    cg_flat = cg_modes.reshape(n_modes, -1)
    node_cosine = (at_nodes * cg_flat).sum(1) / (np.linalg.norm(at_nodes, axis=1)
                                                 * np.linalg.norm(cg_flat, axis=1))
    # overshoot: largest atom displacement over largest node displacement, per mode
    overshoot = (np.linalg.norm(raw, axis=2).max(1)
                 / np.maximum(np.linalg.norm(cg_modes, axis=2).max(1), 1e-300))
    say("interpolation: node-exact normalised Gaussian, sigma %.3g A (%s), %s, %.1f s; "
        "cosine at the CG nodes min %.6f, overshoot max %.2f"
        % (sigma, sigma_how, "PyKeOps" if str(device).startswith("cuda") else
           "KD-tree close pairs", t_interp, node_cosine.min(), overshoot.max()))
    modes = orthonormalise(raw, coords)
    modes32 = modes.astype(np.float32)
    info = {
        "format_version": MODES_FORMAT_VERSION,
        "source": str(model.source),
        "cg": cg_label,
        "cutoff": float(cutoff),
        "gamma": float(gamma),
        "sigma": float(sigma),
        "kernel": "normalised_gaussian_node_exact",
        "solver": method,
        "solver_reason": why,
        "device": str(device),
        "n_cg": n_cg,
        "cg_index": cg_index.astype(np.int64),
        "cg_atom_ids": model.atom_ids[cg_index],
        "cg_coords": cg_coords.astype(np.float32),
        "cg_modes": cg_modes.astype(np.float32),
        "cg_eigenvalues": eigvals,
        "rigid_eigenvalues": w[:6].copy(),
        "eigenvalue_gap": gap,
        "collectivity": collectivity(modes),
        "cg_collectivity": collectivity(cg_modes),
        "node_cosine": node_cosine,
        "overshoot": overshoot,
        "time_hessian_s": t_hessian,
        "time_solve_s": t_solve,
        "time_interpolation_s": t_interp,
        "time_total_s": time.time() - t_all,
    }
    return NormalModes(coords=coords.astype(np.float32), modes=modes32, eigenvalues=eigvals,
                       atom_ids=np.asarray(model.atom_ids).astype(str), info=info)


def _cg_help(cg):
    return {"ca": "CA of amino acids, C4'/P of nucleotides",
            "backbone": "N CA C O of amino acids, sugar-phosphate atoms of nucleotides",
            "heavy": "all heavy atoms", "custom": "given node indices"}.get(cg, cg)


# ----------------------------------------------------------------------------------------
# comparison with a target conformation

def fit_amplitudes(modes: np.ndarray, coords0: np.ndarray,
                   target_coords: np.ndarray) -> np.ndarray:
    """Least-squares amplitudes z (d,) or (F,d) with coords0 + sum z_l modes[l] ~ target.

    ``modes`` (d,M,3); ``target_coords`` (M,3) or (F,M,3), in the frame of ``coords0``.
    The modes need not be orthonormal on these rows (e.g. a subset of atoms).
    """
    U = np.asarray(modes, dtype=np.float64)
    d = U.shape[0]
    U = U.reshape(d, -1).T
    x0 = np.asarray(coords0, dtype=np.float64).reshape(-1)
    T = np.asarray(target_coords, dtype=np.float64)
    single = T.ndim == 2
    D = (T.reshape(-1, x0.size) - x0).T  # (3M, F)
    z, *_ = np.linalg.lstsq(U, D, rcond=None)
    return z[:, 0] if single else z.T


def floor_rmsd(modes: np.ndarray, coords0: np.ndarray,
               target_coords: np.ndarray) -> Union[float, np.ndarray]:
    """The best RMSD to ``target_coords`` that any amplitude vector can reach:
    min_z RMSD(coords0 + U z, target), the residual of target - coords0 outside the span of
    the modes. ``target_coords`` (M,3) -> float, or (F,M,3) -> (F,) array. No superposition
    is done here: give the target in the frame of ``coords0`` (see ``target_diagnostics``)."""
    U = np.asarray(modes, dtype=np.float64)
    d = U.shape[0]
    x0 = np.asarray(coords0, dtype=np.float64)
    T = np.asarray(target_coords, dtype=np.float64)
    single = T.ndim == 2
    T = T.reshape(-1, x0.size)
    z = fit_amplitudes(modes, x0, T.reshape(-1, *x0.shape)).reshape(len(T), d)
    fit = x0.reshape(-1) + z @ U.reshape(d, -1)
    r = np.sqrt(((fit - T) ** 2).sum(1) / x0.shape[0])
    return float(r[0]) if single else r


def target_diagnostics(nm: NormalModes, model: AtomicModel, target: AtomicModel,
                       target_path: Optional[str] = None) -> dict:
    """Overlaps of the modes with the displacement from ``model`` to ``target``.

    Atoms are matched by chain, residue number, insertion code and atom name; the target's
    matched atoms are superposed (Kabsch) on the reference's. Returns a dict: ``overlap``
    (d,) cosines of each mode with the displacement, ``cumulative_overlap`` (d,) the fraction
    of the displacement's norm inside the span of the first k modes, the same on the CG nodes
    with the CG eigenvectors (``cg_cumulative_overlap``), ``rmsd`` after superposition,
    ``floor_rmsd`` and the number of matched atoms.
    """
    check_modes_match(nm, model, coords_tol=None)
    ia, ib = match_atoms(model, target, model.source or None, target_path)
    x0 = nm.coords.astype(np.float64)[ia]
    b = superpose(target.coords[ib], x0)
    disp = (b - x0).reshape(-1)
    U = nm.modes.astype(np.float64)[:, ia, :].reshape(nm.n_modes, -1)
    dn = np.linalg.norm(disp)
    if dn == 0:
        raise NmaemError("%s: the target is identical to the reference after superposition"
                         % (target_path or target.source or "target"))
    overlap = U @ disp / (np.linalg.norm(U, axis=1) * dn)
    Q, _ = np.linalg.qr(U.T)  # nested spans: span(Q[:, :k]) = span of the first k modes
    cumulative = np.sqrt(np.cumsum((Q.T @ disp) ** 2)) / dn
    out = {"target_path": str(target_path or target.source), "n_matched": len(ia),
           "overlap": overlap, "cumulative_overlap": cumulative,
           "rmsd": rmsd(x0, b), "floor_rmsd": floor_rmsd(nm.modes[:, ia, :], x0, b)}
    # the same with the CG eigenvectors on the matched CG nodes (the classical ANM figure)
    cg_index = nm.info.get("cg_index")
    cg_modes = nm.info.get("cg_modes")
    if cg_index is not None and cg_modes is not None:
        pos = {a: k for k, a in enumerate(ia)}
        rows = [(k, pos[a]) for k, a in enumerate(cg_index) if a in pos]
        if len(rows) >= 4:
            kc, km = np.array(rows).T
            dc = (b[km] - x0[km]).reshape(-1)
            Uc = np.asarray(cg_modes, dtype=np.float64)[:, kc, :].reshape(nm.n_modes, -1)
            Qc, _ = np.linalg.qr(Uc.T)
            out["cg_cumulative_overlap"] = np.sqrt(np.cumsum((Qc.T @ dc) ** 2)) / np.linalg.norm(dc)
            out["cg_overlap"] = Uc @ dc / (np.linalg.norm(Uc, axis=1) * np.linalg.norm(dc))
    return out


# ----------------------------------------------------------------------------------------
# files

def save_modes(path: str, nm: NormalModes) -> str:
    """Write ``modes.npz`` atomically (``atomic_path``)."""
    path = str(path)
    arrays = {"coords": np.asarray(nm.coords, dtype=np.float32),
              "modes": np.asarray(nm.modes, dtype=np.float32),
              "eigenvalues": np.asarray(nm.eigenvalues, dtype=np.float64),
              "atom_ids": np.asarray(nm.atom_ids).astype(str)}
    for k, val in nm.info.items():
        if k in arrays:
            continue
        a = np.asarray(val)
        if a.dtype == object:
            a = a.astype(str)
        arrays[k] = a
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(path, "the output folder does not exist")
    try:
        atomic_savez(path, **arrays)
    except OSError as exc:
        fail(path, "cannot write the modes file (%s)" % exc.strerror)
    return path


def load_modes(path: str, orthonormal_tol: float = 1e-4) -> NormalModes:
    """Read and check a ``modes.npz`` file: a :class:`NormalModes`.

    Raises :class:`NmaemError` with a one-line ``path: problem`` message when the file is
    missing, not an npz archive, lacks a contract key, or has wrong shapes, non-finite values
    or modes that are not orthonormal (max |U^T U - I| > ``orthonormal_tol``).
    """
    path = str(path)
    data = read_npz(path, "modes")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        fail(path, "not a modes file: missing %s" % ", ".join(missing))
    coords, modes, ev, ids = (data.pop(k) for k in REQUIRED_KEYS)
    if coords.ndim != 2 or coords.shape[1] != 3 or coords.shape[0] == 0:
        fail(path, "coords has shape %s, expected (M, 3)" % (coords.shape,))
    m = coords.shape[0]
    if modes.ndim != 3 or modes.shape[1:] != (m, 3) or modes.shape[0] == 0:
        fail(path, "modes has shape %s, expected (d, %d, 3)" % (modes.shape, m))
    d = modes.shape[0]
    if ev.shape != (d,):
        fail(path, "eigenvalues has shape %s, expected (%d,)" % (ev.shape, d))
    if ids.shape != (m,) or ids.dtype.kind not in "US":
        fail(path, "atom_ids must be %d strings, found %s of %s" % (m, ids.dtype, ids.shape))
    for name, a in (("coords", coords), ("modes", modes), ("eigenvalues", ev)):
        if a.dtype.kind != "f":
            fail(path, "%s is not floating point (%s)" % (name, a.dtype))
        if not np.all(np.isfinite(a)):
            fail(path, "%s holds non-finite values" % name)
    U = modes.reshape(d, -1).astype(np.float64)
    err = np.abs(U @ U.T - np.eye(d)).max()
    if err > orthonormal_tol:
        fail(path, "the modes are not orthonormal (max |U^T U - I| = %.2g)" % err)
    info = {k: (a.item() if a.ndim == 0 else a) for k, a in data.items()}
    return NormalModes(coords=coords.astype(np.float32), modes=modes.astype(np.float32),
                       eigenvalues=ev.astype(np.float64), atom_ids=ids.astype(str), info=info)


def check_modes_match(modes: NormalModes, model: AtomicModel, coords_tol: float = 0.01) -> None:
    """Raise :class:`NmaemError` unless ``modes`` (a :class:`NormalModes`) were computed on
    ``model``: same atom ids in the same order, and (unless ``coords_tol`` is None) the same
    coordinates within ``coords_tol`` Angstrom."""
    ids = np.asarray(modes.atom_ids).astype(str)
    mids = np.asarray(model.atom_ids).astype(str)
    where = model.source or "model"
    if len(ids) != len(mids):
        fail(where, "modes computed on a different model: the modes file has %d atoms, the "
                    "model %d" % (len(ids), len(mids)))
    diff = np.nonzero(ids != mids)[0]
    if len(diff):
        i = diff[0]
        fail(where, "modes computed on a different model: %d atom ids differ, first at row %d "
                    "(%s in the modes file, %s in the model)" % (len(diff), i, ids[i], mids[i]))
    if coords_tol is not None:
        dev = np.abs(np.asarray(modes.coords, dtype=np.float64) - model.coords).max()
        if dev > coords_tol:
            fail(where, "modes computed on a different model: same atoms but coordinates "
                        "differ by up to %.3g A (another frame or conformation)" % dev)


def export_modes(nm: NormalModes, model: AtomicModel, out_dir: str, amplitude: float = 3.0,
                 n_frames: int = 20, prefix: str = "mode") -> List[str]:
    """Files for viewers in ``out_dir``: ``modes.nmd`` (ProDy NMD, for VMD's NMWiz) and one
    multi-model PDB per mode, ``mode_01.pdb``..., animating X0 + a sin(2 pi k / n_frames) u_l
    with the amplitude chosen so that the largest atom displacement is ``amplitude`` A.
    Returns the written paths."""
    import prody
    check_modes_match(nm, model, coords_tol=None)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    ag = prody.AtomGroup("nmaem")
    ag.setCoords(nm.coords.astype(np.float64))
    ag.setNames(np.asarray(model.atom_name).astype(str))
    ag.setResnames(np.asarray(model.resname).astype(str))
    ag.setResnums(np.asarray(model.resnum).astype(int))
    ag.setChids(np.asarray(model.chain).astype(str))
    ag.setElements(np.asarray(model.elements).astype(str))
    nma = prody.NMA("nmaem_modes")
    nma.setEigens(nm.basis, np.asarray(nm.eigenvalues, dtype=np.float64))
    with _quiet_prody():
        nmd = os.path.join(out_dir, "modes.nmd")
        with atomic_path(nmd) as tmp:          # prody writes by path only
            prody.writeNMD(tmp, nma, ag)
    written.append(nmd)
    if model._structure is not None:
        phase = np.sin(2 * np.pi * np.arange(n_frames) / n_frames)
        x0 = nm.coords.astype(np.float64)
        for l in range(nm.n_modes):
            u = nm.modes[l].astype(np.float64)
            a = amplitude / np.linalg.norm(u, axis=1).max()
            path = os.path.join(out_dir, "%s_%02d.pdb" % (prefix, l + 1))
            write_models(path, model, [x0 + a * p * u for p in phase])
            written.append(path)
    return written
