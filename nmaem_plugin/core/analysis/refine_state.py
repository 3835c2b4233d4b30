"""One state's model refined against its own particles, stopped by a held-out half.

The state's particles are split in two at random: the *refinement half* A, whose
likelihood is minimised, and the *held-out half* B, which only scores. The model is every
heavy atom of the reference, X (M, 3): no longer a point of the normal modes' span. The
objective is the negative log posterior

    f(X) = chi2_A(X) / 2 + R(X),

``chi2_A`` the training likelihood's whitened chi-square over the half A
(``state_likelihood.StateLikelihood``: poses, origins, CTF, the run's noise model, band
and mask, each particle's grey scale and shift, the envelope) and ``R`` the geometry
restraints (``restraints.GeometryRestraints``: bonds, angles, peptide planes, contacts,
as -log of their prior). It is minimised by L-BFGS (``torch.optim.LBFGS``, strong Wolfe
line search) from the start model, in *rounds*:

1. the envelope's B-factor is estimated on half A at the round's start model;
2. L-BFGS runs, and every ``check_every`` iterations the held-out chi2_B of the current
   model is computed; the round stops when chi2_B has not improved for ``patience``
   checks, after ``iterations`` iterations, when L-BFGS converges, or when the objective
   stops being finite (a diverging refinement: reported, the best model so far kept);
3. the model with the lowest chi2_B of the round is refined by OpenMM
   (``refine.refine_coords``: amber99sb-ILDN with implicit solvent, restrained to it) so
   that its chemistry is that of an exported model, and validated
   (``validation.validate``);
4. the polished model replaces the incumbent only when the held-out half prefers it
   (each model scored at its own envelope B, estimated on half A), with a paired
   significance (per-image differences) of at least ``min_significance`` standard errors,
   and its geometry is sound (the OpenMM refinement succeeded, bond rms at most
   ``BOND_RMSD_MAX``, angle rms at most ``ANGLE_RMSD_MAX``, no more close contacts than
   the start); otherwise the rounds stop.

The result is never a model that the held-out half likes less than the start: a state
whose refinement gains nothing significant on B (pure noise, too few particles, a
diverging or chemistry-breaking refinement) keeps its start model, with the reason.
"""
import math
import time
from typing import TYPE_CHECKING, Callable, Dict, Optional

import numpy as np
import torch

from .state_likelihood import StateLikelihood, significance

if TYPE_CHECKING:
    from ..physics.structure import AtomicModel
    from .restraints import GeometryRestraints
    from .validation import ReferenceGeometry

__all__ = ["refine_state", "DEFAULTS", "BOND_RMSD_MAX", "ANGLE_RMSD_MAX"]

DEFAULTS = dict(
    iterations=100,        # L-BFGS iterations per round at most
    check_every=5,         # L-BFGS iterations between held-out checks
    patience=2,            # checks without a held-out improvement before a round stops
    rounds=3,              # rounds at most (each: envelope, L-BFGS, OpenMM, held-out gate)
    min_significance=2.0,  # paired z-score of the held-out gain a new model needs
    history=30,            # L-BFGS memory
)
BOND_RMSD_MAX = 0.05      # A: a refined model with bonds further from the reference's fails
ANGLE_RMSD_MAX = 5.0      # degrees


class Diverged(Exception):
    """The objective stopped being finite."""


def _descend(X0: np.ndarray, train: StateLikelihood, held: StateLikelihood,
             restraints: "GeometryRestraints", iterations: int, check_every: int,
             patience: int, history: int, log: Callable[[str], object],
             monitor: Optional[Callable[[np.ndarray], dict]] = None) -> Dict:
    """One round of L-BFGS with held-out checks (module docstring, step 2). Returns
    ``best`` (M, 3), ``held_best`` (chi2_B), ``held_start``, ``iterations``,
    ``evaluations``, ``stopped`` (why) and ``checks`` (the history)."""
    X = torch.tensor(np.asarray(X0, dtype=np.float64), requires_grad=True)
    ref_chi2 = train.chi2(X0)[0]
    held_start = held.chi2(X0)[0]
    best, held_best = np.array(X0, dtype=np.float64), held_start
    opt = torch.optim.LBFGS([X], lr=1.0, max_iter=max(1, int(check_every)),
                            history_size=int(history), line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-6)
    state = dict(evaluations=0, f=None)

    def closure():
        opt.zero_grad()
        c, _, g = train.chi2(X.detach().numpy(), grad=True)
        e = restraints.energy(X)
        if not (math.isfinite(c) and bool(torch.isfinite(e)) and np.all(np.isfinite(g))):
            raise Diverged("the objective is not finite (chi2 %s, restraints %s)"
                           % (c, float(e)))
        e.backward()
        X.grad += torch.as_tensor(0.5 * g)
        state["evaluations"] += 1
        f = 0.5 * (c - ref_chi2) + float(e.detach())
        state["f"] = f
        return torch.as_tensor(f, dtype=torch.float64)

    checks, done, stale, stopped = [], 0, 0, "iterations"
    t0 = time.time()
    while done < iterations:
        f_before = state["f"]
        try:
            opt.step(closure)
        except Diverged as exc:
            stopped = "diverged: %s" % exc
            break
        done += int(check_every)
        Xn = X.detach().numpy().copy()
        if not np.all(np.isfinite(Xn)):
            stopped = "diverged: non-finite coordinates"
            break
        h = held.chi2(Xn)[0]
        checks.append(dict(iteration=done, evaluations=state["evaluations"],
                           objective=state["f"], heldout_gain=held_start - h,
                           seconds=round(time.time() - t0, 1)))
        if monitor is not None:
            checks[-1].update(monitor(Xn))
        log("refine-states:   iteration %d (%d evaluations, %.0f s): held-out gain %.1f"
            % (done, state["evaluations"], time.time() - t0, held_start - h))
        if h < held_best:
            best, held_best, stale = Xn, h, 0
        else:
            stale += 1
            if stale >= patience:
                stopped = "held-out"
                break
        if f_before is not None and abs(state["f"] - f_before) < 1e-3:
            stopped = "converged"
            break
    return dict(best=best, held_best=held_best, held_start=held_start, iterations=done,
                evaluations=state["evaluations"], stopped=stopped, checks=checks)


def _sound(v: dict, start_contacts: int) -> str:
    """Why a validated model's geometry is not sound ('' when it is)."""
    if v["bond_rmsd"] > BOND_RMSD_MAX:
        return "bond rms %.3f A above %.2f" % (v["bond_rmsd"], BOND_RMSD_MAX)
    if v["angle_rmsd"] > ANGLE_RMSD_MAX:
        return "angle rms %.1f deg above %.1f" % (v["angle_rmsd"], ANGLE_RMSD_MAX)
    if v["close_contacts"] > start_contacts:
        return "%d close contacts (the start has %d)" % (v["close_contacts"], start_contacts)
    return ""


def _score(model: np.ndarray, train: StateLikelihood, held: StateLikelihood
           ) -> tuple:
    """(B fitted on the refinement half, held-out chi2 total, per image) of ``model``."""
    b = train.fit_bfactor(model)
    held.set_bfactor(b)
    total, per, _ = held.chi2(model)
    return b, total, per


def refine_state(reference: "AtomicModel", start: np.ndarray, train: StateLikelihood,
                 held: StateLikelihood, restraints: "GeometryRestraints",
                 geometry: "ReferenceGeometry", polish: Callable[[np.ndarray], tuple],
                 iterations: int = DEFAULTS["iterations"],
                 check_every: int = DEFAULTS["check_every"],
                 patience: int = DEFAULTS["patience"], rounds: int = DEFAULTS["rounds"],
                 min_significance: float = DEFAULTS["min_significance"],
                 history: int = DEFAULTS["history"],
                 log: Callable[[str], object] = print,
                 monitor: Optional[Callable[[np.ndarray], dict]] = None) -> Dict:
    """Refine one state's model (module docstring) from ``start`` (M, 3), an exported
    (OpenMM-refined) model. ``polish(X) -> (coords, ok, info)`` refines a model's
    chemistry (``refine.refine_coords``). Returns a dict: ``coords`` (the result),
    ``refined`` (bool), ``status`` and ``message``, ``heldout_gain`` (chi2 of half B,
    start minus result, each at its own envelope), ``heldout_significance``,
    ``bfactor_start``/``bfactor``, ``iterations``, ``evaluations``, ``rounds``, ``checks``
    (every held-out check), ``validation`` of the result (and of the start under
    ``plain``). ``monitor(X) -> dict``: extra figures of the model at each check (the
    benchmarks' RMSD to a known truth), added to its entry of ``checks``."""
    from .validation import validate
    t0 = time.time()
    start = np.asarray(start, dtype=np.float64)
    v_start = validate(start, geometry)
    b_start, held_start, per_start = _score(start, train, held)
    log("refine-states: start: envelope B %.0f A^2, held-out chi2 %.1f over %d particles"
        % (b_start, held_start, held.n))
    current, per_current, b_current = start, per_start, b_start
    out = dict(refined=False, status="no held-out gain", message="", iterations=0,
               evaluations=0, rounds=0, checks=[], bfactor_start=b_start)
    for r in range(int(rounds)):
        train.set_bfactor(b_current)
        held.set_bfactor(b_current)
        log("refine-states: round %d: L-BFGS on %d particles, held-out check every %d "
            "iterations" % (r + 1, train.n, check_every))
        res = _descend(current, train, held, restraints, iterations, check_every, patience,
                       history, log, monitor)
        out["iterations"] += res["iterations"]
        out["evaluations"] += res["evaluations"]
        out["checks"] += [dict(c, round=r + 1) for c in res["checks"]]
        if res["held_best"] >= res["held_start"]:
            if res["stopped"].startswith("diverged"):
                out.update(status="diverged", message=res["stopped"])
            break
        coords, ok, info = polish(res["best"])
        v = validate(coords, geometry)
        why = "" if ok else "the OpenMM refinement failed: %s" % info.get("message", "")
        why = why or _sound(v, v_start["close_contacts"])
        if why:
            log("refine-states: round %d rejected: %s" % (r + 1, why))
            out.update(status="chemistry", message=why)
            break
        b, held_new, per_new = _score(coords, train, held)
        gain = per_current - per_new
        z = significance(gain)
        log("refine-states: round %d: %s; held-out gain %.1f over the incumbent (%.1f "
            "standard errors), envelope B %.0f A^2"
            % (r + 1, res["stopped"], float(np.nansum(gain)), z, b))
        out["rounds"] = r + 1
        if not (np.nansum(gain) > 0 and z >= min_significance):
            break
        current, per_current, b_current = coords, per_new, b
        out.update(refined=True, status="refined", message=res["stopped"])
        if res["stopped"] in ("converged",) or res["iterations"] == 0:
            break
    gain = per_start - per_current
    out.update(coords=current, heldout_gain=float(np.nansum(gain)),
               heldout_gain_per_particle=float(np.nanmean(gain)),
               heldout_significance=significance(gain) if out["refined"] else 0.0,
               bfactor=b_current, n_refine=train.n, n_heldout=held.n,
               seconds=round(time.time() - t0, 1))
    v = validate(current, geometry, plain=start)
    v.pop("ramachandran_outlier_residues", None)
    out["validation"] = v
    return out
