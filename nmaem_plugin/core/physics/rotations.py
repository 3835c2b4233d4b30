"""Poses for tensors: RELION rotation matrices from Euler angles and rotation vectors, with
autograd and devices.

The conventions live in ``io/poses.py`` (numpy); docs/conventions.md derives and cites each
one. ``euler_to_matrix(rot, tilt, psi)`` is RELION's ``Euler_angles2matrix``:
A = Rz(psi) Ry(tilt) Rz(rot) with the *passive* elementary rotations
Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]], Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]. A model
point r (relative to the rotation centre) goes to A r, and the image is the projection of A r
along z. These wrappers take numpy arrays (numpy out) or tensors (tensors out).
"""
from typing import Tuple, Union

import numpy as np
import torch

from ..io import poses

__all__ = ["euler_to_matrix", "matrix_to_euler", "rotvec_to_matrix", "correct_rotations",
           "ArrayOrTensor"]

ArrayOrTensor = Union[np.ndarray, torch.Tensor]   # numpy in, numpy out; tensors likewise


def _as_tensor(x, dtype=None, device=None):
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype or x.dtype, device=device or x.device)
    return torch.as_tensor(np.asarray(x), dtype=dtype or torch.float64, device=device)


def euler_to_matrix(rot: ArrayOrTensor, tilt: ArrayOrTensor, psi: ArrayOrTensor,
                    degrees: bool = True) -> ArrayOrTensor:
    """RELION's rotation matrix A for Euler angles (rot, tilt, psi); batched, (..., 3, 3).

    Accepts numpy arrays or tensors; returns the same kind (numpy float64 for numpy input).
    The formulas are :func:`poses.euler_to_matrix`'s.
    """
    if not isinstance(rot, torch.Tensor):
        return poses.euler_to_matrix(rot, tilt, psi, degrees=degrees)
    r, t, p = torch.broadcast_tensors(*(_as_tensor(v) for v in (rot, tilt, psi)))
    return poses.euler_to_matrix(r, t, p, degrees=degrees, xp=torch)


def matrix_to_euler(A: ArrayOrTensor, degrees: bool = True
                    ) -> Tuple[ArrayOrTensor, ArrayOrTensor, ArrayOrTensor]:
    """Inverse of :func:`euler_to_matrix`: (rot, tilt, psi) with tilt in [0, 180].

    For tilt = 0 or 180 only rot + psi (or rot - psi) is defined; rot is then set to 0.
    Input (..., 3, 3), numpy or tensor; returns a tuple of three arrays of shape (...).
    """
    if not isinstance(A, torch.Tensor):
        return poses.matrix_to_euler(A, degrees=degrees)
    return poses.matrix_to_euler(A, degrees=degrees, xp=torch)


ROTVEC_TAYLOR = 1e-6     # |v|^2 (rad^2) below which the Rodrigues coefficients use Taylor series


def rotvec_to_matrix(v: ArrayOrTensor) -> torch.Tensor:
    """Rodrigues matrices R(v) = exp([v]_x) of rotation vectors v (..., 3) radians, tensors.

    The tensor counterpart of :func:`poses.rotvec_to_matrix`:
    R = I + a [v]_x + b [v]_x^2 with a = sin(t)/t, b = (1 - cos t)/t^2 = 2 sin^2(t/2)/t^2,
    t = |v|, and their Taylor series near t = 0, so that R(0) is exactly I and the
    gradient is finite there (the pose head of the encoder starts at v = 0).
    """
    v = _as_tensor(v)
    t2 = (v * v).sum(-1)
    small = t2 < ROTVEC_TAYLOR
    t2s = torch.where(small, torch.ones_like(t2), t2)
    t = torch.sqrt(t2s)
    a = torch.where(small, 1.0 - t2 / 6.0, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24.0, 2.0 * torch.sin(0.5 * t) ** 2 / t2s)
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    K = torch.stack([torch.stack([o, -z, y], -1),
                     torch.stack([z, o, -x], -1),
                     torch.stack([-y, x, o], -1)], -2)
    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


def correct_rotations(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A R(v): RELION matrices A (..., 3, 3) corrected by rotation vectors v (..., 3)
    radians on the right, the side documented in ``poses`` (tensors, differentiable)."""
    return A @ rotvec_to_matrix(v.to(A.dtype))
