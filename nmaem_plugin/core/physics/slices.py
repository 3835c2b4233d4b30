"""Projections of many conformations at once by the Fourier slice theorem (``ProjectionBank``).

A search that scores every particle against every conformation of a grid needs N x G
renderings; the renderer's cost is atoms x pixels for each. At a coarse band most of that
is waste: the projection's Fourier transform at the band's few frequencies is the 3D
structure factor on a plane through the origin (the slice theorem),

    F_image(k) = V(A[:2]^T q) exp(-2 pi i q . s) (-1)^(kx + ky),   q = k / (D apix),

with V(q) = sum_j f_j(|q|) exp(-2 pi i q . (r_j - c)) / apix^2 the structure factor of the
atoms r_j about the rotation centre c (the renderer's conventions, ``renderer.py``; the
sign factor puts the image centre at pixel D//2; s the shift). So V is computed once per
conformation, on a cubic grid of frequencies ``oversample`` times finer than the image's,
and each particle's rendering is read from it by trilinear interpolation: G volumes of
atoms x voxels, then N x G x (band frequencies x 8) reads, instead of N x G x atoms x
pixels.

V is tabulated about the conformations' mean centre r0, V(q) = exp(-2 pi i q . (r0 - c))
V0(q), so that V0 varies on the scale of 1 / (the molecule's radius) rather than of the
box: the interpolation's error is then that of a sinusoid with ``oversample`` x D apix /
radius samples per period (about 2 % of |V| for oversample 3 and a molecule filling half
the box; ``tests/core/test_slices.py`` measures it against the renderer).
"""
import math
from typing import Sequence

import numpy as np
import torch

from .structure import form_factor_table

__all__ = ["ProjectionBank", "OVERSAMPLE"]

OVERSAMPLE = 3
CONFORMATION_CHUNK = 8      # conformations per structure-factor product


class ProjectionBank:
    """The structure factors of ``conformations`` (G, M, 3) Angstrom (model frame, atoms
    named by ``elements`` (M,)) up to ``resolution`` Angstrom, for projections into a
    ``box`` of ``apix`` about the rotation ``centre`` (3,); :meth:`project` gives the
    rfft2 coefficients of the projections at chosen frequencies."""

    def __init__(self, elements: Sequence[str], conformations: torch.Tensor, box: int,
                 apix: float, centre: Sequence[float], resolution: float,
                 oversample: int = OVERSAMPLE) -> None:
        X = torch.as_tensor(conformations, dtype=torch.float64)
        device = X.device
        self.box, self.apix = int(box), float(apix)
        self.G = X.shape[0]
        L = self.box * self.apix
        self.step = 1.0 / (oversample * L)                 # 1/A between grid frequencies
        qmax = min(1.0 / float(resolution), 0.5 / self.apix)
        self.R = int(math.ceil(qmax / self.step)) + 2      # +2: the interpolation's corners
        n = torch.arange(-self.R, self.R + 1, dtype=torch.float64, device=device)
        self.n1 = len(n)
        q1 = n * self.step
        self.centre = torch.as_tensor(np.asarray(centre, dtype=np.float64), device=device)
        self.r0 = X.reshape(-1, 3).mean(0)
        names, a, b, index = form_factor_table(elements)
        q2 = (q1[:, None, None] ** 2 + q1[None, :, None] ** 2 + q1[None, None, :] ** 2)
        at = torch.as_tensor(a, device=device)[:, :, None, None, None]
        bt = torch.as_tensor(b, device=device)[:, :, None, None, None]
        ff = (at * torch.exp(-bt * q2 / 4.0)).sum(1) / self.apix ** 2       # (E, n, n, n)
        index = torch.as_tensor(index, device=device)
        # the sums in complex64 (the phases' arguments in float64): half the time of
        # complex128, far below the interpolation's error
        V = torch.zeros((self.G, self.n1, self.n1 * self.n1), dtype=torch.complex64,
                        device=device)
        for e in range(len(names)):
            P = X[:, index == e, :] - self.r0                              # (G, Me, 3)
            f = ff[e].reshape(self.n1, -1).to(torch.complex64)
            for s in range(0, self.G, CONFORMATION_CHUNK):
                Pc = P[s:s + CONFORMATION_CHUNK]
                E = torch.polar(torch.ones((), dtype=torch.float32, device=device),
                                ((-2.0 * math.pi) * Pc[..., None] * q1).float())  # (g, Me, 3, n)
                T = (E[:, :, 1, :, None] * E[:, :, 2, None, :]).reshape(Pc.shape[0],
                                                                         Pc.shape[1], -1)
                V[s:s + CONFORMATION_CHUNK] += torch.bmm(E[:, :, 0, :].transpose(1, 2), T) * f
        # (voxels, G): one read per corner gives every conformation's value
        self.table = V.reshape(self.G, -1).T.contiguous()

    def project(self, rotations: torch.Tensor, shifts: torch.Tensor, kx: torch.Tensor,
                ky: torch.Tensor) -> torch.Tensor:
        """(B, G, K) complex64: the rfft2 coefficients at integer frequencies (``kx``,
        ``ky``) (K,) of the B projections with ``rotations`` (B, 3, 3) (RELION matrices) and
        ``shifts`` (B, 2) Angstrom (the particle centre's displacement), for each of the G
        conformations (no CTF)."""
        dev = self.table.device
        A = torch.as_tensor(rotations, dtype=torch.float64, device=dev)
        s = torch.as_tensor(shifts, dtype=torch.float64, device=dev)
        kx = torch.as_tensor(kx, dtype=torch.float64, device=dev)
        ky = torch.as_tensor(ky, dtype=torch.float64, device=dev)
        L = self.box * self.apix
        q = (kx[None, :, None] * A[:, None, 0, :] + ky[None, :, None] * A[:, None, 1, :]) / L
        u = q / self.step + self.R                                     # (B, K, 3) voxels
        i0 = torch.floor(u)
        t = u - i0
        i0 = i0.long()
        if bool(((i0 < 0) | (i0 + 1 >= self.n1)).any()):
            raise ValueError("a frequency beyond the bank's resolution")
        B, K = u.shape[:2]
        out = torch.zeros((B, K, self.G), dtype=torch.complex64, device=dev)
        n = self.n1
        for cx in (0, 1):
            wx = t[..., 0] if cx else 1 - t[..., 0]
            for cy in (0, 1):
                wy = t[..., 1] if cy else 1 - t[..., 1]
                for cz in (0, 1):
                    wz = t[..., 2] if cz else 1 - t[..., 2]
                    flat = ((i0[..., 0] + cx) * n + (i0[..., 1] + cy)) * n + (i0[..., 2] + cz)
                    out += (wx * wy * wz).to(torch.float32)[..., None] * self.table[flat]
        phase = (-2.0 * math.pi * ((q * (self.r0 - self.centre)).sum(-1)
                                   + (kx * s[:, 0:1] + ky * s[:, 1:2]) / L)
                 + math.pi * (kx + ky))                               # (B, K)
        return (out * torch.polar(torch.ones_like(phase), phase).to(torch.complex64)[..., None]
                ).transpose(1, 2)
