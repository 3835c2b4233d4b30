"""Refinement of states against their own particles (``nmaem refine-states``), against a
simulation's ground truth.

For a simulated dataset (``nmaem simulate``: ``ground_truth.npz`` with each particle's
``frame``, ``frames.pdb``), a trained run and its latent file:

1. ``nmaem states --maxima`` (or ``--kmeans K``) cuts the latent landscape into states
   (reused when ``WORK/states`` exists);
2. ``nmaem refine-states`` refines each state's model (timed; its own options pass
   through after ``--``);
3. each state is scored against its *mean true structure*, the mean over the state's
   particles of their true frames: the **floor** (the RMSD of the best 16-mode model
   X0 + U z to it, z = U^T (truth - X0): what no amplitude vector can beat), the **start**
   (the exported model ``refine-states`` starts from) and the **refined** model; RMSDs over
   all heavy atoms, no superposition (the frame is known). Also the geometry of the
   refined model (bond and angle rms against the reference, contacts under 2.2 A,
   Ramachandran outliers), the held-out gain and the time per state.

    python bench/refine_states.py --sim SIM --run RUN --latent latent.npz --work WORK \\
        [--kmeans 3] [-- --box 96 ...]

``--span`` measures how far normal-mode bases reach (no images): the RMSD from the
closed crystal structure (superposed on the open one) to its projection on the first k
modes of the open one, for ANM on CA (k = 16 ... 100), on the backbone and on every heavy
atom (k up to 600), and with the modes recomputed at the projection and projected again
("iterated": the modes follow the structure), and the same for the clean benchmark's
closed state (frame 41 of 50 of the linear morph). It is why the refinement's basis is
every atom.

``--timing`` instead measures what one evaluation of the likelihood and its gradient
costs (forward and backward through the renderer) per particle at several boxes, and what
k Jacobian-vector products cost (the Gauss-Newton alternative), on the current machine.
Writes ``WORK/bench.json`` and prints a Markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

NMAEM = [sys.executable, "-m", "nmaem_plugin"]


def run(cmd, log):
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ %s\n" % " ".join(cmd))
        fh.flush()
        p = subprocess.run(cmd, stdout=fh, stderr=fh)
    if p.returncode:
        sys.exit("failed (log %s): %s" % (log, " ".join(cmd)))
    return time.perf_counter() - t0


def rmsd(a, b):
    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum(1).mean()))


def score(args, refine_dir, states_dir):
    from nmaem_plugin.core.analysis.landscape import load_run
    from nmaem_plugin.core.analysis.states import read_states
    from nmaem_plugin.core.physics.structure import read_model, read_trajectory
    model, nm, cfg = load_run(args.run)
    U = nm.modes.astype(np.float64).reshape(nm.n_modes, -1)
    X0 = model.coords.astype(np.float64)
    truth = np.load(os.path.join(args.sim, "ground_truth.npz"))
    _, frames = read_trajectory(os.path.join(args.sim, "frames.pdb"))
    label, index, zs, _ = read_states(os.path.join(states_dir, "states.npz"))
    with open(os.path.join(refine_dir, "refine.json")) as fh:
        listing = json.load(fh)
    rows = []
    for r in listing["states"]:
        k = r["state"] - 1
        members = index[label == k]
        fr = truth["frame"][members]
        T = frames[fr].mean(0)
        z = U @ (T - X0).ravel()
        floor = X0 + (U.T @ z).reshape(-1, 3)
        start = read_model(os.path.join(refine_dir, r["name"], "start.pdb")).coords
        refined = read_model(os.path.join(refine_dir, r["name"], "refined.pdb")).coords
        v = r["validation"]
        rows.append(dict(
            state=r["state"], n_particles=r["n_particles"],
            frames="%d-%d (median %d)" % (fr.min(), fr.max(), np.median(fr)),
            floor=rmsd(floor, T), plain=rmsd(X0 + np.tensordot(zs[k], nm.modes, 1), T),
            start=rmsd(start, T), refined=rmsd(refined, T), status=r["status"],
            heldout_gain=r.get("heldout_gain"), heldout_significance=r.get("heldout_significance"),
            iterations=r.get("iterations"), rounds=r.get("rounds"), bfactor=r.get("bfactor"),
            bond_rmsd=v["bond_rmsd"], angle_rmsd=v["angle_rmsd"],
            close_contacts=v["close_contacts"], ramachandran_outliers=v["ramachandran_outliers"],
            seconds=r["seconds"],
            checks=[dict(c) for c in r.get("checks", [])]))
    return dict(box=listing["box"], apix=listing["apix"], settings=listing["settings"],
                bond_rms=listing["bond_rms"], seconds=listing["seconds"], states=rows)


def table(result):
    lines = ["| state | particles | true frames | floor (A) | start (A) | refined (A) | "
             "refined / floor | held-out gain (chi2, SE) | bond rms (A) | angle rms (deg) | "
             "contacts | Rama | iterations | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["states"]:
        lines.append("| %d | %d | %s | %.2f | %.2f | %.2f | %.2f | %.0f (%.0f) | %.4f | %.2f | "
                     "%d | %d | %s | %.0f |" % (
                         r["state"], r["n_particles"], r["frames"], r["floor"], r["start"],
                         r["refined"], r["refined"] / r["floor"], r["heldout_gain"] or 0,
                         r["heldout_significance"] or 0, r["bond_rmsd"], r["angle_rmsd"],
                         r["close_contacts"], r["ramachandran_outliers"], r["iterations"],
                         r["seconds"]))
    return "\n".join(lines)


def timing(args):
    """Seconds per particle of the likelihood's value and gradient (autograd through the
    renderer) and of k Jacobian-vector products (``Renderer.render_ft_jvp``)."""
    import torch
    from nmaem_plugin import DATA_DIR
    from nmaem_plugin.core.physics.renderer import Renderer
    from nmaem_plugin.core.physics.rotations import euler_to_matrix
    from nmaem_plugin.core.physics.structure import read_model
    torch.set_num_threads(1)
    m = read_model(os.path.join(DATA_DIR, "ak_open_4ake.pdb"))
    B = 32
    g = torch.Generator().manual_seed(0)
    ang = torch.rand(B, 3, generator=g) * 360
    A = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    out = []
    for D in args.boxes:
        apix = 0.8 * 192 / D
        r = Renderer(m.elements, D, apix, box0=192, apix0=0.8)
        X = torch.tensor(m.coords, dtype=torch.float32)
        row = dict(box=D, apix=apix, atoms=m.n_atoms)
        best = []
        for _ in range(args.repeat):
            Xb = X.clone().requires_grad_(True)
            t = time.perf_counter()
            F = r.render_ft(Xb, A, torch.zeros(B, 2))
            (F.real ** 2 + F.imag ** 2).sum().backward()
            best.append((time.perf_counter() - t) / B)
        row["value_and_gradient_s"] = min(best)
        V = torch.randn(args.k, m.n_atoms, 3, generator=g)
        t = time.perf_counter()
        r.render_ft_jvp(X, A, torch.zeros(B, 2), None, V)
        row["jvp_k%d_s" % args.k] = (time.perf_counter() - t) / B
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def span(args):
    """Floors of normal-mode bases (module docstring, ``--span``)."""
    from nmaem_plugin import DATA_DIR
    from nmaem_plugin.core.modes.compute import compute_modes
    from nmaem_plugin.core.physics.structure import read_model, superpose
    ref = read_model(os.path.join(DATA_DIR, "ak_open_4ake.pdb"))
    closed = read_model(os.path.join(DATA_DIR, "ak_closed_1ake.pdb"))
    X0 = ref.coords.astype(np.float64)
    C = superpose(closed.coords, X0)
    out = []

    def floor(model, k, cg, target):
        nm = compute_modes(model, k, cg=cg, device="cpu")
        U = nm.modes.astype(np.float64).reshape(k, -1)
        d = (target - model.coords).ravel()
        return model.coords + (U.T @ (U @ d)).reshape(-1, 3)

    for t, label in ((1.0, "closed crystal"), (41.0 / 49.0, "frame 41 of 50")):
        T = X0 + t * (C - X0)
        for cg, ks in (("ca", (16, 32, 64, 100)), ("backbone", (100, 300)),
                       ("heavy", (100, 300, 600))):
            for k in ks:
                row = dict(target=label, cg=cg, k=k, floor=rmsd(floor(ref, k, cg, T), T))
                print(json.dumps(row), flush=True)
                out.append(row)
        for k in (16, 32, 64):
            X = X0.copy()
            for r in range(6):
                X = floor(ref.with_coords(X), k, "ca", T)
            row = dict(target=label, cg="ca, iterated 6 times", k=k, floor=rmsd(X, T))
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", help="simulated dataset folder")
    ap.add_argument("--run", help="training run folder")
    ap.add_argument("--latent", help="latent file of nmaem infer")
    ap.add_argument("--particles", help="particle file (default SIM/particles.star)")
    ap.add_argument("--work", required=True, help="output folder")
    ap.add_argument("--kmeans", type=int, default=None, help="k-means states (default maxima)")
    ap.add_argument("--tag", default="", help="suffix of the refine-states output folder")
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--span", action="store_true")
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 96, 128, 192])
    ap.add_argument("--k", type=int, default=32, help="tangents of the JVP timing")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("rest", nargs=argparse.REMAINDER,
                    help="after --: options of nmaem refine-states")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    for flag, fn in (("timing", timing), ("span", span)):
        if getattr(args, flag):
            res = fn(args)
            with open(os.path.join(args.work, "%s.json" % flag), "w") as fh:
                json.dump(res, fh, indent=1)
            return
    log = os.path.join(args.work, "commands.log")
    particles = args.particles or os.path.join(args.sim, "particles.star")
    states = os.path.join(args.work, "states")
    if not os.path.exists(os.path.join(states, "states.json")):
        how = ["--kmeans", str(args.kmeans)] if args.kmeans else ["--maxima"]
        run(NMAEM + ["states", "--latent", args.latent, "-o", states, "--particles",
                     particles, "--model", args.run, "--no-thumbnails"] + how, log)
    out = os.path.join(args.work, "refined" + args.tag)
    extra = [a for a in args.rest if a != "--"]
    seconds = run(NMAEM + ["refine-states", "--states", states, "--model", args.run,
                           "--particles", particles, "-o", out, "--force"] + extra, log)
    result = score(args, out, states)
    result.update(command=" ".join(sys.argv), refine_states_seconds=seconds,
                  refine_options=extra)
    with open(os.path.join(args.work, "bench%s.json" % args.tag), "w") as fh:
        json.dump(result, fh, indent=1)
    print(table(result))


if __name__ == "__main__":
    main()
