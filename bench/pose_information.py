"""How well can one particle image fix its own rotation? The Cramer-Rao bound of a dataset.

Issue 11 asks the pose refinement to halve the median angular error of poses given with
random errors of 3 degrees rms. Whether any method can is a property of the images: the
Fisher information of one image about its rotation,

    F_ab = sum_k |a dS(k)/dv_a . conj(a dS(k)/dv_b)| / P(k)        (3 x 3, v a rotation vector)

over the rfft2 grid of the training box (Hermitian weights), with S the rendering of the
particle's *true* conformation at its *true* pose (the simulation's ground truth), a the
grey scale of the data against the renderer (fitted), and P(k) the noise power per
coefficient measured on the images themselves (shell averages of |Y - a S|^2). Everything
else (conformation, shift, CTF) is taken as known, so the bound is optimistic for a method
that must also estimate them.

Two figures per dataset:

* **CRB**: the median angle of errors drawn from N(0, F^-1) (an unbiased estimator from
  the image alone).
* **with the prior** (van Trees / posterior): errors from N(0, (F + I / s^2)^-1), s the rms
  per axis of the simulated pose errors (``--prior-sd``, 3 deg / sqrt(3) for ``--pose-sd 3``
  when the errors are isotropic rotation vectors of 3 deg rms): the best any estimator
  that knows how the errors were drawn can do.

Compare both with the median angle of the errors given (printed too) and with half of it,
issue 11's bar.

    python bench/pose_information.py --run SIM/RUN [--n 200] [--prior-sd DEG]
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nmaem_plugin.core.learn.data import ParticleImages, ParticleMetadata  # noqa: E402
from nmaem_plugin.core.physics.rotations import rotvec_to_matrix  # noqa: E402
from nmaem_plugin.core.physics.noise import (hermitian_weights, shell_counts, shell_index,
                                             shell_sums)
from nmaem_plugin.core.io.particles import read_particles  # noqa: E402
from nmaem_plugin.core.io.poses import euler_to_matrix, rotation_angle_deg  # noqa: E402
from nmaem_plugin.core.physics.structure import read_trajectory  # noqa: E402
from nmaem_plugin.core.learn.checkpoints import load_trained  # noqa: E402


def median_angle(cov, rng, draws=64):
    """Median over particles and draws of |v| (degrees), v ~ N(0, cov[i]) (radians)."""
    L = np.linalg.cholesky(cov)                                   # (N, 3, 3)
    e = rng.standard_normal((len(cov), draws, 3))
    v = np.einsum("nij,ndj->ndi", L, e)
    return float(np.degrees(np.median(np.linalg.norm(v, axis=-1))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run folder trained on a simulated dataset")
    ap.add_argument("--n", type=int, default=200, help="particles (evenly spaced)")
    ap.add_argument("--prior-sd", type=float, default=None,
                    help="rms per axis of the pose errors (deg); default from the data")
    ap.add_argument("--eps-deg", type=float, default=0.25, help="finite-difference step")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ae, cfg = load_trained(args.run)
    sim = os.path.dirname(os.path.abspath(cfg["particles"]))
    gt = np.load(os.path.join(sim, "ground_truth.npz"))
    table = read_particles(cfg["particles"])
    meta = ParticleMetadata(table, torch.device("cpu"))
    images = ParticleImages(table, int(cfg["box"]))
    _, frames = read_trajectory(os.path.join(sim, "frames.pdb"))
    dec = ae.decoder
    if frames.shape[1] != dec.coords.shape[0]:
        raise SystemExit("frames.pdb and the run's reference differ in atoms: use a dataset "
                         "simulated without --reference-model")
    rows = np.linspace(0, table.n - 1, min(args.n, table.n)).astype(np.int64)
    _, base, ctf_params = meta.batch(torch.as_tensor(rows))
    ctf = dec.ctf(ctf_params)
    A_true = torch.tensor(euler_to_matrix(*gt["euler"][rows].T), dtype=torch.float32)
    given = rotation_angle_deg(euler_to_matrix(*gt["euler_file"][rows].T),
                               euler_to_matrix(*gt["euler"][rows].T))
    X = torch.tensor(frames[gt["frame"][rows]], dtype=torch.float32)
    r = dec.renderer()
    shifts = base.float() + dec.offset
    eps = np.radians(args.eps_deg)
    with torch.no_grad():
        S = r.render_ft(X, A_true, shifts, ctf).to(torch.complex128)
        Y = torch.fft.rfft2(images[rows][1].double())
        dS = []
        for a in range(3):
            v = torch.zeros(len(rows), 3)
            v[:, a] = eps
            # rotations in the image's frame (x, y in the plane, z the projection axis)
            plus = r.render_ft(X, rotvec_to_matrix(v) @ A_true, shifts, ctf)
            minus = r.render_ft(X, rotvec_to_matrix(-v) @ A_true, shifts, ctf)
            dS.append(((plus - minus) / (2 * eps)).to(torch.complex128))
    D = int(cfg["box"])
    herm = torch.tensor(hermitian_weights(D))
    herm[0, 0] = 0.0                                       # the mean: not used by the losses
    # grey scale of the data against the renderer, then the noise power per shell
    scale = float((herm * (Y * S.conj()).real).sum() / (herm * S.abs() ** 2).sum())
    res2 = ((Y - scale * S).abs() ** 2).mean(0).numpy()     # (D, K)
    P = torch.tensor((shell_sums(res2, D) / shell_counts(D))[shell_index(D)])
    w = herm / P
    F = np.zeros((len(rows), 3, 3))
    for a in range(3):
        for b in range(3):
            F[:, a, b] = (scale ** 2 * w * (dS[a] * dS[b].conj()).real).sum((1, 2)).numpy()
    rng = np.random.default_rng(0)
    crb = median_angle(np.linalg.inv(F), rng)
    sd = args.prior_sd
    if sd is None:                      # rms per axis of the given errors' rotation vectors
        sd = float(np.degrees(np.sqrt(np.mean(np.radians(given) ** 2) / 3.0)))
    post = median_angle(np.linalg.inv(F + np.eye(3) / np.radians(sd) ** 2), rng)
    sd_axes = np.degrees(np.sqrt(np.median(np.diagonal(np.linalg.inv(F), 0, 1, 2), 0)))
    print("run %s, %d particles, box %d, grey scale %.4g" % (args.run, len(rows), D, scale))
    print("given poses: median error %.2f deg (bar: %.2f deg); prior sd %.2f deg per axis"
          % (np.median(given), np.median(given) / 2, sd))
    print("CRB from the image alone: median %.2f deg (median sd per axis x %.2f, y %.2f, "
          "in-plane z %.2f deg)" % (crb, *sd_axes))
    print("with the prior (best possible): median %.2f deg" % post)


if __name__ == "__main__":
    main()
