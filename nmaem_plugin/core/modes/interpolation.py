"""Modes of the coarse-grained nodes carried onto every atom by a normalised Gaussian kernel,
node-exact (``interpolate_modes``): PyKeOps reductions on a GPU, sums over the close pairs of a
KD-tree on the CPU; nothing of size atoms x nodes is stored (docs/modes.md)."""
from typing import Optional

import numpy as np

from ..base.errors import NmaemError
from .solver import default_device

__all__ = ["interpolate_modes", "auto_sigma", "SIGMA_FACTOR", "CHUNK_MODES", "KERNEL_EPS",
           "INTERP_BLOCK"]


# default interpolation width: SIGMA_FACTOR x median nearest-neighbour distance of CG nodes
SIGMA_FACTOR = 0.5
# modes per KeOps reduction call
CHUNK_MODES = 8


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
    device = device or default_device()
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
