"""``make demo``: the workflow on the bundled adenylate kinase models.

For now: simulate a small open -> closed dataset with ``nmaem simulate`` and draw a montage
of clean, CTF-modulated and noisy particles (``montage.png``). Run as
``python -m nmaem_plugin.demo -o DIR``.
"""
import argparse
import os
import subprocess
import sys

import numpy as np

from nmaem_plugin import DATA_DIR

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

    from nmaem_plugin.core import imaging
    from nmaem_plugin.core.metadata import ImageStack, read_particles
    from nmaem_plugin.core.structure import read_trajectory

    table = read_particles(os.path.join(sim_dir, "particles.star"))
    gt = np.load(os.path.join(sim_dir, "ground_truth.npz"))
    model, frames = read_trajectory(os.path.join(sim_dir, "frames.pdb"))
    idx = np.arange(min(n_show, table.n))
    sub = table.subset(idx)
    box, apix = int(sub.box[0]), float(sub.apix[0])
    r = imaging.Renderer(model.elements, box, apix)
    coords = torch.as_tensor(frames[gt["frame"][idx]], dtype=torch.float32)
    A = torch.as_tensor(sub.rotation_matrices(), dtype=torch.float32)
    shift = torch.as_tensor(-sub.origin_or_zero(), dtype=torch.float32)

    def t(x):
        return torch.as_tensor(np.asarray(x), dtype=torch.float32)
    ctf = r.ctf(defocus_u=t(sub.defocus_u), defocus_v=t(sub.defocus_v),
                defocus_angle=t(sub.defocus_angle), voltage=t(sub.voltage), cs=t(sub.cs),
                amp_contrast=t(sub.amp_contrast))
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
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nmaem_plugin.demo", description=__doc__)
    p.add_argument("-o", "--output", default="demo_output", help="output folder")
    p.add_argument("--n", type=int, default=2000, help="particles to simulate")
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--apix", type=float, default=1.0)
    args = p.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    sim = os.path.join(args.output, "particles")
    nmaem = [sys.executable, "-m", "nmaem_plugin"]
    run(nmaem + ["simulate", "--ref", OPEN, "--target", CLOSED, "--frames", "50",
                 "--distribution", "continuous", "--n", str(args.n), "--box", str(args.box),
                 "--apix", str(args.apix), "--snr-db", "-20", "--shift-std", "2",
                 "--seed", "0", "-o", sim, "--overwrite"])
    png = montage(sim, os.path.join(args.output, "montage.png"))
    print("demo: dataset in %s, montage in %s" % (os.path.abspath(sim), os.path.abspath(png)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
