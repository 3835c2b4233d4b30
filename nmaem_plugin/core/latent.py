"""``latent.npz``, the per-particle result of the encoder: the only reader and writer.

Contract (DESIGN.md): ``z`` (N, d) float32 normal-mode amplitudes in Angstrom
(X(z) = X0 + U z; d may be 0), ``shift`` (N, 2) float32 in Angstrom (x, y), the
translation applied to the rendered projection, and ``index`` (N,) int64, the 0-based row
of each particle in the particle file given to ``nmaem infer``. Optional (provenance.py):
``particles``, the fingerprint of that particle file, and ``model``, the fingerprint of
the run's reference and modes (JSON strings; absent in older files and in latents written
from a Scipion set).

Writers: ``nmaem infer`` (``core/infer.py``), and the export and evaluate protocols, which
write the z of a Scipion particle set through :func:`write_latent`. Readers: analysis,
export, evaluate, report, demo, and ``convert`` (latent -> SetOfParticlesFlex).
"""
import numpy as np

from .atomic import atomic_savez
from .errors import fail
from .npz import read_npz

__all__ = ["Latent", "read_latent", "write_latent", "KEYS"]

KEYS = ("z", "shift", "index")


class Latent:
    """A latent file: ``z`` (N,d) float64, ``shift`` (N,2) float64, ``index`` (N,) int64."""

    def __init__(self, z: np.ndarray, shift: np.ndarray, index: np.ndarray, path: str = "",
                 particles=None, model=None):
        self.z, self.shift, self.index, self.path = z, shift, index, path
        self.particles, self.model = particles, model     # fingerprints (provenance.py)

    @property
    def n(self):
        return self.z.shape[0]

    @property
    def d(self):
        return self.z.shape[1]


def read_latent(path) -> Latent:
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
    for name, a in (("z", z), ("shift", shift)):
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
    from .provenance import loads
    return Latent(z.astype(np.float64), shift.astype(np.float64), index, path,
                  particles=loads(data.get("particles")), model=loads(data.get("model")))


def write_latent(path, z, shift=None, index=None, particles=None, model=None) -> str:
    """Write ``latent.npz`` atomically: ``z`` (N, d) (a 1-D z is one amplitude per
    particle), ``shift`` (N, 2) (None: zeros) and ``index`` (N,) (None: 0..N-1);
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
    from .provenance import dumps
    extra = {k: dumps(v) for k, v in (("particles", particles), ("model", model))
             if v is not None}
    atomic_savez(path, z=z, shift=shift, index=index, **extra)
    return path
