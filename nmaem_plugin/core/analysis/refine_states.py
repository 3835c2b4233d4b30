"""``nmaem refine-states``: each state's all-atom model refined against its own particles.

Inputs: a states folder of ``nmaem states`` (``states.npz``, ``states.json``), the
training run, the particle file given to ``nmaem infer`` (STAR or .cs) and the latent
file the states were cut from (``states.json`` names it). For every state (numbered as
``nmaem states`` numbers them):

1. its particles: the rows of the particle file whose latent label is the state (at most
   ``max_particles`` of them, drawn at random), split in two halves at random (``seed``);
2. its start: the exported model, X0 + U z_state refined by OpenMM exactly as ``nmaem
   export`` refines (``refine.refine_coords``);
3. its refinement, ``refine_state.refine_state``: all heavy atoms, the training likelihood
   of the refinement half at the refinement box (``box``: the images Fourier-cropped from
   their original size; the run's noise model, band and mask, each particle's pose,
   pose correction, origin and fitted shift, CTF, grey scale, the envelope), geometry
   restraints, L-BFGS, OpenMM after each round, stopped and gated by the held-out half.
   With ``particle_z`` each particle is rendered at its own z about the state's
   representative, X + U (z_i - z_state).

Outputs (``io/outputs.py`` policy): ``OUT/state_NN/refined.pdb`` (heavy atoms, the
reference's chain, residue and atom names, in the dataset's frame: the start model when the
refinement was refused), ``OUT/state_NN/start.pdb`` (the exported start) and
``OUT/refine.json``: the settings, ``bond_rms`` (the largest bond rms of the refined
models, A) and ``states``, one entry per state (particles, held-out gain and its
significance, RMSD to the start, geometry figures, iterations, rounds, envelope, status).
"""
import json
import os
import time
from typing import Callable, Optional

import numpy as np

from ..base.errors import NmaemError, fail
from .refine_state import DEFAULTS as STATE_DEFAULTS

__all__ = ["refine_states_command", "read_refine_json", "DEFAULTS", "REFINE_JSON",
           "MIN_PARTICLES"]

REFINE_JSON = "refine.json"
MIN_PARTICLES = 20        # a state needs this many particles: two halves of 10
DEFAULTS = dict(STATE_DEFAULTS, box=None, max_particles=4000, seed=0, particle_z=False,
                restraint=30.0)


def _parse_states(text: Optional[str], k: int, path: str) -> list:
    if not text:
        return list(range(k))
    try:
        chosen = sorted({int(s) for s in str(text).replace(" ", "").split(",") if s})
    except ValueError:
        raise NmaemError("--states-only takes state numbers separated by commas, e.g. 1,3 "
                         "(got %r)" % text)
    bad = [s for s in chosen if not 1 <= s <= k]
    if bad:
        fail(path, "has %d state(s): no state %d" % (k, bad[0]))
    return [s - 1 for s in chosen]


def _inputs(states_dir, run_dir, particles, latent_path):
    """Read and check every input; returns a dict of them."""
    from ..io.latent import check_latent, read_latent
    from ..io.particles import read_particles
    from ..io.provenance import particle_fingerprint, same_particles
    from .landscape import check_latent_d, load_run, need_z
    from .states import STATES_FILE, STATES_JSON, read_states, read_states_json
    if not os.path.isdir(states_dir):
        fail(states_dir, "no such states folder (made by nmaem states)")
    label, index, zs, count = read_states(os.path.join(states_dir, STATES_FILE))
    listing = read_states_json(os.path.join(states_dir, STATES_JSON))
    if latent_path is None:
        latent_path = listing.get("latent")
        if not latent_path:
            fail(os.path.join(states_dir, STATES_JSON), "names no latent file; give --latent")
    model, nm, cfg = load_run(run_dir)
    latent = read_latent(latent_path)
    check_latent_d(latent, nm, run_dir)
    need_z(latent, "refine-states")
    check_latent(latent, run_dir, cfg)
    if latent.n != len(label) or not np.array_equal(latent.index, index):
        fail(latent_path, "is not the latent file the states %s were cut from (%d "
                          "particles against %d)" % (states_dir, latent.n, len(label)))
    if zs.shape[1] != nm.n_modes:
        fail(os.path.join(states_dir, STATES_FILE), "has z of d = %d but the run %s has %d "
             "modes" % (zs.shape[1], run_dir, nm.n_modes))
    table = read_particles(particles)
    table.require(poses=True, ctf=True, images=True)
    if latent.index.max() >= table.n:
        fail(latent_path, "index %d beyond the %d particles of %s"
             % (latent.index.max(), table.n, particles))
    if latent.particles is not None:
        same, why = same_particles(latent.particles, particle_fingerprint(table))
        if not same:
            fail(particles, "are not the particles the latent file %s describes (%s)"
                 % (latent_path, why))
    boxes, apixes = np.unique(table.box), np.unique(table.apix)
    if len(boxes) != 1 or len(apixes) != 1:
        fail(particles, "particles of several box or pixel sizes; split the file by optics "
                        "group first")
    if int(boxes[0]) != cfg["box0"] or abs(float(apixes[0]) - cfg["apix0"]) > 1e-6 * cfg["apix0"]:
        fail(particles, "images are %d px at %g A/px, but the run was trained on %d px at "
                        "%g A/px" % (boxes[0], apixes[0], cfg["box0"], cfg["apix0"]))
    from ..io.stacks import ImageStack
    ImageStack(table, check=True).close()
    return dict(label=label, zs=zs, model=model, nm=nm, cfg=cfg, latent=latent,
                latent_path=os.path.abspath(latent_path), table=table, listing=listing)


def _likelihood(cfg, run_dir, table, model, box, apix, log):
    """The run's whitened likelihood at the refinement box (the noise model estimated
    from the particles for runs trained without one)."""
    from ..io.runfolder import has_noise_model, noise_path
    from ..physics import noise as noise_model
    from ..physics.likelihood import WhitenedLikelihood
    if has_noise_model(cfg):
        noise = noise_model.load_noise_model(noise_path(run_dir, cfg))
    else:
        radius = noise_model.default_mask_radius(model.coords, cfg["box0"], cfg["apix0"])
        log("refine-states: the run has no noise model (--loss %s): estimating it from the "
            "particles' background" % cfg.get("loss"))
        noise = noise_model.estimate_from_particles(table, radius)
    hi = cfg.get("resolution_high")
    if hi is not None and hi < 2.0 * apix:
        hi = None                       # the refinement box's own limit is coarser
    return WhitenedLikelihood(noise, box, apix, cfg.get("resolution_low"), hi,
                              cfg.get("mask_radius"), source=table.path)


def refine_states_command(states_dir: str, run_dir: str, particles: str, out_dir: str,
                          latent: Optional[str] = None, box: Optional[int] = None,
                          particle_z: bool = DEFAULTS["particle_z"],
                          iterations: int = DEFAULTS["iterations"],
                          check_every: int = DEFAULTS["check_every"],
                          patience: int = DEFAULTS["patience"],
                          rounds: int = DEFAULTS["rounds"],
                          min_significance: float = DEFAULTS["min_significance"],
                          max_particles: Optional[int] = DEFAULTS["max_particles"],
                          seed: int = DEFAULTS["seed"], states: Optional[str] = None,
                          restraint: float = DEFAULTS["restraint"],
                          platform: Optional[str] = None, force: bool = False,
                          log: Callable[[str], object] = print) -> dict:
    """``nmaem refine-states`` (module docstring); returns the listing of refine.json."""
    import torch
    from ..base.atomic import atomic_open
    from ..io.outputs import FORCE_HINT, check_outputs, command_outputs, run_files
    from ..io.poses import correct_rotations
    from ..physics.chunks import parse_memory_budget
    from ..physics.renderer import Renderer
    from ..physics.structure import write_model
    from .landscape import deformed_coords, format_json
    from .refine import check_refinable, refine_coords
    from .refine_state import refine_state
    from .restraints import GeometryRestraints
    from .state_likelihood import StateLikelihood
    from .states import state_names
    from .validation import reference_geometry
    for name, v, lo in (("--iterations", iterations, 1), ("--check-every", check_every, 1),
                        ("--patience", patience, 1), ("--rounds", rounds, 1)):
        if int(v) < lo:
            raise NmaemError("%s must be at least %d (got %d)" % (name, lo, int(v)))
    if max_particles is not None and int(max_particles) < MIN_PARTICLES:
        raise NmaemError("--max-particles must be at least %d (got %d)"
                         % (MIN_PARTICLES, int(max_particles)))
    inp = _inputs(states_dir, run_dir, particles, latent)
    cfg, model, nm, table, lat = inp["cfg"], inp["model"], inp["nm"], inp["table"], inp["latent"]
    box0, apix0 = int(cfg["box0"]), float(cfg["apix0"])
    box = int(cfg["box"]) if box is None else int(box)
    if box % 2 or box < 16 or box > box0:
        raise NmaemError("--box must be even, between 16 and the particles' %d px (got %d)"
                         % (box0, box))
    apix = apix0 * box0 / box
    K = len(inp["zs"])
    chosen = _parse_states(states, K, os.path.join(states_dir, "states.npz"))
    names = state_names(K)
    _, msg = check_refinable(model, model.source or "reference")
    if msg:
        raise NmaemError(msg)
    products = [REFINE_JSON] + ["%s/%s" % (names[k], f) for k in chosen
                                for f in ("refined.pdb", "start.pdb")]
    inputs = [states_dir, particles, inp["latent_path"]] + run_files(run_dir)
    check_outputs(out_dir, "refine-states", products=products, inputs=inputs, force=force,
                  hint=FORCE_HINT)                 # refused before the long work
    torch.manual_seed(int(seed))
    lik = _likelihood(cfg, run_dir, table, model, box, apix, log)
    renderer = Renderer(model.elements, box, apix, centre=cfg["centre"],
                        memory_budget=parse_memory_budget(cfg.get("memory_budget")),
                        route=cfg.get("renderer") or "auto")
    offset = (box0 // 2) * apix0 - (box // 2) * apix
    restraints = GeometryRestraints(model)
    geometry = reference_geometry(model)

    def polish(X):
        r = refine_coords(model, X, restraint=restraint, platform=platform, unknown="fix")
        return r.coords, r.ok, r.info

    # the output policy (io/outputs.py): a manifest, all or nothing, one writer
    with command_outputs(out_dir, "refine-states", products=products, inputs=inputs,
                         force=force, hint=FORCE_HINT) as out:
        rows_all = []
        t_all = time.time()
        for k in chosen:
            t0 = time.time()
            members = np.flatnonzero(inp["label"] == k)
            rng = np.random.default_rng([int(seed), k])
            if max_particles is not None and len(members) > int(max_particles):
                members = np.sort(rng.choice(members, int(max_particles), replace=False))
            zk = inp["zs"][k]
            log("refine-states: %s: %d particles; start: the exported model X0 + U z (OpenMM)"
                % (names[k], len(members)))
            r0 = refine_coords(model, deformed_coords(model, nm, zk), restraint=restraint,
                               platform=platform, unknown="fix")
            start = r0.coords
            row = dict(state=k + 1, name=names[k], n_particles=int(len(members)),
                       n_state=int((inp["label"] == k).sum()), z=[float(v) for v in zk],
                       start_refinement_ok=bool(r0.ok))
            write_model(out.path("%s/start.pdb" % names[k]), model, start)
            if len(members) < MIN_PARTICLES:
                why = ("%d particles: too few to split into a refinement and a held-out half "
                       "(at least %d)" % (len(members), MIN_PARTICLES))
                log("refine-states: %s: %s; the start model is kept" % (names[k], why))
                row.update(refined=False, status="too few particles", message=why)
                res = dict(coords=start)
            else:
                perm = rng.permutation(members)
                halves = [np.sort(perm[:len(perm) // 2]), np.sort(perm[len(perm) // 2:])]
                parts = []
                for h in halves:
                    rows = lat.index[h]
                    sub = table.subset(rows)
                    rot = sub.rotation_matrices()
                    if lat.pose_correction is not None:
                        rot = correct_rotations(rot, lat.pose_correction[h])
                    shifts = lat.shift[h] - sub.origin_or_zero() + offset
                    dz = (lat.z[h] - zk) if particle_z else None
                    parts.append(StateLikelihood(sub, model.elements, renderer, lik, rot, shifts,
                                                 dz=dz, modes=nm.modes if particle_z else None))
                res = refine_state(model, start, parts[0], parts[1], restraints, geometry, polish,
                                   iterations=iterations, check_every=check_every,
                                   patience=patience, rounds=rounds,
                                   min_significance=min_significance, log=log)
                row.update({key: v for key, v in res.items() if key != "coords"})
            X = np.asarray(res["coords"], dtype=np.float64)
            row["rmsd_to_start"] = float(np.sqrt(((X - start) ** 2).sum(1).mean()))
            if "validation" not in row:
                from .validation import validate
                v = validate(X, geometry)
                v.pop("ramachandran_outlier_residues", None)
                row["validation"] = v
            row["seconds"] = round(time.time() - t0, 1)
            write_model(out.path("%s/refined.pdb" % names[k]), model, X)
            log("refine-states: %s: %s; held-out gain %.1f, %.2f A from the start, bond rms "
                "%.4f A, %.0f s" % (names[k], row["status"], row.get("heldout_gain", 0.0),
                                    row["rmsd_to_start"], row["validation"]["bond_rmsd"],
                                    row["seconds"]))
            rows_all.append(row)
        listing = dict(
            states_dir=os.path.abspath(states_dir), model=os.path.abspath(run_dir),
            particles=os.path.abspath(particles), latent=inp["latent_path"], box=box,
            apix=apix, box0=box0, apix0=apix0, n_atoms=int(model.n_atoms),
            basis="all heavy atoms (%d coordinates)" % (3 * model.n_atoms),
            settings=dict(particle_z=bool(particle_z), iterations=int(iterations),
                          check_every=int(check_every), patience=int(patience),
                          rounds=int(rounds), min_significance=float(min_significance),
                          max_particles=None if max_particles is None else int(max_particles),
                          seed=int(seed), restraint_kcal_mol_A2=float(restraint),
                          resolution_low=cfg.get("resolution_low"),
                          resolution_high=lik.band.resolution_high,
                          mask_radius=cfg.get("mask_radius")),
            bond_rms=max((r["validation"]["bond_rmsd"] for r in rows_all), default=None),
            seconds=round(time.time() - t_all, 1), states=rows_all)
        with atomic_open(out.path(REFINE_JSON), "w") as fh:
            fh.write(format_json(listing) + "\n")
    log("refine-states: %d state(s), %d refined -> %s"
        % (len(rows_all), sum(bool(r.get("refined")) for r in rows_all), out_dir))
    return listing


def read_refine_json(path: str) -> dict:
    """The listing of ``OUT/refine.json`` (one-line error when unreadable)."""
    try:
        with open(os.fspath(path)) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        fail(path, "cannot read the refinement listing (%s)" % exc)
