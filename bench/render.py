"""Benchmark of the physics decoder: images per second of render + CTF + shift.

Adenylate kinase, all 1,656 heavy atoms, batch 64, at 64, 128 and 192 px: forward, and
forward + backward (gradients for coordinates and shifts, as in training). In the same run
a dense reference is timed: every Gaussian of every atom evaluated at every pixel in real
space (D^2 x 5M exponentials, what a direct implementation of the paper's Eq. 3 does),
then the same CTF and shift in Fourier space. The accuracy of both against a float64
evaluation of the band-limited definition is printed too.

    python bench/render.py [--device cpu|cuda] [--sizes 64 128 192] [--batch 64]

Prints a Markdown table (paste it into docs/benchmarks.md with the machine line).
"""
import argparse
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nmaem_plugin import DATA_DIR  # noqa: E402
from nmaem_plugin.core import imaging  # noqa: E402
from nmaem_plugin.core.structure import form_factor_table, read_model  # noqa: E402


class DenseRenderer:
    """Real-space reference: 4 pi sum_j sum_g a/b exp(-4 pi^2 r^2 / b) at pixel centres."""

    def __init__(self, elements, box, apix, centre, device, dtype=torch.float32):
        _, a, b, index = form_factor_table(elements)
        self.a = torch.as_tensor(a[index], dtype=dtype, device=device)       # (M, 5)
        self.b = torch.as_tensor(b[index], dtype=dtype, device=device)
        self.box, self.apix = box, apix
        self.centre = torch.as_tensor(centre, dtype=dtype, device=device)
        g = (torch.arange(box, dtype=dtype, device=device) - box // 2) * apix
        self.gx, self.gy = g, g
        self.grid = imaging.FourierGrid(box, apix, device=device, dtype=dtype)

    def render(self, coords, rotations, shifts, ctf):
        p = torch.matmul(coords - self.centre, rotations[:, :2, :].transpose(-1, -2))
        out = []
        for i in range(p.shape[0]):
            dx2 = (self.gx[None, :] - p[i, :, 0:1]) ** 2       # (M, D)
            dy2 = (self.gy[None, :] - p[i, :, 1:2]) ** 2
            r2 = dy2[:, :, None] + dx2[:, None, :]               # (M, D, D)
            img = 0
            for g in range(5):
                bg = self.b[:, g, None, None]
                img = img + (4 * math.pi * self.a[:, g, None, None] / bg
                             * torch.exp(-4 * math.pi ** 2 * r2 / bg)).sum(0)
            out.append(img)
        img = torch.stack(out)
        ft = imaging.phase_shift(torch.fft.rfft2(img), shifts, self.apix) * ctf
        return torch.fft.irfft2(ft, s=(self.box, self.box))


def timeit(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def machine():
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "%s, %d cores visible, torch %s, %d threads" % (cpu, os.cpu_count(), torch.__version__,
                                                         torch.get_num_threads())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dense-batch", type=int, default=2, help="images for the dense reference")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    model = read_model(os.path.join(DATA_DIR, "ak_open_4ake.pdb"))
    rng = np.random.default_rng(0)
    print("machine:", machine(), "| device:", dev)
    print("model: adenylate kinase, %d atoms; batch %d" % (model.n_atoms, args.batch))
    print()
    print("| box | apix | fast fwd img/s | fast fwd+bwd img/s | dense fwd img/s | "
          "dense fwd+bwd img/s | speed-up fwd / fwd+bwd | rel. L2 error fast / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for D in args.sizes:
        apix = 0.8 * 192 / D
        B = args.batch
        centre = np.full(3, (D // 2) * apix)
        coords = model.coords - model.coords.mean(0) + centre
        ang = rng.uniform([-180, 0, -180], [180, 180, 180], (B, 3))
        A = torch.as_tensor(imaging.euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]),
                            dtype=torch.float32, device=dev)
        X = torch.as_tensor(coords, dtype=torch.float32, device=dev).expand(B, -1, -1).contiguous()
        sh = torch.as_tensor(rng.normal(0, 2, (B, 2)), dtype=torch.float32, device=dev)
        fast = imaging.Renderer(model.elements, D, apix, centre=centre, device=dev)
        ctf = fast.ctf(defocus_u=torch.full((B,), 1.2e4, device=dev),
                       defocus_v=torch.full((B,), 1.1e4, device=dev),
                       defocus_angle=torch.full((B,), 30.0, device=dev), voltage=300.0,
                       cs=2.7, amp_contrast=0.1)
        dense = DenseRenderer(model.elements, D, apix, centre, dev)
        nd = args.dense_batch

        def fwd(r, n):
            with torch.no_grad():
                return r.render(X[:n], A[:n], sh[:n], ctf[:n])

        def fwdbwd(r, n):
            x = X[:n].clone().requires_grad_(True)
            s = sh[:n].clone().requires_grad_(True)
            r.render(x, A[:n], s, ctf[:n]).square().sum().backward()

        t_f = timeit(lambda: fwd(fast, B), args.repeats)
        t_fb = timeit(lambda: fwdbwd(fast, B), args.repeats)
        t_df = timeit(lambda: fwd(dense, nd), 1)
        t_dfb = timeit(lambda: fwdbwd(dense, nd), 1)
        # accuracy on the first image against float64 fast rendering of the definition
        ref = imaging.Renderer(model.elements, D, apix, centre=centre, device=dev,
                               dtype=torch.float64).render(X[:1].double(), A[:1].double(),
                                                           sh[:1].double(), ctf[:1].double())
        e_fast = (torch.linalg.norm(fwd(fast, 1).double() - ref) / torch.linalg.norm(ref)).item()
        e_dense = (torch.linalg.norm(fwd(dense, 1).double() - ref) / torch.linalg.norm(ref)).item()
        print("| %d | %.2f | %.0f | %.0f | %.2f | %.2f | %.0fx / %.0fx | %.1e / %.1e |"
              % (D, apix, B / t_f, B / t_fb, nd / t_df, nd / t_dfb,
                 (B / t_f) / (nd / t_df), (B / t_fb) / (nd / t_dfb), e_fast, e_dense),
              flush=True)
    print()
    print("fast: exact band-limited Fourier renderer (nmaem_plugin.core.imaging.Renderer); "
          "dense: real-space Gaussians at pixel centres (point-sampled, aliased); errors "
          "against the float64 band-limited image.")


if __name__ == "__main__":
    main()
