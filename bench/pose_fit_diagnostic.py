"""Is the rotation error of ``nmaem infer --fit-pose`` the images' noise, or the model?

On the first N particles of a simulated dataset (ground truth with the true and the
written rotations), with a trained run:

1. the encoder's z and shift, then the per-particle fit of (z, shift, rotation) as
   ``nmaem infer --fit-pose`` does it, under a broad rotation prior (10 degrees per axis,
   so that the answer is the images', not the prior's);
2. the same fit on synthetic twins of those images: the run's own model rendered at the
   fitted z and shift and at the *true* rotation, at each image's fitted grey scale, plus
   Gaussian noise of the run's noise spectrum. The twins differ from the particles only
   in the model: exactly representable, with noise exactly as the likelihood assumes.

For both it prints the median angle from the refined to the true rotation, and the
median the fit itself predicts (0.89 times the rms angle of its Laplace posterior, the
median of a 3-D Gaussian). Where the twins' error matches the prediction and the
particles' exceeds it, the excess is the model's incompleteness (e.g. states off the
modes' span), not noise nor the minimiser.

    python bench/pose_fit_diagnostic.py --sim WORK/cpu/sim_discontinuous_n8000_b192_angles3 \\
        --run WORK/cpu/sim_discontinuous_n8000_b192_angles3/run_discontinuous_d16 --n 256
"""
import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nmaem_plugin.core.learn.data import ParticleImages, ParticleMetadata  # noqa: E402
from nmaem_plugin.core.inference.infer import FIT_BATCH, encode_images  # noqa: E402
from nmaem_plugin.core.physics.likelihood import WhitenedLikelihood  # noqa: E402
from nmaem_plugin.core.inference.particle_fit import (FitStats, fit_batch, population_prior,
                                                      prior_floor)
from nmaem_plugin.core.io.particles import read_particles  # noqa: E402
from nmaem_plugin.core.io.poses import correct_rotations, euler_to_matrix, rotation_angle_deg
from nmaem_plugin.core.learn.checkpoints import load_trained  # noqa: E402
from latent_twins import make_twins  # noqa: E402

BROAD_DEG = 10.0
MEDIAN_OVER_RMS = 0.888      # median / rms of the length of a 3-D isotropic Gaussian


def fit_all(ae, lik, images, groups, z0, t0, rot, base, ctf, mu, prec, iterations):
    """Fitted (z, shift, w) and the Laplace variances of w, in batches."""
    zs, ts, ws, var = [], [], [], []
    for i in range(0, len(z0), FIT_BATCH):
        s = slice(i, i + FIT_BATCH)
        st = FitStats()
        z, t, w = fit_batch(ae.decoder, lik, images[s], groups[s], z0[s], t0[s], rot[s],
                            base[s], ctf[s], mu, prec, iterations, stats=st,
                            turn0=torch.zeros(len(z0[s]), 3))
        zs.append(z)
        ts.append(t)
        ws.append(w)
        var.append(st.turn_var[0])
    return torch.cat(zs), torch.cat(ts), torch.cat(ws), np.concatenate(var)


def report(name, A_file, A_true, w, var):
    refined = correct_rotations(A_file, w.double().numpy())
    err = rotation_angle_deg(refined, A_true)
    given = rotation_angle_deg(A_file, A_true)
    pred = MEDIAN_OVER_RMS * np.degrees(np.sqrt(var.sum(1)))
    print("%-34s input %.2f deg -> refined %.2f deg (median); the fit's own prediction "
          "%.2f deg" % (name, np.median(given), np.median(err), np.median(pred)))
    return float(np.median(err)), float(np.median(pred))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", required=True, help="folder written by nmaem simulate")
    ap.add_argument("--run", required=True,
                    help="trained run folder (whitened likelihood, without --refine-pose)")
    ap.add_argument("--n", type=int, default=256, help="particles (the first N)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the twins' noise")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ae, cfg = load_trained(args.run, "cpu")
    if cfg.get("refine_pose"):
        sys.exit("%s: a run trained with --refine-pose; this diagnostic fits from the "
                 "file's rotations (use a run trained without it)" % args.run)
    table = read_particles(os.path.join(args.sim, "particles.star"))
    with np.load(os.path.join(args.sim, "ground_truth.npz")) as gt:
        if "euler" not in gt:
            sys.exit("%s: no true rotations in ground_truth.npz" % args.sim)
        true_euler = gt["euler"][:args.n].astype(np.float64)
    rows = np.arange(min(args.n, table.n))
    _, images = ParticleImages(table, cfg["box"])[rows]
    t_enc, z_enc, _ = encode_images(ae.encoder, images, "cpu")
    lik = WhitenedLikelihood.for_run(args.run, cfg, "cpu")
    mu, prec = population_prior(np.concatenate([z_enc, t_enc], 1),
                                min_sd=prior_floor(z_enc.shape[1], ae.decoder.coords.shape[0]))
    P = len(mu) + 3
    m = np.concatenate([mu, np.zeros(3)])
    q = np.zeros((P, P))
    q[:len(mu), :len(mu)] = prec
    q[len(mu):, len(mu):] = np.eye(3) / math.radians(BROAD_DEG) ** 2
    m, q = torch.as_tensor(m, dtype=torch.float32), torch.as_tensor(q, dtype=torch.float32)
    meta = ParticleMetadata(table, "cpu")
    rt = torch.as_tensor(rows)
    rot, base, cp = meta.batch(rt)
    ctf = ae.decoder.ctf(cp)
    groups = meta.optics_group[rt]
    z0, t0 = torch.as_tensor(z_enc), torch.as_tensor(t_enc)
    A_file = table.rotation_matrices()[rows]
    A_true = euler_to_matrix(*true_euler[rows].T)

    z, t, w, var = fit_all(ae, lik, images, groups, z0, t0, rot, base, ctf, m, q,
                           args.iterations)
    report("particles:", A_file, A_true, w, var)

    # twins: the fitted z and shift at the true rotation, the fitted grey scale, noise of
    # the run's spectrum
    twins, chi2 = make_twins(ae.decoder, lik, images, groups, z,
                             torch.as_tensor(A_true, dtype=torch.float32), base + t, ctf,
                             args.seed)
    print("twins: reduced chi2 at their truth, median %.3f (1 for the likelihood's noise)"
          % chi2)
    _, _, w2, var2 = fit_all(ae, lik, twins, groups, z0, t0, rot, base, ctf, m, q,
                             args.iterations)
    report("twins (the model, exactly):", A_file, A_true, w2, var2)


if __name__ == "__main__":
    main()
