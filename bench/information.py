"""How much information about the conformation do realistic particles carry, against clean ones?

``nmaem simulate`` sets the noise level by the total noise variance (``--snr-db``). With the
nuisances of real data the same total variance is spread differently: coloured noise
(``--noise-falloff R``: power falling R times from zero frequency to Nyquist) puts more of
it at the low frequencies where a protein's signal is, and a B-factor envelope (``--bfactor
B``) removes signal at high frequency. This script measures what that does to the Fisher
information of one image about the first principal coordinate of a trained run's latent
space (the direction that orders the states):

    F = sum_k |dS(k)/dt|^2 / sigma^2(k)

over the rfft2 grid of the training box (Hermitian weights), with S the rendered image
(renderer + CTF, the particle's pose and defocus) and sigma^2(k) proportional to white
noise, or to the coloured shape of ``nuisances.noise_filter`` (mean 1 over the simulated
box, so the total variance is the same), the signal multiplied by exp(-B s^2 / 4) for the
B-factor. The ratio of the Cramer-Rao bounds sqrt(F_white / F_realistic) is how much larger
the smallest possible per-image error of the coordinate is on realistic particles than on
clean ones at the same --snr-db.

    python bench/information.py --run SIM/RUN [--falloff 10] [--bfactor 50] [--n 100]
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nmaem_plugin.core.learn.data import ParticleMetadata  # noqa: E402
from nmaem_plugin.core.io.latent import read_latent  # noqa: E402
from nmaem_plugin.core.physics.noise import hermitian_weights  # noqa: E402
from nmaem_plugin.core.sim.nuisances import noise_filter  # noqa: E402
from nmaem_plugin.core.io.particles import read_particles  # noqa: E402
from nmaem_plugin.core.learn.checkpoints import load_trained  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a trained run folder with latent.npz")
    ap.add_argument("--falloff", type=float, default=10.0,
                    help="noise power fall-off to Nyquist (nmaem simulate --noise-falloff)")
    ap.add_argument("--bfactor", type=float, default=50.0, help="B-factor (A^2)")
    ap.add_argument("--n", type=int, default=100, help="particles (evenly spaced)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ae, cfg = load_trained(args.run)
    lat = read_latent(os.path.join(args.run, "latent.npz"))
    zc = lat.z - lat.z.mean(0)
    v = torch.tensor(np.linalg.svd(zc, full_matrices=False)[2][0], dtype=torch.float32)
    table = read_particles(cfg["particles"])
    meta = ParticleMetadata(table, torch.device("cpu"))
    pick = np.linspace(0, lat.n - 1, min(args.n, lat.n)).astype(np.int64)
    rows = torch.as_tensor(lat.index[pick])
    rot, base, ctf_params = meta.batch(rows)
    z = torch.tensor(lat.z[pick], dtype=torch.float32)
    dec = ae.decoder
    ctf = dec.ctf(ctf_params)
    eps = 2.0
    with torch.no_grad():
        d = (dec.render_ft(z + eps * v, rot, base, ctf)
             - dec.render_ft(z - eps * v, rot, base, ctf)) / (2 * eps)
    power = (d.abs() ** 2).double().numpy()                 # (B, D, D//2+1)

    D, D0, apix = int(cfg["box"]), int(cfg["box0"]), float(cfg["apix"])
    ky = np.fft.fftfreq(D, 1.0 / D)
    kx = np.arange(D // 2 + 1)
    herm = hermitian_weights(D)
    # the noise shape of the simulated box at the training box's frequencies (a Fourier
    # crop keeps each physical frequency): index (ky, kx) of the D grid is (ky, kx) of D0's
    shape0 = noise_filter(D0, args.falloff).numpy() ** 2      # (D0, D0) full grid, mean 1
    shape = shape0[np.asarray(ky, int) % D0][:, kx]
    s = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) / (D * apix)     # 1/A
    envelope2 = np.exp(-args.bfactor * s ** 2 / 2.0)                     # (exp(-B s^2/4))^2

    f_white = (power * herm).sum((1, 2))
    f_col = (power * herm / shape).sum((1, 2))
    f_real = (power * herm * envelope2 / shape).sum((1, 2))
    print("run %s: %d particles, %d px at %.2f A/px (simulated %d px)"
          % (args.run, len(pick), D, apix, D0))
    print("| noise / signal | Fisher information / white (median) | Cramer-Rao bound / white |")
    print("|---|---|---|")
    print("| white, no envelope | 1 | 1 |")
    for name, f in (("coloured (fall-off %g)" % args.falloff, f_col),
                    ("coloured + B = %g A^2" % args.bfactor, f_real)):
        r = np.median(f / f_white)
        print("| %s | %.3f | %.2f |" % (name, r, 1.0 / np.sqrt(r)))


if __name__ == "__main__":
    main()
