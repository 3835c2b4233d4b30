"""Training of the autoencoder: preparing a run, the loop, checkpoints, resume.

A run folder (``RUN``) holds everything a run needs and produces; its layout, config.json,
log.csv and checkpoint names live in ``runfolder.py`` (docs/training.md). The dataset and
loader are in ``data.py``; devices, DDP and the torchrun launcher in ``distributed.py``.

Checkpoints hold only tensors, dicts, lists, numbers and strings, so that
``torch.load(path, weights_only=True)`` reads them: ``format``, ``epoch`` (completed
epochs), ``model`` (encoder state dict), ``optimizer``, ``rng`` (torch, CUDA, numpy and
Python states), ``split`` (train/val index tensors), ``history`` (one dict per epoch) and
``config``. The order of the training images in epoch e is a permutation drawn from a
generator seeded with (seed, e), so that a resumed run sees exactly the batches that an
uninterrupted one would have seen: on CPU the weights are bit-identical.

Images are read (``data.ParticleImages``, ``stacks.ImageStack``) one batch at a time and
downsampled by Fourier cropping to ``box`` (pixel size apix0 * box0 / box). The rotation
centre stays the consensus-map centre (box0//2)*apix0 of the original particles.
"""
import json
import math
import os
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..base.atomic import atomic_copy, atomic_open, atomic_savez
from .data import ParticleImages, ParticleMetadata, epoch_order, make_loader
from .distributed import ProcessGroup, is_oom, rank_batches, resolve_device, use_fast_kernels
from ..base.errors import NmaemError, fail

if TYPE_CHECKING:
    from .network import AutoEncoder
from .normstats import recompute_from_dataset, resolve_batch
from ..io.outputs import check_run_dir
from ..io.runfolder import (FIT_CHECK_FILE, NOISE_FILE, TrainConfig, checkpoint_dir,
                            checkpoint_file, checkpoint_path, config_path, encoder_box_for,
                            epoch_checkpoint_file, is_auto_batch, noise_path, read_config,
                            reference_name, run_lock, write_config, write_json, write_log)

__all__ = ["DEFAULTS", "prepare_run", "train_run", "train", "load_trained", "build_autoencoder",
           "save_checkpoint", "epoch_lr", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1
VAL_FRACTION = 0.1
DEFAULTS = TrainConfig().as_dict()     # the options and their defaults: runfolder.TrainConfig
RESUMABLE = TrainConfig.RESUMABLE


def epoch_lr(cfg: dict, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: ``lr`` (constant, the paper's) or, for
    ``cosine``, lr (1 + cos(pi epoch / epochs)) / 2, from lr at epoch 0 towards 0."""
    lr = float(cfg["lr"])
    if cfg.get("lr_schedule", "constant") == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / int(cfg["epochs"])))
    return lr


# ============================================================================ data

# ============================================================================ run folder

def _check_table(table):
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
    box0, apix0 = _check_table(table)
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
    saved = (_load_checkpoint(last).get("partial") or {}).get("batch_size")
    if saved is not None and int(saved) != int(batch):
        fail(run_dir, "the last checkpoint was saved within an epoch with --batch %d; resume "
                      "that epoch with the same --batch (a later epoch may change it)"
             % int(saved))


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


# ============================================================================ model

def build_autoencoder(cfg: dict, run_dir: str) -> "AutoEncoder":
    """The autoencoder described by a run configuration (untrained, on the CPU)."""
    from ..modes.modesfile import check_modes_match, load_modes
    from .network import AutoEncoder, Decoder, Encoder
    from ..physics.structure import read_model
    nm = load_modes(os.path.join(run_dir, cfg["modes"]))
    model = read_model(os.path.join(run_dir, cfg["reference"]))
    check_modes_match(nm, model)
    # runs made before pose refinement existed have no refine_pose: no pose head
    pose_max = math.radians(float(cfg["max_pose_correction"])) if cfg.get("refine_pose") else 0.0
    # runs made before input whitening existed have no whiten_input: images as they are
    input_filter = None
    if cfg.get("whiten_input"):
        from ..physics.noise import load_noise_model, whitening_filter
        input_filter = whitening_filter(load_noise_model(noise_path(run_dir, cfg)), cfg["box"])
    enc = Encoder(cfg["box"], cfg["n_modes"], filters=cfg["filters"], hidden=cfg["hidden"],
                  z_scale=cfg["z_scale"], shift_scale=cfg["shift_scale"], pose_max=pose_max,
                  input_filter=input_filter, encoder_box=cfg.get("encoder_box"),
                  # runs made before --pose-input existed: the head read the image
                  pose_input=cfg.get("pose_input") or "image")
    from ..physics.chunks import parse_memory_budget
    budget = cfg.get("memory_budget")
    dec = Decoder(model.elements, nm.coords, nm.modes[:int(cfg["n_modes"])], cfg["box"], cfg["apix"],
                  centre=cfg["centre"], offset=cfg["offset"],
                  memory_budget=parse_memory_budget(budget),
                  route=cfg.get("renderer") or "auto")
    return AutoEncoder(enc, dec)


def _load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # truncated or foreign file
        fail(path, "unreadable checkpoint (%s)" % str(exc).splitlines()[0][:200])


def _check_belongs(path, ck, cfg, run_dir, encoder):
    """A one-line NmaemError unless the checkpoint ``ck`` holds weights of this run's
    network: the same layers and shapes, the same output scales and the same reference
    and modes (provenance.model_fingerprint, in checkpoints of runs that record it)."""
    from ..io.provenance import run_model_fingerprint
    weights = ck.get("model") if isinstance(ck, dict) else None
    if not isinstance(weights, dict):
        fail(path, "not an nmaem checkpoint (no model weights)")
    own = encoder.state_dict()
    if (set(own) != set(weights)
            or any(tuple(own[k].shape) != tuple(weights[k].shape) for k in own)):
        fail(path, "holds the weights of another network than the run %s's (%d px, %d modes, "
                   "filters %s, hidden %s): a checkpoint of another run?"
             % (run_dir, cfg["box"], cfg["n_modes"], cfg["filters"], cfg["hidden"]))
    theirs = ck.get("config") if isinstance(ck.get("config"), dict) else {}
    for k in ("z_scale", "shift_scale", "n_modes", "box"):
        if k in theirs and not math.isclose(float(theirs[k]), float(cfg[k]), rel_tol=1e-9):
            fail(path, "belongs to another run: %s = %s, the run %s has %s"
                 % (k, theirs[k], run_dir, cfg[k]))
    if theirs.get("model_fingerprint") is not None:
        if theirs["model_fingerprint"] != run_model_fingerprint(run_dir, cfg):
            fail(path, "belongs to another run: its reference model or normal modes are not "
                       "those of %s" % run_dir)


def load_trained(run_dir: str, device: Union[str, torch.device] = "cpu",
                 checkpoint: Optional[str] = None) -> Tuple["AutoEncoder", dict]:
    """(autoencoder in eval mode on ``device``, config dict) of a trained run;
    ``checkpoint``: see :func:`checkpoint_path`."""
    run_dir = os.path.abspath(run_dir)
    cfg = read_config(run_dir)
    path = checkpoint_path(run_dir, checkpoint)
    ck = _load_checkpoint(path)
    ae = build_autoencoder(cfg, run_dir)
    _check_belongs(path, ck, cfg, run_dir, ae.encoder)
    ae.encoder.load_state_dict(ck["model"])
    ae.to(resolve_device(device))
    ae.eval()
    cfg = dict(cfg, epoch=int(ck["epoch"]))
    return ae, cfg


# ============================================================================ states

def _rng_state():
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_state[0]),
                  "keys": torch.as_tensor(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": [int(v) for v in py_state[1]],
                   "gauss_next": None if py_state[2] is None else float(py_state[2])},
    }


def _set_rng_state(st):
    torch.set_rng_state(st["torch"])
    if st.get("cuda") and torch.cuda.is_available():
        cuda = st["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def _is_best(history):
    """Whether the last epoch of ``history`` has the lowest finite validation loss so far."""
    vals = [h["val_loss"] for h in history]
    v = vals[-1]
    return bool(np.isfinite(v)) and all(not (o < v) for o in vals[:-1] if np.isfinite(o))


def save_checkpoint(run_dir: str, ck: dict, keep: int) -> None:
    """Write epoch_NNNN.pt, best.pt when this epoch has the lowest validation loss so far,
    then last.pt. last.pt is written last, so a run killed in between redoes the epoch on
    --resume and writes best.pt again."""
    folder = checkpoint_dir(run_dir)
    os.makedirs(folder, exist_ok=True)
    last = checkpoint_file(run_dir, "last")
    epoch_file = epoch_checkpoint_file(run_dir, ck["epoch"])
    with atomic_open(epoch_file) as fh:
        torch.save(ck, fh)
    if _is_best(ck["history"]):
        atomic_copy(epoch_file, checkpoint_file(run_dir, "best"))
    atomic_copy(epoch_file, last)
    olds = sorted(f for f in os.listdir(folder) if f.startswith("epoch_") and f.endswith(".pt"))
    for f in olds[:max(0, len(olds) - max(1, int(keep)))]:
        os.unlink(os.path.join(folder, f))


# ============================================================================ training

def _fmt_loss(x):
    return "%.6g" % x


def train_run(run_dir: str, log: Callable[[str], None] = print,
              stop_after: Optional[float] = None) -> List[Dict[str, Any]]:
    """Train (or continue training) the prepared run ``run_dir`` to ``config['epochs']``.

    Runs alone or as one process of a torchrun group (WORLD_SIZE > 1: DDP over the
    encoder, gloo on CPU, NCCL on CUDA). Starts from ``checkpoints/last.pt`` when there is
    one. ``stop_after`` ends this call after that many epochs (as if killed there; a
    fraction stops within an epoch, after writing a mid-epoch checkpoint).
    Returns the history (one dict per epoch).
    """
    from ..io.particles import read_particles
    from .network import image_loss
    from ..base.progress import Progress
    run_dir = os.path.abspath(run_dir)
    cfg = read_config(run_dir)
    dist = ProcessGroup()
    device = resolve_device(cfg.get("device"))
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    dist.init(device)
    try:
        return _train(run_dir, cfg, dist, device, log, stop_after, read_particles, image_loss,
                      Progress)
    finally:
        dist.close()


def _train(run_dir, cfg, dist, device, log, stop_after, read_particles, image_loss, Progress):
    from .network import pose_penalty, split_outputs
    from ..base.progress import fmt_time
    rank0 = dist.rank == 0
    say = log if rank0 else (lambda *a, **k: None)
    table = read_particles(cfg["particles"])
    box0, apix0 = _check_table(table)
    if box0 != cfg["box0"] or abs(apix0 - cfg["apix0"]) > 1e-6 * cfg["apix0"]:
        fail(cfg["particles"], "images are %d px at %g A/px; the run was set up for %d px at "
                               "%g A/px" % (box0, apix0, cfg["box0"], cfg["apix0"]))
    with np.load(os.path.join(run_dir, "split.npz")) as sp:
        trn, val = sp["train"].astype(np.int64), sp["val"].astype(np.int64)

    torch.manual_seed(int(cfg["seed"]))
    ae = build_autoencoder(cfg, run_dir).to(device)
    encoder = ae.encoder
    use_fast_kernels(device, encoder)
    opt = torch.optim.Adam(encoder.parameters(), lr=float(cfg["lr"]))
    start, history, partial = 0, [], None
    last = checkpoint_file(run_dir, "last")
    if os.path.isfile(last):
        ck = _load_checkpoint(last)
        if ck.get("format") != CHECKPOINT_FORMAT:
            fail(last, "checkpoint format %s, expected %d" % (ck.get("format"),
                                                              CHECKPOINT_FORMAT))
        encoder.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        for g in opt.param_groups:
            g["lr"] = float(cfg["lr"])
        _set_rng_state(ck["rng"])
        start, history = int(ck["epoch"]), list(ck["history"])
        partial = ck.get("partial")      # a mid-epoch checkpoint (--checkpoint-minutes)
        say("train: resuming %s after epoch %d" % (run_dir, start))
    epochs = int(cfg["epochs"])
    if start >= epochs:
        say("train: %s has already done %d of %d epochs" % (run_dir, start, epochs))
        return history

    model = encoder
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)
    meta = ParticleMetadata(table, device)
    dataset = ParticleImages(table, cfg["box"])
    pin = device.type == "cuda"
    use_bf16 = bool(cfg.get("bf16"))
    loss_kind = cfg["loss"]
    likelihood = None
    if loss_kind == "whitened":
        from ..physics.likelihood import WhitenedLikelihood
        likelihood = WhitenedLikelihood.for_run(run_dir, cfg, device)
    if rank0:
        write_log(run_dir, history)     # a resumed run drops rows after its checkpoint

    per_epoch = len(rank_batches(trn, cfg["batch"], 0, dist.world)[0])
    local_batch = rank_batches(trn, cfg["batch"], 0, dist.world)[1]
    progress = Progress((epochs - start) * per_epoch * local_batch * dist.world, "train",
                        unit="images") if rank0 else None
    end = epochs if stop_after is None else min(epochs, start + int(math.ceil(stop_after)))
    # --checkpoint-minutes: last.pt also within an epoch (one process), for long epochs
    every = cfg.get("checkpoint_minutes")
    every = float(every) * 60.0 if every and not dist.active else None
    last_saved = time.perf_counter()

    def checkpoint(done, **extra):
        return dict(format=CHECKPOINT_FORMAT, epoch=done,
                    model={k: v.detach().cpu() for k, v in encoder.state_dict().items()},
                    optimizer=_cpu(opt.state_dict()), rng=_rng_state(),
                    split={"train": torch.as_tensor(trn), "val": torch.as_tensor(val)},
                    history=[dict(h) for h in history], config=_plain(cfg), **extra)
    say("train: epochs %d-%d on %s%s, batch %d (%d per process), lr %g%s, loss %s"
        % (start + 1, epochs, device, " x %d processes" % dist.world if dist.active else "",
           cfg["batch"], local_batch, cfg["lr"],
           " (cosine decay)" if cfg.get("lr_schedule") == "cosine" else "", loss_kind))
    say("train: renderer: %s" % ae.decoder.renderer(device).chunks(local_batch).describe())

    prior_sd = math.radians(float(cfg.get("pose_prior_sd") or 1.0))
    pose_sizes: List[torch.Tensor] = []      # |v| of this epoch's training batches

    def forward(enc, images, rows):
        rot, base, ctf_params = meta.batch(rows)
        if use_bf16:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                out = enc(images)
            out = tuple(o.float() for o in out)
        else:
            out = enc(images)
        shift, z, rotvec = split_outputs(out)
        penalty = None if rotvec is None else pose_penalty(rotvec, prior_sd)
        if rotvec is not None and enc.training:
            pose_sizes.append(rotvec.detach().norm(dim=1))
        ctf = ae.decoder.ctf(ctf_params)
        if likelihood is not None:
            rendered_ft = ae.decoder.render_ft(z, rot, base + shift, ctf, rotvec=rotvec)
            return likelihood(images, rendered_ft, meta.optics_group[rows], penalty=penalty)
        rendered = ae.decoder(z, rot, base + shift, ctf, rotvec=rotvec)
        return image_loss(images, rendered, loss_kind, penalty=penalty)

    for epoch in range(start, end):
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for g in opt.param_groups:
            g["lr"] = epoch_lr(cfg, epoch)
        batches, _ = rank_batches(epoch_order(trn, cfg["seed"], epoch), cfg["batch"],
                                   dist.rank, dist.world)
        encoder.train()
        total, count, first = 0.0, 0, 0
        pose_sizes.clear()
        if partial is not None and epoch == start:   # resume within this epoch
            # its batches are counted in the saving run's batch size, in one process
            if partial.get("batch_size", cfg["batch"]) != cfg["batch"] or dist.active:
                fail(run_dir, "the last checkpoint was saved within an epoch with --batch %d "
                              "in one process; resume that epoch with the same --batch in one "
                              "process (a later epoch may change them)"
                     % partial.get("batch_size", cfg["batch"]))
            first, total, count = partial["batch"], partial["total"], partial["count"]
            t0 -= partial["seconds"]
        try:
            for b, (rows, images) in enumerate(
                    make_loader(dataset, batches[first:], cfg["num_workers"], pin), first):
                rows = rows.to(device)
                images = images.to(device, non_blocking=True)
                try:
                    loss = forward(model, images, rows)
                except NmaemError as exc:     # e.g. a NaN image met by the likelihood
                    raise NmaemError("%s (epoch %d, batch %d; stopped, the last good "
                                     "checkpoint (epoch %d) is kept)"
                                     % (exc, epoch + 1, b + 1, epoch))
                bad = dist.sum([0.0 if torch.isfinite(loss) else 1.0], device)[0]
                if bad:
                    raise NmaemError(
                        "%s: the training loss became non-finite (NaN/inf) in epoch %d, batch "
                        "%d; stopped, the last good checkpoint (epoch %d) is kept; check the "
                        "images for NaNs or resume with a lower --lr%s"
                        % (run_dir, epoch + 1, b + 1, epoch,
                           " or without --bf16" if use_bf16 else ""))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(rows)
                count += len(rows)
                if progress is not None:
                    progress.update(len(rows) * dist.world, extra="epoch %d/%d loss %s"
                                    % (epoch + 1, epochs, _fmt_loss(total / count)))
                stop = (stop_after is not None and b + 1 < len(batches)
                        and epoch - start + (b + 1) / len(batches) >= stop_after)
                if rank0 and not dist.active and (stop or (
                        every is not None and time.perf_counter() - last_saved >= every)):
                    os.makedirs(checkpoint_dir(run_dir), exist_ok=True)
                    with atomic_open(checkpoint_file(run_dir, "last")) as fh:
                        torch.save(checkpoint(epoch, partial=dict(
                            batch=b + 1, batch_size=int(cfg["batch"]), total=total, count=count,
                            seconds=time.perf_counter() - t0)), fh)
                    last_saved = time.perf_counter()
                if stop:
                    return history
            t_train = time.perf_counter() - t0
            # precise BN: running statistics of the final weights (core/normstats.py)
            recompute_from_dataset(encoder, dataset, trn, local_batch, cfg["seed"], epoch,
                                   device, lambda ds, bs: make_loader(ds, bs, cfg["num_workers"],
                                                                      pin),
                                   autocast=device.type if use_bf16 else None)
            vsum, vcount = _validate(encoder, forward, dataset, val, local_batch, dist, cfg,
                                     pin, device)
        except NmaemError:
            raise
        except Exception as exc:
            if is_oom(exc):
                raise NmaemError(
                    "out of memory on %s with --batch %d (%d images per process); resume "
                    "with --resume --batch %d" % (device, cfg["batch"], local_batch,
                                                  max(1, cfg["batch"] // 2)))
            raise
        tot, cnt = dist.sum([total, count], device)
        row = dict(epoch=epoch + 1, train_loss=tot / max(cnt, 1), val_loss=vsum / max(vcount, 1),
                   images_per_s=cnt / max(t_train, 1e-9),
                   seconds=time.perf_counter() - t0)
        if pose_sizes:   # this process's images (of this session, when resumed mid-epoch)
            row["pose_correction_deg"] = math.degrees(float(torch.cat(pose_sizes).median()))
        history.append(row)
        if rank0:
            save_checkpoint(run_dir, checkpoint(epoch + 1), cfg.get("keep", 3))
            last_saved = time.perf_counter()
            write_log(run_dir, history)
            done = [r["seconds"] for r in history[start:]]
            eta = (end - epoch - 1) * sum(done) / len(done)
            extra = ""
            if "pose_correction_deg" in row:
                extra += "  pose correction median %.2f deg" % row["pose_correction_deg"]
            if device.type == "cuda":
                extra += "  GPU peak %.2f GiB" % (torch.cuda.max_memory_allocated(device) / 2 ** 30)
            say("train: epoch %d/%d  train loss %s  val loss %s  %.1f images/s  %.1f s%s%s"
                % (epoch + 1, epochs, _fmt_loss(row["train_loss"]), _fmt_loss(row["val_loss"]),
                   row["images_per_s"], row["seconds"], extra,
                   "  ETA %s" % fmt_time(eta) if epoch + 1 < end else ""))
        dist.barrier()
    return history


def _validate(encoder, forward, dataset, val, local_batch, dist, cfg, pin, device):
    """Summed validation loss and count over all processes (eval mode, no gradients)."""
    encoder.eval()
    mine = val[dist.rank::dist.world]
    batches = [mine[i:i + local_batch] for i in range(0, len(mine), local_batch)]
    total, count = 0.0, 0
    with torch.no_grad():
        for rows, images in make_loader(dataset, batches, cfg["num_workers"], pin):
            loss = forward(encoder, images.to(device, non_blocking=True), rows.to(device))
            total += float(loss) * len(rows)
            count += len(rows)
    encoder.train()
    return dist.sum([total, count], device)


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _plain(obj):
    """JSON-like copy (dicts, lists, numbers, strings, None)."""
    return json.loads(json.dumps(obj))


# ============================================================================ entry points

def train(out: str, particles: Optional[str] = None, ref: Optional[str] = None,
          modes: Optional[str] = None, resume: bool = False, log: Callable[[str], None] = print,
          stop_after: Optional[float] = None, **settings: Any) -> List[Dict[str, Any]]:
    """Prepare (or resume) the run ``out`` and train it in this process, holding the run's
    lock (``runfolder.run_lock``); returns the history."""
    with run_lock(out, log=log):
        prepare_run(out, particles, ref, modes, resume=resume, log=log, **settings)
        return train_run(out, log=log, stop_after=stop_after)
