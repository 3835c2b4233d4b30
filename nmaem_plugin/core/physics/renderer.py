"""Image formation: the projected Coulomb potential of atoms, with CTF and shift (``Renderer``).

Every convention of the project about poses and images (docs/conventions.md derives and cites
each one):

* Poses follow RELION (``io/poses.py``, numpy; ``rotations.py`` for tensors): the rotation
  matrix A of a particle takes a model point r (relative to the rotation centre) to A r, and the
  image is the projection of A r along z.
* The rotation centre is the centre of the consensus-map box, (D//2)*apix in x, y and z,
  for the particles' original box size D and pixel size apix.
* ``rlnOriginX/YAngst`` is the translation RELION applies to the particle image to centre
  it, so the particle centre sits at (image centre - origin): a rendered projection is
  translated by ``shift = -origin``. Here ``shift`` (Angstrom, (x, y)) always
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
* The CTF is RELION's (``ctf.py``): -sin(gamma), positive (= amplitude contrast) at zero
  frequency, so protein density is white in the images.

The structure factor has two routes: exact matrix products (``gemm.py``) and type-1 NUFFTs
(``nufft.py``), chosen by :func:`choose_route`; both work in chunks within a memory budget
(``chunks.py``).
"""
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..base.choices import RENDER_ROUTES
from ..base.errors import NmaemError
from .chunks import (JVP_GROUP, JVP_WORK, JVP_WORK_GPU, Chunks, Device, default_memory_budget,
                     gemm_chunks, jvp_chunks)
from .ctf import ctf_params
from .fourier import FourierGrid
from .gemm import assemble_quarters, atom_chunks, phase_tables, quarter_structure_factor
from .nufft import NUFFT_CROSSOVER, NufftPlans, nufft_available, nufft_structure_factor

__all__ = ["Renderer", "choose_route"]


def choose_route(n_atoms: int, box: int, device: Device, dtype: torch.dtype = torch.float32
                 ) -> str:
    """The faster structure-factor route for ``n_atoms`` atoms at ``box`` px on ``device``.

    The type-1 NUFFT (FINUFFT: CPU, float32, when installed) once the matrix products'
    cost, which grows as M D^2, exceeds ``NUFFT_CROSSOVER`` (measured with bench/render.py,
    docs/benchmarks.md; the NUFFT's cost grows as M + D^2 log D); the exact matrix products
    otherwise, and always in float64 (the reference precision).
    """
    if (torch.device(device).type != "cpu" or dtype != torch.float32
            or not nufft_available()):
        return "gemm"
    return "nufft" if int(n_atoms) * int(box) ** 2 >= NUFFT_CROSSOVER else "gemm"


class Renderer:
    """Batched, differentiable projection of atoms with CTF and shift (CPU or CUDA).

    ``elements`` (M,) names the atoms' elements (their rows in the form-factor table);
    ``box``/``apix`` give the rendered image; ``centre`` (3,) Angstrom is the rotation
    centre in the model frame, by default (box0//2)*apix0 for the box and pixel size of the
    consensus map (``box0``/``apix0``, default the rendered ones).

    The Fourier transform of the projection is computed exactly on the DFT grid: per
    element e, S_e[ky, kx] = sum_j exp(-2 pi i ky v_j / D) exp(-2 pi i kx u_j / D) is a
    (D x M_e) @ (M_e x K) complex matrix product (the phase factor is separable in x and
    y), and F = sum_e f_e(|q|) S_e. The cost is independent of the atoms' widths and there
    is no aliasing; see docs/imaging.md.
    """

    def __init__(self, elements: Sequence[str], box: int, apix: float,
                 centre: Optional[Sequence[float]] = None, box0: Optional[int] = None,
                 apix0: Optional[float] = None, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, memory_budget: Optional[int] = None,
                 route: str = "auto"):
        from .structure import form_factor_table
        if route not in RENDER_ROUTES:
            raise ValueError("unknown renderer route %r (choose from %s)"
                             % (route, ", ".join(RENDER_ROUTES)))
        self.grid = FourierGrid(box, apix, device=device, dtype=dtype)
        self.box, self.apix = self.grid.box, self.grid.apix
        self.device, self.dtype = self.grid.device, dtype
        names, a, b, index = form_factor_table(elements)
        self.element_names = names
        order = np.argsort(index, kind="stable")
        self.order = torch.as_tensor(order, device=self.device)
        counts = np.bincount(index, minlength=len(names))
        self.slices = []
        start = 0
        for c in counts:
            self.slices.append(slice(start, start + int(c)))
            start += int(c)
        if centre is None:
            b0 = self.box if box0 is None else int(box0)
            a0 = self.apix if apix0 is None else float(apix0)
            centre = [(b0 // 2) * a0] * 3
        self.centre = torch.as_tensor(np.asarray(centre, dtype=np.float64), dtype=dtype,
                                      device=self.device)
        # Form factor of each element, f_e(q) = sum_g a_g exp(-b_g q^2 / 4), on the quarter
        # grid ky, kx = 0..h-1 (all that projection_ft uses: f is radial, the other
        # quadrants follow by symmetry), zero outside the disc |k| < D/2, divided by apix^2
        # (I[n] = (1/(D apix)^2) sum_k F e^{2 pi i k.n/D} = irfft2(F) / apix^2) and tiled
        # 2 x 2 for the cos/sin blocks.
        h = self.box // 2
        k = torch.arange(h, device=self.device, dtype=torch.float64)
        k2 = k[:, None] ** 2 + k[None, :] ** 2
        q2 = k2 / (self.box * self.apix) ** 2
        at = torch.as_tensor(a, device=self.device)[:, :, None, None]
        bt = torch.as_tensor(b, device=self.device)[:, :, None, None]
        quarter = (at * torch.exp(-bt * q2 / 4.0)).sum(1) * (k2 < (self.box / 2.0) ** 2)
        quarter = quarter / self.apix ** 2
        self._ff_tiled = quarter.to(dtype).repeat(1, 2, 2).contiguous()
        self._k_half = k.to(dtype)
        self.n_atoms = len(order)
        self.memory_budget = (default_memory_budget(self.device) if memory_budget is None
                              else max(1, int(memory_budget)))
        self.route = route
        self._ff_half = None        # the NUFFT route's form factors, made when first used
        self._plans = None

    def chunks(self, n_images: int) -> Chunks:
        """The route and chunk sizes used for a batch of ``n_images`` (see :func:`gemm_chunks`)."""
        route = self.route
        if route == "auto":
            route = choose_route(self.n_atoms, self.box, self.device, self.dtype)
        if route == "nufft":
            if not nufft_available():
                raise NmaemError("--renderer nufft needs the optional FINUFFT package (pip "
                                 "install finufft); use --renderer auto or gemm")
            if self.device.type != "cpu":
                raise NmaemError("--renderer nufft runs on the CPU only, not on %s; use "
                                 "--renderer auto or gemm" % self.device)
            # per image: the result, its gradient and FINUFFT's upsampled grid (2D x 2D)
            itemsize = torch.finfo(self.dtype).bits // 8
            work = n_images * 4 * self.box * self.box * itemsize + 24 * self.box ** 2 * itemsize
            return Chunks("nufft", max(1, int(n_images)), self.n_atoms, int(work))
        itemsize = torch.finfo(self.dtype).bits // 8
        return gemm_chunks(n_images, self.n_atoms, self.box, self.memory_budget, itemsize)

    def _nufft_form_factors(self):
        """(E, D, h) form factors on the half plane kx = 0..h-1, ky in FFT order."""
        if self._ff_half is None:
            h = self.box // 2
            quarter = self._ff_tiled[:, :h, :h]
            ky = torch.fft.fftfreq(self.box, d=1.0 / self.box).abs().long().clamp(max=h - 1)
            ff = quarter[:, ky, :].clone()
            ff[:, h, :] = 0                 # ky = -D/2: outside the disc
            self._ff_half = ff.contiguous()
            self._plans = NufftPlans(self.box, self.dtype)
        return self._ff_half

    def positions(self, coords: torch.Tensor, rotations: torch.Tensor,
                  shifts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image-plane positions in pixels from the array origin, (B, M, 2) (u = x, v = y).

        ``coords`` (M, 3) or (B, M, 3) Angstrom in the model frame, ``rotations`` (B, 3, 3)
        RELION matrices, ``shifts`` (B, 2) Angstrom displacement of the particle centre.
        """
        r = coords - self.centre
        p = torch.matmul(r, rotations[:, :2, :].transpose(-1, -2))      # (B, M, 2)
        if shifts is not None:
            p = p + shifts[:, None, :]
        return p / self.apix + float(self.box // 2)

    def projection_ft(self, coords: torch.Tensor, rotations: torch.Tensor,
                      shifts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rfft2 of the band-limited projection, (B, D, D//2+1) complex (CTF not applied).

        With tx = -2 pi kx u / D and ty = -2 pi ky v / D, exp(i(tx + ty)) splits into
        cos/sin products. Because cos is even and sin odd in ky, the four real sums
        CC = sum cos(ty) cos(tx), CS = sum cos(ty) sin(tx), SC = sum sin(ty) cos(tx),
        SS = sum sin(ty) sin(tx) over ky >= 0 give both half planes:
        F(kx, +ky) = (CC - SS) + i (CS + SC) and F(kx, -ky) = (CC + SS) + i (CS - SC).
        One real matrix product per element yields all four: half the arithmetic of a
        complex product over the whole rfft grid. Frequencies outside the disc |k| < D/2
        (the Nyquist row and column included) are zero.
        """
        coords = coords.to(dtype=self.dtype)
        uv = self.positions(coords[..., self.order, :], rotations.to(self.dtype),
                            None if shifts is None else shifts.to(self.dtype))
        h = self.box // 2
        chunks = self.chunks(uv.shape[0])
        if chunks.route == "nufft":
            F = nufft_structure_factor(uv[..., 0], uv[..., 1], self._nufft_form_factors(),
                                       self.slices, self._plans)
            return torch.nn.functional.pad(torch.complex(F[..., 0], F[..., 1]), (0, 1))
        P = quarter_structure_factor(uv[..., 0], uv[..., 1], self._k_half,
                                     self._ff_tiled, self.slices, chunks)
        return assemble_quarters(P, h)

    def ctf(self, *args, **kwargs) -> torch.Tensor:
        """CTF (B, D, K) on this renderer's grid: ``ctf(params)`` with a :class:`CTFParams`,
        or ``ctf(defocus_u, defocus_v, defocus_angle, voltage, cs, amp_contrast,
        phase_shift=0.0, bfactor=0.0)`` (see :func:`ctf_2d` for the units)."""
        return self.grid.ctf(ctf_params(args, kwargs))

    def render_ft(self, coords: torch.Tensor, rotations: torch.Tensor,
                  shifts: Optional[torch.Tensor] = None,
                  ctf: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rfft2 of the rendered images: projection, times the CTF (B, D, K) when given."""
        ft = self.projection_ft(coords, rotations, shifts)
        if ctf is not None:
            ft = ft * ctf
        return ft

    def jvp_chunks(self, n_images: int, n_tangents: int) -> Chunks:
        """The chunks of :meth:`render_ft_jvp` for a batch of ``n_images`` and
        ``n_tangents`` tangents (see :func:`jvp_chunks`)."""
        itemsize = torch.finfo(self.dtype).bits // 8
        return jvp_chunks(n_images, self.n_atoms, n_tangents, self.box, self.memory_budget,
                          itemsize, self._jvp_work())

    def _jvp_work(self) -> int:
        """Bytes of one weighted table of :meth:`render_ft_jvp`: ``JVP_WORK`` on a CPU,
        up to ``JVP_WORK_GPU`` (a quarter of the budget at most) on a GPU."""
        if self.device.type == "cpu":
            return JVP_WORK
        return max(JVP_WORK, min(JVP_WORK_GPU, self.memory_budget // 4))

    def render_ft_jvp(self, coords: torch.Tensor, rotations: torch.Tensor,
                      shifts: Optional[torch.Tensor] = None,
                      ctf: Optional[torch.Tensor] = None,
                      tangents: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(F, J): :meth:`render_ft` (B, D, K) complex and its exact derivatives
        (T + 2, B, D, K): along each of the T ``tangents`` of the atoms, then with respect
        to the shift's x and y (per Angstrom). No gradients (autograd is not used).

        ``coords``, ``rotations``, ``shifts``, ``ctf`` as in :meth:`render_ft`; ``tangents``
        (T, M, 3), or (T, B, M, 3) per image, are displacements of the atoms in the model
        frame, Angstrom per unit of each parameter (e.g. the normal modes, for derivatives
        per Angstrom of amplitude), in the order of ``coords``; None: T = 0.

        Always the matrix-product route, whatever ``route`` (exact; on a NUFFT renderer F
        differs from :meth:`render_ft` by the NUFFT's error). A tangent moves atom j in the
        image plane by (du_j, dv_j) = A[:2] U_j / apix pixels, and with
        e_j(k) = exp(-2 pi i (kx u_j + ky v_j) / D) the derivative of F is
        -2 pi i / D (kx G_u + ky G_v) times the CTF, where G_u = sum_j f_j du_j e_j and
        G_v likewise are the structure factor with the atoms weighted by du and dv: the same
        cos/sin tables as F, each weighted sum one more matrix product (2T in all, grouped
        ``JVP_GROUP`` at a time). A shift moves every atom by 1/apix pixels: its derivative
        is -2 pi i kx / (D apix) F (and ky for y). Chunks of images and atoms within the
        memory budget (:func:`jvp_chunks`); the sums are the same, in pieces.
        """
        D, h = self.box, self.box // 2
        with torch.no_grad():
            coords = coords.to(dtype=self.dtype)
            A = rotations.to(self.dtype)
            uv = self.positions(coords[..., self.order, :], A,
                                None if shifts is None else shifts.to(self.dtype))
            B = uv.shape[0]
            if tangents is None:
                tangents = coords.new_zeros(0, self.n_atoms, 3)
            U = tangents.to(dtype=self.dtype)[..., self.order, :]
            T = U.shape[0]
            per_image = U.dim() == 4
            A2 = A[:, :2, :] / self.apix                              # (B, 2, 3)
            w = (-2.0 * math.pi / D) * self._k_half
            kx, ky = self.grid.kx, self.grid.ky
            cdtype = torch.complex128 if self.dtype == torch.float64 else torch.complex64
            F = torch.zeros(B, D, h + 1, dtype=cdtype, device=self.device)
            J = torch.zeros(T + 2, B, D, h + 1, dtype=cdtype, device=self.device)
            chunks, work = self.jvp_chunks(B, T), self._jvp_work()
            group = max(1, min(JVP_GROUP, 2 * T))
            for b0 in range(0, B, chunks.batch):
                bs = slice(b0, min(B, b0 + chunks.batch))
                b = bs.stop - bs.start
                P = uv.new_zeros(b, D, D)
                # the weighted sums, side by side: weight s < T is du of tangent s, s >= T
                # is dv of tangent s - T
                Q = uv.new_zeros(b, D, 2 * T, D)
                for e, sl in atom_chunks(self.slices, chunks.atoms):
                    right = phase_tables(uv[bs, sl, 0], w, h)       # (b, m, D)
                    left = phase_tables(uv[bs, sl, 1], w, h).transpose(-1, -2)
                    ff = self._ff_tiled[e]
                    P.addcmul_(torch.matmul(left, right), ff)
                    if not T:
                        continue
                    m = sl.stop - sl.start
                    if per_image:
                        W = torch.einsum("tbmc,bac->bmat", U[:, bs, sl], A2[bs])
                    else:
                        W = torch.einsum("tmc,bac->bmat", U[:, sl], A2[bs])
                    W = W.reshape(b, m, 2 * T)                        # pixels per unit
                    # images n at a time, so that the weighted table stays in the cache
                    n = max(1, min(b, work // (m * group * D * uv.element_size())))
                    for i0 in range(0, b, n):
                        rows = slice(i0, min(b, i0 + n))
                        for g0 in range(0, 2 * T, group):
                            g1 = min(2 * T, g0 + group)
                            wr = W[rows, :, g0:g1, None] * right[rows, :, None, :]
                            term = torch.matmul(left[rows], wr.view(-1, m, (g1 - g0) * D))
                            Q[rows, :, g0:g1].addcmul_(term.view(-1, D, g1 - g0, D),
                                                     ff[:, None, :])
                            del wr, term
                Fb = assemble_quarters(P, h)
                del P
                cb = None                                   # the chunk's CTF
                if ctf is not None:
                    cb = ctf[bs] if ctf.dim() == 3 and ctf.shape[0] == B else ctf
                    Fb = Fb * cb
                F[bs] = Fb
                c = -2j * math.pi / (D * self.apix)
                J[T, bs] = (c * kx) * Fb
                J[T + 1, bs] = (c * ky) * Fb
                for t in range(T):
                    dF = (kx * assemble_quarters(Q[:, :, t], h)
                          + ky * assemble_quarters(Q[:, :, T + t], h)) * (-2j * math.pi / D)
                    if cb is not None:
                        dF = dF * cb
                    J[t, bs] = dF
                del Q
        return F, J

    def render(self, coords: torch.Tensor, rotations: torch.Tensor,
               shifts: Optional[torch.Tensor] = None,
               ctf: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rendered images (B, D, D), arrays [y, x]."""
        return torch.fft.irfft2(self.render_ft(coords, rotations, shifts, ctf),
                                s=(self.box, self.box))
