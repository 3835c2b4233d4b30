"""Local pose search after training: Gauss-Newton steps on each particle's rotation.

An experiment for issue 11, not part of ``nmaem``. The encoder's pose head (``nmaem train
--refine-pose``) predicts what can be read from the image alone: the rotation of the model
that a consensus refinement leaves, which depends on the conformation. A random error of
the consensus pose cannot be read that way (the encoder does not see the file's pose). This
script looks for it the way a refinement program would, by comparing each image with
renderings around its pose, at the encoder's z and shift, in the whitened metric of the
training loss:

    minimise over v   chi2(v) + |v|^2 / s^2,   chi2(v) = <Y - a S(v), Y - a S(v)>_w

S(v) the rendering at A_file R(v), a the image's grey scale (closed form), w = band /
sigma2 (``WhitenedLikelihood.weights``), s the prior sd. Each step linearises S about v
(Jacobian by forward differences, one rendering of 4B images): H = a^2 J^T W J + I / s^2,
g = a J^T W r - v / s^2, v <- v + H^-1 g, then |v| <= the run's largest correction. It
prints the median angle to the true rotations (the simulation's ground truth) after each
number of steps.

    python bench/pose_local_search.py --run SIM/RUN [--n 256] [--iterations 0 1 2 4]
                                      [--prior-sd DEG]
"""
import argparse
import math
import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nmaem_plugin.core.learn.data import ParticleImages, ParticleMetadata  # noqa: E402
from nmaem_plugin.core.physics.likelihood import WhitenedLikelihood, whitened_fit  # noqa: E402
from nmaem_plugin.core.learn.network import split_outputs  # noqa: E402
from nmaem_plugin.core.io.particles import read_particles  # noqa: E402
from nmaem_plugin.core.io.poses import correct_rotations, euler_to_matrix, rotation_angle_deg
from nmaem_plugin.core.learn.checkpoints import load_trained  # noqa: E402


FD_STEP = math.radians(0.2)      # forward-difference step of the Jacobian (radians)
MAX_STEP = math.radians(5.0)     # the largest change of v in one step (radians)


def gauss_newton_rotations(decoder: torch.nn.Module, likelihood: WhitenedLikelihood,
                           images: torch.Tensor, groups: Optional[torch.Tensor],
                           z: torch.Tensor, rotations: torch.Tensor, shifts: torch.Tensor,
                           ctf: Optional[torch.Tensor], v0: torch.Tensor, prior_sd: float,
                           max_angle: float, iterations: int = 3) -> List[torch.Tensor]:
    """Rotation corrections (B, 3) radians after 0, 1, ..., ``iterations`` Gauss-Newton
    steps from ``v0`` (module docstring; one list entry per step count); ``shifts`` the
    full rendered shifts (Angstrom), ``ctf`` the decoder's CTF of the batch, ``prior_sd``
    and ``max_angle`` in radians. No gradients."""
    B = images.shape[0]
    v = v0.detach().float().clone()
    steps = [v]
    if iterations <= 0 or B == 0:
        return steps
    with torch.no_grad():
        Y = likelihood.band.images_ft(images.float())
        w = likelihood.weights(groups)
        if w.dim() == 2:
            w = w.expand(B, *w.shape)
        eye = torch.eye(3, dtype=v.dtype, device=v.device)
        zz, rr, ss = z.repeat(4, 1), rotations.repeat(4, 1, 1), shifts.repeat(4, 1)
        cc = None if ctf is None else ctf.repeat(4, 1, 1)
        inv_s2 = 1.0 / float(prior_sd) ** 2
        for _ in range(int(iterations)):
            vs = torch.cat([v] + [v + FD_STEP * eye[k] for k in range(3)], 0)
            S = likelihood.band.rendered_ft(decoder.render_ft(zz, rr, ss, cc, rotvec=vs))
            S = S.reshape(4, B, *S.shape[1:])
            S0, J = S[0], (S[1:] - S[0]) / FD_STEP                  # (B,D,K), (3,B,D,K)
            a = whitened_fit(Y, S0, w)["scale"]                      # (B,)
            r = Y - a[:, None, None] * S0
            Jr, Ji = J.real, J.imag
            H = torch.einsum("bdk,ibdk,jbdk->bij", w, Jr, Jr) \
                + torch.einsum("bdk,ibdk,jbdk->bij", w, Ji, Ji)
            H = (a * a)[:, None, None] * H + inv_s2 * eye
            g = torch.einsum("bdk,ibdk,bdk->bi", w, Jr, r.real) \
                + torch.einsum("bdk,ibdk,bdk->bi", w, Ji, r.imag)
            g = a[:, None] * g - inv_s2 * v
            step = torch.linalg.solve(H, g[..., None])[..., 0]
            n = step.norm(dim=1, keepdim=True)
            step = step * torch.clamp(MAX_STEP / n.clamp_min(1e-12), max=1.0)
            v = v + step
            n = v.norm(dim=1, keepdim=True)
            v = v * torch.clamp(float(max_angle) / n.clamp_min(1e-12), max=1.0)
            steps.append(v)
    return steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run trained with --refine-pose on a "
                                                 "simulated dataset (whitened loss)")
    ap.add_argument("--n", type=int, default=256, help="particles (evenly spaced)")
    ap.add_argument("--iterations", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--prior-sd", type=float, default=None,
                    help="prior sd of the correction (deg; default the run's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ae, cfg = load_trained(args.run, "cpu")
    table = read_particles(cfg["particles"])
    meta = ParticleMetadata(table, "cpu")
    gt = np.load(os.path.join(os.path.dirname(cfg["particles"]), "ground_truth.npz"))
    lik = WhitenedLikelihood.for_run(args.run, cfg)
    images = ParticleImages(table, cfg["box"])
    rows = np.linspace(0, table.n - 1, min(args.n, table.n)).astype(np.int64)
    true = euler_to_matrix(*gt["euler"][rows].T)
    A = table.rotation_matrices()[rows]
    prior = math.radians(args.prior_sd if args.prior_sd else cfg["pose_prior_sd"])
    largest = math.radians(cfg["max_pose_correction"])
    out = {k: [] for k in args.iterations}
    t0 = time.perf_counter()
    for s in range(0, len(rows), 64):
        rr = torch.as_tensor(rows[s:s + 64])
        _, im = images[rr.numpy()]
        with torch.no_grad():
            shift, z, v = split_outputs(ae.encoder(im))
        if v is None:
            raise SystemExit("%s was trained without --refine-pose" % args.run)
        rot, base, ctf_params = meta.batch(rr)
        ctf = ae.decoder.ctf(ctf_params)
        steps = gauss_newton_rotations(ae.decoder, lik, im, meta.optics_group[rr], z, rot,
                                       base + shift, ctf, v, prior, largest,
                                       max(args.iterations))
        for k in args.iterations:
            out[k].append(steps[k].numpy())
    print("run %s, %d particles, prior sd %.2f deg, given poses: median error %.2f deg"
          % (args.run, len(rows), math.degrees(prior),
             np.median(rotation_angle_deg(A, true))))
    for k in args.iterations:
        v = np.concatenate(out[k]).astype(np.float64)
        err = rotation_angle_deg(correct_rotations(A, v), true)
        print("%d Gauss-Newton step(s) from the pose head: median %.2f deg" % (k, np.median(err)))
    print("%.1f s" % (time.perf_counter() - t0))


if __name__ == "__main__":
    main()
