"""Provenance: which particles and which model a result was made from (torch-free).

Two fingerprints, written into the files that results are combined from and checked
where they are combined (docs/reliability.md):

* the **particle fingerprint** of a particle table (:func:`particle_fingerprint`): the
  number of particles, a sha256 of their identities in file order (image index and stack
  file name, without folders: moving a dataset keeps it), and a probe of 16 rows spread
  over the file: their defocus U, their pose (RELION Euler angles) and the mean and
  standard deviation of their images. Two tables are the same particles
  (:func:`same_particles`) when the counts agree and the probes agree within tolerances
  that survive a STAR/Scipion round trip (another folder, another Euler triplet of the
  same rotation, six written digits), so the identities' hash is only a shortcut. The
  images' statistics tell apart two simulations with the same poses and CTFs (``--like``
  with another seed). Written into ``latent.npz`` (``particles``), ``ground_truth.npz``
  (``particles_fingerprint``) and the run's ``config.json`` (``particles_fingerprint``).
* the **model fingerprint** of a run (:func:`model_fingerprint`): a sha256 of its
  reference model file, its modes file and the number of modes used; the amplitudes z
  only mean something in that basis. Written into ``config.json`` (``model_fingerprint``,
  so every checkpoint carries it) and ``latent.npz`` (``model``).

Checks: ``evaluate`` and ``report`` compare the latent with the truth (particles) and with
the run (model) through ``latent.check_latent``; ``infer --checkpoint FILE`` compares the
checkpoint's network with the run's (``learn.checkpoints.load_trained``); ``states
--particles`` and ``evaluate --particles`` compare the particle file with the latent's
(:func:`check_particles`); ``train --resume`` compares the particle file, the reference and
the modes with those the run was started with (``learn.prepare``). A file written
before fingerprints existed gives a warning (:func:`warn`), not an error.
"""
import hashlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from ..base.errors import fail

if TYPE_CHECKING:                   # hint-only: provenance imports it not at run time
    from .table import ParticleTable

__all__ = ["particle_fingerprint", "model_fingerprint", "run_model_fingerprint",
           "same_particles", "check_model", "check_particles", "dumps", "loads", "warn",
           "PROBE_ROWS"]

FORMAT = 1
PROBE_ROWS = 16
_DEFOCUS_ATOL = 1.0          # Angstrom (STAR files keep 6 digits)
_ROTATION_ATOL = 1e-3        # on the matrix elements (about 0.06 degree)
_IMAGE_RTOL = 1e-3           # image mean and standard deviation, relative to the std


def _probe_rows(n):
    return np.unique(np.round(np.linspace(0, n - 1, min(n, PROBE_ROWS))).astype(np.int64))


def _ids_hash(table):
    if table.stack_paths is None:
        return None
    h = hashlib.sha256()
    for path, k in zip(table.stack_paths.tolist(), table.stack_index.tolist()):
        h.update(("%d@%s\n" % (int(k) + 1, os.path.basename(str(path)))).encode())
    return h.hexdigest()


def particle_fingerprint(table: "ParticleTable", images: bool = True) -> Dict[str, Any]:
    """The fingerprint (a JSON-able dict) of a :class:`~.particles.ParticleTable`.
    ``images``: also the probe images' statistics (reads 16 images)."""
    n = int(table.n)
    rows = _probe_rows(n) if n else np.zeros(0, np.int64)
    fp = dict(format=FORMAT, n=n, ids=_ids_hash(table), rows=rows.tolist(),
              defocus_u=None, euler=None, image_mean=None, image_std=None)
    if n and table.defocus_u is not None:
        fp["defocus_u"] = [float(v) for v in np.asarray(table.defocus_u)[rows]]
    if n and table.euler is not None:
        fp["euler"] = np.asarray(table.euler, dtype=np.float64)[rows].tolist()
    if n and images and table.stack_paths is not None:
        from .stacks import ImageStack
        with ImageStack(table, check=False) as stack:
            im = stack.read(rows).astype(np.float64).reshape(len(rows), -1)
        fp["image_mean"] = im.mean(1).tolist()
        fp["image_std"] = im.std(1).tolist()
    return fp


def _sha256_file(path, h):
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 20)
            if not block:
                break
            h.update(block)


def model_fingerprint(reference: Optional[str], modes: Optional[str], n_modes: int) -> str:
    """sha256 (hex) of the reference model file, the modes file and the number of modes
    used: the basis that the amplitudes z are expressed in."""
    h = hashlib.sha256()
    for path in (reference, modes):
        if path is None:
            h.update(b"none\n")
        else:
            _sha256_file(path, h)
        h.update(b"\n")
    h.update(("%d\n" % int(n_modes)).encode())
    return h.hexdigest()


def run_model_fingerprint(run_dir: str, cfg: Mapping[str, Any]) -> str:
    """The model fingerprint of a run folder (from its files, as written in
    ``config.json`` by training)."""
    ref = os.path.join(run_dir, cfg["reference"]) if cfg.get("reference") else None
    modes = os.path.join(run_dir, cfg["modes"]) if cfg.get("modes") else None
    return model_fingerprint(ref, modes, int(cfg.get("n_modes") or 0))


def dumps(fp: Union[Dict[str, Any], str]) -> np.ndarray:
    """A fingerprint as a numpy 0-d string (for .npz files)."""
    return np.array(json.dumps(fp, sort_keys=True))


def loads(value: object) -> Optional[Union[Dict[str, Any], str]]:
    """A fingerprint from ``dumps`` (or None for None, an empty or unreadable value)."""
    if value is None:
        return None
    try:
        fp = json.loads(str(value))
    except ValueError:
        return None
    return fp if isinstance(fp, (dict, str)) and fp else None


def _rotations(euler):
    from .poses import euler_to_matrix
    e = np.asarray(euler, dtype=np.float64).reshape(-1, 3)
    return euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])


def same_particles(a: Mapping[str, Any], b: Mapping[str, Any]) -> Tuple[bool, Optional[str]]:
    """(True, None) when the fingerprints ``a`` and ``b`` describe the same particles in the
    same order, else (False, what differs)."""
    if a.get("n") != b.get("n"):
        return False, "%s particles against %s" % (a.get("n"), b.get("n"))
    compared = False
    if a.get("defocus_u") is not None and b.get("defocus_u") is not None:
        compared = True
        if not np.allclose(a["defocus_u"], b["defocus_u"], rtol=1e-5, atol=_DEFOCUS_ATOL):
            return False, "their defocus values differ"
    if a.get("euler") is not None and b.get("euler") is not None:
        compared = True
        if not np.allclose(_rotations(a["euler"]), _rotations(b["euler"]), rtol=0,
                           atol=_ROTATION_ATOL):
            return False, "their poses differ"
    if a.get("image_std") is not None and b.get("image_std") is not None:
        compared = True
        sa, sb = np.asarray(a["image_std"]), np.asarray(b["image_std"])
        ma, mb = np.asarray(a["image_mean"]), np.asarray(b["image_mean"])
        scale = np.maximum(np.maximum(sa, sb), 1e-12)
        if (np.any(np.abs(sa - sb) > _IMAGE_RTOL * scale)
                or np.any(np.abs(ma - mb) > _IMAGE_RTOL * scale)):
            return False, "their images differ"
    if not compared and a.get("ids") != b.get("ids"):
        return False, "their image names differ"
    return True, None


def warn(path: object, what: str) -> None:
    sys.stderr.write("nmaem: warning: %s: no fingerprint (written by an older nmaem, or from "
                     "a Scipion set): %s cannot be checked\n" % (path, what))


def check_model(fp: Optional[str], fp_path: str, run_fp: str, run_dir: str) -> None:
    """Fail when the latent's model fingerprint ``fp`` is not the run's (another reference,
    other modes or another number of modes)."""
    if fp != run_fp:
        fail(fp_path, "was made by another run than %s (its reference model or normal "
                      "modes differ): the amplitudes z mean nothing in this run's modes"
             % run_dir)


def check_particles(fp: Optional[Mapping[str, Any]], fp_path: str, table: "ParticleTable",
                    made: str = "was made from") -> None:
    """Fail (one line naming the particle file) when ``table`` is not the particles that
    the fingerprint ``fp``, read from ``fp_path``, describes (``<fp_path> <made> other
    particles``); warn when ``fp`` is None (an older file)."""
    if fp is None:
        warn(fp_path, "that %s holds its particles" % table.path)
        return
    same, why = same_particles(fp, particle_fingerprint(table))
    if not same:
        fail(table.path, "is not the particle file that %s %s (%s); give that file"
             % (fp_path, made, why))
