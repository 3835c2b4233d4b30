"""Preparing a training run (``prepare_run``): the options checked (``trainconfig.TrainConfig``),
the particles, reference and modes read and checked, the fit check, the noise model, the
train/validation split and ``config.json`` written into the run folder (docs/training.md);
or, with ``resume``, the options a resumed run may change."""
import os
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import numpy as np

from ..base.atomic import atomic_copy, atomic_savez
from .distributed import resolve_device
from ..base.errors import NmaemError, fail
from .normstats import resolve_batch
from ..io.outputs import check_run_dir
from ..io.runfolder import (FIT_CHECK_FILE, NOISE_FILE, checkpoint_dir, checkpoint_file,
                            config_path, read_config, reference_name, write_config, write_json)
from ..io.trainconfig import TrainConfig, encoder_box_for, is_auto_batch
from .checkpoints import load_checkpoint

if TYPE_CHECKING:
    from ..io.table import ParticleTable

__all__ = ["prepare_run", "check_training_table", "check_resume", "DEFAULTS", "RESUMABLE",
           "VAL_FRACTION"]

VAL_FRACTION = 0.1
DEFAULTS = TrainConfig().as_dict()     # the options and their defaults: trainconfig.TrainConfig
RESUMABLE = TrainConfig.RESUMABLE


def check_training_table(table: "ParticleTable") -> Tuple[int, float]:
    """(box, pixel size) of a table fit for training: poses, CTF and images, at least 2
    particles, one box and pixel size."""
    table.require(poses=True, ctf=True, images=True)
    if table.n < 2:
        fail(table.path, "at least 2 particles are needed to train (found %d)" % table.n)
    boxes, apixes = np.unique(table.box), np.unique(table.apix)
    if len(boxes) != 1 or len(apixes) != 1:
        fail(table.path, "particles of several box or pixel sizes; split the file by optics "
                         "group first")
    if boxes[0] <= 0:
        fail(table.path, "image size unknown (no rlnImageSize and no readable stack)")
    return int(boxes[0]), float(apixes[0])


def prepare_run(out: str, particles: Optional[str] = None, ref: Optional[str] = None,
                modes: Optional[str] = None, resume: bool = False,
                log: Callable[[str], None] = print, **settings) -> dict:
    """Check the inputs and create (or, with ``resume``, update) the run folder ``out``.

    Returns the run configuration. Raises NmaemError (one line) on bad input: particles
    without poses, CTF or images; modes of another model; a box larger than the images;
    an existing run without ``resume``; ``resume`` without a checkpoint.
    """
    from ..io.particles import read_particles
    from ..io.stacks import ImageStack
    from ..modes.modesfile import check_modes_match, load_modes
    from .network import z_scale_for
    from ..physics.structure import read_model
    settings = {k: v for k, v in settings.items() if k not in ("nproc", "gpus")}
    options = TrainConfig.from_settings(**settings)     # unknown names: TypeError
    if settings.get("device") is not None:
        resolve_device(settings["device"])           # an unusable device: fail before writing
    out = os.path.abspath(out)
    cfg_path = config_path(out)
    last = checkpoint_file(out, "last")

    if resume:
        if not os.path.isfile(cfg_path):
            fail(out, "nothing to resume: no training run here (no config.json and no "
                      "checkpoint)")
        # the options a resumed run may change, checked with the run's own for the rest
        old = read_config(out)
        check_resume(out, old, ref=ref, modes=modes)   # first: an edited config says so
        kept = {k: old[k] for k in TrainConfig.names()
                if k in old and k not in TrainConfig.RESUMABLE}
        TrainConfig.from_settings(**dict(kept, **{
            k: v for k, v in settings.items() if k in TrainConfig.RESUMABLE})).validate()
        if not os.path.isfile(last):
            # prepared, then stopped before the first checkpoint: start from the beginning
            log("train: %s has no checkpoint yet (stopped during epoch 1); starting from "
                "the beginning" % out)
        cfg = read_config(out)
        given = {k: v for k, v in settings.items() if v is not None}
        if given.get("batch") is not None:       # --batch auto: normstats.auto_batch
            cfg["batch_auto"] = is_auto_batch(given["batch"])
            given["batch"] = resolve_batch(given["batch"], cfg["n_train"])
            _check_partial_batch(out, last, given["batch"])
        for k, v in given.items():
            if k in RESUMABLE:
                continue
            old = cfg.get(k)
            if isinstance(old, list) or isinstance(v, (list, tuple)):
                same = old is not None and [float(a) for a in old] == [float(a) for a in v]
            else:
                same = old == v
            if not same:
                fail(out, "this run was trained with %s = %s; a resumed run cannot change it "
                          "(got %s)" % (k, old, v))
        if particles is not None and os.path.abspath(particles) != cfg["particles"]:
            fail(out, "this run was trained on %s, not %s" % (cfg["particles"], particles))
        for k in RESUMABLE:
            if given.get(k) is not None:
                cfg[k] = given[k]
        write_config(out, cfg)
        return cfg

    if os.path.exists(cfg_path) or os.path.isdir(checkpoint_dir(out)):
        fail(out, "already holds a training run; pass --resume to continue it or choose "
                  "another -o")
    check_run_dir(out, is_run=False)        # a new run: a new or empty folder
    if particles is None or ref is None or modes is None:
        raise NmaemError("training needs --particles, --ref and --modes")
    s = options.as_dict()

    table = read_particles(particles)
    box0, apix0 = check_training_table(table)
    ImageStack(table, check=True).close()
    nm = load_modes(modes)
    model = read_model(ref)
    check_modes_match(nm, model)
    d = nm.n_modes if s["n_modes"] is None else int(s["n_modes"])
    if not 0 <= d <= nm.n_modes:
        fail(modes, "--n-modes %d: the file has %d modes" % (d, nm.n_modes))

    options.validate(box0=box0, particles=particles)     # the option rules, written once
    batch_auto = is_auto_batch(s["batch"])                   # normstats.auto_batch
    s["batch"] = resolve_batch(s["batch"], table.n - max(1, int(round(VAL_FRACTION * table.n))))
    box = box0 if s["box"] is None else int(s["box"])
    filters, hidden = options.layout()
    apix = apix0 * box0 / box
    centre = [(box0 // 2) * apix0] * 3
    # the rotation centre projects to (box0//2)*apix0 in the original images; after
    # cropping the image centre pixel box//2 sits at (box//2)*apix (they differ only for
    # an odd box0): the difference is added to every rendered shift
    offset = [(box0 // 2) * apix0 - (box // 2) * apix] * 2

    n = table.n
    n_val = max(1, int(round(VAL_FRACTION * n)))
    perm = np.random.default_rng(int(s["seed"])).permutation(n)
    val, trn = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    check = None
    if s["check"]:
        check = _fit_check(table, model, particles, ref, s, log)
    noise = None
    if s["loss"] == "whitened":
        from ..physics import noise as noise_model
        from ..physics.likelihood import Band
        Band(box, apix, s["resolution_low"], s["resolution_high"], s["mask_radius"],
             path=particles)                          # a bad band fails before writing
        radius = noise_model.default_mask_radius(model.coords, box0, apix0)
        log("train: estimating the noise spectrum from the particles' background (outside "
            "%.0f A)" % radius)
        noise = noise_model.estimate_from_particles(table, radius, seed=int(s["seed"]))

    os.makedirs(out, exist_ok=True)
    if noise is not None:
        noise.save(os.path.join(out, NOISE_FILE))
    if check is not None:
        write_json(os.path.join(out, FIT_CHECK_FILE), check)
    ref_name = reference_name(ref)
    if ref.lower().endswith(".gz"):
        from ..physics.structure import write_model
        write_model(os.path.join(out, ref_name), model)
    else:
        atomic_copy(ref, os.path.join(out, ref_name))
    if 0 < d < nm.n_modes:            # keep the first d modes: RUN/modes.npz matches z
        from dataclasses import replace
        from ..modes.modesfile import save_modes
        save_modes(os.path.join(out, "modes.npz"),
                   replace(nm, modes=nm.modes[:d], eigenvalues=nm.eigenvalues[:d]))
    else:                             # all of them (d = 0 uses none: config n_modes = 0)
        atomic_copy(modes, os.path.join(out, "modes.npz"))
    atomic_savez(os.path.join(out, "split.npz"), train=trn.astype(np.int64),
                 val=val.astype(np.int64))
    from nmaem_plugin import __version__
    cfg = dict(
        format=1, version=__version__, particles=os.path.abspath(particles),
        reference=ref_name, reference_source=os.path.abspath(ref), modes="modes.npz",
        modes_source=os.path.abspath(modes), n_modes=int(d), n_atoms=int(nm.n_atoms),
        n_particles=int(n), n_train=int(len(trn)), n_val=int(len(val)),
        box=int(box), apix=float(apix), box0=int(box0), apix0=float(apix0),
        centre=[float(c) for c in centre], offset=[float(o) for o in offset],
        epochs=int(s["epochs"]), batch=int(s["batch"]), batch_auto=batch_auto,
        lr=float(s["lr"]), seed=int(s["seed"]),
        loss=str(s["loss"]), encoder=str(s["encoder"]), filters=filters, hidden=hidden,
        encoder_box=encoder_box_for(box, s["encoder_box"]),
        rmsd_unit=float(s["rmsd_unit"]), z_scale=z_scale_for(nm.n_atoms, s["rmsd_unit"]),
        shift_scale=float(apix), bf16=bool(s["bf16"]), device=s["device"],
        num_workers=int(s["num_workers"]), keep=int(s["keep"]), optimizer="adam",
        lr_schedule=str(s["lr_schedule"]), memory_budget=s["memory_budget"],
        renderer=str(s["renderer"]), checkpoint_minutes=s["checkpoint_minutes"],
        resolution_low=s["resolution_low"], resolution_high=s["resolution_high"],
        mask_radius=s["mask_radius"], noise=NOISE_FILE if noise is not None else None,
        whiten_input=bool(s["whiten_input"] and noise is not None),
        fit_check=None if check is None else dict(verdict=check["verdict"],
                                                  cause=check["cause"],
                                                  message=check["message"]),
        refine_pose=bool(s["refine_pose"]),
        max_pose_correction=float(s["max_pose_correction"]),
        pose_prior_sd=float(s["pose_prior_sd"]),
        pose_input=str(s["pose_input"]),
        val_fraction=VAL_FRACTION)
    from ..io.provenance import particle_fingerprint, run_model_fingerprint
    cfg["particles_fingerprint"] = particle_fingerprint(table)
    cfg["model_fingerprint"] = run_model_fingerprint(out, cfg)
    write_config(out, cfg)      # last: marks a prepared run
    log("train: %d particles (%d train, %d validation), %d px at %.3f A/px -> %d px at "
        "%.3f A/px%s, %d modes x %d atoms%s -> %s"
        % (n, len(trn), len(val), box0, apix0, box, apix,
           " (the encoder sees %d px)" % cfg["encoder_box"] if cfg["encoder_box"] != box else "",
           d, nm.n_atoms,
           ", pose refinement (at most %g deg, prior sd %g deg, from the %s)"
           % (cfg["max_pose_correction"], cfg["pose_prior_sd"],
              "conformation z" if cfg["pose_input"] == "z" else "image")
           if cfg["refine_pose"] else "",
           out))
    return cfg


def _check_partial_batch(run_dir, last, batch):
    """A one-line error when ``last`` was saved within an epoch (--checkpoint-minutes)
    with another batch size than ``batch``: that epoch's remaining batches are counted in
    the saving run's batch size."""
    if not os.path.isfile(last):
        return
    saved = (load_checkpoint(last).get("partial") or {}).get("batch_size")
    if saved is not None and int(saved) != int(batch):
        fail(run_dir, "the last checkpoint was saved within an epoch with --batch %d; resume "
                      "that epoch with the same --batch (a later epoch may change it)"
             % int(saved))


# what a resumed run may differ in from the checkpoint it continues (besides RESUMABLE):
# bookkeeping, and the paths of files whose contents are checked by their fingerprints (a
# dataset may move)
_BOOKKEEPING = ("batch_auto", "version", "epoch", "device", "particles", "reference_source",
                "modes_source")


def check_resume(run_dir: str, cfg: dict, ref: Optional[str] = None,
                 modes: Optional[str] = None) -> None:
    """A resumed run continues what it started: a one-line NmaemError when ``config.json``
    no longer says what the last checkpoint was trained with (an edited file: other
    particles, loss, box, modes...), when the particle file is not the one the run
    started on (its fingerprint), when the run's reference or modes changed, or when
    ``ref`` / ``modes`` given again are not the run's."""
    from ..io.provenance import check_particles, run_model_fingerprint
    from ..io.particles import read_particles
    cfg_file = config_path(run_dir)
    last = checkpoint_file(run_dir, "last")
    if os.path.isfile(last):
        ck = load_checkpoint(last)
        theirs = ck.get("config") if isinstance(ck, dict) else None
        if isinstance(theirs, dict):
            for k in sorted(set(theirs) & set(cfg)):
                if k in RESUMABLE or k in _BOOKKEEPING or theirs[k] == cfg[k]:
                    continue
                fail(cfg_file, "says %s = %s but the run's checkpoints were trained with %s "
                               "= %s: the file was edited; a resumed run cannot change it "
                               "(put it back, or start a new run)"
                     % (k, _short(cfg[k]), k, _short(theirs[k])))
    if cfg.get("particles_fingerprint") is not None:
        check_particles(cfg["particles_fingerprint"], cfg_file, read_particles(cfg["particles"]),
                        made="was started on")
    if cfg.get("model_fingerprint") is not None:
        if run_model_fingerprint(run_dir, cfg) != cfg["model_fingerprint"]:
            fail(run_dir, "its reference (%s) or modes (%s) changed since the run started: a "
                          "resumed run continues with the same model; put them back"
                 % (cfg.get("reference"), cfg.get("modes")))
    if ref is not None:
        _same_reference(run_dir, cfg, ref)
    if modes is not None:
        _same_modes(run_dir, cfg, modes)


def _short(v):
    text = str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _same_reference(run_dir, cfg, ref):
    from ..physics.structure import read_model
    mine = read_model(os.path.join(run_dir, cfg["reference"]))
    given = read_model(ref)
    if (given.n_atoms != mine.n_atoms or list(given.atom_ids) != list(mine.atom_ids)
            or not np.allclose(given.coords, mine.coords, atol=1e-3)):
        fail(ref, "is not the reference this run was trained with (%s): a resumed run "
                  "cannot change its reference" % cfg.get("reference_source", cfg["reference"]))


def _same_modes(run_dir, cfg, modes):
    from ..modes.modesfile import load_modes
    d = int(cfg["n_modes"])
    given = load_modes(modes)
    if d == 0:
        return
    mine = load_modes(os.path.join(run_dir, cfg["modes"]))
    if (given.n_modes < d or given.modes.shape[1:] != mine.modes.shape[1:]
            or not np.allclose(given.modes[:d], mine.modes[:d], atol=1e-5)):
        fail(modes, "are not the modes this run was trained with (%s): a resumed run cannot "
                    "change its modes" % cfg.get("modes_source", cfg["modes"]))


FIT_CHECK_MIN_PARTICLES = 50


def _fit_check(table, model, particles, ref, s, log):
    """The fit check of a new run (fitcheck.py): its result, or a one-line NmaemError when
    the reference does not explain the particles (unless ``force``)."""
    from ..physics.fitcheck import fit_check, format_report
    if table.n < FIT_CHECK_MIN_PARTICLES:
        log("train: fit check skipped (%d particles; it needs at least %d)"
            % (table.n, FIT_CHECK_MIN_PARTICLES))
        return None
    log("train: fit check: the reference rendered at the particles' poses and CTFs ...")
    res = fit_check(table, model, seed=int(s["seed"]), device=s["device"])
    for line in format_report(res).splitlines():
        log("train: " + line)
    if res["verdict"] != "pass":
        if not s["force"]:
            raise NmaemError(res["message"] + " (--force trains anyway)")
        log("train: the fit check failed; training anyway (--force)")
    return res
