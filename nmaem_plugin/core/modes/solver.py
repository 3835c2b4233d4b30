"""The eigenproblem of the Hessian: the lowest eigenpairs (``solve_modes``: dense torch eigh, or
shift and invert on the sparse Hessian, module ``shift_invert``), the choice between them by
network size (``choose_solver``), deterministic signs, and the collectivity of modes."""
from typing import TYPE_CHECKING, Callable, Optional, Tuple, Union

import numpy as np

from ..base.errors import NmaemError
from .shift_invert import lowest_eigenpairs

if TYPE_CHECKING:                   # scipy is imported where a sparse matrix is built
    from scipy.sparse import csr_matrix

__all__ = ["solve_modes", "choose_solver", "default_device", "fix_signs", "collectivity",
           "DENSE_MAX_NODES_CPU", "DENSE_MAX_NODES_GPU", "ZERO_TOL"]


# the dense solver is used up to this many CG nodes (3N x 3N float64 Hessian + eigenvectors);
# on a CPU the sparse routes are faster from a few hundred nodes on (one thread, 22
# eigenpairs: 428 nodes dense 0.6 s, sparse 0.1 s; 1,070 nodes dense 15 s, sparse 0.3 s)
DENSE_MAX_NODES_CPU = 300
DENSE_MAX_NODES_GPU = 4000
# an eigenvalue below ZERO_TOL * (mean diagonal of the Hessian) is a zero (rigid/floppy) mode
ZERO_TOL = 1e-6


def choose_solver(n_nodes: int, n_wanted: int, solver: str, device: str) -> Tuple[str, str]:
    """(method, reason): ``dense`` or ``sparse`` for ``n_wanted`` eigenpairs of ``n_nodes``
    nodes; ``auto`` chooses by size (``DENSE_MAX_NODES_CPU`` / ``_GPU``)."""
    if solver not in ("auto", "dense", "sparse"):
        raise NmaemError("unknown solver %r (choose auto, dense or sparse)" % solver)
    if solver == "sparse" and n_wanted >= 3 * n_nodes - 1:
        # ARPACK needs k < 3N - 1
        return "dense", "sparse asked but %d eigenpairs of a %d x %d matrix need the dense " \
                        "solver" % (n_wanted, 3 * n_nodes, 3 * n_nodes)
    if solver != "auto":
        return solver, "asked"
    limit = DENSE_MAX_NODES_GPU if str(device).startswith("cuda") else DENSE_MAX_NODES_CPU
    if n_nodes <= limit or n_wanted >= 3 * n_nodes - 1:
        return "dense", "%d nodes <= %d (dense limit on %s)" % (n_nodes, limit, device)
    return "sparse", "%d nodes > %d (dense limit on %s)" % (n_nodes, limit, device)


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def solve_modes(hessian: Union[np.ndarray, "csr_matrix"], n_wanted: int, solver: str = "dense",
                device: Optional[str] = None,
                log: Optional[Callable[[str], None]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The ``n_wanted`` lowest eigenpairs of a symmetric Hessian: (values (k,), vectors (3N,k)).

    ``dense``: torch.linalg.eigh in float64 on ``device`` (numpy array input);
    ``sparse``: shift and invert about a small negative shift (``shift_invert``): the
    shifted Hessian factorised once by MUMPS and a block Lanczos when python-mumps is
    installed, else by SuperLU and ARPACK's Lanczos. ``log`` receives one line saying the
    route, the solves and the largest residual.
    """
    if solver == "dense":
        import torch
        device = device or default_device()
        H = hessian.toarray() if hasattr(hessian, "toarray") else np.asarray(hessian)
        Ht = torch.from_numpy(np.ascontiguousarray(H, dtype=np.float64)).to(device)
        w, v = torch.linalg.eigh(Ht)
        w = w[:n_wanted].cpu().numpy()
        v = v[:, :n_wanted].cpu().numpy()
        del Ht
        return w, v
    if solver == "sparse":
        found = lowest_eigenpairs(hessian, n_wanted)
        if log is not None:
            log("sparse eigensolver: %s; factor %.1f s, %d solves in %d calls %.1f s, largest "
                "residual |Hv - lambda v| %.1e of the mean diagonal"
                % (found.route, found.time_factor_s, found.solves, found.blocks,
                   found.time_iterations_s, found.residual))
        return found.values, found.vectors
    raise NmaemError("unknown solver %r" % solver)


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Deterministic sign: the largest-magnitude component of each column is positive."""
    idx = np.argmax(np.abs(vectors), axis=0)
    s = np.sign(vectors[idx, np.arange(vectors.shape[1])])
    s[s == 0] = 1
    return vectors * s


def collectivity(modes: np.ndarray) -> Union[float, np.ndarray]:
    """Collectivity (Brueschweiler 1995) of modes (d,M,3) or (M,3): exp(entropy of the
    per-atom squared displacements) / M, in (0, 1]."""
    u = np.asarray(modes, dtype=np.float64)
    single = u.ndim == 2
    if single:
        u = u[None]
    p = (u ** 2).sum(-1)
    p = p / p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    k = np.exp(ent) / u.shape[1]
    return float(k[0]) if single else k
