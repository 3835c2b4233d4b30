"""How precisely does a trained encoder place each particle, against what the image allows?

For a run trained on simulated particles (``nmaem simulate`` + ``nmaem train`` +
``nmaem infer``), per true frame: the mean and the spread (std) of the particles' PC1
coordinate of z, against the Cramer-Rao bound for PC1 from one image, the smallest std any
unbiased estimator of that coordinate can reach from that image and its known pose, CTF,
shift and white noise. The bound is sigma_noise / ||d image / d PC1||, with the derivative
taken by central differences of the decoder (the renderer of docs/imaging.md) at the
encoder's own z. It is computed at the training box (the images the encoder sees, noise
sigma * box / box0 after the Fourier crop) and at the simulated box (every pixel).

    python bench/latent_precision.py --sim SIMDIR --run SIMDIR/RUN [--per-frame 32]

Output: one table row per frame with at least 40 particles. Within one frame the true z is
a single point, so the spread is estimation error only; a spread several times the bound
means the encoder uses a fraction of the information in the images.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nmaem_plugin.core.io.particles import read_particles  # noqa: E402
from nmaem_plugin.core.learn.network import Decoder  # noqa: E402
from nmaem_plugin.core.learn.data import ParticleMetadata  # noqa: E402
from nmaem_plugin.core.learn.checkpoints import load_trained  # noqa: E402


def bound(dec, z, v, rot, base, ctf_params, sigma, eps=1.0):
    """Per-image Cramer-Rao std of the coordinate t in z + t v (v a unit vector)."""
    ctf = dec.ctf(ctf_params)
    with torch.no_grad():
        d = (dec(z + eps * v, rot, base, ctf) - dec(z - eps * v, rot, base, ctf)) / (2 * eps)
    fisher = (d.double() ** 2).sum(dim=(1, 2)) / sigma ** 2
    return (1.0 / fisher.sqrt()).numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", required=True, help="nmaem simulate output folder")
    ap.add_argument("--run", required=True, help="training run folder with latent.npz")
    ap.add_argument("--latent", help="latent file (default RUN/latent.npz)")
    ap.add_argument("--per-frame", type=int, default=32,
                    help="particles per frame used for the bound (default 32)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ae, cfg = load_trained(args.run)
    if cfg["n_modes"] < 1:
        sys.exit("the run has d = 0: no amplitudes to place")
    with np.load(os.path.join(args.sim, "ground_truth.npz")) as g:
        frame = g["frame"]
        sigma0 = json.loads(str(g["params"]))["noise_sigma"]
    with np.load(args.latent or os.path.join(args.run, "latent.npz")) as lat:
        z, index = lat["z"].astype(np.float64), lat["index"]
    frame = frame[index]
    zc = z - z.mean(0)
    v1 = np.linalg.svd(zc, full_matrices=False)[2][0]
    pc1 = zc @ v1
    if np.corrcoef(pc1, frame)[0, 1] < 0:
        v1, pc1 = -v1, -pc1

    table = read_particles(os.path.join(args.sim, "particles.star"))
    meta = ParticleMetadata(table, torch.device("cpu"))
    small = ae.decoder
    full = Decoder(small.elements, small.coords.numpy(), small.modes.numpy(), cfg["box0"],
                   cfg["apix0"], centre=cfg["centre"], offset=(0.0, 0.0))
    sig_small = sigma0 * cfg["box"] / cfg["box0"]     # white noise after the Fourier crop
    v = torch.tensor(v1, dtype=torch.float32)

    print("run %s: d = %d, trained at %d px (%.2f A/px), images %d px (%.2f A/px), "
          "noise sigma %.4g" % (args.run, cfg["n_modes"], cfg["box"], cfg["apix"],
                                cfg["box0"], cfg["apix0"], sigma0))
    print("| frame | particles | PC1 mean | PC1 std (encoder) | bound at %d px | bound at "
          "%d px | std / bound (%d px) |" % (cfg["box"], cfg["box0"], cfg["box"]))
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for f in np.unique(frame):
        sel = np.flatnonzero(frame == f)
        if len(sel) < 40:
            continue
        rows = index[sel[:args.per_frame]]
        rot, base, ctf_params = meta.batch(torch.as_tensor(rows))
        zz = torch.tensor(z[sel[:args.per_frame]], dtype=torch.float32)
        b_small = np.median(bound(small, zz, v, rot, base, ctf_params, sig_small))
        b_full = np.median(bound(full, zz, v, rot, base, ctf_params, sigma0))
        std = pc1[sel].std()
        ratios.append(std / b_small)
        print("| %d | %d | %.1f | %.1f | %.1f | %.1f | %.1f |"
              % (f, len(sel), pc1[sel].mean(), std, b_small, b_full, std / b_small))
    print("median std / bound at the training box: %.1f" % np.median(ratios))


if __name__ == "__main__":
    main()
