"""Training of the autoencoder: the loop (``train_run``), resume, and ``train`` (prepare and
train in this process). Preparing a run is ``prepare.py``; building the network of a run,
checkpoints and loading a trained run are ``checkpoints.py``.

A run folder (``RUN``) holds everything a run needs and produces; its layout, config.json,
log.csv and checkpoint names live in ``runfolder.py`` (docs/training.md). The dataset and
loader are in ``data.py``; devices, DDP and the torchrun launcher in ``distributed.py``.

The order of the training images in epoch e is a permutation drawn from a
generator seeded with (seed, e), so that a resumed run sees exactly the batches that an
uninterrupted one would have seen: on CPU the weights are bit-identical.

Images are read (``data.ParticleImages``, ``stacks.ImageStack``) one batch at a time and
downsampled by Fourier cropping to ``box`` (pixel size apix0 * box0 / box). The rotation
centre stays the consensus-map centre (box0//2)*apix0 of the original particles.
"""
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from ..base.atomic import atomic_open
from .data import ParticleImages, ParticleMetadata, epoch_order, make_loader
from .distributed import ProcessGroup, is_oom, rank_batches, resolve_device, use_fast_kernels
from ..base.errors import NmaemError, fail
from .convergence import validation_stall
from .normstats import recompute_from_dataset
from ..io.runfolder import checkpoint_dir, checkpoint_file, read_config, run_lock, write_log
from .checkpoints import (CHECKPOINT_FORMAT, build_autoencoder, load_checkpoint, rng_state,
                          save_checkpoint, set_rng_state)
from .prepare import check_training_table, prepare_run

__all__ = ["train_run", "train", "epoch_lr"]


def epoch_lr(cfg: dict, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: ``lr`` (constant, the paper's) or, for
    ``cosine``, lr (1 + cos(pi epoch / epochs)) / 2, from lr at epoch 0 towards 0."""
    lr = float(cfg["lr"])
    if cfg.get("lr_schedule", "constant") == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / int(cfg["epochs"])))
    return lr


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
    box0, apix0 = check_training_table(table)
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
        ck = load_checkpoint(last)
        if ck.get("format") != CHECKPOINT_FORMAT:
            fail(last, "checkpoint format %s, expected %d" % (ck.get("format"),
                                                              CHECKPOINT_FORMAT))
        encoder.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        for g in opt.param_groups:
            g["lr"] = float(cfg["lr"])
        set_rng_state(ck["rng"])
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
                    optimizer=_cpu(opt.state_dict()), rng=rng_state(),
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

    warned = False               # the validation stall is told once (convergence.py)
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
            for b, (rows, images) in _numbered(
                    make_loader(dataset, batches[first:], cfg["num_workers"], pin), first,
                    epoch):
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
            # precise BN: running statistics of the final weights (core/learn/normstats.py)
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
            stall = validation_stall(history)
            if stall and not warned:          # once per session, on stdout with the epochs
                say("train: " + stall[0].lower() + stall[1:])
                warned = True
        dist.barrier()
    return history


def _numbered(loader, first, epoch):
    """(batch number, item) of ``loader`` from ``first``; an error reading a batch (a NaN
    image, ``data.ParticleImages``) says where the training stopped and what it kept."""
    it, b = iter(loader), first
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except NmaemError as exc:
            raise NmaemError("%s (epoch %d, batch %d; stopped, the last good checkpoint "
                             "(epoch %d) is kept)" % (exc, epoch + 1, b + 1, epoch)) from None
        yield b, item
        b += 1


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
