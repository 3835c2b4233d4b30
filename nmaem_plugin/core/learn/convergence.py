"""Has the training loss levelled off? ``convergence`` of a training log (``RUN/log.csv``, its
columns or its rows), the note the training figure and the Scipion viewer show; and
``validation_stall``: the validation loss flat while the training loss keeps falling (the
network learns the training particles, not the landscape), the warning the training prints
once and the figure and viewer add to their note. numpy only."""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["Convergence", "convergence", "log_columns", "Log", "CONVERGENCE_EPOCHS",
           "CONVERGED_CHANGE", "validation_stall", "STALL_EPOCHS", "STALL_TRAIN_DROP"]

# a training log: a path to log.csv, a dict of columns, or a list of row dicts
Log = Union[str, Mapping[str, Sequence[Any]], Sequence[Mapping[str, Any]]]

CONVERGENCE_EPOCHS = 3       # the last 3 epochs against the 3 before them
CONVERGED_CHANGE = 0.01      # |relative change| of the validation loss called levelled off
STALL_EPOCHS = 3             # epochs of a flat validation loss before the warning
STALL_TRAIN_DROP = 0.03      # ... while the training loss fell by more than this (relative)


def log_columns(log: Log) -> Dict[str, np.ndarray]:
    """A log (path, dict of columns or list of row dicts) as a dict of float arrays, rows
    without a finite epoch (a partly written line) dropped; a missing or unreadable file
    is an empty log (a training that has not finished an epoch)."""
    if isinstance(log, (str, os.PathLike)):
        from ..io.runfolder import read_log_columns
        try:
            log = read_log_columns(log)
        except (OSError, UnicodeDecodeError):
            log = {}
    elif isinstance(log, (list, tuple)):
        keys = set().union(*[r.keys() for r in log]) if log else set()
        log = {k: [r.get(k, np.nan) for r in log] for k in keys}
    cols = {}
    for k, v in log.items():
        if k is None:           # csv's overflow column of a malformed line
            continue
        try:
            cols[k] = np.asarray(v, dtype=float).ravel()
        except (TypeError, ValueError):
            cols[k] = np.array([np.nan if not _isnumber(a) else float(a) for a in v])
    epoch = cols.get("epoch", np.zeros(0))
    keep = np.isfinite(epoch)
    return {k: v[keep] if len(v) == len(keep) else v for k, v in cols.items()}


def _isnumber(a):
    try:
        float(a)
        return True
    except (TypeError, ValueError):
        return False


class Convergence:
    """Has the loss levelled off? ``change``: relative change of the mean loss over the
    last ``n`` epochs against the ``n`` before them, (mean_last - mean_prev) / |mean_prev|
    (None with fewer than 2n finite values); ``key``: the column judged (``val_loss``, or
    ``train_loss`` for a run without validation particles); ``epochs``: (first, last)
    epoch of each window; ``note``: one sentence for the figure and the viewer."""

    def __init__(self, key: str, change: Optional[float], n: int,
                 epochs: Optional[Tuple[Tuple[int, int], Tuple[int, int]]], note: str) -> None:
        self.key, self.change, self.n, self.epochs, self.note = key, change, n, epochs, note

    @property
    def converged(self) -> bool:
        return self.change is not None and abs(self.change) < CONVERGED_CHANGE


def convergence(log: Log, n: int = CONVERGENCE_EPOCHS, tol: float = CONVERGED_CHANGE
                ) -> Convergence:
    """:class:`Convergence` of a training log (path, columns or rows): the validation
    loss's mean over the last ``n`` epochs against the ``n`` epochs before; levelled off
    when |relative change| < ``tol``."""
    cols = log_columns(log)
    epoch = cols.get("epoch", np.zeros(0))
    key, what = "val_loss", "validation loss"
    vals = cols.get(key)
    if vals is None or np.count_nonzero(np.isfinite(vals)) == 0:
        key, what = "train_loss", "training loss (no validation particles)"
        vals = cols.get(key, np.zeros(0))
    ok = np.isfinite(vals)
    e, v = epoch[ok], vals[ok]
    if len(v) < 2 * n:
        return Convergence(key, None, n, None,
                           "%d epoch(s) with a %s: %d needed to judge convergence (the "
                           "last %d against the %d before)" % (len(v), what.split(" (")[0],
                                                                2 * n, n, n))
    last, prev = v[-n:].mean(), v[-2 * n:-n].mean()
    if prev != 0:
        change = (last - prev) / abs(prev)
    else:
        change = 0.0 if last == prev else np.copysign(np.inf, last - prev)
    epochs = ((int(e[-2 * n]), int(e[-n - 1])), (int(e[-n]), int(e[-1])))
    verdict = ("levelled off (|change| < %g %%)" % (100 * tol) if abs(change) < tol else
               "still decreasing: more epochs may help" if change < 0 else
               "rising: look for overfitting or a too high learning rate")
    stall = validation_stall(cols, tol=tol)
    note = ("%s %+.2f %% (mean of epochs %d-%d vs %d-%d): %s"
            % (what[0].upper() + what[1:], 100 * change, epochs[1][0], epochs[1][1],
               epochs[0][0], epochs[0][1], stall or verdict))
    return Convergence(key, float(change), n, epochs, note)


def validation_stall(log: Log, patience: int = STALL_EPOCHS, tol: float = CONVERGED_CHANGE,
                     drop: float = STALL_TRAIN_DROP) -> Optional[str]:
    """A one-sentence warning when the validation loss has not fallen for the last
    ``patience`` epochs or more (it reached its floor, within ``tol`` relative of its
    lowest value, that many epochs ago; flat or rising since) while the training loss fell
    by more than ``drop`` (relative) over those epochs; None otherwise."""
    cols = log_columns(log)
    epoch = cols.get("epoch", np.zeros(0))
    val, trn = cols.get("val_loss"), cols.get("train_loss")
    if val is None or trn is None or len(val) != len(trn) or len(val) < patience + 1:
        return None
    ok = np.isfinite(val) & np.isfinite(trn)
    e, v, t = epoch[ok], val[ok], trn[ok]
    if len(v) < patience + 1:
        return None
    floor = v.min()
    s = int(np.flatnonzero(v - floor <= tol * abs(floor))[0])
    if len(v) - 1 - s < patience:
        return None
    fell = (t[s] - t[-1]) / abs(t[s]) if t[s] != 0 else 0.0
    if not fell > drop:
        return None
    return ("Warning: the validation loss has not fallen since epoch %d (it came within "
            "%g %% of its lowest then) while the training loss fell by %.0f %%: the "
            "network fits the "
            "training particles, not the landscape (overfitting); more particles, fewer "
            "epochs or a smaller encoder help, and --checkpoint best keeps the best epoch"
            % (int(e[s]), 100 * tol, 100 * fell))
