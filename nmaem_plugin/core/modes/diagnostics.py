"""Modes against a target conformation: least-squares amplitudes, the floor RMSD any amplitudes
reach, and the overlaps of each mode with the displacement to the target."""
from typing import Optional, Union

import numpy as np

from ..base.errors import NmaemError
from ..physics.structure import AtomicModel, match_atoms, rmsd, superpose
from .modesfile import NormalModes, check_modes_match

__all__ = ["fit_amplitudes", "floor_rmsd", "target_diagnostics"]


# ----------------------------------------------------------------------------------------
# comparison with a target conformation

def fit_amplitudes(modes: np.ndarray, coords0: np.ndarray,
                   target_coords: np.ndarray) -> np.ndarray:
    """Least-squares amplitudes z (d,) or (F,d) with coords0 + sum z_l modes[l] ~ target.

    ``modes`` (d,M,3); ``target_coords`` (M,3) or (F,M,3), in the frame of ``coords0``.
    The modes need not be orthonormal on these rows (e.g. a subset of atoms).
    """
    U = np.asarray(modes, dtype=np.float64)
    d = U.shape[0]
    U = U.reshape(d, -1).T
    x0 = np.asarray(coords0, dtype=np.float64).reshape(-1)
    T = np.asarray(target_coords, dtype=np.float64)
    single = T.ndim == 2
    D = (T.reshape(-1, x0.size) - x0).T  # (3M, F)
    z, *_ = np.linalg.lstsq(U, D, rcond=None)
    return z[:, 0] if single else z.T


def floor_rmsd(modes: np.ndarray, coords0: np.ndarray,
               target_coords: np.ndarray) -> Union[float, np.ndarray]:
    """The best RMSD to ``target_coords`` that any amplitude vector can reach:
    min_z RMSD(coords0 + U z, target), the residual of target - coords0 outside the span of
    the modes. ``target_coords`` (M,3) -> float, or (F,M,3) -> (F,) array. No superposition
    is done here: give the target in the frame of ``coords0`` (see ``target_diagnostics``)."""
    U = np.asarray(modes, dtype=np.float64)
    d = U.shape[0]
    x0 = np.asarray(coords0, dtype=np.float64)
    T = np.asarray(target_coords, dtype=np.float64)
    single = T.ndim == 2
    T = T.reshape(-1, x0.size)
    z = fit_amplitudes(modes, x0, T.reshape(-1, *x0.shape)).reshape(len(T), d)
    fit = x0.reshape(-1) + z @ U.reshape(d, -1)
    r = np.sqrt(((fit - T) ** 2).sum(1) / x0.shape[0])
    return float(r[0]) if single else r


def target_diagnostics(nm: NormalModes, model: AtomicModel, target: AtomicModel,
                       target_path: Optional[str] = None) -> dict:
    """Overlaps of the modes with the displacement from ``model`` to ``target``.

    Atoms are matched by chain, residue number, insertion code and atom name; the target's
    matched atoms are superposed (Kabsch) on the reference's. Returns a dict: ``overlap``
    (d,) cosines of each mode with the displacement, ``cumulative_overlap`` (d,) the fraction
    of the displacement's norm inside the span of the first k modes, the same on the CG nodes
    with the CG eigenvectors (``cg_cumulative_overlap``), ``rmsd`` after superposition,
    ``floor_rmsd`` and the number of matched atoms.
    """
    check_modes_match(nm, model, coords_tol=None)
    ia, ib = match_atoms(model, target, model.source or None, target_path)
    x0 = nm.coords.astype(np.float64)[ia]
    b = superpose(target.coords[ib], x0)
    disp = (b - x0).reshape(-1)
    U = nm.modes.astype(np.float64)[:, ia, :].reshape(nm.n_modes, -1)
    dn = np.linalg.norm(disp)
    if dn == 0:
        raise NmaemError("%s: the target is identical to the reference after superposition"
                         % (target_path or target.source or "target"))
    overlap = U @ disp / (np.linalg.norm(U, axis=1) * dn)
    Q, _ = np.linalg.qr(U.T)  # nested spans: span(Q[:, :k]) = span of the first k modes
    cumulative = np.sqrt(np.cumsum((Q.T @ disp) ** 2)) / dn
    out = {"target_path": str(target_path or target.source), "n_matched": len(ia),
           "overlap": overlap, "cumulative_overlap": cumulative,
           "rmsd": rmsd(x0, b), "floor_rmsd": floor_rmsd(nm.modes[:, ia, :], x0, b)}
    # the same with the CG eigenvectors on the matched CG nodes (the classical ANM figure)
    cg_index = nm.info.get("cg_index")
    cg_modes = nm.info.get("cg_modes")
    if cg_index is not None and cg_modes is not None:
        pos = {a: k for k, a in enumerate(ia)}
        rows = [(k, pos[a]) for k, a in enumerate(cg_index) if a in pos]
        if len(rows) >= 4:
            kc, km = np.array(rows).T
            dc = (b[km] - x0[km]).reshape(-1)
            Uc = np.asarray(cg_modes, dtype=np.float64)[:, kc, :].reshape(nm.n_modes, -1)
            Qc, _ = np.linalg.qr(Uc.T)
            out["cg_cumulative_overlap"] = np.sqrt(np.cumsum((Qc.T @ dc) ** 2)) / np.linalg.norm(dc)
            out["cg_overlap"] = Uc @ dc / (np.linalg.norm(Uc, axis=1) * np.linalg.norm(dc))
    return out
