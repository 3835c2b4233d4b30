"""Batch-norm gap: eval-mode (running statistics) against train-mode (batch statistics) loss
and latent accuracy of a trained encoder, before and after precise BN (core/learn/normstats.py).

    python bench/bn_gap.py [--work DIR] [--n 4000] [--epochs 8] [--threads 1]

Simulates an adenylate kinase morph (open -> closed, 20 frames, uniform) at 64 px, 2.4 A/px,
``--snr-db`` (default -15), computes 16 modes of the open model, then trains the small
encoder with ``--loss corr`` and default options otherwise, in up to three runs:

* ``b256_old``: ``--batch 256`` with the running statistics of momentum-0.1 BN, as before
  the fix (the recomputation is switched off in this process only);
* ``b256_pbn``: the same final weights with precise-BN statistics (recomputed afterwards,
  exactly what training with the fix stores: the recomputation never changes weights);
* ``auto_pbn``: ``--batch auto`` (min(256, max(16, N_train // 64))) with the fix.

For each: the validation loss with eval() and with batch statistics (batches of 256 in a
fixed order), the loss of the undeformed model (z = 0) and of the best z the modes allow
(projection of the true frame), then ``infer`` in both modes and ``analysis.evaluate``
(median excess RMSD over the floor, |corr(PC1, frame)|). Prints a table and writes
WORK/results.json.
"""
import argparse
import copy
import json
import os
import sys
import time
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nmaem_plugin import DATA_DIR  # noqa: E402
from nmaem_plugin.core.learn import normstats, train as train_mod  # noqa: E402
from nmaem_plugin.core.analysis.evaluate import evaluate  # noqa: E402
from nmaem_plugin.core.io.particles import read_particles  # noqa: E402
from nmaem_plugin.core.learn.network import image_loss  # noqa: E402
from nmaem_plugin.core.learn.data import ParticleMetadata, make_loader, ParticleImages
from nmaem_plugin.core.io.runfolder import read_config  # noqa: E402
from nmaem_plugin.core.learn.checkpoints import load_trained  # noqa: E402


def quiet(*a, **k):
    pass


def make_data(work, n, snr_db, seed):
    from nmaem_plugin.core.modes.compute import compute_modes
    from nmaem_plugin.core.modes.modesfile import save_modes
    from nmaem_plugin.core.sim.simulate import SimulationSettings, load_frames, simulate
    from nmaem_plugin.core.physics.structure import read_model
    sim = os.path.join(work, "sim")
    if not os.path.isfile(os.path.join(sim, "modes.npz")):
        model, frames = load_frames(ref=os.path.join(DATA_DIR, "ak_open_4ake.pdb"),
                                    target=os.path.join(DATA_DIR, "ak_closed_1ake.pdb"),
                                    n_frames=20)
        simulate(sim, model, frames,
                 SimulationSettings(n=n, box=64, apix=2.4, snr_db=snr_db, seed=seed),
                 device="cpu", log=quiet, overwrite=True)
        save_modes(os.path.join(sim, "modes.npz"),
                   compute_modes(read_model(os.path.join(sim, "reference.pdb")), n_modes=16,
                                 device="cpu"))
    return sim


def val_losses(ae, cfg, run, sim, batch=256):
    """Validation loss: eval mode, batch statistics, z = 0, and the floor z (true frame)."""
    from nmaem_plugin.core.physics.structure import read_trajectory
    table = read_particles(cfg["particles"])
    with np.load(os.path.join(run, "split.npz")) as sp:
        val = sp["val"]
    meta = ParticleMetadata(table, "cpu")
    ds = ParticleImages(table, cfg["box"])
    with np.load(os.path.join(sim, "ground_truth.npz")) as g:
        frame = g["frame"]
    fmodel, frames = read_trajectory(os.path.join(sim, "frames.pdb"))
    U = ae.decoder.modes.double().reshape(ae.decoder.n_modes, -1)
    x0 = ae.decoder.coords.double().reshape(-1)
    zf = ((torch.as_tensor(frames).reshape(len(frames), -1) - x0) @ U.T).float()
    train_enc = copy.deepcopy(ae.encoder).train()
    out = dict(eval=0.0, batchstat=0.0, undeformed=0.0, floor_z=0.0)
    batches = [val[i:i + batch] for i in range(0, len(val), batch)]
    with torch.no_grad():
        for rows, images in make_loader(ds, batches, 0, False):
            rot, base, ctf_params = meta.batch(rows)
            ctf = ae.decoder.ctf(ctf_params)
            for key, enc in (("eval", ae.encoder), ("batchstat", train_enc)):
                shift, z = enc(images)
                out[key] += float(image_loss(images, ae.decoder(z, rot, base + shift, ctf),
                                             cfg["loss"])) * len(rows)
            z0 = torch.zeros(len(rows), ae.decoder.n_modes)
            out["undeformed"] += float(image_loss(images, ae.decoder(z0, rot, base, ctf),
                                                  cfg["loss"])) * len(rows)
            # the simulator's shifts are in the STAR origins; true residual shift = 0
            out["floor_z"] += float(image_loss(
                images, ae.decoder(zf[frame[rows.numpy()]], rot, base, ctf),
                cfg["loss"])) * len(rows)
    return {k: v / len(val) for k, v in out.items()}


def latent_eval(ae, cfg, run, sim, mode, tag):
    """infer every particle with the encoder in eval() or train() mode; evaluate."""
    table = read_particles(cfg["particles"])
    enc = copy.deepcopy(ae.encoder)
    enc.train(mode == "batchstat")
    n = table.n
    z = np.zeros((n, cfg["n_modes"]), np.float32)
    sh = np.zeros((n, 2), np.float32)
    rows_all = np.arange(n)
    batches = [rows_all[i:i + 256] for i in range(0, n, 256)]
    with torch.no_grad():
        for rows, images in make_loader(ParticleImages(table, cfg["box"]), batches, 0, False):
            s, zz = enc(images)
            sh[rows.numpy()], z[rows.numpy()] = s.numpy(), zz.numpy()
    path = os.path.join(run, "latent_%s_%s.npz" % (tag, mode))
    np.savez(path, z=z, shift=sh, index=rows_all)
    s = evaluate(path, sim, run)["summary"]
    return dict(median_excess_rmsd=s["median_rmsd"] - s["median_floor_rmsd"],
                median_rmsd=s["median_rmsd"], median_floor=s["median_floor_rmsd"],
                abs_corr_pc1_frame=s["abs_corr_pc1_frame"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join("/tmp", "nmaem_bn_gap"))
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--snr-db", type=float, default=-15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", nargs="+", default=["b256", "auto"], choices=["b256", "auto"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()
    sim = make_data(args.work, args.n, args.snr_db, args.seed)
    print("data: %s (%.0f s)" % (sim, time.time() - t0), flush=True)
    common = dict(encoder="small", loss="corr", epochs=args.epochs, seed=args.seed,
                  device="cpu", log=quiet)
    results = {}
    for name in args.runs:
        run = os.path.join(args.work, "run_" + name)
        t1 = time.time()
        if not os.path.isfile(os.path.join(run, "checkpoints", "last.pt")):
            if name == "b256":       # before the fix: no recomputation
                with mock.patch.object(train_mod, "recompute_from_dataset", lambda *a, **k: 0):
                    train_mod.train(run, os.path.join(sim, "particles.star"),
                                    os.path.join(sim, "reference.pdb"),
                                    os.path.join(sim, "modes.npz"), batch=256, **common)
            else:
                train_mod.train(run, os.path.join(sim, "particles.star"),
                                os.path.join(sim, "reference.pdb"),
                                os.path.join(sim, "modes.npz"), batch="auto", **common)
        t_train = time.time() - t1
        cfg = read_config(run)
        ae, cfg = load_trained(run, "cpu")
        variants = [(name + ("_old" if name == "b256" else "_pbn"), ae)]
        if name == "b256":           # the same weights with precise-BN statistics
            ae2 = copy.deepcopy(ae)
            table = read_particles(cfg["particles"])
            with np.load(os.path.join(run, "split.npz")) as sp:
                trn = sp["train"]
            normstats.recompute_from_dataset(
                ae2.encoder, ParticleImages(table, cfg["box"]), trn, cfg["batch"], cfg["seed"],
                cfg["epoch"] - 1, "cpu", lambda ds, bs: make_loader(ds, bs, 0, False))
            ae2.eval()
            variants.append(("b256_pbn", ae2))
        for tag, model in variants:
            steps = cfg["epochs"] * -(-cfg["n_train"] // cfg["batch"])
            r = dict(batch=cfg["batch"], steps=steps, train_s=round(t_train))
            r.update({"loss_" + k: v for k, v in val_losses(model, cfg, run, sim).items()})
            for mode in ("eval", "batchstat"):
                r.update({"%s_%s" % (k, mode): v for k, v in
                          latent_eval(model, cfg, run, sim, mode, tag).items()})
            results[tag] = r
            print(tag, json.dumps(r), flush=True)
    with open(os.path.join(args.work, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print("\n%-9s %5s %5s | %-7s %-7s %-7s %-7s | %-6s %-6s | %-5s %-5s" % (
        "run", "batch", "steps", "L_eval", "L_bstat", "L_z=0", "L_floor", "exc_ev", "exc_bs",
        "cor_ev", "cor_bs"))
    for tag, r in results.items():
        print("%-9s %5d %5d | %.4f  %.4f  %.4f  %.4f  | %.2f   %.2f   | %.2f  %.2f" % (
            tag, r["batch"], r["steps"], r["loss_eval"], r["loss_batchstat"],
            r["loss_undeformed"], r["loss_floor_z"], r["median_excess_rmsd_eval"],
            r["median_excess_rmsd_batchstat"], r["abs_corr_pc1_frame_eval"],
            r["abs_corr_pc1_frame_batchstat"]))
    print("total %.0f s" % (time.time() - t0))


if __name__ == "__main__":
    main()
