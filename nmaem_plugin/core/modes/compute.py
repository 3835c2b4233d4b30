"""Normal modes of an atomic model: ANM on a coarse-grained network, interpolated on all atoms.

The pipeline (``compute_modes``):

1. **Coarse graining** (``cg_selection``): one node per residue by default (``ca``: CA of amino
   acids, C4' of nucleotides, P where a nucleotide has no C4'), or the protein and nucleic
   backbones (``backbone``), or every heavy atom (``heavy``).
2. **ANM Hessian** of the nodes (``sparse_hessian``, vectorised over the KD-tree's contact
   pairs; the same matrix as ProDy's ``ANM.buildHessian``, cutoff 15 A, gamma 1).
3. **Diagonalisation**: dense ``torch.linalg.eigh`` (on the GPU when there is one) for small
   networks, or shift and invert on the sparse Hessian for networks too large for a dense
   3N x 3N matrix (``shift_invert``: MUMPS and a block Lanczos, or SuperLU and ARPACK).
   ``solver='auto'`` chooses by size.
4. **Rigid-body modes**: the six zero eigenvalues are found by their gap to the first internal
   mode; more than six zero modes means the network is disconnected or floppy (an error).
5. **Interpolation** of the d lowest internal modes onto every atom with a normalised Gaussian
   kernel (Nadaraya-Watson / Shepard weights of the CG nodes), evaluated as a PyKeOps
   soft-max-weighted reduction: no M x N matrix is ever stored. See ``docs/modes.md``.
6. **Basis**: the all-atom rigid-body motions are projected out and the modes are made
   orthonormal over the 3M coordinates by symmetric (Loewdin) orthonormalisation, which keeps
   every mode as close as possible to its interpolated self.

Each step is a module of this folder: ``anm`` (1, 2), ``solver`` and ``shift_invert`` (3, 4),
``interpolation`` (5), ``basis`` (6). The result is a ``NormalModes``, written and read as ``modes.npz`` by
``modesfile``; ``diagnostics`` compares modes with a target conformation.
"""
import time
from typing import Callable, Optional

import numpy as np

from ..base.errors import NmaemError, fail
from ..physics.structure import AtomicModel
from .anm import cg_selection, check_network_parameters, count_pieces, sparse_hessian
from .basis import orthonormalise
from .interpolation import SIGMA_FACTOR, auto_sigma, interpolate_modes
from .modesfile import MODES_FORMAT_VERSION, NormalModes
from .shift_invert import sparse_route
from .solver import ZERO_TOL, choose_solver, collectivity, default_device, fix_signs, solve_modes

__all__ = ["compute_modes"]


# ----------------------------------------------------------------------------------------
# the whole computation

def compute_modes(model: AtomicModel, n_modes: int = 16, cg: str = "ca", cutoff: float = 15.0,
                  gamma: float = 1.0, solver: str = "auto", sigma: Optional[float] = None,
                  device: Optional[str] = None, cg_index: Optional[np.ndarray] = None,
                  log: Optional[Callable[[str], None]] = None) -> NormalModes:
    """Normal modes of ``model`` (an :class:`AtomicModel`) interpolated on all its atoms.

    ``cg_index`` (indices into the model) overrides the ``cg`` selection. ``sigma`` is the
    interpolation kernel width in Angstrom (default: ``auto_sigma`` of the CG nodes).
    ``solver`` is ``auto``, ``dense`` or ``sparse``; ``device`` the torch device (default the
    GPU when present). ``log`` is a callable receiving progress lines. Returns
    :class:`NormalModes` with diagnostics in ``info``.
    """
    say = log or (lambda *a: None)
    t_all = time.time()
    src = model.source or "model"
    n_modes = int(n_modes)
    if n_modes < 1:
        raise NmaemError("--n-modes must be at least 1, not %d" % n_modes)
    check_network_parameters(cutoff, gamma)
    coords = np.asarray(model.coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) == 0:
        fail(src, "no atom coordinates")
    if not np.all(np.isfinite(coords)):
        bad = np.nonzero(~np.isfinite(coords).all(1))[0]
        fail(src, "%d atom(s) with non-finite (NaN/inf) coordinates, e.g. %s"
             % (len(bad), model.atom_ids[bad[0]]))
    device = device or default_device()

    if cg_index is None:
        cg_index = cg_selection(model, cg)
        cg_label = cg
    else:
        cg_index = np.unique(np.asarray(cg_index, dtype=int))
        cg_label = "custom"
    n_cg = len(cg_index)
    if n_cg == 0:
        fail(src, "no atom matches the coarse-graining selection %r (%s)"
             % (cg_label, _cg_help(cg_label)))
    if n_cg < 4:
        fail(src, "only %d atom(s) match the coarse-graining selection %r; an elastic network "
                  "needs at least 4 nodes (try --cg backbone or --cg heavy)" % (n_cg, cg_label))
    n_internal = 3 * n_cg - 6
    if n_modes > n_internal:
        fail(src, "%d modes asked but the %d-node network (--cg %s) has only %d non-rigid "
                  "modes" % (n_modes, n_cg, cg_label, n_internal))
    cg_coords = coords[cg_index]
    say("coarse graining: %s, %d of %d atoms" % (cg_label, n_cg, len(coords)))

    pieces = count_pieces(cg_coords, cutoff)
    if pieces > 1:
        fail(src, "the elastic network is disconnected: %d separate pieces at cutoff %g A "
                  "(--cg %s); use a larger --cutoff" % (pieces, cutoff, cg_label))

    n_wanted = n_modes + 6
    method, why = choose_solver(n_cg, n_wanted, solver, device)
    t0 = time.time()
    H = sparse_hessian(cg_coords, cutoff, gamma)
    if method == "dense":
        H = H.toarray()
    t_hessian = time.time() - t0
    scale = float(H.diagonal().mean())
    say("ANM Hessian (vectorised, cutoff %g A, gamma %g): %d x %d %s, %.1f s"
        % (cutoff, gamma, 3 * n_cg, 3 * n_cg, "sparse" if method == "sparse" else "dense",
           t_hessian))
    t0 = time.time()
    route = "torch.linalg.eigh on %s" % device if method == "dense" else sparse_route()
    w, v = solve_modes(H, n_wanted, method, device, log=say)
    del H
    t_solve = time.time() - t0
    say("eigensolver: %s (%s; %s), %.1f s" % (method, route, why, t_solve))

    # rigid-body modes: the zero eigenvalues below the gap
    tol = ZERO_TOL * scale
    n_zero = int((w < tol).sum())
    if n_zero > 6:
        fail(src, "the elastic network has %s%d zero-frequency modes (6 expected): parts of it "
                  "are only loosely attached at cutoff %g A (--cg %s); use a larger --cutoff"
             % ("at least " if n_zero == len(w) else "", n_zero, cutoff, cg_label))
    if n_zero < 6:
        fail(src, "only %d zero-frequency modes found (6 expected: no clear gap after the "
                  "rigid-body modes, eigenvalues %s)"
             % (n_zero, " ".join("%.3g" % x for x in w[:8])))
    gap = float(w[6] / max(abs(w[5]), 1e-300 * scale, np.finfo(float).tiny))
    eigvals = w[6:6 + n_modes].copy()
    cg_vectors = fix_signs(v[:, 6:6 + n_modes])
    cg_modes = cg_vectors.T.reshape(n_modes, n_cg, 3)
    say("rigid-body modes removed: |lambda_1..6| <= %.2g, lambda_7 = %.4g (gap x%.2g)"
        % (np.abs(w[:6]).max(), w[6], gap))

    if sigma is None:
        sigma = auto_sigma(cg_coords)
        sigma_how = "auto (%g x median nearest-node distance)" % SIGMA_FACTOR
    else:
        sigma = float(sigma)
        sigma_how = "asked"
    t0 = time.time()
    raw = interpolate_modes(cg_coords, cg_modes, coords, sigma, device=device)
    t_interp = time.time() - t0
    # fidelity at the nodes themselves, before orthonormalisation
    at_nodes = raw[:, cg_index, :].reshape(n_modes, -1)
    cg_flat = cg_modes.reshape(n_modes, -1)
    node_cosine = (at_nodes * cg_flat).sum(1) / (np.linalg.norm(at_nodes, axis=1)
                                                 * np.linalg.norm(cg_flat, axis=1))
    # overshoot: largest atom displacement over largest node displacement, per mode
    overshoot = (np.linalg.norm(raw, axis=2).max(1)
                 / np.maximum(np.linalg.norm(cg_modes, axis=2).max(1), 1e-300))
    say("interpolation: node-exact normalised Gaussian, sigma %.3g A (%s), %s, %.1f s; "
        "cosine at the CG nodes min %.6f, overshoot max %.2f"
        % (sigma, sigma_how, "PyKeOps" if str(device).startswith("cuda") else
           "KD-tree close pairs", t_interp, node_cosine.min(), overshoot.max()))
    modes = orthonormalise(raw, coords)
    modes32 = modes.astype(np.float32)
    info = {
        "format_version": MODES_FORMAT_VERSION,
        "source": str(model.source),
        "cg": cg_label,
        "cutoff": float(cutoff),
        "gamma": float(gamma),
        "sigma": float(sigma),
        "kernel": "normalised_gaussian_node_exact",
        "solver": method,
        "solver_reason": why,
        "solver_route": route,
        "device": str(device),
        "n_cg": n_cg,
        "cg_index": cg_index.astype(np.int64),
        "cg_atom_ids": model.atom_ids[cg_index],
        "cg_coords": cg_coords.astype(np.float32),
        "cg_modes": cg_modes.astype(np.float32),
        "cg_eigenvalues": eigvals,
        "rigid_eigenvalues": w[:6].copy(),
        "eigenvalue_gap": gap,
        "collectivity": collectivity(modes),
        "cg_collectivity": collectivity(cg_modes),
        "node_cosine": node_cosine,
        "overshoot": overshoot,
        "time_hessian_s": t_hessian,
        "time_solve_s": t_solve,
        "time_interpolation_s": t_interp,
        "time_total_s": time.time() - t_all,
    }
    return NormalModes(coords=coords.astype(np.float32), modes=modes32, eigenvalues=eigvals,
                       atom_ids=np.asarray(model.atom_ids).astype(str), info=info)


def _cg_help(cg):
    return {"ca": "CA of amino acids, C4'/P of nucleotides",
            "backbone": "N CA C O of amino acids, sugar-phosphate atoms of nucleotides",
            "heavy": "all heavy atoms", "custom": "given node indices"}.get(cg, cg)
