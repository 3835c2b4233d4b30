"""The orthonormal all-atom basis: rigid-body motions projected out, then symmetric (Loewdin)
orthonormalisation, which keeps every mode as close as possible to its interpolated self."""
from typing import Optional

import numpy as np

from ..base.errors import NmaemError

__all__ = ["rigid_body_basis", "orthonormalise"]


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
