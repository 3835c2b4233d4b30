"""What would inference give if the model explained the particles exactly?

For the first N particles of a simulated dataset and a run trained on it, ``nmaem infer``'s
pipeline (the encoder, then the per-particle fit of z and shift, as by default) is run
twice and evaluated against the true frames:

1. on the particles themselves;
2. on synthetic *twins* (:func:`make_twins`): the run's own model rendered at the amplitudes z*_f that best
   reach each particle's true frame (the floor's amplitudes, ``modes.fit_amplitudes``), at
   the true rotation and the file's CTF, at the fitted shift and grey scale of the
   particle, plus Gaussian noise of the run's noise spectrum. The twins carry the
   particles' noise, poses (and pose errors) and CTF, but none of what the model misses:
   states off the modes' span, atom jitter, B-factors, the reference's differences,
   defocus errors.

The fit here renders sharp (no envelope, the fit before ``--fit-bfactor``): the twins
have none. The gap between the two is what the model's incompleteness and those
nuisances cost; the
twins' own |corr(PC1, frame)| is what the images' noise allows this estimator (a ceiling
for the data set as simulated at its SNR).

    python bench/latent_twins.py --sim WORK/cpu/sim_discontinuous_n8000_b192_realistic \\
        --run WORK/cpu/sim_discontinuous_n8000_b192_realistic/RUN --n 2000
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nmaem_plugin.core.analysis.landscape import pca  # noqa: E402
from nmaem_plugin.core.base.choices import FIT_ITERATIONS_DEFAULT  # noqa: E402
from nmaem_plugin.core.learn.data import ParticleImages, ParticleMetadata  # noqa: E402
from nmaem_plugin.core.inference.infer import FIT_BATCH, encode_images  # noqa: E402
from nmaem_plugin.core.physics.likelihood import WhitenedLikelihood, whitened_fit  # noqa: E402
from nmaem_plugin.core.modes.diagnostics import fit_amplitudes  # noqa: E402
from nmaem_plugin.core.inference.particle_fit import fit_batch, population_prior, prior_floor  # noqa: E402
from nmaem_plugin.core.io.particles import read_particles  # noqa: E402
from nmaem_plugin.core.io.poses import euler_to_matrix  # noqa: E402
from nmaem_plugin.core.physics.structure import read_model, read_trajectory  # noqa: E402
from nmaem_plugin.core.learn.checkpoints import load_trained  # noqa: E402


def infer_like_nmaem(ae, lik, images, groups, rot, base, ctf, iterations, start=None):
    """(encoder z, fitted z, fitted shift): the encoder then the per-particle fit, as
    ``nmaem infer`` does; ``start`` (z, shift) numpy replaces the encoder's output on these
    images (start and prior population)."""
    if start is None:
        t_enc, z_enc, _ = encode_images(ae.encoder, images, "cpu")
    else:
        z_enc, t_enc = start
    mu, prec = population_prior(np.concatenate([z_enc, t_enc], 1),
                                min_sd=prior_floor(z_enc.shape[1], ae.decoder.coords.shape[0]))
    mu_t = torch.as_tensor(mu, dtype=torch.float32)
    prec_t = torch.as_tensor(prec, dtype=torch.float32)
    z0, t0 = torch.as_tensor(z_enc), torch.as_tensor(t_enc)
    zs, ts = [], []
    for i in range(0, len(z0), FIT_BATCH):
        s = slice(i, i + FIT_BATCH)
        z, t, _ = fit_batch(ae.decoder, lik, images[s], groups[s], z0[s], t0[s], rot[s],
                            base[s], ctf[s], mu_t, prec_t, iterations)
        zs.append(z)
        ts.append(t)
    return z_enc, torch.cat(zs), torch.cat(ts), t_enc


def make_twins(decoder, lik, images, groups, z, rotations, shifts, ctf, seed=0):
    """(twins, median reduced chi2 at their truth): the decoder's renderings at (z,
    rotations, shifts, ctf), each at the grey scale that best fits the image it stands
    for, plus Gaussian noise of the likelihood's spectrum (the rfft2 of unit white noise
    has power D^2 per coefficient)."""
    D = int(decoder.box)
    with torch.no_grad():
        S = decoder.render_ft(z, rotations, shifts, ctf)
        w = lik.weights(groups)
        a = whitened_fit(lik.band.images_ft(images.float()), S, w)["scale"]
        s2 = torch.stack([torch.as_tensor(lik.noise.grid(int(g), box=D), dtype=torch.float32)
                          for g in groups])
        white = torch.randn(len(z), D, D, generator=torch.Generator().manual_seed(seed))
        noise = torch.fft.irfft2(torch.fft.rfft2(white) * torch.sqrt(s2) / D, s=(D, D))
        twins = torch.fft.irfft2(a[:, None, None] * S, s=(D, D)) + noise
        chi2 = whitened_fit(lik.band.images_ft(twins), S, w)["chi2"]
    return twins, float((chi2 / lik.band.dof).median())


def score(name, z, frame, x0, U, T):
    """|corr(PC1, frame)| and the median RMSD to the true frames (matched atoms)."""
    z = np.asarray(z, dtype=np.float64)
    pc1 = pca(z).transform(z)[:, 0]
    corr = abs(np.corrcoef(pc1, frame)[0, 1])
    X = x0[None] + np.einsum("nd,dmk->nmk", z, U)
    rmsd = np.sqrt(((X - T[frame]) ** 2).sum(2).mean(1))
    print("%-44s |corr(PC1, frame)| %.3f, median RMSD %.3f A" % (name, corr, np.median(rmsd)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", required=True, help="folder written by nmaem simulate")
    ap.add_argument("--run", required=True,
                    help="trained run folder (whitened likelihood, without --refine-pose)")
    ap.add_argument("--n", type=int, default=2000, help="particles (the first N)")
    ap.add_argument("--iterations", type=int, default=FIT_ITERATIONS_DEFAULT)
    ap.add_argument("--seed", type=int, default=0, help="seed of the twins' noise")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ae, cfg = load_trained(args.run, "cpu")
    if cfg.get("refine_pose"):
        sys.exit("%s: a run trained with --refine-pose (use one trained without it)"
                 % args.run)
    table = read_particles(os.path.join(args.sim, "particles.star"))
    rows = np.arange(min(args.n, table.n))
    with np.load(os.path.join(args.sim, "ground_truth.npz")) as gt:
        frame = gt["frame"][rows].astype(np.int64)
        A_true = euler_to_matrix(*gt["euler"][rows].astype(np.float64).T)
    # matched atoms, as nmaem evaluate: the run's reference and modes against the frames
    model = read_model(os.path.join(args.run, cfg["reference"]))
    fmodel, frames = read_trajectory(os.path.join(args.sim, "frames.pdb"))
    pos = {a: k for k, a in enumerate(fmodel.atom_ids)}
    ia = np.array([k for k, a in enumerate(model.atom_ids) if a in pos], dtype=np.int64)
    ib = np.array([pos[model.atom_ids[k]] for k in ia], dtype=np.int64)
    U_all = ae.decoder.modes.double().numpy()
    x0, U, T = model.coords[ia].astype(np.float64), U_all[:, ia], frames[:, ib]
    z_star = fit_amplitudes(U, x0, T).reshape(len(T), -1)          # (frames, d)
    print("frames: %d; the floor's amplitudes reach them at a median RMSD of %.3f A"
          % (len(T), np.median(np.sqrt(((x0 + np.einsum("fd,dmk->fmk", z_star, U) - T) ** 2)
                                         .sum(2).mean(1)))))

    _, images = ParticleImages(table, cfg["box"])[rows]
    lik = WhitenedLikelihood.for_run(args.run, cfg, "cpu")
    meta = ParticleMetadata(table, "cpu")
    rt = torch.as_tensor(rows)
    rot, base, cp = meta.batch(rt)
    ctf = ae.decoder.ctf(cp)
    groups = meta.optics_group[rt]

    z_enc, z_fit, t_fit, t_enc = infer_like_nmaem(ae, lik, images, groups, rot, base, ctf,
                                                  args.iterations)
    score("particles: encoder", z_enc, frame, x0, U, T)
    score("particles: encoder + fit (nmaem infer)", z_fit.numpy(), frame, x0, U, T)

    zt = torch.as_tensor(z_star[frame], dtype=torch.float32)
    twins, chi2 = make_twins(ae.decoder, lik, images, groups, zt,
                             torch.as_tensor(A_true, dtype=torch.float32), base + t_fit, ctf,
                             args.seed)
    print("twins: reduced chi2 at their truth, median %.3f" % chi2)
    tz_enc, tz_fit, _, _ = infer_like_nmaem(ae, lik, twins, groups, rot, base, ctf,
                                            args.iterations)
    score("twins: encoder", tz_enc, frame, x0, U, T)
    score("twins: encoder + fit", tz_fit.numpy(), frame, x0, U, T)
    # the encoder was trained on the particles, not on the twins: the same fit from the
    # particles' encoder output (start and prior), so that only the images differ
    _, tz_fit2, _, _ = infer_like_nmaem(ae, lik, twins, groups, rot, base, ctf,
                                        args.iterations, start=(z_enc, t_enc))
    score("twins: the particles' encoder output + fit", tz_fit2.numpy(), frame, x0, U, T)
    score("the floor (z*_f itself)", z_star[frame], frame, x0, U, T)
    print("(%d particles, %d fit iterations)" % (len(rows), args.iterations))

if __name__ == "__main__":
    main()
