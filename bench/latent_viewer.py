"""Benchmark: the latent landscape figure (core.latent_landscape, as the Scipion
latent viewer and ``nmaem report`` draw it) for 1,000,000 synthetic particles with
d = 16, drawn and saved to PNG. Target: under 10 s.

    python bench/latent_viewer.py [--n 1000000] [--d 16] [--frames] [-o latent.png]
"""
import argparse
import os
import tempfile
import time

import matplotlib
matplotlib.use("Agg")

import numpy as np  # noqa: E402

from nmaem_plugin.core.base.figures import save  # noqa: E402
from nmaem_plugin.core.report.figures import latent_landscape  # noqa: E402


def synthetic(n, d, seed=0):
    """Three populations along a mixed direction (as a discontinuous trajectory gives),
    isotropic noise on the other directions; ground-truth frames 0..49."""
    rng = np.random.default_rng(seed)
    frames = rng.choice(50, size=n, p=np.r_[np.full(20, 0.6 / 20), np.full(15, 0.3 / 15),
                                            np.full(15, 0.1 / 15)])
    centre = np.where(frames < 20, -8.0, np.where(frames < 35, 0.0, 8.0))
    axis = rng.normal(size=d)
    axis /= np.linalg.norm(axis)
    z = rng.normal(0.0, 1.0, (n, d)).astype(np.float32)
    z += (centre + rng.normal(0, 1.5, n))[:, None].astype(np.float32) * axis
    return z, frames


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000000)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--frames", action="store_true", help="add the ground-truth frame panel")
    ap.add_argument("-o", "--output", default=None, help="PNG (default: a temporary file)")
    args = ap.parse_args()
    z, frames = synthetic(args.n, args.d)
    out = args.output or os.path.join(tempfile.mkdtemp(), "latent.png")
    t0 = time.perf_counter()
    fig = latent_landscape(z, frames=frames if args.frames else None)
    t1 = time.perf_counter()
    save(fig, out)
    t2 = time.perf_counter()
    hist_ax = fig.axes[1]
    n_max = len([ln for ln in hist_ax.get_lines() if ln.get_gid() == "maxima"][0].get_xdata())
    print("latent figure: N = %d, d = %d, frames %s: build %.2f s, draw + save PNG %.2f s, "
          "total %.2f s (%d density maxima, %d bytes) -> %s"
          % (args.n, args.d, "yes" if args.frames else "no", t1 - t0, t2 - t1, t2 - t0,
             n_max, os.path.getsize(out), out))


if __name__ == "__main__":
    main()
