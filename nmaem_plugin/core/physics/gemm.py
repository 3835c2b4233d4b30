"""The renderer's exact route (``gemm``): the structure factor of the atoms on the DFT grid as
real matrix products of cos/sin tables, quarter plane by quarter plane, in chunks within the
memory budget (``chunks.Chunks``), with its own backward pass (``Renderer.projection_ft``
explains the sums; docs/imaging.md)."""
import math
from typing import Iterator, List, Tuple

import torch

from .chunks import Chunks

__all__ = ["phase_tables", "atom_chunks", "quarter_structure_factor", "assemble_quarters"]


def phase_tables(x: torch.Tensor, w: torch.Tensor, h: int) -> torch.Tensor:
    """cos and sin of x[..., None] * w side by side, (..., 2h)."""
    t = x[..., None] * w
    out = x.new_empty(*x.shape, 2 * h)
    torch.cos(t, out=out[..., :h])
    torch.sin(t, out=out[..., h:])
    return out


def atom_chunks(slices: List[slice], size: int) -> Iterator[Tuple[int, slice]]:
    """(element index, atom slice) pairs covering every element's slice in pieces of ``size``."""
    for e, sl in enumerate(slices):
        for s in range(sl.start, sl.stop, size):
            yield e, slice(s, min(sl.stop, s + size))


class _QuarterStructureFactor(torch.autograd.Function):
    """P[b] = sum_e ff_e * (L_e^T @ R_e), L = [cos ty | sin ty], R = [cos tx | sin tx].

    tx = -2 pi k u / D, ty = -2 pi k v / D for k = 0..h-1 (h = D/2), atoms sorted by
    element so that element e is the row slice ``slices[e]``. The sum runs over chunks of
    ``chunks.batch`` images and ``chunks.atoms`` atoms. With ``chunks.keep`` the tables of
    the whole batch are made once and kept for the backward pass; otherwise only the
    positions are kept and the backward pass recomputes each chunk's tables, so that the
    tables of one chunk only are in memory at any time. Either way the backward pass turns
    the gradient of P into position gradients with two more matrix products per chunk
    (exact: the same sums, in pieces).
    """

    @staticmethod
    def forward(ctx, u, v, k, ff_tiled, slices, chunks):
        h = k.shape[0]
        w = (-2.0 * math.pi / (2 * h)) * k
        B = u.shape[0]
        P = u.new_zeros(B, 2 * h, 2 * h)
        tables = (phase_tables(u, w, h), phase_tables(v, w, h)) if chunks.keep else None
        for bs, e, sl, right, left in _chunk_tables(u, v, w, h, slices, chunks, tables):
            term = torch.matmul(left.transpose(-1, -2), right)
            del left, right
            P[bs].addcmul_(term, ff_tiled[e])
            del term
        if chunks.keep:
            ctx.save_for_backward(u, v, w, ff_tiled, *tables)
        else:
            ctx.save_for_backward(u, v, w, ff_tiled)
        ctx.slices, ctx.chunks = slices, chunks
        return P

    @staticmethod
    def backward(ctx, gP):
        u, v, w, ff_tiled, *tables = ctx.saved_tensors
        h = w.shape[0]
        gu = torch.empty_like(u)
        gv = torch.empty_like(v)
        G = None
        for bs, e, sl, ri, le in _chunk_tables(u, v, w, h, ctx.slices, ctx.chunks,
                                               tables or None):
            if G is None or (bs, e) != G[:2]:
                G = (bs, e, gP[bs] * ff_tiled[e])
            # d cos(w u)/du = -w sin(w u), d sin(w u)/du = w cos(w u)
            g = torch.matmul(le, G[2])                                   # dL/dright
            t = g[..., h:] * ri[..., :h]
            t.addcmul_(g[..., :h], ri[..., h:], value=-1.0)
            gu[bs, sl] = torch.matmul(t, w)
            del g, t
            g = torch.matmul(ri, G[2].transpose(-1, -2))                 # dL/dleft
            t = g[..., h:] * le[..., :h]
            t.addcmul_(g[..., :h], le[..., h:], value=-1.0)
            gv[bs, sl] = torch.matmul(t, w)
            del g, t, le, ri
        return gu, gv, None, None, None, None


def _chunk_tables(u, v, w, h, slices, chunks, tables=None):
    """(image slice, element, atom slice, right table, left table) for every chunk, the
    tables sliced from ``tables`` (the whole batch's) or made for the chunk."""
    B = u.shape[0]
    for b0 in range(0, B, chunks.batch):
        bs = slice(b0, min(B, b0 + chunks.batch))
        for e, sl in atom_chunks(slices, chunks.atoms):
            if tables is not None:
                yield bs, e, sl, tables[0][bs, sl], tables[1][bs, sl]
            else:
                yield bs, e, sl, phase_tables(u[bs, sl], w, h), phase_tables(v[bs, sl], w, h)


def quarter_structure_factor(u: torch.Tensor, v: torch.Tensor, k: torch.Tensor,
                             ff_tiled: torch.Tensor, slices: List[slice], chunks: Chunks
                             ) -> torch.Tensor:
    """The quarter-plane sums P (B, 2h, 2h) of :class:`_QuarterStructureFactor`
    (differentiable in the image-plane positions ``u``, ``v`` (B, M) pixels)."""
    return _QuarterStructureFactor.apply(u, v, k, ff_tiled, slices, chunks)


def assemble_quarters(P: torch.Tensor, h: int) -> torch.Tensor:
    """The rfft2 grid (..., 2h, h + 1) complex from the quarter-plane sums P (..., 2h, 2h)
    = [[CC, CS], [SC, SS]] (``Renderer.projection_ft``): F(kx, +ky) = (CC - SS) + i (CS + SC),
    F(kx, -ky) = (CC + SS) + i (CS - SC); the row ky = -h and the column kx = h are zero."""
    CC, CS = P[..., :h, :h], P[..., :h, h:]
    SC, SS = P[..., h:, :h], P[..., h:, h:]
    re_pos, im_pos = CC - SS, CS + SC                    # ky = 0 .. h-1
    re_neg, im_neg = CC + SS, CS - SC                    # ky = 0 .. -(h-1)
    zero_row = P.new_zeros(*P.shape[:-2], 1, h)
    re = torch.cat([re_pos, zero_row, torch.flip(re_neg[..., 1:, :], dims=(-2,))], dim=-2)
    im = torch.cat([im_pos, zero_row, torch.flip(im_neg[..., 1:, :], dims=(-2,))], dim=-2)
    ft = torch.complex(re, im)                           # (..., D, h); kx = h is zero
    return torch.nn.functional.pad(ft, (0, 1))
