"""State maps on the realistic benchmark: each state's RELION map against the truth.

The adenylate kinase open -> closed morph (50 frames) of bench/ak_paper.py, the
discontinuous distribution (three islands of frames), every nuisance of real data on
(``nmaem simulate --realistic``: coloured noise, contrast and offset per particle, RELION
normalisation, pose, origin and defocus errors, a B-factor, atom jitter), -20 dB; the
network trained and run as a user would (``nmaem modes / train / infer``), then
``nmaem states --maxima --reconstruct`` (RELION's relion_reconstruct, the models refined
with OpenMM). For each state:

* its map's half-map resolution (FSC 0.143) and its model's map-model resolution (FSC 0.5);
* the correlation of its map with the map of the state's true mean structure (the mean
  coordinates of the true frames of its particles) against that with the map of the
  reference X0 (both maps made with the renderer's form factors, ``physics.density``, and
  low-passed with the state map to its half-map resolution, ``analysis.fsc``): a state map
  that shows the state correlates better with the truth than with the reference;
* the time per state (RELION's three reconstructions, and everything: model map, FSCs,
  figure).

Every step is the user's command run as a subprocess; datasets and runs are reused when
present (``--fresh`` redoes the states). Results: ``WORK/states*/results.json`` and a
Markdown table (printed). CPU is shared: run it niced, one thread:

    OMP_NUM_THREADS=1 nice -n 19 python bench/state_maps.py --work /tmp/bench_maps \\
        [--n 4000 --sim-box 96 --sim-apix 1.6 --box 64 --epochs 15 --d 4]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "nmaem_plugin", "data")
sys.path.insert(0, os.path.join(HERE, ".."))


def run(cmd, log):
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ %s\n" % " ".join(cmd))
        fh.flush()
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench_maps", help="working folder (not the repo)")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--sim-box", type=int, default=96)
    ap.add_argument("--sim-apix", type=float, default=1.6)
    ap.add_argument("--box", type=int, default=64, help="the network's box (nmaem train --box)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--snr-db", type=float, default=-20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-refine", action="store_true", help="validate the plain models")
    ap.add_argument("--fresh", action="store_true", help="redo the states and their maps")
    ap.add_argument("--kmeans", type=int, default=None, metavar="K",
                    help="K k-means states instead of the density maxima (into states_kK/)")
    args = ap.parse_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "commands.log")
    nm = [sys.executable, "-m", "nmaem_plugin"]
    sim = os.path.join(work, "sim")
    star = os.path.join(sim, "particles.star")
    t = {}
    if not os.path.exists(star):
        t["simulate"] = run(nm + ["simulate", "--ref", os.path.join(DATA, "ak_open_4ake.pdb"),
                                  "--target", os.path.join(DATA, "ak_closed_1ake.pdb"),
                                  "--frames", str(args.frames), "-o", sim, "--n", str(args.n),
                                  "--distribution", "discontinuous", "--box",
                                  str(args.sim_box), "--apix", str(args.sim_apix),
                                  "--snr-db", str(args.snr_db), "--seed", str(args.seed),
                                  "--realistic", "--device", "cpu", "--overwrite"], log)
    modes = os.path.join(sim, "modes.npz")
    if not os.path.exists(modes):
        t["modes"] = run(nm + ["modes", os.path.join(sim, "reference.pdb"), "-o", modes,
                               "--n-modes", str(args.d), "--device", "cpu"], log)
    rdir = os.path.join(work, "run")
    latent = os.path.join(rdir, "latent.npz")
    if not os.path.exists(os.path.join(rdir, "checkpoints", "last.pt")):
        if os.path.exists(rdir):
            shutil.rmtree(rdir)
        t["train"] = run(nm + ["train", "--particles", star, "--ref",
                               os.path.join(sim, "reference.pdb"), "--modes", modes,
                               "--n-modes", str(args.d), "-o", rdir, "--box", str(args.box),
                               "--epochs", str(args.epochs), "--encoder", "small",
                               "--batch", "64", "--lr-schedule", "cosine", "--device", "cpu",
                               "--seed", str(args.seed)], log)
    if not os.path.exists(latent):
        t["infer"] = run(nm + ["infer", "--particles", star, "--model", rdir, "-o", latent,
                               "--device", "cpu"], log)
    states = os.path.join(work, "states" if not args.kmeans else "states_k%d" % args.kmeans)
    how = ["--maxima"] if not args.kmeans else ["--kmeans", str(args.kmeans)]
    if args.fresh or not os.path.exists(os.path.join(states, "states.json")):
        t["states"] = run(nm + ["states", "--latent", latent] + how + ["--particles", star,
                                "--model", rdir, "-o", states, "--reconstruct", "--force"]
                          + (["--no-refine"] if args.no_refine else []), log)
    report(work, sim, latent, states, t, args)


def report(work, sim, latent_path, states_dir, times, args):
    from nmaem_plugin.core.analysis.fsc import band_correlation
    from nmaem_plugin.core.analysis.states import read_states, read_states_json
    from nmaem_plugin.core.io.maps import read_map
    from nmaem_plugin.core.physics.density import model_map
    from nmaem_plugin.core.physics.structure import read_model, read_trajectory
    listing = read_states_json(os.path.join(states_dir, "states.json"))
    label, index, _, _ = read_states(os.path.join(states_dir, "states.npz"))
    truth = np.load(os.path.join(sim, "ground_truth.npz"))
    frames_model, frames = read_trajectory(os.path.join(sim, "frames.pdb"))
    ref = read_model(os.path.join(sim, "reference.pdb"))
    rows = []
    for row in listing["states"]:
        if not row.get("map"):
            rows.append(dict(state=row["name"], n=row["n_particles"], map=None))
            continue
        vol, apix = read_map(os.path.join(states_dir, row["map"]))
        D = vol.shape[0]
        members = index[label == row["state"] - 1]
        true_frames = truth["frame"][members]
        mean = frames[true_frames].mean(0)
        res = row["resolution_0143"]
        c_true = band_correlation(vol, model_map(mean, frames_model.elements, D, apix), apix,
                                  res)
        c_ref = band_correlation(vol, model_map(ref.coords, ref.elements, D, apix), apix, res)
        c_model = band_correlation(vol, read_map(os.path.join(states_dir,
                                                              row["model_map"]))[0], apix, res)
        with open(os.path.join(states_dir, row["fsc"])) as fh:
            info = json.load(fh)
        rows.append(dict(state=row["name"], n=row["n_particles"],
                         frames="%d-%d (median %d)" % (true_frames.min(), true_frames.max(),
                                                       np.median(true_frames)),
                         resolution_0143=res, model_map_resolution_05=row[
                             "model_map_resolution_05"],
                         corr_true_mean=c_true, corr_reference=c_ref, corr_state_model=c_model,
                         relion_s=info["seconds"]["relion"], total_s=info["seconds"]["total"]))
    out = dict(command="python bench/state_maps.py " + " ".join(sys.argv[1:]),
               settings=vars(args), times_s=times, states=rows,
               map_model_correlation=listing.get("map_model_correlation"))
    with open(os.path.join(states_dir, "results.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    lines = ["| state | particles | true frames | map (FSC 0.143) | model vs map (FSC 0.5) "
             "| corr. with true mean | corr. with reference | corr. with state model "
             "| RELION (s) | per state (s) |", "|" + "---|" * 10]
    for r in rows:
        if r.get("map", True) is None:
            lines.append("| %s | %d | no map |" % (r["state"], r["n"]))
            continue
        lines.append("| %s | %d | %s | %.1f A | %.1f A | %.3f | %.3f | %.3f | %.0f | %.0f |" % (
            r["state"], r["n"], r["frames"], r["resolution_0143"],
            r["model_map_resolution_05"], r["corr_true_mean"], r["corr_reference"],
            r["corr_state_model"], r["relion_s"], r["total_s"]))
    print("\n".join(lines))
    print("times (s): %s" % json.dumps({k: round(v, 1) for k, v in times.items()}))


if __name__ == "__main__":
    main()
