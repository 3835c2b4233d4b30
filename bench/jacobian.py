"""Benchmark of ``Decoder.render_ft_jacobian`` (the per-particle fit's Jacobian, nmaem infer):
the exact matrix-product Jacobian (``Renderer.render_ft_jvp``) against the forward
differences it replaced on that route (d + 3 renderings per particle).

Adenylate kinase (1,656 atoms), d random orthonormal modes, random poses and a CTF, the
matrix-product route. Each method runs ``--repeats`` times after one warm-up; the fastest
time is reported (the machine may be shared), with images per second counted as
particles (B) per second, and the relative L2 difference of the two Jacobians (the
forward differences' truncation error, about 1 %).

    OMP_NUM_THREADS=1 python bench/jacobian.py [--batch 32] [--modes 16] [--box 64]
                                               [--apix 3.0] [--threads 1] [--repeats 5]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nmaem_plugin import DATA_DIR  # noqa: E402
from nmaem_plugin.core.physics.ctf import CTFParams  # noqa: E402
from nmaem_plugin.core.physics.rotations import euler_to_matrix  # noqa: E402
from nmaem_plugin.core.learn.network import Decoder  # noqa: E402
from nmaem_plugin.core.physics.structure import read_model  # noqa: E402

AK = os.path.join(DATA_DIR, "ak_open_4ake.pdb")


def fastest(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--modes", type=int, default=16)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = read_model(AK)
    M, B, d = model.n_atoms, a.batch, a.modes
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3 * M, d)))
    dec = Decoder(model.elements, model.coords, q.T.reshape(d, M, 3), a.box, a.apix,
                  model.coords.mean(0), route="gemm")
    ang = rng.uniform([-180, 0, -180], [180, 180, 180], (B, 3))
    A = torch.tensor(euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]),
                     dtype=torch.float32)
    z = torch.tensor(rng.normal(0, 20.0, (B, d)), dtype=torch.float32)
    s = torch.tensor(rng.normal(0, 2.0, (B, 2)), dtype=torch.float32)
    ctf = dec.ctf(CTFParams(torch.full((B,), 9000.0), torch.full((B,), 8500.0),
                            torch.zeros(B), 300.0, 2.7, 0.1))
    with torch.no_grad():
        old = fastest(lambda: dec._render_ft_differences(z, A, s, ctf), a.repeats)
        new = fastest(lambda: dec.render_ft_jacobian(z, A, s, ctf), a.repeats)
        _, J0 = dec._render_ft_differences(z, A, s, ctf)
        _, J1 = dec.render_ft_jacobian(z, A, s, ctf)
    diff = float(torch.linalg.norm(J0 - J1) / torch.linalg.norm(J1))
    print("%d atoms, %d px, batch %d, d = %d, %d thread(s); %s"
          % (M, a.box, B, d, a.threads, dec.renderer().jvp_chunks(B, d).describe()))
    print("| method | s per batch | particles/s |")
    print("|---|---|---|")
    print("| forward differences ((d + 3) B renderings) | %.3f | %.1f |" % (old, B / old))
    print("| exact (render_ft_jvp) | %.3f | %.1f |" % (new, B / new))
    print("speed-up %.2fx; relative difference of the Jacobians %.2e" % (old / new, diff))


if __name__ == "__main__":
    main()
