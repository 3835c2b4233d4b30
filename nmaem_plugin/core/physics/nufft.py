"""The renderer's fast route for many atoms (``nufft``): type-1 non-uniform FFTs (FINUFFT, CPU,
optional) of each element's atoms, with the adjoint transform as the backward pass."""
import importlib
import math
import threading
from typing import Callable, List, Tuple

import numpy as np
import torch

__all__ = ["nufft_available", "NufftPlans", "nufft_structure_factor", "NUFFT_CROSSOVER",
           "NUFFT_UPSAMPLING", "NUFFT_EPS"]


def nufft_available() -> bool:
    """Whether the optional FINUFFT package (``pip install finufft``, CPU) can be imported."""
    try:
        importlib.import_module("finufft")
    except ImportError:
        return False
    return True


NUFFT_CROSSOVER = 2e8                # M D^2 from which the NUFFT is faster (bench/render.py)
NUFFT_UPSAMPLING = 1.25           # FINUFFT's fine grid (1.25 D): faster than 2 D here
NUFFT_EPS = 3e-5                     # FINUFFT tolerance: images within ~1e-5, gradients ~2e-5


class NufftPlans:
    """FINUFFT type-1 plans of one renderer (2D, FFT order, sign -1): D x D modes for the
    forward pass, (D + 2) x (D + 2) for the adjoint of the backward pass (both gradients
    in one transform, ``_NufftStructureFactor``).

    Each plan is single-threaded; the images of a batch go to ``torch.get_num_threads()``
    worker threads, each with its own plans (FINUFFT's calls release the GIL). Measured on
    the shared 2-core machine: FINUFFT's own OpenMP threads next to torch's were 3.6x
    *slower* than one thread (docs/benchmarks.md), images in parallel threads are not.
    """

    def __init__(self, box: int, dtype: torch.dtype) -> None:
        cdt = "complex128" if dtype == torch.float64 else "complex64"
        self.real = np.float64 if dtype == torch.float64 else np.float32
        self.complex = np.dtype(cdt)
        self._kw = dict(eps=NUFFT_EPS, isign=-1, dtype=cdt, modeord=1,
                        upsampfac=NUFFT_UPSAMPLING, nthreads=1, debug=0, spread_debug=0)
        self.box = int(box)
        self._local = threading.local()
        self._pool, self._workers = None, 0
        self._grids = {}

    def plans(self) -> tuple:
        """This thread's (one-transform, two-transform) plans, made on first use."""
        p = getattr(self._local, "plans", None)
        if p is None:
            import finufft
            n = self.box + 2            # the adjoint's grid: frequencies -D/2-1 .. D/2
            p = self._local.plans = (finufft.Plan(1, (self.box, self.box), n_trans=1, **self._kw),
                                     finufft.Plan(1, (n, n), n_trans=1, **self._kw))
        return p

    def adjoint_grid(self, h: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where the half plane's entries (D, h) and their mirrors -k go on the adjoint's
        (D + 2)^2 grid (flat indices, each set unique), and (kx + i ky) / 2i at the
        frequencies the forward transform used (column D/2 is -D/2). Made once."""
        key = ("adjoint", int(h))
        if key not in self._grids:
            D, N = self.box, self.box + 2
            fy = np.rint(np.fft.fftfreq(D, 1.0 / D)).astype(np.int64)[:, None] \
                * np.ones(h, np.int64)
            fx = np.where(np.arange(h) < D // 2, np.arange(h), np.arange(h) - D)[None, :] \
                * np.ones((D, 1), np.int64)
            at = ((fy % N) * N + fx % N).ravel()
            mirror = (((-fy) % N) * N + (-fx) % N).ravel()
            self._grids[key] = (at, mirror, (fx + 1j * fy).astype(self.complex) / 2j)
        return self._grids[key]

    def each_image(self, fn: Callable[[int], None], n: int) -> None:
        """fn(b) for b = 0..n-1, in up to torch.get_num_threads() threads."""
        workers = min(int(n), max(1, torch.get_num_threads()))
        if workers <= 1:
            for b in range(n):
                fn(b)
            return
        if self._workers != workers:
            if self._pool is not None:
                self._pool.shutdown()
            from concurrent.futures import ThreadPoolExecutor
            self._pool, self._workers = ThreadPoolExecutor(workers), workers
        for f in [self._pool.submit(fn, b) for b in range(n)]:
            f.result()


def _wrapped_angles(x, D, real):
    """2 pi x / D wrapped into [0, 2 pi), as a contiguous numpy array (FINUFFT's points)."""
    a = torch.remainder(x.detach().double() * (2.0 * math.pi / D), 2.0 * math.pi)
    return np.ascontiguousarray(a.cpu().numpy().astype(real))


class _NufftStructureFactor(torch.autograd.Function):
    """F[b, ky, kx] = sum_e ff_e(k) sum_{j in e} exp(-2 pi i (kx u_j + ky v_j) / D) on the
    half plane kx = 0..h-1 (all ky, FFT order), as (B, D, h, 2) real/imaginary parts.

    A type-1 non-uniform FFT per image and element (FINUFFT, tolerance ``NUFFT_EPS``); the
    column kx = D/2 of the half plane is the transform's frequency -D/2 (FFT order). The
    backward pass is the adjoint: with G the gradient of F (real + i imaginary part) and
    c_k = ff_e(k) G_k, dL/du_j = -(2 pi / D) Im sum_k kx c_k exp(+2 pi i k.(u_j, v_j) / D),
    and the same with ky for v (k over the entries of the half plane, at the frequencies
    the forward pass used). Im sum_k a_k e^{ik.x} = sum over the full plane of d e^{ik.x}
    with d_k = a_k / 2i and d_-k = conj(a_k / 2i) (a Hermitian array: a real sum), so
    both gradients are the real and imaginary parts of ONE adjoint (type-2) transform of
    T = d^u + i d^v on a (D + 2)^2 grid, which holds every mirrored frequency (+-D/2).
    """

    @staticmethod
    def forward(ctx, u, v, ff_half, slices, plans):
        B = u.shape[0]
        E, D, h = ff_half.shape
        x = _wrapped_angles(u, D, plans.real)
        y = _wrapped_angles(v, D, plans.real)
        ff = ff_half.detach().cpu().numpy()
        out = np.zeros((B, D, h), dtype=plans.complex)

        def image(b):
            one, _ = plans.plans()
            for e, sl in enumerate(slices):
                if sl.stop == sl.start:
                    continue
                one.setpts(y[b, sl], x[b, sl])           # first axis: ky (rows)
                S = one.execute(np.ones(sl.stop - sl.start, dtype=plans.complex))
                out[b] += ff[e] * S[:, :h]

        plans.each_image(image, B)
        ctx.save_for_backward(u, v, ff_half)
        ctx.slices, ctx.plans, ctx.points = slices, plans, (x, y)
        return torch.view_as_real(torch.from_numpy(out)).to(device=u.device, dtype=u.dtype)

    @staticmethod
    def backward(ctx, gF):
        u, v, ff_half = ctx.saved_tensors
        plans = ctx.plans
        B = u.shape[0]
        E, D, h = ff_half.shape
        x, y = ctx.points                       # the forward pass's points
        ff = ff_half.detach().cpu().numpy()
        G = gF.detach().cpu().numpy().astype(plans.real)
        G = G[..., 0] + 1j * G[..., 1]                              # (B, D, h)
        at, mirror, kxy = plans.adjoint_grid(h)
        N = D + 2
        gu = np.zeros(u.shape, dtype=np.float64)
        gv = np.zeros(v.shape, dtype=np.float64)
        def image(b):
            _, adj = plans.plans()
            T = np.zeros(N * N, dtype=plans.complex)
            for e, sl in enumerate(ctx.slices):
                if sl.stop == sl.start:
                    continue
                fG = (ff[e] * G[b]).astype(plans.complex)
                T[:] = 0
                T[at] = (kxy * fG).ravel()                           # d^u + i d^v at k
                T[mirror] -= (kxy * np.conj(fG)).ravel()   # at -k: conj(fG / 2i) (kx + i ky)
                adj.setpts(y[b, sl], x[b, sl])
                H = adj.execute_adjoint(T.reshape(N, N))             # (M_e,)
                gu[b, sl] = H.real
                gv[b, sl] = H.imag

        plans.each_image(image, B)
        s = -2.0 * math.pi / D
        t = lambda a: torch.from_numpy(a * s).to(device=u.device, dtype=u.dtype)
        return t(gu), t(gv), None, None, None


def nufft_structure_factor(u: torch.Tensor, v: torch.Tensor, ff_half: torch.Tensor,
                           slices: List[slice], plans: NufftPlans) -> torch.Tensor:
    """The half-plane structure factor (B, D, h, 2) of :class:`_NufftStructureFactor`
    (differentiable in the image-plane positions ``u``, ``v`` (B, M) pixels)."""
    return _NufftStructureFactor.apply(u, v, ff_half, slices, plans)
