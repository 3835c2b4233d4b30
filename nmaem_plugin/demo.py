"""``make demo``: the whole workflow on the bundled adenylate kinase models.

The ``nmaem`` command chain, each step a real command as a user would run it:

1. ``simulate``: an open -> closed morph of adenylate kinase (50 frames, the paper's
   discontinuous distribution: three separated groups of frames), noisy particles;
2. ``modes``: 16 normal modes of the open form (X0), with the closed form as target;
3. ``train``: the encoder through the physics decoder;
4. ``infer``: amplitudes and shifts of every particle;
5. ``export``: all-atom models at the density maxima along PC1 and along PC1;
6. ``evaluate``: accuracy against the ground truth.

It writes ``DIR/montage.png`` (clean, CTF-modulated and noisy particles),
``DIR/training.png`` (loss per epoch), ``DIR/latent.png`` (PC1 against the true frame, and
the PC1 histogram with its maxima) and prints the figures. The defaults are sized for a
laptop CPU (a few minutes); ``--n``, ``--box`` and ``--epochs`` scale it up. Run as
``python -m nmaem_plugin.demo -o DIR``.
"""
import argparse
import os
import subprocess
import sys

import numpy as np

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.base.atomic import atomic_open
from nmaem_plugin.core.base.figures import save

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def montage(sim_dir, out_png, n_show=6):
    """Clean, CTF-modulated and noisy versions of the first particles of a dataset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from nmaem_plugin.core.physics.ctf import CTFParams
    from nmaem_plugin.core.physics.renderer import Renderer
    from nmaem_plugin.core.io.particles import read_particles
    from nmaem_plugin.core.io.stacks import ImageStack
    from nmaem_plugin.core.physics.structure import read_trajectory

    table = read_particles(os.path.join(sim_dir, "particles.star"))
    gt = np.load(os.path.join(sim_dir, "ground_truth.npz"))
    model, frames = read_trajectory(os.path.join(sim_dir, "frames.pdb"))
    idx = np.arange(min(n_show, table.n))
    sub = table.subset(idx)
    box, apix = int(sub.box[0]), float(sub.apix[0])
    r = Renderer(model.elements, box, apix)
    coords = torch.as_tensor(frames[gt["frame"][idx]], dtype=torch.float32)
    A = torch.as_tensor(sub.rotation_matrices(), dtype=torch.float32)
    shift = torch.as_tensor(-sub.origin_or_zero(), dtype=torch.float32)

    ctf = r.ctf(CTFParams(defocus_u=sub.defocus_u, defocus_v=sub.defocus_v,
                          defocus_angle=sub.defocus_angle, voltage=sub.voltage,
                          cs=sub.cs, amp_contrast=sub.amp_contrast
                          ).to(dtype=torch.float32))
    with torch.no_grad():
        clean = r.render(coords, A, shift).numpy()
        modulated = r.render(coords, A, shift, ctf).numpy()
    with ImageStack(sub) as stack:
        noisy = stack.read(np.arange(len(idx)))
    rows = [("clean projection", clean), ("with CTF", modulated), ("with noise (as written)", noisy)]
    fig, axes = plt.subplots(3, len(idx), figsize=(2.0 * len(idx), 6.6))
    for i, (label, imgs) in enumerate(rows):
        for j in range(len(idx)):
            ax = axes[i, j]
            ax.imshow(imgs[j], cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
            if i == 0:
                ax.set_title("frame %d, df %.2f um" % (gt["frame"][idx[j]],
                                                        sub.defocus_u[j] / 1e4), fontsize=8)
    fig.suptitle("Adenylate kinase open -> closed, %d px at %.2f A/px" % (box, apix))
    fig.tight_layout()
    save(fig, out_png)
    plt.close(fig)
    return out_png


def plot_results(out, run_dir, latent_path, sim_dir, evaluation):
    """Training curve and latent landscape against the ground truth (PNG files)."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nmaem_plugin.core.analysis.landscape import pca
    from nmaem_plugin.core.io.latent import read_latent

    with open(os.path.join(run_dir, "log.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    ep = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ep, [float(r["train_loss"]) for r in rows], "o-", label="training")
    ax.plot(ep, [float(r["val_loss"]) for r in rows], "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    save(fig, os.path.join(out, "training.png"))
    plt.close(fig)

    lat = read_latent(latent_path)
    frame = np.load(os.path.join(sim_dir, "ground_truth.npz"))["frame"][lat.index]
    pc1 = pca(lat.z).transform(lat.z)[:, 0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].scatter(frame, pc1, s=3, alpha=0.4)
    axes[0].set_xlabel("true frame (0 = open, 49 = closed)")
    axes[0].set_ylabel("PC1 of z (A)")
    axes[0].set_title("|corr| = %.3f" % (evaluation["summary"]["abs_corr_pc1_frame"] or 0))
    axes[1].hist(pc1, bins=80, color="0.6")
    for m in evaluation["maxima"]["points"]:
        axes[1].axvline(m["pc1"], color="r", lw=1)
        axes[1].text(m["pc1"], axes[1].get_ylim()[1] * 0.9, " frame %s\n %.2f A"
                     % (m["frame"], m["rmsd"]), color="r", fontsize=8)
    axes[1].set_xlabel("PC1 of z (A)")
    axes[1].set_ylabel("particles")
    axes[1].set_title("PC1 explains %.0f %% of the variance"
                      % (100 * (evaluation["summary"]["pc1_explained_variance"] or 0)))
    fig.tight_layout()
    save(fig, os.path.join(out, "latent.png"))
    plt.close(fig)


def print_results(evaluation, args):
    """The demo's accuracy figures from an ``nmaem evaluate`` result."""
    s = evaluation["summary"]
    print()
    print("demo results (%d particles, %d px at %.1f A/px, %g dB, %d epochs):"
          % (args.n, args.box, args.apix, args.snr_db, args.epochs))
    print("  median per-particle RMSD to the true model: %.2f A (floor %.2f A, X0 %.2f A)"
          % (s["median_rmsd"], s["median_floor_rmsd"], s["median_reference_rmsd"]))
    if s.get("pc1_explained_variance") is not None:
        print("  PC1 explained variance: %.1f %%, |corr(PC1, frame)| = %.3f"
              % (100 * s["pc1_explained_variance"], s["abs_corr_pc1_frame"] or 0))
    for m in evaluation["maxima"]["points"]:
        print("  maximum at frame %s: RMSD %.2f A to the true model (floor %.2f A)"
              % (m["frame"], m["rmsd"], m["floor_rmsd"]))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nmaem_plugin.demo", description=__doc__)
    p.add_argument("-o", "--output", default="demo_output", help="output folder")
    p.add_argument("--n", type=int, default=3000, help="particles to simulate (default 3000)")
    p.add_argument("--box", type=int, default=64, help="box in pixels (default 64)")
    p.add_argument("--apix", type=float, default=2.4, help="pixel size in A (default 2.4)")
    p.add_argument("--snr-db", type=float, default=-10.0, help="SNR in dB (default -10)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    p.add_argument("--encoder", default="small", choices=["small", "paper"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    sim = os.path.join(out, "particles")
    modes = os.path.join(out, "modes.npz")
    run_dir = os.path.join(out, "run")
    latent = os.path.join(out, "latent.npz")
    models = os.path.join(out, "models")
    nmaem = [sys.executable, "-m", "nmaem_plugin"]
    dev = ["--device", args.device] if args.device else []
    for old in (run_dir, models):     # the demo's own outputs: start afresh
        if os.path.isdir(old):
            import shutil
            shutil.rmtree(old)
    run(nmaem + ["simulate", "--ref", OPEN, "--target", CLOSED, "--frames", "50",
                 "--distribution", "discontinuous", "--n", str(args.n), "--box", str(args.box),
                 "--apix", str(args.apix), "--snr-db", str(args.snr_db), "--shift-std", "1",
                 "--seed", "0", "-o", sim, "--overwrite"] + dev)
    montage(sim, os.path.join(out, "montage.png"))
    ref = os.path.join(sim, "reference.pdb")
    run(nmaem + ["modes", ref, "-o", modes, "--n-modes", "16", "--target", CLOSED, "--force"])
    run(nmaem + ["train", "--particles", os.path.join(sim, "particles.star"), "--ref", ref,
                 "--modes", modes, "-o", run_dir, "--epochs", str(args.epochs),
                 "--batch", "64", "--encoder", args.encoder] + dev)
    run(nmaem + ["infer", "--particles", os.path.join(sim, "particles.star"), "--model",
                 run_dir, "-o", latent, "--force"] + dev)
    run(nmaem + ["export", "--latent", latent, "--model", run_dir, "-o", models, "--maxima",
                 "--pcs", "1", "--steps", "5"])
    p = subprocess.run(nmaem + ["evaluate", "--latent", latent, "--truth", sim, "--model",
                                run_dir], check=True, capture_output=True, text=True)
    import json
    evaluation = json.loads(p.stdout)
    with atomic_open(os.path.join(out, "evaluation.json"), "w") as fh:
        fh.write(p.stdout)
    plot_results(out, run_dir, latent, sim, evaluation)
    print_results(evaluation, args)
    print("outputs in %s: montage.png, training.png, latent.png, evaluation.json, models/"
          % out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
