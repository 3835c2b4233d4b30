"""The 3D Coulomb potential of an atomic model on a map's grid (``model_map``): the map a
model predicts, with the form factors the renderer uses.

The map is band-limited exactly like :class:`renderer.Renderer`'s images (docs/imaging.md):
its Fourier transform is the continuous one, F(q) = sum_j f_j(|q|) exp(-2 pi i q.r_j),
sampled at the box's 3D DFT frequencies q = k / (D apix) with |k| < D/2 (a ball strictly
inside Nyquist), and inverse-transformed: V[n] = (1/(D apix)^3) sum_k F(q_k)
exp(2 pi i k.n / D). f_j is the electron form factor of atom j, sum_g a_g exp(-b_g |q|^2/4)
(International Tables C 4.3.2.2, ``structure.form_factor_table``), the 3D Fourier transform
of sum_g a_g (4 pi / b_g)^(3/2) exp(-4 pi^2 r^2 / b_g), so V approximates the potential in
the Angstrom units of gemmi's c4322 table. A B-factor B (A^2) adds B to every b_g
(exp(-B |q|^2 / 4), a Gaussian blur).

Grid: arrays ``[z, y, x]`` of D^3 voxels of ``apix`` Angstrom, voxel (D//2, D//2, D//2) at
``centre`` (default (D//2)*apix in x, y and z: the box centre of the consensus map the
poses refer to, RELION's map origin; docs/conventions.md). So the projection of V along z,
apix * sum_z V, is the renderer's image of the same model at the identity pose without CTF
(the central-slice theorem: the plane kz = 0 of F is the image's transform).

The structure factor is exact (no gridding): exp(-2 pi i k.u / D) is separable in x, y and
z, so per element and per slab of kz it is a complex matrix product (M atoms on the inner
dimension), in slabs that fit ``SLAB_BYTES``. Its cost grows as M D^3; numpy only.
"""
from typing import Optional, Sequence

import numpy as np

from .structure import form_factor_table

__all__ = ["model_map", "map_frame_positions", "SLAB_BYTES"]

# working memory of one slab of (atoms x kz x ky) phase factors
SLAB_BYTES = 64 << 20


def map_frame_positions(coords: np.ndarray, box: int, apix: float,
                        centre: Optional[Sequence[float]] = None) -> np.ndarray:
    """(M, 3) positions (x, y, z) of atoms in voxels from the array origin of a D^3 map of
    ``apix`` whose voxel D//2 is ``centre`` (default (D//2)*apix in x, y, z)."""
    D = int(box)
    c = np.full(3, (D // 2) * float(apix)) if centre is None else np.asarray(centre, float)
    return (np.asarray(coords, dtype=np.float64) - c) / float(apix) + D // 2


def model_map(coords: np.ndarray, elements: Sequence[str], box: int, apix: float,
              centre: Optional[Sequence[float]] = None, bfactor: float = 0.0,
              dtype: type = np.float32) -> np.ndarray:
    """The band-limited potential (D, D, D) ``[z, y, x]`` of atoms ``coords`` (M, 3)
    Angstrom of ``elements`` (M,) (see the module docstring); ``bfactor`` B >= 0 A^2
    blurs it by exp(-B q^2 / 4)."""
    D, apix = int(box), float(apix)
    if D < 2:
        raise ValueError("a map needs a box of at least 2 voxels (got %d)" % D)
    if bfactor < 0:
        raise ValueError("the B-factor must be >= 0 (got %g)" % bfactor)
    u = map_frame_positions(coords, D, apix, centre)
    names, a, b, index = form_factor_table(elements)
    K = D // 2 + 1
    k_full = np.fft.fftfreq(D, d=1.0 / D)                  # ky, kz: FFT order
    k_half = np.arange(K, dtype=np.float64)                 # kx: rfft half
    q2 = (k_full[:, None, None] ** 2 + k_full[None, :, None] ** 2
          + k_half[None, None, :] ** 2)                    # (kz, ky, kx) in index units^2
    inside = q2 < (D / 2.0) ** 2
    q2 = q2 / (D * apix) ** 2                               # 1/A^2
    F = np.zeros((D, D, K), dtype=np.complex128)
    w = -2j * np.pi / D
    for e in range(len(names)):
        rows = np.flatnonzero(index == e)
        if not len(rows):
            continue
        ue = u[rows]
        ex = np.exp(w * ue[:, 0:1] * k_half[None, :])      # (m, K)
        ey = np.exp(w * ue[:, 1:2] * k_full[None, :])      # (m, D)
        ez = np.exp(w * ue[:, 2:3] * k_full[None, :])      # (m, D)
        S = np.empty((D, D, K), dtype=np.complex128)
        slab = max(1, int(SLAB_BYTES // (16 * len(rows) * D)))
        for z0 in range(0, D, slab):
            z1 = min(D, z0 + slab)
            zy = ez[:, z0:z1, None] * ey[:, None, :]        # (m, s, D)
            S[z0:z1] = (zy.reshape(len(rows), -1).T @ ex).reshape(z1 - z0, D, K)
        ff = (a[e][:, None, None, None]
              * np.exp(-(b[e][:, None, None, None] + float(bfactor)) * q2[None] / 4.0)).sum(0)
        F += ff * S
    F *= inside
    vol = np.fft.irfftn(F, s=(D, D, D), axes=(0, 1, 2)) / apix ** 3
    return vol.astype(dtype)
