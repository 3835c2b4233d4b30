"""``nmaem evaluate``: accuracy of the latent amplitudes against a simulated dataset's
ground truth (``ground_truth.npz``, ``frames.pdb``): RMSD of X(z_i) to the true frame, the
floor the modes allow, and the density maxima found against the true states.

RMSDs are over all matched atoms with no superposition: on synthetic data the pose is
known, so the frames are already in the reference's frame.

Particles matched by id (``--particles P.star``, :func:`match_to_simulation`): when the
latent's rows are particles of another file than the simulation's ``particles.star`` (a
Scipion set written by a protocol, a subset, a re-extraction), each row is found in the
simulation by its ``rlnImageId`` (ids 1..N in a file without the column), and its
predicted shift, relative to the simulation's origins, is its latent shift plus the
simulated origin minus the file's origin (RELION origins, Angstrom): a file whose origins
already hold the predicted shifts (refined particles) and a zero latent shift give the
simulated origin minus the refined one.

``pose_error`` (when the ground truth has the true and the written angles, ``euler`` and
``euler_file``): the angle of the rotation between each particle's true matrix and the one
in its particle file (``input``), and, for a latent file of a run trained with
``--refine-pose``, the refined one (``refined``), in degrees (``poses.rotation_angle_deg``).
"""
import json
import os
from typing import Mapping, Optional

import numpy as np

from .kde import density_maxima
from .landscape import DEFAULTS, check_latent_d, load_run, pca
from ..base.atomic import atomic_savez
from ..base.errors import fail, require_folder
from ..io.latent import Latent, read_latent
from ..io.table import ParticleTable
from ..io.particles import read_particles

__all__ = ["evaluate", "pose_error", "match_to_simulation"]


def _load_truth(sim_dir):
    sim_dir = str(sim_dir)
    require_folder(sim_dir, "simulated dataset folder (--truth)")
    gt_path = os.path.join(sim_dir, "ground_truth.npz")
    fr_path = os.path.join(sim_dir, "frames.pdb")
    for path in (gt_path, fr_path):
        if not os.path.isfile(path):
            fail(path, "missing: --truth must be a folder written by nmaem simulate")
    try:
        with np.load(gt_path, allow_pickle=False) as f:
            gt = {k: f[k] for k in f.files}
    except Exception as exc:  # numpy raises several types for corrupt archives
        fail(gt_path, "not readable (%s)" % (str(exc).splitlines() or ["?"])[0])
    if "frame" not in gt:
        fail(gt_path, "no 'frame' array")
    params = {}
    if "params" in gt:
        try:
            params = json.loads(str(gt["params"]))
        except ValueError:
            params = {}
    return gt, params, fr_path


def pose_error(gt: Mapping[str, np.ndarray], n_gt: int, latent: Latent) -> Optional[dict]:
    """Angles (degrees) from the written and the refined rotations to the true ones."""
    from ..io.poses import euler_to_matrix, rotation_angle_deg
    if not all(k in gt and gt[k].shape == (n_gt, 3) for k in ("euler", "euler_file")):
        return None
    idx = latent.index
    true = euler_to_matrix(*gt["euler"][idx].T)
    given = rotation_angle_deg(euler_to_matrix(*gt["euler_file"][idx].T), true)
    out = dict(median_input_deg=float(np.median(given)),
               p95_input_deg=float(np.percentile(given, 95)),
               median_refined_deg=None, p95_refined_deg=None)
    if latent.euler is not None:
        refined = rotation_angle_deg(euler_to_matrix(*latent.euler.T), true)
        out.update(median_refined_deg=float(np.median(refined)),
                   p95_refined_deg=float(np.percentile(refined, 95)))
    return out


def match_to_simulation(latent: Latent, particles: ParticleTable,
                        simulated: ParticleTable) -> Latent:
    """The latent with its rows in the simulation: ``index`` the row of each particle
    (``latent.index`` rows of ``particles``) in ``simulated`` (the simulation's
    particles.star, whose rows are those of ground_truth.npz), matched by particle id
    (:meth:`ParticleTable.ids`); ``shift`` the latent shift plus the simulated origin
    minus the particle's origin (A; module docstring). One-line error naming the file for
    a row beyond ``particles``, repeated ids, or a particle not in the simulation."""
    if latent.index.max() >= particles.n:
        fail(latent.path, "index %d beyond the %d particles of %s"
             % (int(latent.index.max()), particles.n, particles.path))
    sim_ids = simulated.ids()
    if len(np.unique(sim_ids)) != simulated.n:
        fail(simulated.path, "repeated particle ids (rlnImageId): the rows cannot be matched")
    ids = particles.ids()[latent.index]
    row_of = dict(zip(sim_ids.tolist(), range(simulated.n)))
    missing = [i for i in ids.tolist() if i not in row_of]
    if missing:
        fail(particles.path, "particle %d is not among the %d simulated particles of %s "
                             "(%d of %d particles not found; matched by rlnImageId)"
             % (missing[0], simulated.n, simulated.path, len(missing), len(ids)))
    rows = np.array([row_of[i] for i in ids.tolist()], dtype=np.int64)
    shift = (latent.shift + simulated.origin_or_zero()[rows]
             - particles.origin_or_zero()[latent.index])
    return Latent(latent.z, shift, rows, latent.path, latent.pose_correction, latent.euler,
                  particles=None, model=latent.model)


def _run_folder(run_dir):
    run_dir = str(run_dir)
    return os.path.dirname(run_dir) or "." if os.path.isfile(run_dir) else run_dir


def _summary_stats(v):
    v = np.asarray(v, dtype=np.float64)
    q = np.percentile(v, [5, 25, 50, 75, 95])
    return dict(median=float(q[2]), mean=float(v.mean()), p5=float(q[0]), p25=float(q[1]),
                p75=float(q[3]), p95=float(q[4]), max=float(v.max()))


def _rmsd_rows(x0, U, z, targets, chunk=512):
    """sqrt(mean_atoms |x0 + z U - targets|^2) per row; x0 (M,3), U (d,M,3), z (N,d),
    targets (N,M,3) given as an index into a frame array: (frames, frame_idx)."""
    frames, idx = targets
    out = np.empty(len(idx))
    for s in range(0, len(idx), chunk):
        x = x0[None] + np.tensordot(z[s:s + chunk], U, axes=(1, 0)) if U is not None \
            else np.broadcast_to(x0, (len(idx[s:s + chunk]),) + x0.shape)
        diff = x - frames[idx[s:s + chunk]]
        out[s:s + chunk] = np.sqrt((diff * diff).sum((1, 2)) / x0.shape[0])
    return out


def evaluate(latent_path: str, sim_dir: str, run_dir: str, per_particle: Optional[str] = None,
             bandwidth: Optional[float] = None,
             min_height: float = DEFAULTS["min_height"],
             min_prominence: float = DEFAULTS["min_prominence"],
             min_significance: float = DEFAULTS["min_significance"],
             particles: Optional[str] = None) -> dict:
    """Accuracy of a latent file against a simulated dataset's ground truth: a dict.

    See ``docs/analysis.md`` for every field. In short: per-particle RMSD of
    X0 + U z_i to the particle's true frame (matched atoms, no superposition), the floor
    RMSD of each frame (best any z can do), the RMSD of X0 to each frame (the d = 0
    baseline), |corr(PC1, frame)|, the PCA explained variance, the density maxima on PC1
    with the frame and RMSD at each, the shift error, and a ``summary``.
    ``per_particle`` (a .npz path) also saves the per-particle arrays. ``bandwidth``,
    ``min_height`` and ``min_prominence`` go to ``density_maxima``. ``particles``: the
    particle file whose rows the latent's ``index`` counts, matched to the simulation by
    particle id (:func:`match_to_simulation`); default the simulation's own particles.
    """
    from ..modes.diagnostics import floor_rmsd
    from ..physics.structure import read_trajectory, rmsd
    from ..io.latent import check_latent
    from ..io.provenance import loads
    model, nm, cfg = load_run(run_dir, need_modes=False)
    latent = read_latent(latent_path)
    check_latent_d(latent, nm, run_dir)
    gt, params, fr_path = _load_truth(sim_dir)
    if particles is None:
        check_latent(latent, _run_folder(run_dir), cfg,
                     truth=(loads(gt.get("particles_fingerprint")),
                            os.path.join(str(sim_dir), "ground_truth.npz")))
    else:
        from ..io.provenance import particle_fingerprint
        table = read_particles(particles)
        check_latent(latent, _run_folder(run_dir), cfg,
                     truth=(particle_fingerprint(table, images=False), table.path))
        sim_star = os.path.join(str(sim_dir), "particles.star")
        if not os.path.isfile(sim_star):
            fail(sim_star, "missing: --truth must be a folder written by nmaem simulate")
        latent = match_to_simulation(latent, table, read_particles(sim_star))
    frame_all = np.asarray(gt["frame"]).astype(np.int64)
    n_gt = len(frame_all)
    if latent.index.max() >= n_gt:
        bad = int(np.sum(latent.index >= n_gt))
        fail(latent.path, "%d index value(s) beyond the %d particles of the ground truth "
                          "(max index %d): latent and --truth are different datasets"
             % (bad, n_gt, int(latent.index.max())))
    fmodel, frames = read_trajectory(fr_path)
    if frame_all.max() >= len(frames) or frame_all.min() < 0:
        fail(os.path.join(str(sim_dir), "ground_truth.npz"),
             "frame numbers outside the %d models of frames.pdb" % len(frames))
    # match atoms by their full ids (chain:resnum:icode:resname:atom)
    pos = {a: k for k, a in enumerate(fmodel.atom_ids)}
    ref_ids = model.atom_ids
    ia = np.array([k for k, a in enumerate(ref_ids) if a in pos], dtype=np.int64)
    if len(ia) == 0:
        fail(fr_path, "no atom shared with the run's reference model (matched by "
                      "chain:resnum:icode:resname:atom)")
    ib = np.array([pos[ref_ids[k]] for k in ia], dtype=np.int64)
    x0 = model.coords[ia]
    T = frames[:, ib, :]
    U = None if nm is None else nm.modes.astype(np.float64)[:, ia, :]

    frame = frame_all[latent.index]
    per_rmsd = _rmsd_rows(x0, U, latent.z, (T, frame))
    ref_rmsd_frames = np.array([rmsd(x0, t) for t in T])
    floor_frames = ref_rmsd_frames.copy() if U is None else np.asarray(floor_rmsd(U, x0, T))
    per_floor = floor_frames[frame]

    out = dict(latent=os.path.abspath(latent.path), truth=os.path.abspath(str(sim_dir)),
               model=os.path.abspath(str(run_dir)), n_particles=int(latent.n), d=int(latent.d),
               n_atoms=int(model.n_atoms), n_matched_atoms=int(len(ia)),
               n_frames=int(len(frames)), distribution=params.get("distribution"),
               snr_db=params.get("snr_db"))
    if particles is not None:
        out["particles"] = os.path.abspath(str(particles))
    out["rmsd"] = _summary_stats(per_rmsd)
    out["floor_rmsd"] = _summary_stats(per_floor)
    out["reference_rmsd"] = _summary_stats(ref_rmsd_frames[frame])
    out["excess_rmsd"] = _summary_stats(per_rmsd - per_floor)
    out["floor_rmsd_per_frame"] = [float(v) for v in floor_frames]
    out["reference_rmsd_per_frame"] = [float(v) for v in ref_rmsd_frames]
    counts = np.bincount(frame, minlength=len(frames))
    med = np.full(len(frames), np.nan)
    for f in np.flatnonzero(counts):
        med[f] = np.median(per_rmsd[frame == f])
    out["particles_per_frame"] = counts.tolist()
    out["median_rmsd_per_frame"] = [None if np.isnan(v) else float(v) for v in med]

    # shifts: against ground truth when the particle file had no origins, else against 0
    if "shift" in gt and gt["shift"].shape == (n_gt, 2):
        if params.get("unknown_shifts", True):
            true_shift, against = gt["shift"][latent.index].astype(np.float64), "ground_truth"
        else:
            true_shift, against = np.zeros((latent.n, 2)), "zero (origins in the particle file)"
        err = np.linalg.norm(latent.shift - true_shift, axis=1)
        out["shift_error"] = dict(compared_to=against, rmse=float(np.sqrt((err ** 2).mean())),
                                  median=float(np.median(err)), p95=float(np.percentile(err, 95)))
    else:
        out["shift_error"] = None

    out["pose_error"] = pose_error(gt, n_gt, latent)

    p = None
    if latent.d > 0 and latent.n >= 2:
        p = pca(latent.z)
        pc1 = p.transform(latent.z)[:, 0]
        out["pca_explained_variance_ratio"] = p.explained_variance_ratio.tolist()
        out["pc1_explained_variance"] = float(p.explained_variance_ratio[0])
        if pc1.std() > 0 and frame.std() > 0:
            out["abs_corr_pc1_frame"] = float(abs(np.corrcoef(pc1, frame)[0, 1]))
        else:
            out["abs_corr_pc1_frame"] = None
        mx = density_maxima(pc1, bandwidth=bandwidth, min_height=min_height,
                            min_prominence=min_prominence, min_significance=min_significance)
        counts = mx.basin_counts
        rows = []
        for j in range(len(mx)):
            members = mx.near[j]
            if len(members) == 0:
                continue
            zj = latent.z[members].mean(0)
            f = int(np.percentile(frame[members], 50, method="lower"))
            xj = x0 + np.tensordot(zj, U, axes=(0, 0))
            rows.append(dict(pc1=float(mx.positions[j]), density=float(mx.densities[j]),
                             n_near=int(len(members)), n_basin=int(counts[j]),
                             frame=f, frame_spread=float(np.std(frame[members])),
                             z=[float(v) for v in zj], rmsd=rmsd(xj, T[f]),
                             floor_rmsd=float(floor_frames[f]),
                             reference_rmsd=float(ref_rmsd_frames[f])))
        out["maxima"] = dict(bandwidth=float(mx.bandwidth), radius=float(mx.radius),
                             min_height=min_height, min_prominence=min_prominence,
                             min_significance=min_significance, points=rows)
    else:
        out["pca_explained_variance_ratio"] = None
        out["pc1_explained_variance"] = None
        out["abs_corr_pc1_frame"] = None
        out["maxima"] = None

    mrows = out["maxima"]["points"] if out["maxima"] else []
    out["summary"] = dict(
        distribution=params.get("distribution"), d=int(latent.d),
        n_particles=int(latent.n),
        median_rmsd=out["rmsd"]["median"], median_floor_rmsd=out["floor_rmsd"]["median"],
        median_reference_rmsd=out["reference_rmsd"]["median"],
        pc1_explained_variance=out["pc1_explained_variance"],
        abs_corr_pc1_frame=out["abs_corr_pc1_frame"],
        n_maxima=len(mrows), maxima_frames=[r["frame"] for r in mrows],
        maxima_rmsd=[r["rmsd"] for r in mrows],
        max_maxima_rmsd=max([r["rmsd"] for r in mrows]) if mrows else None,
        maxima_below_1_5A=(all(r["rmsd"] < 1.5 for r in mrows) if mrows else None),
        shift_rmse=None if out["shift_error"] is None else out["shift_error"]["rmse"],
        median_angle_input_deg=(out["pose_error"] or {}).get("median_input_deg"),
        median_angle_refined_deg=(out["pose_error"] or {}).get("median_refined_deg"))
    if per_particle:
        atomic_savez(per_particle, index=latent.index, frame=frame, rmsd=per_rmsd,
                     floor_rmsd=per_floor, reference_rmsd=ref_rmsd_frames[frame],
                     pc1=(p.transform(latent.z)[:, 0] if p is not None
                          else np.zeros(0)))
        out["per_particle_file"] = os.path.abspath(per_particle)
    return out
