"""``latent.npz``, the per-particle result of the encoder: the only reader and writer.

Contract (DESIGN.md): ``z`` (N, d) float32 normal-mode amplitudes in Angstrom
(X(z) = X0 + U z; d may be 0), ``shift`` (N, 2) float32 in Angstrom (x, y), the
translation applied to the rendered projection, and ``index`` (N,) int64, the 0-based row
of each particle in the particle file given to ``nmaem infer``. Runs trained with
``--refine-pose`` add ``pose_correction`` (N, 3) float32, the rotation vector v (radians)
of each particle's correction, and ``euler`` (N, 3) float64, the refined RELION angles
(rot, tilt, psi) in degrees of A_file R(v) (``poses.correct_rotations``); other files
have neither (``Latent.pose_correction`` and ``Latent.euler`` are then None).
Optional, from ``nmaem infer`` with the population estimate (``deconvolve.py``): ``z_cov``
(N, d, d) float32, each particle's posterior covariance of z (Angstrom^2, symmetric
positive definite); the population, ``population_weights`` (K,), ``population_means``
(K, d), ``population_covs`` (K, d, d), ``population_extra_mean`` (E,),
``population_extra_cov`` (E, E) (``Latent.population``, a dict of these arrays without
the prefix, for ``inference.population.Population.from_arrays``); and the shrinkage
check, ``shrinkage_scales`` (S,), ``shrinkage_loglik`` (S,), ``shrinkage_interval`` (3,) =
(best, low, high) (:class:`ShrinkageCheck`). Older latents have none of them
(``Latent.z_cov``, ``Latent.population`` and ``Latent.shrinkage`` are then None).
Optional (provenance.py):
``particles``, the fingerprint of that particle file, and ``model``, the fingerprint of
the run's reference and modes (JSON strings; absent in older files and in latents written
from a Scipion set).

Writers: ``nmaem infer`` (``core/inference/infer.py``), and the export, states and evaluate protocols, which
write the z of a Scipion particle set through :func:`write_latent`. Readers: analysis,
export, evaluate, report, demo, and ``convert`` (latent -> SetOfParticlesFlex).
"""
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from ..base.atomic import atomic_savez
from ..base.errors import fail
from .npz import read_npz

__all__ = ["Latent", "read_latent", "write_latent", "check_latent", "KEYS",
           "ShrinkageCheck", "POPULATION_KEYS"]

KEYS = ("z", "shift", "index")
POSE_KEYS = ("pose_correction", "euler")     # optional: runs with --refine-pose
POPULATION_KEYS = ("weights", "means", "covs", "extra_mean", "extra_cov")  # population_*


@dataclass
class ShrinkageCheck:
    """The shrinkage check of ``nmaem infer`` (``inference.population.scale_profile``):
    ``scales`` (S,) factors s of the landscape's spread about its mean, ``loglik`` (S,)
    the particles' marginal log-likelihood there relative to s = 1, ``best`` the
    maximising s, ``low``/``high`` its 95 % interval (within 1.92 of the maximum)."""
    scales: np.ndarray
    loglik: np.ndarray
    best: float
    low: float
    high: float

    @property
    def shrunk(self) -> bool:
        """The images support a wider landscape (the interval lies above 1)."""
        return self.low > 1.0

    def verdict(self) -> str:
        """One line for the log and the protocol's summary."""
        if self.low > 1.0:
            what = "the landscape is shrunk toward its mean"
        elif self.high < 1.0:
            what = "the landscape is spread wider than the images support"
        else:
            what = "consistent with the images"
        return ("landscape scale: the particles' likelihood is highest at %.2fx the inferred "
                "spread (95 %% interval %.2f-%.2f): %s" % (self.best, self.low, self.high,
                                                          what))


class Latent:
    """A latent file: ``z`` (N,d) float64, ``shift`` (N,2) float64, ``index`` (N,) int64;
    ``pose_correction`` (N,3) radians and ``euler`` (N,3) degrees, float64, or None."""

    def __init__(self, z: np.ndarray, shift: np.ndarray, index: np.ndarray, path: str = "",
                 pose_correction: Optional[np.ndarray] = None, euler: Optional[np.ndarray] = None,
                 particles: Optional[dict] = None, model: Optional[str] = None,
                 z_cov: Optional[np.ndarray] = None,
                 population: Optional[Mapping[str, np.ndarray]] = None,
                 shrinkage: Optional[ShrinkageCheck] = None) -> None:
        self.z, self.shift, self.index, self.path = z, shift, index, path
        self.pose_correction, self.euler = pose_correction, euler
        self.particles, self.model = particles, model     # fingerprints (provenance.py)
        self.z_cov, self.population, self.shrinkage = z_cov, population, shrinkage

    def z_sd(self) -> Optional[np.ndarray]:
        """Each particle's total posterior sd of z, sqrt(trace z_cov) (N,), in the units
        of z (divide by sqrt(M) for Angstrom RMSD), or None without ``z_cov``."""
        if self.z_cov is None:
            return None
        return np.sqrt(np.trace(self.z_cov, axis1=1, axis2=2))

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
    z_cov = _read_z_cov(path, data, n, z.shape[1])
    population, shrinkage = _read_population(path, data, z.shape[1])
    from .provenance import loads
    return Latent(z.astype(np.float64), shift.astype(np.float64), index, path,
                  pose.get("pose_correction"), pose.get("euler"),
                  particles=loads(data.get("particles")), model=loads(data.get("model")),
                  z_cov=z_cov, population=population, shrinkage=shrinkage)


def _read_z_cov(path, data, n, d):
    if "z_cov" not in data:
        return None
    c = data["z_cov"]
    if c.shape != (n, d, d):
        fail(path, "z_cov has shape %s, expected (%d, %d, %d)" % (c.shape, n, d, d))
    if c.dtype.kind != "f" or not np.all(np.isfinite(c)):
        fail(path, "z_cov holds non-finite or non-float values")
    c = c.astype(np.float64)
    if n and d:
        scale = np.abs(c).max(axis=(1, 2))
        asym = np.abs(c - np.swapaxes(c, 1, 2)).max(axis=(1, 2))
        bad = np.flatnonzero(asym > 1e-4 * np.maximum(scale, 1e-30))
        if len(bad):
            fail(path, "z_cov is not symmetric (first at row %d)" % bad[0])
        c = 0.5 * (c + np.swapaxes(c, 1, 2))
        try:                     # one batched Cholesky (eigenvalues cost 20x more)
            np.linalg.cholesky(c)
        except np.linalg.LinAlgError:
            # the eigenvalues decide (and name the row); a matrix Cholesky refuses only
            # at rounding is positive definite as before
            bad = np.flatnonzero(~(np.linalg.eigvalsh(c)[:, 0] > 0))
            if len(bad):
                fail(path, "z_cov is not positive definite (first at row %d)" % bad[0])
    return c


def _read_population(path, data, d):
    pop = None
    present = [k for k in POPULATION_KEYS if "population_" + k in data]
    if present:
        if len(present) != len(POPULATION_KEYS):
            fail(path, "the population arrays are incomplete (%s only)" % ", ".join(present))
        pop = {k: np.asarray(data["population_" + k], dtype=np.float64)
               for k in POPULATION_KEYS}
        K = pop["weights"].shape[0] if pop["weights"].ndim == 1 else -1
        E = pop["extra_mean"].shape[0] if pop["extra_mean"].ndim == 1 else -1
        if (K < 1 or pop["means"].shape != (K, d) or pop["covs"].shape != (K, d, d)
                or E < 0 or pop["extra_cov"].shape != (E, E)):
            fail(path, "the population's arrays do not match z (d = %d)" % d)
        if not all(np.all(np.isfinite(a)) for a in pop.values()) or np.any(pop["weights"] <= 0):
            fail(path, "the population holds non-finite values or weights that are not "
                       "positive")
    shrink = None
    if "shrinkage_scales" in data:
        s, ll, iv = (data.get(k) for k in ("shrinkage_scales", "shrinkage_loglik",
                                           "shrinkage_interval"))
        if ll is None or iv is None or s.shape != ll.shape or np.shape(iv) != (3,):
            fail(path, "the shrinkage check's arrays are incomplete or malformed")
        shrink = ShrinkageCheck(s.astype(np.float64), ll.astype(np.float64), float(iv[0]),
                                float(iv[1]), float(iv[2]))
    return pop, shrink


def write_latent(path: str, z: np.ndarray, shift: Optional[np.ndarray] = None,
                 index: Optional[np.ndarray] = None, pose_correction: Optional[np.ndarray] = None,
                 euler: Optional[np.ndarray] = None, particles: Optional[dict] = None,
                 model: Optional[str] = None, z_cov: Optional[np.ndarray] = None,
                 population: Optional[Mapping[str, np.ndarray]] = None,
                 shrinkage: Optional[ShrinkageCheck] = None) -> str:
    """Write ``latent.npz`` atomically: ``z`` (N, d) (a 1-D z is one amplitude per
    particle), ``shift`` (N, 2) (None: zeros) and ``index`` (N,) (None: 0..N-1); with
    ``pose_correction`` (N, 3) radians also ``euler`` (N, 3) degrees, the refined angles;
    ``particles`` and ``model``: fingerprints (provenance.py) when known; ``z_cov``,
    ``population`` (a dict with :data:`POPULATION_KEYS`) and ``shrinkage`` as in the
    module docstring."""
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
    if z_cov is not None:
        arrays["z_cov"] = np.asarray(z_cov, np.float32).reshape(n, z.shape[1], z.shape[1])
    if population is not None:
        arrays.update({"population_" + k: np.asarray(population[k], np.float64)
                       for k in POPULATION_KEYS})
    if shrinkage is not None:
        arrays.update(shrinkage_scales=np.asarray(shrinkage.scales, np.float64),
                      shrinkage_loglik=np.asarray(shrinkage.loglik, np.float64),
                      shrinkage_interval=np.array([shrinkage.best, shrinkage.low,
                                                   shrinkage.high], np.float64))
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
