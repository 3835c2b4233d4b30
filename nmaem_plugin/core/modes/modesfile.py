"""``modes.npz``: ``NormalModes`` (the basis and what it was computed from), its writer and its
checked reader, the check that modes belong to a model, and the files for viewers (VMD's NMD,
one animated PDB per mode).

``modes.npz`` holds ``coords`` (M,3) float32, ``modes`` (d,M,3) float32 orthonormal over the
flattened 3M coordinates, ``eigenvalues`` (d,), ``atom_ids`` (M,) and diagnostics/parameters.
X(z) = coords + sum_l z_l modes[l].
"""
import os
from dataclasses import dataclass, field
from typing import List

import numpy as np

from ..base.atomic import atomic_path, atomic_savez
from ..base.errors import fail
from ..io.npz import read_npz
from ..physics.structure import AtomicModel, write_models

__all__ = ["NormalModes", "save_modes", "load_modes", "check_modes_match", "export_modes",
           "MODES_FORMAT_VERSION", "REQUIRED_KEYS"]


MODES_FORMAT_VERSION = 1
REQUIRED_KEYS = ("coords", "modes", "eigenvalues", "atom_ids")


@dataclass
class NormalModes:
    """An orthonormal all-atom mode basis and what it was computed from.

    ``coords`` (M,3) float32, ``modes`` (d,M,3) float32, ``eigenvalues`` (d,) float64,
    ``atom_ids`` (M,) str; ``info`` holds diagnostics and parameters (the extra keys of
    ``modes.npz``: numbers, strings and arrays).
    """
    coords: np.ndarray
    modes: np.ndarray
    eigenvalues: np.ndarray
    atom_ids: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return self.coords.shape[0]

    @property
    def n_modes(self) -> int:
        return self.modes.shape[0]

    @property
    def basis(self) -> np.ndarray:
        """U as a (3M, d) float64 matrix (columns orthonormal)."""
        return self.modes.reshape(self.n_modes, -1).T.astype(np.float64)

    def deform(self, z: np.ndarray) -> np.ndarray:
        """X(z) = coords + sum_l z_l modes[l] for z (d,) or (B, d): (M,3) or (B,M,3)."""
        z = np.asarray(z, dtype=np.float64)
        return self.coords + np.tensordot(z, self.modes.astype(np.float64), axes=(-1, 0))

    def __getitem__(self, key):
        if key in ("coords", "modes", "eigenvalues", "atom_ids"):
            return getattr(self, key)
        return self.info[key]


class _quiet_prody:
    """ProDy's logger silenced for a block (without touching the user's ProDy config)."""

    def __enter__(self):
        import prody
        self.logger = prody.LOGGER
        self.old = self.logger.verbosity
        self.logger.verbosity = "warning"

    def __exit__(self, *exc):
        self.logger.verbosity = self.old


# ----------------------------------------------------------------------------------------
# files

def save_modes(path: str, nm: NormalModes) -> str:
    """Write ``modes.npz`` atomically (``atomic_path``)."""
    path = str(path)
    arrays = {"coords": np.asarray(nm.coords, dtype=np.float32),
              "modes": np.asarray(nm.modes, dtype=np.float32),
              "eigenvalues": np.asarray(nm.eigenvalues, dtype=np.float64),
              "atom_ids": np.asarray(nm.atom_ids).astype(str)}
    for k, val in nm.info.items():
        if k in arrays:
            continue
        a = np.asarray(val)
        if a.dtype == object:
            a = a.astype(str)
        arrays[k] = a
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(path, "the output folder does not exist")
    try:
        atomic_savez(path, **arrays)
    except OSError as exc:
        fail(path, "cannot write the modes file (%s)" % exc.strerror)
    return path


def load_modes(path: str, orthonormal_tol: float = 1e-4) -> NormalModes:
    """Read and check a ``modes.npz`` file: a :class:`NormalModes`.

    Raises :class:`NmaemError` with a one-line ``path: problem`` message when the file is
    missing, not an npz archive, lacks a contract key, or has wrong shapes, non-finite values
    or modes that are not orthonormal (max |U^T U - I| > ``orthonormal_tol``).
    """
    path = str(path)
    data = read_npz(path, "modes")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        fail(path, "not a modes file: missing %s" % ", ".join(missing))
    coords, modes, ev, ids = (data.pop(k) for k in REQUIRED_KEYS)
    if coords.ndim != 2 or coords.shape[1] != 3 or coords.shape[0] == 0:
        fail(path, "coords has shape %s, expected (M, 3)" % (coords.shape,))
    m = coords.shape[0]
    if modes.ndim != 3 or modes.shape[1:] != (m, 3) or modes.shape[0] == 0:
        fail(path, "modes has shape %s, expected (d, %d, 3)" % (modes.shape, m))
    d = modes.shape[0]
    if ev.shape != (d,):
        fail(path, "eigenvalues has shape %s, expected (%d,)" % (ev.shape, d))
    if ids.shape != (m,) or ids.dtype.kind not in "US":
        fail(path, "atom_ids must be %d strings, found %s of %s" % (m, ids.dtype, ids.shape))
    for name, a in (("coords", coords), ("modes", modes), ("eigenvalues", ev)):
        if a.dtype.kind != "f":
            fail(path, "%s is not floating point (%s)" % (name, a.dtype))
        if not np.all(np.isfinite(a)):
            fail(path, "%s holds non-finite values" % name)
    U = modes.reshape(d, -1).astype(np.float64)
    err = np.abs(U @ U.T - np.eye(d)).max()
    if err > orthonormal_tol:
        fail(path, "the modes are not orthonormal (max |U^T U - I| = %.2g)" % err)
    info = {k: (a.item() if a.ndim == 0 else a) for k, a in data.items()}
    return NormalModes(coords=coords.astype(np.float32), modes=modes.astype(np.float32),
                       eigenvalues=ev.astype(np.float64), atom_ids=ids.astype(str), info=info)


def check_modes_match(modes: NormalModes, model: AtomicModel, coords_tol: float = 0.01) -> None:
    """Raise :class:`NmaemError` unless ``modes`` (a :class:`NormalModes`) were computed on
    ``model``: same atom ids in the same order, and (unless ``coords_tol`` is None) the same
    coordinates within ``coords_tol`` Angstrom."""
    ids = np.asarray(modes.atom_ids).astype(str)
    mids = np.asarray(model.atom_ids).astype(str)
    where = model.source or "model"
    if len(ids) != len(mids):
        fail(where, "modes computed on a different model: the modes file has %d atoms, the "
                    "model %d" % (len(ids), len(mids)))
    diff = np.nonzero(ids != mids)[0]
    if len(diff):
        i = diff[0]
        fail(where, "modes computed on a different model: %d atom ids differ, first at row %d "
                    "(%s in the modes file, %s in the model)" % (len(diff), i, ids[i], mids[i]))
    if coords_tol is not None:
        dev = np.abs(np.asarray(modes.coords, dtype=np.float64) - model.coords).max()
        if dev > coords_tol:
            fail(where, "modes computed on a different model: same atoms but coordinates "
                        "differ by up to %.3g A (another frame or conformation)" % dev)


def export_modes(nm: NormalModes, model: AtomicModel, out_dir: str, amplitude: float = 3.0,
                 n_frames: int = 20, prefix: str = "mode") -> List[str]:
    """Files for viewers in ``out_dir``: ``modes.nmd`` (ProDy NMD, for VMD's NMWiz) and one
    multi-model PDB per mode, ``mode_01.pdb``..., animating X0 + a sin(2 pi k / n_frames) u_l
    with the amplitude chosen so that the largest atom displacement is ``amplitude`` A.
    Returns the written paths."""
    import prody
    check_modes_match(nm, model, coords_tol=None)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    ag = prody.AtomGroup("nmaem")
    ag.setCoords(nm.coords.astype(np.float64))
    ag.setNames(np.asarray(model.atom_name).astype(str))
    ag.setResnames(np.asarray(model.resname).astype(str))
    ag.setResnums(np.asarray(model.resnum).astype(int))
    ag.setChids(np.asarray(model.chain).astype(str))
    ag.setElements(np.asarray(model.elements).astype(str))
    nma = prody.NMA("nmaem_modes")
    nma.setEigens(nm.basis, np.asarray(nm.eigenvalues, dtype=np.float64))
    with _quiet_prody():
        nmd = os.path.join(out_dir, "modes.nmd")
        with atomic_path(nmd) as tmp:          # prody writes by path only
            prody.writeNMD(tmp, nma, ag)
    written.append(nmd)
    if model._structure is not None:
        phase = np.sin(2 * np.pi * np.arange(n_frames) / n_frames)
        x0 = nm.coords.astype(np.float64)
        for l in range(nm.n_modes):
            u = nm.modes[l].astype(np.float64)
            a = amplitude / np.linalg.norm(u, axis=1).max()
            path = os.path.join(out_dir, "%s_%02d.pdb" % (prefix, l + 1))
            write_models(path, model, [x0 + a * p * u for p in phase])
            written.append(path)
    return written
