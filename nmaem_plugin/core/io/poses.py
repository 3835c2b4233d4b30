"""Pose conventions in numpy: RELION Euler angles <-> rotation matrices, cryoSPARC poses.

The one home of the project's rotation conventions (docs/conventions.md derives each one);
numpy only, so that reading particle files or converting Scipion particles does not load
torch. ``physics/rotations.py`` wraps these functions for tensors.

* ``euler_to_matrix(rot, tilt, psi)`` is RELION's ``Euler_angles2matrix``:
  A = Rz(psi) Ry(tilt) Rz(rot) with the *passive* elementary rotations
  Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]], Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]].
  A model point r (relative to the rotation centre) goes to A r, and the image is the
  projection of A r along z.
* cryoSPARC's ``alignments3D/pose`` is a rotation vector v; RELION's matrix of it is
  A = R(v)^T with R the Rodrigues matrix (``cryosparc_pose_to_matrix``; the evidence is in
  ``core/io/cryosparc.py``).
* A *pose correction* (``nmaem train --refine-pose``) is a rotation vector v (radians)
  composed on the right of the file's matrix: A_refined = A_file R(v)
  (:func:`correct_rotations`). R(v) turns the model about the rotation centre in the
  model's own frame, before the file's rotation: the frame in which a consensus
  refinement's error lives (it aligned one domain, so the error is a rotation of the
  model that depends on the conformation only, whatever the view: ``nmaem simulate
  --consensus-poses`` writes A_file = A_true R_c^T, and the ideal correction is R(v) =
  R_c for every particle of that conformation). A correction on the left (in the
  image's frame) would have to be A R_c A^T, a function of the view that the encoder,
  which sees the image but not the file's pose, cannot form (measured: docs/benchmarks.md).
"""
from typing import TYPE_CHECKING, Any, Tuple

import numpy as np

if TYPE_CHECKING:                   # hint-only: xp is numpy or torch, inputs any array-like
    from types import ModuleType

    from numpy.typing import ArrayLike

__all__ = ["euler_to_matrix", "matrix_to_euler", "rotvec_to_matrix",
           "cryosparc_pose_to_matrix", "correct_rotations", "matrix_to_rotvec",
           "rotation_angle_deg", "view_matrix", "VIEW_AXES", "EULER_EPS"]

EULER_EPS = 1e-6   # sin(tilt) below which tilt is 0 or 180 (gimbal lock)

# The fixed views of a model's thumbnails (``thumbnails.model_thumbnail``): the matrix A of the
# projection along a model axis, rows (image x, image y, projection axis), det +1.
VIEW_AXES = ("z", "y", "x")
_VIEWS = {"z": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),      # image (x, y): along z
          "y": ((1, 0, 0), (0, 0, 1), (0, -1, 0)),     # image (x, z): along y
          "x": ((0, 1, 0), (0, 0, 1), (1, 0, 0))}      # image (y, z): along x


def _rz(a, xp):
    c, s = xp.cos(a), xp.sin(a)
    o, z = xp.ones_like(a), xp.zeros_like(a)
    return xp.stack([xp.stack([c, s, z], -1),
                     xp.stack([-s, c, z], -1),
                     xp.stack([z, z, o], -1)], -2)


def _ry(b, xp):
    c, s = xp.cos(b), xp.sin(b)
    o, z = xp.ones_like(b), xp.zeros_like(b)
    return xp.stack([xp.stack([c, z, -s], -1),
                     xp.stack([z, o, z], -1),
                     xp.stack([s, z, c], -1)], -2)


def euler_to_matrix(rot: "ArrayLike", tilt: "ArrayLike", psi: "ArrayLike",
                    degrees: bool = True, xp: "ModuleType" = np) -> Any:
    """RELION's rotation matrix A for Euler angles (rot, tilt, psi); batched, (..., 3, 3).

    With the default ``xp=numpy`` the inputs are any array-likes and the result is float64;
    ``physics/rotations.py`` passes ``xp=torch`` with broadcast tensors (the same formulas, differentiable).
    """
    if xp is np:
        rot, tilt, psi = np.broadcast_arrays(
            *(np.asarray(v, dtype=np.float64) for v in (rot, tilt, psi)))
    if degrees:
        rot, tilt, psi = xp.deg2rad(rot), xp.deg2rad(tilt), xp.deg2rad(psi)
    return _rz(psi, xp) @ _ry(tilt, xp) @ _rz(rot, xp)


def matrix_to_euler(A: "ArrayLike", degrees: bool = True, xp: "ModuleType" = np) -> Tuple:
    """Inverse of :func:`euler_to_matrix`: (rot, tilt, psi) with tilt in [0, 180].

    For tilt = 0 or 180 only rot + psi (or rot - psi) is defined; rot is then set to 0.
    Input (..., 3, 3); returns a tuple of three arrays of shape (...) (float64 for numpy).
    """
    if xp is np:
        A = np.asarray(A, dtype=np.float64)
    sb = xp.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    cb = A[..., 2, 2]
    tilt = xp.arctan2(sb, cb)
    regular = sb > EULER_EPS
    rot = xp.where(regular, xp.arctan2(A[..., 2, 1], A[..., 2, 0]), xp.zeros_like(sb))
    psi_reg = xp.arctan2(A[..., 1, 2], -A[..., 0, 2])
    psi_up = xp.arctan2(-A[..., 1, 0], A[..., 0, 0])     # tilt = 0: A = Rz(psi + rot)
    psi_down = xp.arctan2(A[..., 1, 0], -A[..., 0, 0])   # tilt = 180
    psi = xp.where(regular, psi_reg, xp.where(cb > 0, psi_up, psi_down))
    out = (rot, tilt, psi)
    if degrees:
        out = tuple(xp.rad2deg(v) for v in out)
    return out


def rotvec_to_matrix(v: "ArrayLike") -> np.ndarray:
    """Rodrigues matrix R(v) = exp([v]_x) of rotation vectors v (..., 3), float64.

    R(v) @ x = x rotated by |v| radians about v/|v| (right-handed). RELION's A for a
    cryoSPARC pose v is R(v)^T (:func:`cryosparc_pose_to_matrix`).
    """
    v = np.asarray(v, dtype=np.float64)
    t = np.linalg.norm(v, axis=-1)
    safe = np.where(t > 0, t, 1.0)
    w = v / safe[..., None]
    K = np.zeros(v.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2] = -w[..., 2], w[..., 1]
    K[..., 1, 0], K[..., 1, 2] = w[..., 2], -w[..., 0]
    K[..., 2, 0], K[..., 2, 1] = -w[..., 1], w[..., 0]
    s, c = np.sin(t)[..., None, None], (1.0 - np.cos(t))[..., None, None]
    return np.eye(3) + s * K + c * (K @ K)


def cryosparc_pose_to_matrix(v: "ArrayLike") -> np.ndarray:
    """RELION's matrix A = R(v)^T of cryoSPARC rotation vectors v (..., 3)."""
    return np.swapaxes(rotvec_to_matrix(v), -1, -2)


def correct_rotations(A: "ArrayLike", v: "ArrayLike") -> np.ndarray:
    """The refined RELION matrices A R(v) of matrices A (..., 3, 3) and pose corrections v
    (..., 3) radians (module docstring: the correction acts in the model's frame)."""
    return np.asarray(A, dtype=np.float64) @ rotvec_to_matrix(v)


def matrix_to_rotvec(R: "ArrayLike") -> np.ndarray:
    """Rotation vectors v (..., 3) radians with R(v) = R, for rotations of angle < 180
    degrees (the inverse of :func:`rotvec_to_matrix` there)."""
    R = np.asarray(R, dtype=np.float64)
    w = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0],
                  R[..., 1, 0] - R[..., 0, 1]], -1) / 2.0          # sin(t) * axis
    s = np.linalg.norm(w, axis=-1)
    c = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    t = np.arctan2(s, c)
    scale = np.where(s > 1e-12, t / np.where(s > 1e-12, s, 1.0), 1.0)
    return w * scale[..., None]


def rotation_angle_deg(A: "ArrayLike", B: "ArrayLike") -> np.ndarray:
    """Angle (degrees) of the rotation A B^T between stacks of rotation matrices (...)."""
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    tr = np.einsum("...ij,...ij->...", A, B)
    return np.degrees(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def view_matrix(axis: str) -> np.ndarray:
    """A (3, 3) of the projection along a model axis ``"z"``, ``"y"`` or ``"x"``: the image's
    (x, y) are the model's (x, y), (x, z) and (y, z) respectively (a proper rotation)."""
    if axis not in _VIEWS:
        raise ValueError("unknown view %r (choose from %s)" % (axis, ", ".join(VIEW_AXES)))
    return np.array(_VIEWS[axis], dtype=np.float64)
