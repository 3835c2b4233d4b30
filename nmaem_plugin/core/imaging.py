"""Image formation: poses, projected Coulomb potential, CTF, shifts, cropping, noise.

Every convention of the project about poses and images lives here (docs/conventions.md
derives and cites each one):

* Poses follow RELION. ``euler_to_matrix(rot, tilt, psi)`` is RELION's
  ``Euler_angles2matrix``: A = Rz(psi) Ry(tilt) Rz(rot) with the *passive* elementary
  rotations Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]], Ry(b) = [[c, 0, -s], [0, 1, 0],
  [s, 0, c]]. A model point r (relative to the rotation centre) goes to A r, and the image
  is the projection of A r along z.
* The rotation centre is the centre of the consensus-map box, (D//2)*apix in x, y and z,
  for the particles' original box size D and pixel size apix.
* ``rlnOriginX/YAngst`` is the translation RELION applies to the particle image to centre
  it, so the particle centre sits at (image centre - origin): a rendered projection is
  translated by ``shift = -origin``. In this module ``shift`` (Angstrom, (x, y)) always
  means the displacement of the particle centre from the image centre.
* Images are arrays ``[..., y, x]`` whose centre is pixel (D//2, D//2); their Fourier
  transforms use ``torch.fft.rfft2`` layout ``[..., ky, kx]`` with kx = 0..D//2.
* The image is band-limited by definition: the Fourier transform of the continuous
  projection, F(q) = sum_j f_j(|q|) exp(-2 pi i q.r_j), sampled at the box's DFT
  frequencies q = k / (D apix) with |k| < D/2 (a disc strictly inside Nyquist), then
  inverse-transformed: I[n] = (1/(D apix)^2) sum_k F(q_k) exp(2 pi i k.n / D). f_j is the
  electron form factor of atom j, sum_g a_g exp(-b_g |q|^2 / 4) (the 2D Fourier transform
  of 4 pi sum_g a_g/b_g exp(-4 pi^2 r^2 / b_g)), so I approximates the projected potential
  (Angstrom units of gemmi's c4322 table) without point-sampling aliasing.
* The CTF is RELION's: -sin(gamma), positive (= amplitude contrast) at zero frequency, so
  protein density is white in the images.
"""
import math

import numpy as np
import torch

__all__ = ["euler_to_matrix", "matrix_to_euler", "electron_wavelength"]


# ----------------------------------------------------------------------------- poses

def _as_tensor(x, dtype=None, device=None):
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype or x.dtype, device=device or x.device)
    return torch.as_tensor(np.asarray(x), dtype=dtype or torch.float64, device=device)


def _rz(a):
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([torch.stack([c, s, z], -1),
                        torch.stack([-s, c, z], -1),
                        torch.stack([z, z, o], -1)], -2)


def _ry(b):
    c, s = torch.cos(b), torch.sin(b)
    o, z = torch.ones_like(b), torch.zeros_like(b)
    return torch.stack([torch.stack([c, z, -s], -1),
                        torch.stack([z, o, z], -1),
                        torch.stack([s, z, c], -1)], -2)


def euler_to_matrix(rot, tilt, psi, degrees=True):
    """RELION's rotation matrix A for Euler angles (rot, tilt, psi); batched, (..., 3, 3).

    Accepts numpy arrays or tensors; returns the same kind (numpy float64 for numpy input).
    """
    is_np = not isinstance(rot, torch.Tensor)
    r, t, p = (_as_tensor(v) for v in (rot, tilt, psi))
    r, t, p = torch.broadcast_tensors(r, t, p)
    if degrees:
        r, t, p = torch.deg2rad(r), torch.deg2rad(t), torch.deg2rad(p)
    A = _rz(p) @ _ry(t) @ _rz(r)
    return A.numpy() if is_np else A


def matrix_to_euler(A, degrees=True):
    """Inverse of :func:`euler_to_matrix`: (rot, tilt, psi) with tilt in [0, 180].

    For tilt = 0 or 180 only rot + psi (or rot - psi) is defined; rot is then set to 0.
    Input (..., 3, 3), numpy or tensor; returns a tuple of three arrays of shape (...).
    """
    is_np = not isinstance(A, torch.Tensor)
    A = _as_tensor(A)
    sb = torch.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    cb = A[..., 2, 2]
    tilt = torch.atan2(sb, cb)
    eps = 1e-6
    regular = sb > eps
    rot = torch.where(regular, torch.atan2(A[..., 2, 1], A[..., 2, 0]), torch.zeros_like(sb))
    psi_reg = torch.atan2(A[..., 1, 2], -A[..., 0, 2])
    psi_up = torch.atan2(-A[..., 1, 0], A[..., 0, 0])     # tilt = 0: A = Rz(psi + rot)
    psi_down = torch.atan2(A[..., 1, 0], -A[..., 0, 0])   # tilt = 180
    psi = torch.where(regular, psi_reg, torch.where(cb > 0, psi_up, psi_down))
    out = (rot, tilt, psi)
    if degrees:
        out = tuple(torch.rad2deg(v) for v in out)
    return tuple(v.numpy() for v in out) if is_np else out


# ----------------------------------------------------------------------------- optics

def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV.

    lambda = h / sqrt(2 m0 e V (1 + e V / (2 m0 c^2))) = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))
    with V in volts (the same constants as RELION's CTF).
    """
    v = voltage_kv * 1e3
    if isinstance(v, torch.Tensor):
        return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))
