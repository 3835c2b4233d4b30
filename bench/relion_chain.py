"""The facility chain for real (issue 26): RELION's poses, then the plugin with its defaults.

A molecule RELION can align: seven copies of adenylate kinase (4AKE chain A, 214 residues
each, 166 kDa in all) packed into one compact asymmetric assembly, each copy turned at
random; in two copies (chains A and B) the LID and NMP domains close (1AKE, superposed on
the open copy by its CORE residues 1-29, 60-121, 160-214), the other five stay open. The
assembly is built here from the bundled models (``--copies``, ``--closing``, ``--seed``);
the particles are a 50-frame morph open -> closed, drawn in three islands
(``--distribution discontinuous``): the three states the figures are given for.

Stages (each one kept in ``WORK`` and skipped when its output is there, so a re-run only
redoes what is missing; RELION resumes from its last iteration when it was interrupted):

1. ``model/``: the assembly, open (the reference handed to the plugin) and closed.
2. ``snr.json``: the SNR that gives these particles the dose of the project's adenylate
   kinase particles (-20 dB at 64 px and 2.4 A/px, the paper's dose in the issue's
   trial): SNR is the variance of the clean image (the projected potential, whose values
   do not depend on the pixel size) over the variance of the noise, and at one dose a
   pixel of side a counts a^2 times the electrons, so the noise variance per pixel goes as
   1/a^2. Hence SNR_assembly = 0.01 * var(clean assembly images at the benchmark's box and
   pixel size a) / var(clean AK images, 64 px at 2.4 A) * (a / 2.4)^2. Both variances from
   noise-free ``nmaem simulate`` runs with the same seed.
3. ``sim/``: ``nmaem simulate`` with every nuisance of real data but the pose errors
   (``--realistic --angle-error 0 --origin-error 0``: coloured noise, contrast, offset,
   RELION normalisation, defocus errors, B-factor, atom jitter) and random picking offsets
   (``--shift-std``) that the STAR does not carry (``--unknown-shifts``).
4. ``relion/``: the starting map, the reference model rendered as an electron density by
   gemmi (``DensityCalculatorE``, International Tables c4322 form factors) at the particles'
   pixel size, in the particles' box, low-passed to 40 A; RELION's input STAR (the
   simulation's without angles, ``rlnImageId`` = row + 1); then ``relion_refine_mpi
   --auto_refine --split_random_halves`` (C1, 3 MPI ranks, one thread each, ``nice -n 19``).
   A finished refinement (``run_data.star``) is reused.
5. RELION's poses against the truth, per state: the angle of A_relion A_true^T and the
   origin error, raw and after removing the one global rotation G and translation t that
   carry the truth's frame into RELION's (RELION may refine in a frame turned or moved
   relative to the starting map: A_relion = A_true G^T for every particle, and the
   origins move by the projection of t). G is the rotation closest to the mean of
   A_true^T A_relion over the particles within 20 degrees of the current estimate
   (iterated), t by least squares on the origin differences.
6. The plugin with its defaults on ``run_data.star`` (subprocesses of the ``nmaem``
   command, as a user runs it): ``modes`` (``--n-modes``: 64 by default, since 16 modes
   reach only a 3.5 A floor of the 4.3 A change, see docs/benchmarks.md), ``check``,
   ``train --box 64 --epochs 30 --encoder small`` (a user's first run on a CPU; and once
   more with ``--refine-pose``), ``infer`` (the default fit, and ``--fit-pose``),
   ``states``, ``evaluate --particles run_data.star`` (rows matched to the simulation by
   ``rlnImageId``). Per state (the three islands), the median RMSD to the true frame
   against the floor the modes allow.

    OMP_NUM_THREADS=1 python bench/relion_chain.py --work /tmp/bench_relion [--n 3000] ...

The figures go to ``WORK/results.json`` and ``WORK/results.md``; docs/benchmarks.md holds
the machine's.
"""
import argparse
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

import gemmi
import mrcfile
import numpy as np
import starfile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "nmaem_plugin", "data")
sys.path.insert(0, os.path.join(HERE, ".."))
from nmaem_plugin.core.io.poses import (correct_rotations, euler_to_matrix,  # noqa: E402
                                        rotation_angle_deg)

OPEN = os.path.join(DATA, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA, "ak_closed_1ake.pdb")
AK_CORE = ((1, 29), (60, 121), (160, 214))
CHAINS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def nmaem_cmd():
    """The ``nmaem`` command as ``python -m nmaem_plugin`` of this interpreter (the same
    command; an installed console script may be older than the checkout)."""
    return [sys.executable, "-m", "nmaem_plugin"]


def run(cmd, log, capture=False, nice=True):
    """Run one command (niced), echo it, log its output; returns (seconds, stdout)."""
    cmd = (["nice", "-n", "19"] if nice else []) + list(cmd)
    line = " ".join(shlex.quote(c) for c in cmd)
    print("$ " + line, flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ %s\n" % line)
        fh.flush()
        p = subprocess.run(cmd, stdout=subprocess.PIPE if capture else fh, stderr=fh,
                           text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit("command failed (status %d, log %s): %s" % (p.returncode, log, line))
    return dt, (p.stdout if capture else None)


# ---------------------------------------------------------------------------- the assembly

def _coords(st):
    return np.array([[a.pos.x, a.pos.y, a.pos.z] for r in st[0][0] for a in r])


def _kabsch(P, Q):
    pc, qc = P.mean(0), Q.mean(0)
    U, _, Vt = np.linalg.svd((P - pc).T @ (Q - qc))
    d = np.sign(np.linalg.det(Vt.T @ U.T))
    R = Vt.T @ np.diag([1.0, 1.0, d]) @ U.T
    return R, qc - R @ pc


def _random_rotation(rng):
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def build_assembly(out_dir, copies, closing, seed, gap=4.0, trials=60):
    """Write ``out_dir/open.pdb`` and ``out_dir/closed.pdb``: ``copies`` copies of AK,
    each turned at random and slid towards the copies already placed along the best of
    ``trials`` random directions (the most compact: smallest largest radius) until an atom
    comes within ``gap`` A of another copy, in both states; copies ``closing`` are closed
    in closed.pdb. Returns a dict describing the assembly."""
    from scipy.spatial import cKDTree
    op, cl = gemmi.read_structure(OPEN), gemmi.read_structure(CLOSED)
    names_o = [(r.seqid.num, a.name) for r in op[0][0] for a in r]
    names_c = [(r.seqid.num, a.name) for r in cl[0][0] for a in r]
    if names_o != names_c:
        sys.exit("%s and %s do not hold the same atoms" % (OPEN, CLOSED))
    xo, xc = _coords(op), _coords(cl)
    core = np.array([a == "CA" and any(lo <= n <= hi for lo, hi in AK_CORE)
                     for n, a in names_o])
    R, t = _kabsch(xc[core], xo[core])
    xc = xc @ R.T + t
    c0 = xo.mean(0)
    xo, xc = xo - c0, xc - c0
    rng = np.random.default_rng(seed)
    placed_o, placed_c = [], []
    for k in range(copies):
        Rk = _random_rotation(rng)
        a = xo @ Rk.T
        b = (xc if k in closing else xo) @ Rk.T
        if k == 0:
            shift = np.zeros(3)
        else:
            all_o, all_c = np.concatenate(placed_o), np.concatenate(placed_c)
            cen = all_o.mean(0)
            tree_o, tree_c = cKDTree(all_o), cKDTree(all_c)
            best = None
            for _ in range(trials):
                u = rng.normal(size=3)
                u /= np.linalg.norm(u)
                for dist in np.arange(150.0, 0.0, -1.0):
                    s = cen + dist * u
                    if tree_o.query(a + s)[0].min() < gap or tree_c.query(b + s)[0].min() < gap:
                        break
                s = cen + (dist + 1.0) * u
                union = np.concatenate([all_o, a + s])
                radius = np.linalg.norm(union - union.mean(0), axis=1).max()
                if best is None or radius < best[0]:
                    best = (radius, s)
            shift = best[1]
        placed_o.append(a + shift)
        placed_c.append(b + shift)
    xa, xb = np.concatenate(placed_o), np.concatenate(placed_c)
    cen = xa.mean(0)
    xa, xb = xa - cen, xb - cen
    os.makedirs(out_dir, exist_ok=True)
    for name, x in (("open", xa), ("closed", xb)):
        st = gemmi.Structure()
        st.cell = op.cell
        model = gemmi.Model("1")
        n = len(xo)
        for k in range(copies):
            ch = op[0][0].clone()
            ch.name = CHAINS[k]
            i = 0
            for res in ch:
                for at in res:
                    at.pos = gemmi.Position(*x[k * n + i])
                    i += 1
            model.add_chain(ch)
        st.add_model(model)
        st.setup_entities()
        tmp = os.path.join(out_dir, name + ".tmp.pdb")
        st.write_pdb(tmp)
        os.replace(tmp, os.path.join(out_dir, name + ".pdb"))
    mass = gemmi.read_structure(os.path.join(out_dir, "open.pdb"))[0].calculate_mass()
    info = dict(copies=copies, closing=[CHAINS[k] for k in closing], seed=seed,
                atoms=int(len(xa)), mass_kda=round(mass / 1000.0, 1),
                max_radius=float(np.linalg.norm(xa, axis=1).max()),
                rmsd_open_closed=float(np.sqrt(((xa - xb) ** 2).sum(1).mean())))
    with open(os.path.join(out_dir, "assembly.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    return info


# ---------------------------------------------------------------------------- the SNR

def _mean_variance(sim_dir):
    v = []
    for f in sorted(glob.glob(os.path.join(sim_dir, "stacks", "*.mrcs"))):
        a = mrcfile.read(f).astype(np.float64)
        v.append(a.reshape(len(a), -1).var(1))
    return float(np.concatenate(v).mean())


def calibrate_snr(work, args, log):
    """SNR (dB) of the assembly's particles at the dose of the AK particles at -20 dB."""
    out = os.path.join(work, "snr.json")
    if os.path.exists(out):
        return json.load(open(out))
    nm = nmaem_cmd()
    runs = {"assembly": (os.path.join(work, "model", "open.pdb"),
                         os.path.join(work, "model", "closed.pdb"), args.box, args.apix),
            "ak": (OPEN, CLOSED, 64, 2.4)}
    var = {}
    for name, (ref, target, box, apix) in runs.items():
        d = os.path.join(work, "snr_" + name)
        run(nm + ["simulate", "--ref", ref, "--target", target, "--frames", "10", "--n", "256",
                  "--box", str(box), "--apix", str(apix), "--no-noise", "--seed", "0",
                  "--device", "cpu", "-o", d, "--force"], log)
        var[name] = _mean_variance(d)
    # noise variance per pixel at one dose ~ 1 / pixel area
    ak_apix = runs["ak"][3]
    snr = -20.0 + 10.0 * np.log10(var["assembly"] / var["ak"] * (args.apix / ak_apix) ** 2)
    res = dict(var_assembly=var["assembly"], var_ak=var["ak"], apix=args.apix,
               ak_apix=ak_apix, snr_db=round(float(snr), 2))
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)
    return res


# ---------------------------------------------------------------------------- RELION

def starting_map(ref_pdb, out, box, apix, lowpass):
    """The reference model as an electron density (gemmi, c4322 form factors) on the
    particles' grid (model frame: the box centre at (box//2)*apix, as the particles'),
    low-passed to ``lowpass`` A (a Gaussian whose amplitude is 1/2 at 1/lowpass)."""
    st = gemmi.read_structure(ref_pdb)
    st.setup_entities()
    size = box * apix
    st.cell = gemmi.UnitCell(size, size, size, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    dc = gemmi.DensityCalculatorE()
    dc.d_min = 2.0 * apix
    dc.rate = 1.0
    dc.set_grid_cell_and_spacegroup(st)
    dc.put_model_density_on_grid(st[0])
    if dc.grid.shape != (box, box, box):
        sys.exit("gemmi made a %s grid for a %d px box" % (dc.grid.shape, box))
    rho = np.array(dc.grid, copy=True).astype(np.float64)   # [x, y, z]
    rho = np.transpose(rho, (2, 1, 0))                       # MRC order [z, y, x]
    f = np.fft.fftfreq(box, d=apix)
    k2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2
    # exp(-k^2 / (2 s^2)) = 1/2 at |k| = 1/lowpass
    s2 = (1.0 / lowpass) ** 2 / (2.0 * np.log(2.0))
    rho = np.fft.ifftn(np.fft.fftn(rho) * np.exp(-k2 / (2.0 * s2))).real
    tmp = out + ".tmp.mrc"
    with mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(rho.astype(np.float32))
        m.voxel_size = apix
    os.replace(tmp, out)


def relion_input(sim_star, out):
    """The simulation's STAR without angles, with rlnImageId = row + 1, image paths
    absolute (RELION reads them from its own folder)."""
    blocks = starfile.read(sim_star, always_dict=True)
    parts = blocks["particles"].copy()
    parts = parts.drop(columns=[c for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
                                if c in parts.columns])
    root = os.path.dirname(os.path.abspath(sim_star))

    def absolute(name):
        i, path = name.split("@", 1)
        return "%s@%s" % (i, path if os.path.isabs(path) else os.path.join(root, path))
    parts["rlnImageName"] = parts["rlnImageName"].map(absolute)
    parts["rlnImageId"] = np.arange(1, len(parts) + 1)
    for c in ("rlnOriginXAngst", "rlnOriginYAngst"):
        parts[c] = 0.0
    starfile.write({"optics": blocks["optics"], "particles": parts}, out, overwrite=True)


def relion_state(rdir):
    """('done', None) | ('continue', last optimiser.star) | ('fresh', None)."""
    if os.path.exists(os.path.join(rdir, "run_data.star")):
        return "done", None
    its = sorted(glob.glob(os.path.join(rdir, "run_it[0-9][0-9][0-9]_optimiser.star")))
    return ("continue", its[-1]) if its else ("fresh", None)


def run_relion(work, args, log):
    rdir = os.path.join(work, "relion")
    os.makedirs(rdir, exist_ok=True)
    state, last = relion_state(rdir)
    if state == "done":
        print("RELION: finished refinement found in %s (reused)" % rdir, flush=True)
        return
    ini = os.path.join(rdir, "initial_%gA.mrc" % args.ini_high)
    if not os.path.exists(ini):
        starting_map(os.path.join(work, "sim", "reference.pdb"), ini, args.box, args.apix,
                     args.ini_high)
    inp = os.path.join(rdir, "particles_in.star")
    if not os.path.exists(inp):
        relion_input(os.path.join(work, "sim", "particles.star"), inp)
    mpi = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(args.ranks),
           "relion_refine_mpi"]
    if state == "continue":
        cmd = mpi + ["--continue", last, "--o", os.path.join(rdir, "run"), "--j", "1",
                     "--dont_combine_weights_via_disc", "--pool", "30"]
    else:
        cmd = mpi + [
            "--o", os.path.join(rdir, "run"), "--auto_refine", "--split_random_halves",
            "--i", inp, "--ref", ini, "--firstiter_cc", "--ini_high", "%g" % args.ini_high,
            "--dont_combine_weights_via_disc", "--pool", "30", "--pad", "2", "--ctf",
            "--particle_diameter", str(args.diameter), "--flatten_solvent", "--zero_mask",
            "--oversampling", "1", "--healpix_order", str(args.healpix_order),
            "--auto_local_healpix_order", "4", "--offset_range", str(args.offset_range),
            "--offset_step", str(args.offset_step), "--sym", "C1",
            "--low_resol_join_halves", "40", "--norm", "--scale", "--j", "1",
            "--random_seed", "0"]
    env_log = os.path.join(rdir, "relion.log")
    t0 = time.time()
    run(cmd, env_log)
    with open(os.path.join(rdir, "timing.json"), "a") as fh:
        fh.write(json.dumps(dict(state=state, seconds=time.time() - t0)) + "\n")


def relion_iterations(rdir):
    """Per iteration: (number, seconds since the previous file, resolution A)."""
    rows = []
    files = sorted(glob.glob(os.path.join(rdir, "run_it[0-9][0-9][0-9]_optimiser.star")))
    prev = None
    for f in files:
        n = int(re.search(r"_it(\d+)_", f).group(1))
        t = os.path.getmtime(f)
        res = None
        model = f.replace("_optimiser.star", "_half1_model.star")
        if os.path.exists(model):
            gen = starfile.read(model, always_dict=True).get("model_general")
            if gen is not None:
                res = float(np.asarray(gen["rlnCurrentResolution"]).ravel()[0])
        rows.append(dict(iteration=n, seconds=None if prev is None else t - prev,
                         resolution=res))
        prev = t
    return rows


# ---------------------------------------------------------------------------- poses

STATES = ("state 1 (frames 0-16)", "state 2 (frames 17-32)", "state 3 (frames 33-49)")


def state_of_frame(frame, n_frames=50):
    """The island of each frame (0, 1, 2): the discontinuous distribution's three islands
    sit at 1/6, 1/2 and 5/6 of the morph, so thirds of the frames separate them."""
    return np.minimum((np.asarray(frame) * 3) // n_frames, 2)


def _closest_rotation(M):
    U, _, Vt = np.linalg.svd(M)
    d = np.sign(np.linalg.det(U @ Vt))
    return U @ np.diag([1.0, 1.0, d]) @ Vt


def relion_pose_errors(work, data_star):
    """RELION's poses (``data_star``) against the truth: per particle the rotation error
    and the origin error (A), raw and after the global frame (G, t) is removed (module
    docstring); the rows' simulation indices; and G, t."""
    gt = np.load(os.path.join(work, "sim", "ground_truth.npz"))
    parts = starfile.read(data_star, always_dict=True)["particles"]
    rows = parts["rlnImageId"].to_numpy().astype(np.int64) - 1
    a_true = euler_to_matrix(*gt["euler"][rows].T)
    a_rel = euler_to_matrix(parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"])
    raw = rotation_angle_deg(a_rel, a_true)
    # A_rel = A_true G^T for a map turned by G: G^T = A_true^T A_rel, the same for all
    m = np.einsum("nji,njk->nik", a_true, a_rel)
    gt_t = _closest_rotation(m.mean(0))
    for _ in range(10):
        err = rotation_angle_deg(m, np.broadcast_to(gt_t, m.shape))
        keep = err < 20.0
        if keep.sum() < 10:
            break
        gt_t = _closest_rotation(m[keep].mean(0))
    g = gt_t.T
    corrected = rotation_angle_deg(a_rel @ g, a_true)
    o_true = -gt["shift"][rows].astype(np.float64)
    o_rel = parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy().astype(np.float64)
    d = o_rel - o_true
    # a map moved by t: each origin moves by the projection of A t (least squares)
    proj = a_rel[:, :2, :]
    ok = corrected < 20.0
    t, *_ = np.linalg.lstsq(proj[ok].reshape(-1, 3), d[ok].reshape(-1), rcond=None)
    d_corr = d - proj @ t
    return dict(rows=rows, angle_raw=raw, angle=corrected, a_true=a_true, a_rel=a_rel,
                origin_raw=np.linalg.norm(d, axis=1), origin=np.linalg.norm(d_corr, axis=1),
                frame=gt["frame"][rows], G=g, t=t,
                G_angle=float(np.degrees(np.arccos(np.clip((np.trace(g) - 1) / 2, -1, 1)))))


def summarise_poses(pe):
    st = state_of_frame(pe["frame"])
    out = dict(n=int(len(pe["rows"])), global_rotation_deg=pe["G_angle"],
               global_translation_A=[float(v) for v in pe["t"]], all={}, states={})
    for key, sel in [("all", np.ones(len(st), bool))] + [(STATES[k], st == k) for k in range(3)]:
        row = dict(n=int(sel.sum()))
        for name in ("angle_raw", "angle", "origin_raw", "origin"):
            row["median_" + name] = float(np.median(pe[name][sel]))
        row["within_5deg"] = float(np.mean(pe["angle"][sel] < 5.0))
        row["within_10deg"] = float(np.mean(pe["angle"][sel] < 10.0))
        if key == "all":
            out["all"] = row
        else:
            out["states"][key] = row
    return out


# ---------------------------------------------------------------------------- the plugin

def per_state_accuracy(per_particle_npz):
    with np.load(per_particle_npz) as f:
        frame, rmsd, floor = f["frame"], f["rmsd"], f["floor_rmsd"]
    st = state_of_frame(frame)
    out = {}
    for k, name in enumerate(STATES):
        sel = st == k
        out[name] = dict(n=int(sel.sum()), median_rmsd=float(np.median(rmsd[sel])),
                         median_floor=float(np.median(floor[sel])))
    out["all"] = dict(n=int(len(st)), median_rmsd=float(np.median(rmsd)),
                      median_floor=float(np.median(floor)))
    return out


def refined_pose_errors(latent_npz, pe):
    """Per state, the median angle (degrees) of the rotations the plugin refined (the
    latent's ``euler`` with ``infer --fit-pose``, or RELION's corrected by its
    ``pose_correction`` with ``train --refine-pose``) to the true ones, in the truth's
    frame (G removed), next to RELION's own for the same particles; None when the
    latent has no refined rotations."""
    with np.load(latent_npz) as f:
        idx = f["index"]
        if "euler" in f.files and f["euler"].size:
            a = euler_to_matrix(*f["euler"].T)
        elif "pose_correction" in f.files and f["pose_correction"].size:
            a = correct_rotations(pe["a_rel"][idx], f["pose_correction"])
        else:
            return None
    err = rotation_angle_deg(a @ pe["G"], pe["a_true"][idx])
    st = state_of_frame(pe["frame"][idx])
    out = {}
    for k, name in enumerate(STATES):
        sel = st == k
        out[name] = dict(refined=float(np.median(err[sel])),
                         relion=float(np.median(pe["angle"][idx][sel])))
    out["all"] = dict(refined=float(np.median(err)), relion=float(np.median(pe["angle"][idx])))
    return out


def chain(work, args, info, snr, log):
    """modes, check, train (with and without --refine-pose), infer (default fit and
    --fit-pose), states, evaluate; then the tables."""
    nm = nmaem_cmd()
    rdir = os.path.join(work, "relion")
    data = os.path.join(rdir, "run_data.star")
    ref = os.path.join(work, "sim", "reference.pdb")
    pdir = os.path.join(work, "plugin")
    os.makedirs(pdir, exist_ok=True)
    timings = {}
    res_file = os.path.join(work, "results.json")
    results = json.load(open(res_file)) if os.path.exists(res_file) else {}

    def step(name, out, cmd, capture=False):
        if os.path.exists(out):
            return
        dt, stdout = run(cmd, log, capture=capture)
        timings[name] = dt
        if capture:
            tmp = out + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(stdout)
            os.replace(tmp, out)

    pe = relion_pose_errors(work, data)
    results["relion_poses"] = summarise_poses(pe)
    results["relion_iterations"] = relion_iterations(rdir)
    modes = os.path.join(pdir, "modes.npz")
    step("modes", modes, nm + ["modes", ref, "-o", modes, "--n-modes", str(args.n_modes),
                               "--target", os.path.join(work, "model", "closed.pdb"),
                               "--device", "cpu"])
    check = os.path.join(pdir, "check.json")
    step("check", check, nm + ["check", "--particles", data, "--ref", ref, "--device", "cpu",
                               "--json", check])
    runs = {"": [], "_pose": ["--refine-pose"]}
    for tag, extra in runs.items():
        rd = os.path.join(pdir, "run" + tag)
        step("train" + tag, os.path.join(rd, "final.done"),
             nm + ["train", "--particles", data, "--ref", ref, "--modes", modes, "-o", rd,
                   "--box", str(args.train_box), "--epochs", str(args.epochs), "--encoder",
                   args.encoder, "--device", "cpu"] + extra)
        if not os.path.exists(os.path.join(rd, "final.done")):
            open(os.path.join(rd, "final.done"), "w").close()
    variants = {"default": ("run", []), "fit_pose": ("run", ["--fit-pose"]),
                "refine_pose": ("run_pose", [])}
    acc = results.setdefault("accuracy", {})
    for name, (rname, extra) in variants.items():
        rd = os.path.join(pdir, rname)
        lat = os.path.join(pdir, "latent_%s.npz" % name)
        step("infer_" + name, lat, nm + ["infer", "--particles", data, "--model", rd, "-o", lat,
                                          "--device", "cpu"] + extra)
        ev = os.path.join(pdir, "evaluate_%s.json" % name)
        pp = os.path.join(pdir, "per_particle_%s.npz" % name)
        step("evaluate_" + name, ev, nm + ["evaluate", "--latent", lat, "--truth",
                                            os.path.join(work, "sim"), "--model", rd,
                                            "--particles", data, "--per-particle", pp],
             capture=True)
        e = json.load(open(ev))
        acc[name] = dict(per_state=per_state_accuracy(pp),
                         corr_pc1_frame=e.get("summary", e).get("abs_corr_pc1_frame"),
                         summary=e.get("summary"),
                         refined_pose_error=refined_pose_errors(lat, pe))
    states = os.path.join(pdir, "states")
    step("states", os.path.join(states, "states.json"),
         nm + ["states", "--latent", os.path.join(pdir, "latent_default.npz"), "-o", states,
               "--maxima", "--particles", data, "--model", os.path.join(pdir, "run")])
    results["states"] = json.load(open(os.path.join(states, "states.json")))
    results["check"] = json.load(open(check))
    results["assembly"] = info
    results["snr"] = snr
    results.setdefault("timings", {}).update(timings)
    tmp = res_file + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    os.replace(tmp, res_file)
    write_table(work, results)


def write_table(work, r):
    lines = ["RELION poses against the truth (%d particles; global frame: %.1f deg, t = %s A)"
             % (r["relion_poses"]["n"], r["relion_poses"]["global_rotation_deg"],
                ", ".join("%.1f" % v for v in r["relion_poses"]["global_translation_A"])),
             "",
             "| particles | n | median angle error (deg), raw / frame removed | "
             "within 5 / 10 deg | median origin error (A), raw / frame removed |",
             "|---|---|---|---|---|"]
    rows = [("all", r["relion_poses"]["all"])] + list(r["relion_poses"]["states"].items())
    for name, p in rows:
        lines.append("| %s | %d | %.2f / %.2f | %.0f %% / %.0f %% | %.2f / %.2f |" % (
            name, p["n"], p["median_angle_raw"], p["median_angle"], 100 * p["within_5deg"],
            100 * p["within_10deg"], p["median_origin_raw"], p["median_origin"]))
    lines += ["", "Median RMSD to the true frame / floor (A), per state:", "",
              "| poses | " + " | ".join(STATES) + " | all | abs corr(PC1, frame) | "
              "median angle error (deg), RELION -> refined |",
              "|---|" + "---|" * (len(STATES) + 3)]
    labels = {"default": "RELION's (nmaem infer)", "fit_pose": "RELION's, infer --fit-pose",
              "refine_pose": "RELION's, train --refine-pose"}
    for name, a in r.get("accuracy", {}).items():
        ps = a["per_state"]
        cells = ["%.2f / %.2f" % (ps[s]["median_rmsd"], ps[s]["median_floor"])
                 for s in list(STATES) + ["all"]]
        corr = a.get("corr_pc1_frame")
        rp = a.get("refined_pose_error")
        pose = "-" if not rp else "%.2f -> %.2f" % (rp["all"]["relion"], rp["all"]["refined"])
        lines.append("| %s | %s | %s | %s |" % (labels.get(name, name), " | ".join(cells),
                                                "-" if corr is None else "%.2f" % corr, pose))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(work, "results.md"), "w") as fh:
        fh.write(text)
    print(text, flush=True)


# ---------------------------------------------------------------------------- main

def simulate(work, args, snr_db, log):
    sim = os.path.join(work, "sim")
    if os.path.exists(os.path.join(sim, "ground_truth.npz")):
        return
    run(nmaem_cmd() + [
        "simulate", "--ref", os.path.join(work, "model", "open.pdb"),
        "--target", os.path.join(work, "model", "closed.pdb"), "--frames", "50",
        "--distribution", "discontinuous", "--n", str(args.n), "--box", str(args.box),
        "--apix", str(args.apix), "--snr-db", "%.2f" % snr_db, "--realistic",
        "--angle-error", "0", "--origin-error", "0", "--shift-std", str(args.shift_std),
        "--unknown-shifts", "--seed", str(args.seed), "--device", "cpu", "-o", sim], log)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/bench_relion_chain",
                    help="working folder, outside the repository (kept between runs)")
    ap.add_argument("--copies", type=int, default=7)
    ap.add_argument("--closing", default="0,1", help="indices of the copies that close")
    ap.add_argument("--assembly-seed", type=int, default=2)
    ap.add_argument("--n", type=int, default=3000, help="particles")
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=3.0)
    ap.add_argument("--shift-std", type=float, default=4.0,
                    help="picking offsets (A per axis), unknown to RELION")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--diameter", type=float, default=170.0,
                    help="RELION --particle_diameter (A)")
    ap.add_argument("--offset-range", type=int, default=3, help="RELION --offset_range (px)")
    ap.add_argument("--offset-step", type=int, default=2, help="RELION --offset_step (px)")
    ap.add_argument("--healpix-order", type=int, default=1,
                    help="RELION --healpix_order of the first iterations (1: 15 degrees)")
    ap.add_argument("--ranks", type=int, default=3, help="MPI ranks of relion_refine_mpi")
    ap.add_argument("--ini-high", type=float, default=40.0,
                    help="low-pass of the starting map and RELION --ini_high (A; default 40)")
    ap.add_argument("--n-modes", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--train-box", type=int, default=64)
    ap.add_argument("--encoder", default="small")
    ap.add_argument("--poses-from", help="with --stop-after poses: a RELION data.star to "
                    "score (e.g. an iteration's run_itNNN_data.star)")
    ap.add_argument("--stop-after", choices=("model", "snr", "simulate", "relion", "poses"),
                    help="stop after this stage")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "commands.log")
    closing = [int(k) for k in args.closing.split(",") if k != ""]
    if not os.path.exists(os.path.join(work, "model", "assembly.json")):
        info = build_assembly(os.path.join(work, "model"), args.copies, closing,
                              args.assembly_seed)
    else:
        info = json.load(open(os.path.join(work, "model", "assembly.json")))
    print("assembly:", json.dumps(info), flush=True)
    if args.stop_after == "model" or (args.stop_after == "poses"
                                      and not os.path.exists(os.path.join(work, "sim"))):
        return
    snr = calibrate_snr(work, args, log)
    print("SNR:", json.dumps(snr), flush=True)
    if args.stop_after == "snr":
        return
    simulate(work, args, snr["snr_db"], log)
    if args.stop_after == "simulate":
        return
    if args.stop_after == "poses":       # score RELION's poses as they are; runs nothing
        data = args.poses_from or os.path.join(work, "relion", "run_data.star")
        res = summarise_poses(relion_pose_errors(work, data))
        res["iterations"] = relion_iterations(os.path.join(work, "relion"))
        print(json.dumps(res, indent=1))
        return
    run_relion(work, args, log)
    if args.stop_after == "relion":
        return
    chain(work, args, info, snr, log)


if __name__ == "__main__":
    main()
