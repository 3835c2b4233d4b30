"""Benchmark of the physics decoder: images per second of render + CTF + shift, per route.

Models: adenylate kinase (1,656 heavy atoms) and copies of it on a 40 A lattice
(``structure.tile_model``: 27 copies = 44,712 atoms, 90 copies = 149,040 atoms). For each
number of atoms, box and route, in a fresh process (so that its peak memory is its own):
forward + backward images per second (gradients for coordinates and shifts, as in
training), the process's peak resident memory (VmHWM) and the growth of the resident memory
during the timed renders, and the relative L2 error of the first image against a float64
evaluation of the band-limited definition (the exact matrix-product route in float64).
Routes: ``gemm`` (cos/sin matrix products in chunks within ``--memory-budget``), ``nufft``
(FINUFFT, when installed), ``dense`` (every Gaussian of every atom at every pixel in real
space, then CTF and shift in Fourier space: what a direct implementation of the paper's
Eq. 3 does; only for small models).

    python bench/render.py [--atoms 1656 44712 149040] [--sizes 128 256] [--batch 8]
                           [--routes gemm nufft] [--device cpu|cuda] [--memory-budget GIB]

Prints a Markdown table (paste it into docs/benchmarks.md with the machine line).
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nmaem_plugin import DATA_DIR  # noqa: E402
from nmaem_plugin.core.physics.chunks import Chunks, parse_memory_budget  # noqa: E402
from nmaem_plugin.core.physics.ctf import CTFParams  # noqa: E402
from nmaem_plugin.core.physics.fourier import FourierGrid, phase_shift  # noqa: E402
from nmaem_plugin.core.physics.nufft import NUFFT_EPS, NUFFT_UPSAMPLING, nufft_available  # noqa: E402
from nmaem_plugin.core.physics.renderer import Renderer  # noqa: E402
from nmaem_plugin.core.physics.rotations import euler_to_matrix  # noqa: E402
from nmaem_plugin.core.physics.structure import form_factor_table, read_model, tile_model  # noqa: E402

AK = os.path.join(DATA_DIR, "ak_open_4ake.pdb")


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

    def chunks(self, n):
        return Chunks("dense", 1, len(self.a), 0)

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
        ft = phase_shift(torch.fft.rfft2(img), shifts, self.apix) * ctf
        return torch.fft.irfft2(ft, s=(self.box, self.box))


def machine():
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        cpu += "; GPU " + torch.cuda.get_device_name(0)
    return "%s, %d cores visible, torch %s, %d threads" % (cpu, os.cpu_count(), torch.__version__,
                                                         torch.get_num_threads())


def kib(key):
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0])


def model_of(n_atoms):
    """Adenylate kinase or copies of it: exactly ``n_atoms`` heavy atoms (a multiple of 1,656)."""
    ak = read_model(AK)
    copies = int(n_atoms) // ak.n_atoms
    if copies * ak.n_atoms != int(n_atoms) or copies < 1:
        raise SystemExit("--atoms must be multiples of %d (adenylate kinase copies)" % ak.n_atoms)
    return ak if copies == 1 else tile_model(ak, copies, spacing=40.0)[0]


def one(args):
    """One (atoms, box, route) case in this process: a JSON line."""
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model = model_of(args.one_atoms)
    D, route, B = args.one_size, args.one_route, args.batch
    apix = 0.8 * 256 / D                     # the same field of view (205 A) at every size
    centre = np.full(3, (D // 2) * apix)
    coords = model.coords - model.coords.mean(0) + centre
    rng = np.random.default_rng(0)
    ang = rng.uniform([-180, 0, -180], [180, 180, 180], (B, 3))
    A = torch.as_tensor(euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]),
                        dtype=torch.float32, device=dev)
    X = torch.as_tensor(coords, dtype=torch.float32, device=dev).expand(B, -1, -1).contiguous()
    sh = torch.as_tensor(rng.normal(0, 2, (B, 2)), dtype=torch.float32, device=dev)
    budget = parse_memory_budget(args.memory_budget)
    if route == "dense":
        r = DenseRenderer(model.elements, D, apix, centre, dev)
    else:
        r = Renderer(model.elements, D, apix, centre=centre, device=dev,
                     memory_budget=budget, route=route)
    grid = FourierGrid(D, apix, device=dev)
    ctf = CTFParams(defocus_u=torch.full((B,), 1.2e4, device=dev),
                    defocus_v=torch.full((B,), 1.1e4, device=dev),
                    defocus_angle=torch.full((B,), 30.0, device=dev), voltage=300.0,
                    cs=2.7, amp_contrast=0.1).image(grid.fx, grid.fy)
    n = 1 if route == "dense" else B

    def fwdbwd():
        x = X[:n].clone().requires_grad_(True)
        s = sh[:n].clone().requires_grad_(True)
        r.render(x, A[:n], s, ctf[:n]).square().sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    fwdbwd()                                  # warm-up (plans, caches)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    before = kib("VmRSS")
    best = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        fwdbwd()
        best = min(best, time.perf_counter() - t)
    grown = kib("VmHWM") - before
    with torch.no_grad():
        img = r.render(X[:1], A[:1], sh[:1], ctf[:1]).double()
    ref = Renderer(model.elements, D, apix, centre=centre, device=dev,
                   dtype=torch.float64, route="gemm", memory_budget=budget)
    with torch.no_grad():
        ref = ref.render(X[:1].double(), A[:1].double(), sh[:1].double(), ctf[:1].double())
    err = (torch.linalg.norm(img - ref) / torch.linalg.norm(ref)).item()
    out = dict(atoms=int(model.n_atoms), box=D, apix=apix, route=route,
               chunks=r.chunks(n).describe(), img_s=n / best, peak_gib=kib("VmHWM") / 2 ** 20,
               grown_gib=grown / 2 ** 20, error=err)
    if dev.type == "cuda":
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    print(json.dumps(out), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--atoms", type=int, nargs="+", default=[1656, 44712, 149040])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--routes", nargs="+", default=["gemm", "nufft"],
                   choices=["gemm", "nufft", "dense"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-budget", default=None, metavar="GIB",
                   help="the renderer's budget (default: the device's)")
    p.add_argument("--one-atoms", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one-route", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_route:
        return one(args)
    torch.set_num_threads(args.threads)
    print("machine:", machine(), "| device:", args.device)
    print("batch %d, forward + backward, best of %d; one process per line"
          % (args.batch, args.repeats))
    print()
    print("| atoms | box | route | chunks | img/s fwd+bwd | peak RSS GiB (growth) | "
          "rel. L2 error vs float64 |")
    print("|---|---|---|---|---|---|---|")
    for M in args.atoms:
        for D in args.sizes:
            for route in args.routes:
                if route == "nufft" and not nufft_available():
                    print("| %d | %d | nufft | FINUFFT not installed | | | |" % (M, D))
                    continue
                if route == "dense" and M * D * D > 2e8:
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--one-atoms", str(M),
                       "--one-size", str(D), "--one-route", route, "--batch", str(args.batch),
                       "--repeats", str(args.repeats), "--threads", str(args.threads),
                       "--device", args.device]
                if args.memory_budget is not None:
                    cmd += ["--memory-budget", str(args.memory_budget)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print("| %d | %d | %s | failed: %s | | | |"
                          % (M, D, route, res.stderr.strip().splitlines()[-1:]), flush=True)
                    continue
                o = json.loads(res.stdout.strip().splitlines()[-1])
                gpu = " (GPU %.2f GiB)" % o["gpu_peak_gib"] if "gpu_peak_gib" in o else ""
                print("| %d | %d | %s | %s | %.2f | %.2f (+%.2f)%s | %.1e |"
                      % (o["atoms"], D, route, o["chunks"].split(", ", 1)[1], o["img_s"],
                         o["peak_gib"], o["grown_gib"], gpu, o["error"]), flush=True)
    print()
    print("gemm: exact cos/sin matrix products in chunks; nufft: FINUFFT type 1 "
          "(tolerance %g, grid %.2f D); dense: real-space Gaussians at pixel centres "
          "(point-sampled, aliased). Field of view 205 A (apix 0.8 A at 256 px)."
          % (NUFFT_EPS, NUFFT_UPSAMPLING))


if __name__ == "__main__":
    main()
