"""Checkpoints of a run and the network they hold: ``build_autoencoder`` (the network a run's
configuration describes), ``save_checkpoint`` / ``load_checkpoint``, the random states they
carry, and ``load_trained`` (a trained run, ready for inference), which checks that a
checkpoint belongs to the run.

Checkpoints hold only tensors, dicts, lists, numbers and strings, so that
``torch.load(path, weights_only=True)`` reads them: ``format``, ``epoch`` (completed
epochs), ``model`` (encoder state dict), ``optimizer``, ``rng`` (torch, CUDA, numpy and
Python states), ``split`` (train/val index tensors), ``history`` (one dict per epoch) and
``config``.
"""
import math
import os
import random
from typing import TYPE_CHECKING, Optional, Tuple, Union

import numpy as np
import torch

from ..base.atomic import atomic_copy, atomic_open
from .distributed import resolve_device
from ..base.errors import fail

if TYPE_CHECKING:
    from .network import AutoEncoder
from ..io.runfolder import (checkpoint_dir, checkpoint_file, checkpoint_path,
                            epoch_checkpoint_file, noise_path, read_config)

__all__ = ["build_autoencoder", "load_checkpoint", "load_trained", "save_checkpoint",
           "rng_state", "set_rng_state", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1


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


def load_checkpoint(path: str) -> dict:
    """The checkpoint at ``path`` (weights only, on the CPU); a one-line error when unreadable
    (an empty or cut file, a foreign one), which names the whole per-epoch checkpoints of
    its run that may replace it."""
    from ..base.errors import require_file
    require_file(path, "checkpoint file")
    try:
        if os.path.getsize(path) == 0:
            raise ValueError("an empty file, 0 bytes")
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # truncated or foreign file
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        folder = os.path.dirname(os.path.abspath(path))
        others = sorted(f for f in os.listdir(folder) if f.startswith("epoch_")
                        and f.endswith(".pt") and os.path.join(folder, f) != path)
        fail(path, "unreadable checkpoint (%s)%s" % (
            text, "; the run keeps %s: copy the newest whole one over it" % ", ".join(others)
            if others else ""))
    if not isinstance(ck, dict):
        fail(path, "not an nmaem checkpoint (no dict of weights)")
    return ck


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
    ck = load_checkpoint(path)
    ae = build_autoencoder(cfg, run_dir)
    _check_belongs(path, ck, cfg, run_dir, ae.encoder)
    ae.encoder.load_state_dict(ck["model"])
    ae.to(resolve_device(device))
    ae.eval()
    cfg = dict(cfg, epoch=int(ck["epoch"]))
    return ae, cfg


# ============================================================================ states

def rng_state() -> dict:
    """The torch, CUDA, numpy and Python random states, as checkpoint-safe values."""
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


def set_rng_state(st: dict) -> None:
    """Restore the random states saved by :func:`rng_state`."""
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
