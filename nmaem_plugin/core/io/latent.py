"""``latent.npz``, the per-particle result of the encoder: the only reader and writer.

Contract (DESIGN.md): ``z`` (N, d) float32 normal-mode amplitudes in Angstrom
(X(z) = X0 + U z; d may be 0), ``shift`` (N, 2) float32 in Angstrom (x, y), the
translation applied to the rendered projection, and ``index`` (N,) int64, the 0-based row
of each particle in the particle file given to ``nmaem infer``. Runs trained with
``--refine-pose`` add ``pose_correction`` (N, 3) float32, the rotation vector v (radians)
of each particle's correction, and ``euler`` (N, 3) float64, the refined RELION angles
(rot, tilt, psi) in degrees of A_file R(v) (``poses.correct_rotations``); other files
have neither (``Latent.pose_correction`` and ``Latent.euler`` are then None).
Optional (provenance.py):
``particles``, the fingerprint of that particle file, and ``model``, the fingerprint of
the run's reference and modes (JSON strings; absent in older files and in latents written
from a Scipion set).

Writers: ``nmaem infer`` (``core/inference/infer.py``), and the export, states and evaluate protocols, which
write the z of a Scipion particle set through :func:`write_latent`. Readers: analysis,
export, evaluate, report, demo, and ``convert`` (latent -> SetOfParticlesFlex).
"""
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from ..base.atomic import atomic_savez
from ..base.errors import fail
from .npz import read_npz

__all__ = ["Latent", "read_latent", "write_latent", "check_latent", "KEYS"]

KEYS = ("z", "shift", "index")
POSE_KEYS = ("pose_correction", "euler")     # optional: runs with --refine-pose


class Latent:
    """A latent file: ``z`` (N,d) float64, ``shift`` (N,2) float64, ``index`` (N,) int64;
    ``pose_correction`` (N,3) radians and ``euler`` (N,3) degrees, float64, or None."""

    def __init__(self, z: np.ndarray, shift: np.ndarray, index: np.ndarray, path: str = "",
                 pose_correction: Optional[np.ndarray] = None, euler: Optional[np.ndarray] = None,
                 particles: Optional[dict] = None, model: Optional[str] = None) -> None:
        self.z, self.shift, self.index, self.path = z, shift, index, path
        self.pose_correction, self.euler = pose_correction, euler
        self.particles, self.model = particles, model     # fingerprints (provenance.py)

    @property
    def n(self) -> int:
        return self.z.shape[0]

    @property
    def d(self) -> int:
        return self.z.shape[1]


def read_latent(path: str) -> Latent:
    """Read and check ``latent.npz`` (``z`` (N,d), ``shift`` (N,2), ``index`` (N,)).

    d may be 0 (a run without modes). Raises :class:`NmaemError` (one line) when the file
    is missing or unreadable, lacks a key, has inconsistent shapes, non-finite values,
    negative or non-integer indices, or no particles.
    """
    path = str(path)
    data = read_npz(path, "latent")
    missing = [k for k in KEYS if k not in data]
    if missing:
        fail(path, "not a latent file: missing %s" % ", ".join(missing))
    z, shift, index = data["z"], data["shift"], data["index"]
    if z.ndim == 1 and z.size == 0:
        fail(path, "z is empty: no particles")
    if z.ndim != 2:
        fail(path, "z has shape %s, expected (N, d)" % (z.shape,))
    n = z.shape[0]
    if n == 0:
        fail(path, "no particles (z has 0 rows)")
    if shift.shape != (n, 2):
        fail(path, "shift has shape %s, expected (%d, 2)" % (shift.shape, n))
    if index.shape != (n,):
        fail(path, "index has shape %s, expected (%d,)" % (index.shape, n))
    pose = {}
    for name in POSE_KEYS:
        if name in data:
            pose[name] = data[name]
            if pose[name].shape != (n, 3):
                fail(path, "%s has shape %s, expected (%d, 3)" % (name, pose[name].shape, n))
    if len(pose) == 1:
        fail(path, "%s without %s: both or neither" % tuple(
            list(pose) + [k for k in POSE_KEYS if k not in pose]))
    for name, a in [("z", z), ("shift", shift)] + list(pose.items()):
        if a.size and a.dtype.kind not in "fiu":
            fail(path, "%s is not numeric (%s)" % (name, a.dtype))
        if a.size and not np.all(np.isfinite(a)):
            fail(path, "%s holds non-finite values" % name)
    if index.dtype.kind not in "iu":
        if index.dtype.kind == "f" and np.all(np.isfinite(index)) and np.all(index == np.round(index)):
            index = np.round(index)
        else:
            fail(path, "index must hold integers (found %s)" % index.dtype)
    index = index.astype(np.int64)
    if index.min() < 0:
        fail(path, "index holds negative rows (first at position %d)"
             % int(np.flatnonzero(index < 0)[0]))
    pose = {k: v.astype(np.float64) for k, v in pose.items()}
    from .provenance import loads
    return Latent(z.astype(np.float64), shift.astype(np.float64), index, path,
                  pose.get("pose_correction"), pose.get("euler"),
                  particles=loads(data.get("particles")), model=loads(data.get("model")))


def write_latent(path: str, z: np.ndarray, shift: Optional[np.ndarray] = None,
                 index: Optional[np.ndarray] = None, pose_correction: Optional[np.ndarray] = None,
                 euler: Optional[np.ndarray] = None, particles: Optional[dict] = None,
                 model: Optional[str] = None) -> str:
    """Write ``latent.npz`` atomically: ``z`` (N, d) (a 1-D z is one amplitude per
    particle), ``shift`` (N, 2) (None: zeros) and ``index`` (N,) (None: 0..N-1); with
    ``pose_correction`` (N, 3) radians also ``euler`` (N, 3) degrees, the refined angles;
    ``particles`` and ``model``: fingerprints (provenance.py) when known."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim == 1:
        z = z.reshape(-1, 1)
    n = len(z)
    shift = (np.zeros((n, 2), np.float32) if shift is None
             else np.asarray(shift, dtype=np.float32).reshape(n, 2))
    index = (np.arange(n, dtype=np.int64) if index is None
             else np.asarray(index, dtype=np.int64).reshape(n))
    path = str(path)
    arrays = dict(z=z, shift=shift, index=index)
    if (pose_correction is None) != (euler is None):
        raise ValueError("pose_correction and euler go together")
    if pose_correction is not None:
        arrays["pose_correction"] = np.asarray(pose_correction, np.float32).reshape(n, 3)
        arrays["euler"] = np.asarray(euler, np.float64).reshape(n, 3)
    from .provenance import dumps
    arrays.update({k: dumps(v) for k, v in (("particles", particles), ("model", model))
                   if v is not None})
    atomic_savez(path, **arrays)
    return path


def check_latent(latent: "Latent", run_dir: Optional[str] = None,
                 cfg: Optional[Mapping[str, Any]] = None,
                 truth: Optional[Tuple[Optional[Mapping[str, Any]], str]] = None) -> None:
    """Check that a :class:`Latent` belongs with a run and a simulation's truth.

    ``truth``: (particle fingerprint or None, path of ground_truth.npz). A one-line
    NmaemError naming the latent file when its particles are not the truth's, or when it
    was made by another run (other reference, modes or number of modes); a warning when a
    fingerprint is missing."""
    from .provenance import check_model, run_model_fingerprint, same_particles, warn
    unchecked = []
    if truth is not None:
        truth_fp, truth_path = truth
        if truth_fp is None:
            warn(truth_path, "that it describes the particles of %s" % latent.path)
        elif latent.particles is None:
            unchecked.append("that its particles are those of %s" % truth_path)
        else:
            same, why = same_particles(latent.particles, truth_fp)
            if not same:
                fail(latent.path, "describes other particles than the simulation %s (%s): "
                                  "the latent and the truth must come from the same "
                                  "particles" % (truth_path, why))
    if run_dir is not None and cfg and cfg.get("reference"):
        if latent.model is None:
            unchecked.append("that it was made by the run %s" % run_dir)
        else:
            check_model(latent.model, latent.path, run_model_fingerprint(run_dir, cfg),
                        run_dir)
    if unchecked:
        warn(latent.path, " and ".join(unchecked))
