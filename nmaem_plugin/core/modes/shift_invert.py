"""The lowest eigenpairs of a large sparse symmetric positive semi-definite matrix (the ANM
Hessian of a large network) by shift and invert: the eigenvalues nearest a small negative shift
sigma are the largest of (H - sigma I)^-1, and a Krylov method finds those first.

Two routes, chosen by what is installed (``sparse_route``):

* **MUMPS + block Lanczos** (python-mumps present): H - sigma I is factorised once as L D L^T
  by MUMPS (multifrontal, METIS nested-dissection ordering; the fronts are dense blocks done
  by BLAS-3), and ``block_lanczos`` iterates on blocks of vectors: one solve with 12
  right-hand sides costs about twice one with one right-hand side, because a solve reads the
  whole factor from memory whatever the number of columns.
* **SuperLU + ARPACK** (scipy only): the factorisation of H - sigma I by SuperLU in its
  symmetric mode with a minimum-degree ordering of A + A^T, and ARPACK's single-vector
  implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``), as before: SuperLU's
  multi-column solves cost nearly as much per column as single ones, so blocks do not pay
  there.

On the 90-copy adenylate kinase lattice 36 A apart (19,260 CA nodes, H of 57,780 rows and
11.3 million non-zeros), one thread: MUMPS factorises in 6-11 s (63 million non-zeros in the
factor, against SuperLU's 193 million and 40-55 s) and the block Lanczos converges in 19 blocks
of 11 for d = 16; docs/benchmarks.md has the measurements.
"""
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from ..base.errors import NmaemError

if TYPE_CHECKING:                   # scipy is imported where it is used
    from scipy.sparse import spmatrix

__all__ = ["Eigenpairs", "ShiftedFactor", "factorise_shifted", "block_lanczos",
           "lowest_eigenpairs", "sparse_route", "mumps_available", "FACTORISERS",
           "SHIFT_FRACTION", "LANCZOS_TOL"]

# the shift: -SHIFT_FRACTION x the mean diagonal of H (below the zero eigenvalues, so that
# H - sigma I is positive definite and the lowest eigenvalues are the nearest)
SHIFT_FRACTION = 1e-3
# block Lanczos stops when every wanted Ritz pair of (H - sigma I)^-1 has a residual below
# LANCZOS_TOL x its Ritz value (then ||H v - lambda v|| is about 1e-11 of the mean diagonal)
LANCZOS_TOL = 1e-10
FACTORISERS = ("auto", "mumps", "superlu")


def mumps_available() -> bool:
    """Whether python-mumps (the ``mumps`` module with its ``Context``) can be imported."""
    try:
        import mumps
    except ImportError:
        return False
    return hasattr(mumps, "Context")


def sparse_route(factoriser: str = "auto") -> str:
    """The route ``lowest_eigenpairs`` takes with ``factoriser``, in words."""
    if _factoriser(factoriser) == "mumps":
        return "MUMPS LDL^T (METIS ordering) + block shift-invert Lanczos"
    return "SuperLU (MMD ordering) + ARPACK shift-invert Lanczos"


def _factoriser(factoriser):
    if factoriser not in FACTORISERS:
        raise NmaemError("unknown factoriser %r (choose %s)" % (factoriser, ", ".join(FACTORISERS)))
    if factoriser == "auto":
        return "mumps" if mumps_available() else "superlu"
    if factoriser == "mumps" and not mumps_available():
        raise NmaemError("the MUMPS route needs python-mumps (pip install python-mumps)")
    return factoriser


class ShiftedFactor:
    """A factorisation of H - shift I: ``solve(B)`` for B (n,) or (n, p) returns
    (H - shift I)^-1 B. Use it in a ``with`` block (MUMPS frees its factor on exit)."""

    def __init__(self, solve: Callable[[np.ndarray], np.ndarray], name: str, shift: float,
                 close: Optional[Callable[[], None]] = None, nnz_factor: int = 0,
                 seconds: float = 0.0):
        self.solve = solve
        self.name = name
        self.shift = float(shift)
        self.nnz_factor = int(nnz_factor)
        self.seconds = float(seconds)
        self._close = close

    def __enter__(self) -> "ShiftedFactor":
        return self

    def __exit__(self, *exc) -> None:
        if self._close is not None:
            self._close()
            self._close = None


def factorise_shifted(hessian: "spmatrix", shift: float, factoriser: str = "auto"
                      ) -> ShiftedFactor:
    """Factorise ``hessian`` - ``shift`` I (symmetric; positive definite for a PSD Hessian
    and a negative shift, so no pivoting is needed) with MUMPS or SuperLU."""
    from scipy.sparse import csc_matrix, identity
    how = _factoriser(factoriser)
    n = hessian.shape[0]
    A = csc_matrix(hessian) - float(shift) * identity(n, format="csc")
    t0 = time.time()
    if how == "mumps":
        import mumps
        ctx = mumps.Context()
        ctx.set_matrix(A.tocoo(), symmetric=True)
        try:
            ctx.factor(ordering="metis", pivot_tol=0.0)
        except mumps.MUMPSError as exc:
            raise NmaemError("MUMPS could not factorise the shifted Hessian (%s)" % exc)

        # MUMPS keeps a pointer to the last right-hand side it was given and touches it
        # again later (freeing that array while the context lives corrupts the heap: seen
        # with python-mumps 0.0.2), so the right-hand sides go through buffers that live as
        # long as the context, one per shape
        buffers = {}

        def solve(b):
            b = np.asarray(b, dtype=np.float64)
            buf = buffers.get(b.shape)
            if buf is None:
                buf = buffers[b.shape] = np.empty(b.shape, dtype=np.float64, order="F")
            buf[...] = b
            out = ctx.solve(buf, overwrite_b=True)
            return np.array(out, copy=True)

        def close():
            ctx.__exit__(None, None, None)
            buffers.clear()

        nnz = int(getattr(ctx.factor_stats, "nonzeros", 0) or 0)
        return ShiftedFactor(solve, "MUMPS LDL^T (METIS ordering)", shift, close, nnz,
                             time.time() - t0)
    from scipy.sparse.linalg import splu
    lu = splu(A, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
              options=dict(SymmetricMode=True))
    return ShiftedFactor(lu.solve, "SuperLU (MMD ordering of A + A^T)", shift, None,
                         lu.L.nnz + lu.U.nnz, time.time() - t0)


@dataclass
class Eigenpairs:
    """The lowest eigenpairs found: ``values`` (k,) ascending, ``vectors`` (n, k) orthonormal,
    ``residual`` the largest ||H v - lambda v|| over the mean diagonal of H, ``route`` in
    words, ``solves`` the right-hand sides solved, ``blocks`` the solve calls, and the
    seconds of the factorisation and of the iterations."""
    values: np.ndarray
    vectors: np.ndarray
    residual: float
    route: str
    solves: int
    blocks: int
    time_factor_s: float
    time_iterations_s: float


def block_lanczos(hessian: "spmatrix", k: int, factor: ShiftedFactor,
                  block: Optional[int] = None, tol: float = LANCZOS_TOL,
                  max_basis: Optional[int] = None, seed: int = 0) -> Optional[tuple]:
    """Block Lanczos on (H - shift I)^-1 with full reorthogonalisation (classical Gram-Schmidt,
    twice). Returns (values (k,), vectors (n, k), solves, blocks), the Rayleigh quotients of
    H ascending, or None when ``max_basis`` vectors are not enough.

    With V the orthonormal Krylov basis (block columns X_1..X_j), the step solves
    W = (H - shift I)^-1 X_j for all the block's columns at once, orthogonalises W against V
    (W - V C = X_{j+1} R) and adds the coefficients C to S = V^T (H - shift I)^-1 V. The
    Ritz pairs (theta, u) of S give the eigenvalues shift + 1/theta, and the residual of each
    Ritz pair of the inverse is || R u_last || (u_last: the rows of u on the last block; the
    Lanczos relation), so convergence is checked without touching an n-vector.
    """
    n = hessian.shape[0]
    k = int(k)
    b = block or max(8, min(16, math.ceil(k / 2)))
    b = max(1, min(b, n))
    max_basis = min(n, max_basis or max(40 * k, 400))
    rng = np.random.default_rng(seed)
    cap = min(max_basis, 8 * k + 2 * b)
    V = np.empty((n, cap), order="F")
    S = np.zeros((cap, cap))
    X, _ = np.linalg.qr(rng.standard_normal((n, b)))
    m = blocks = solves = 0
    while True:
        p = X.shape[1]
        Y = np.asarray(factor.solve(np.asfortranarray(X)), dtype=np.float64).reshape(n, p)
        blocks += 1
        solves += p
        if m + p > cap:
            cap = min(max_basis, max(2 * cap, m + p))
            grown = np.empty((n, cap), order="F")
            grown[:, :m] = V[:, :m]
            V = grown
            grown = np.zeros((cap, cap))
            grown[:m, :m] = S[:m, :m]
            S = grown
        V[:, m:m + p] = X
        Vm = V[:, :m + p]
        C = Vm.T @ Y
        S[:m + p, m:m + p] = C
        S[m:m + p, :m] = C[:m].T
        m += p
        Z = Y - Vm @ C
        Z -= Vm @ (Vm.T @ Z)
        X, R = np.linalg.qr(Z)
        theta, U = np.linalg.eigh(0.5 * (S[:m, :m] + S[:m, :m].T))
        theta, U = theta[::-1][:k], U[:, ::-1][:, :k]
        if len(theta) == k:
            estimate = np.linalg.norm(R @ U[m - p:], axis=0) / np.abs(theta)
            if estimate.max() < tol:
                break
        room = max_basis - m
        if room < b:
            if room == 0 or max_basis < n:
                return None
            # the basis is about to fill the whole space: its last directions are the
            # complement of V, after which the Ritz pairs are exact
            X = _orthogonal_complement(Vm, room, rng)
            continue
        # an exhausted direction (W inside span V) is replaced by a random one
        d = np.abs(np.diag(R))
        weak = d < 1e-10 * max(float(d.max(initial=0.0)), 1e-300)
        if weak.any():
            X[:, weak] = _orthogonal_complement(np.hstack([Vm, X[:, ~weak]]),
                                                int(weak.sum()), rng)
    vectors = V[:, :m] @ U
    values = np.einsum("ij,ij->j", vectors, hessian @ vectors)
    order = np.argsort(values)
    return values[order], vectors[:, order], solves, blocks


def _orthogonal_complement(V, r, rng):
    """``r`` orthonormal random directions orthogonal to the orthonormal columns of ``V``."""
    Z = rng.standard_normal((V.shape[0], r))
    Z -= V @ (V.T @ Z)
    Z -= V @ (V.T @ Z)
    return np.linalg.qr(Z)[0]


def lowest_eigenpairs(hessian: "spmatrix", k: int, factoriser: str = "auto",
                      shift: Optional[float] = None) -> Eigenpairs:
    """The ``k`` lowest eigenpairs of the sparse symmetric PSD ``hessian`` (scipy sparse,
    n x n, k < n - 1): MUMPS + ``block_lanczos`` or SuperLU + ARPACK (``factoriser``: auto,
    mumps, superlu). ``shift`` defaults to -``SHIFT_FRACTION`` x the mean diagonal. Should
    the block Lanczos not converge within its basis, ARPACK finishes with the same factor."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import LinearOperator, eigsh
    H = csr_matrix(hessian, dtype=np.float64)
    n = H.shape[0]
    k = int(k)
    if not 0 < k < n - 1:
        raise NmaemError("the sparse eigensolver needs 0 < k < n - 1 (k = %d, n = %d)" % (k, n))
    scale = max(float(H.diagonal().mean()), 1e-300)
    shift = -SHIFT_FRACTION * scale if shift is None else float(shift)
    how = _factoriser(factoriser)
    with factorise_shifted(H, shift, how) as factor:
        t0 = time.time()
        found = block_lanczos(H, k, factor) if how == "mumps" else None
        if found is not None:
            values, vectors, solves, blocks = found
            route = "%s + block shift-invert Lanczos" % factor.name
        else:
            count = [0]

            def matvec(b):
                count[0] += 1
                return factor.solve(b)
            inverse = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
            v0 = np.random.default_rng(0).standard_normal(n)
            values, vectors = eigsh(H, k=k, sigma=shift, which="LM", v0=v0, tol=0,
                                    OPinv=inverse, maxiter=100 * n)
            order = np.argsort(values)
            values, vectors = values[order], vectors[:, order]
            solves = blocks = count[0]
            route = "%s + ARPACK shift-invert Lanczos" % factor.name
        t_iter = time.time() - t0
        t_factor = factor.seconds
    residual = float((np.linalg.norm(H @ vectors - vectors * values, axis=0) / scale).max())
    return Eigenpairs(values=values, vectors=vectors, residual=residual, route=route,
                      solves=int(solves), blocks=int(blocks), time_factor_s=t_factor,
                      time_iterations_s=t_iter)
