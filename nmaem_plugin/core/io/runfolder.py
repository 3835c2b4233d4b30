"""The training run folder (``RUN``): layout, configuration, log and checkpoint paths.

Torch-free, so that protocols, viewers, the report and the CLI read a run the same way::

    RUN/config.json          all settings (paths inside RUN are relative to RUN)
    RUN/reference.pdb|.cif   copy of --ref (X0), named by config["reference"]
    RUN/modes.npz            copy of --modes, named by config["modes"]
    RUN/split.npz            train / val: sorted 0-based rows of the particle file
    RUN/noise.npz            noise spectrum per optics group (--loss whitened)
    RUN/fit_check.json       the fit check of the reference against the particles
    RUN/checkpoints/last.pt  the latest checkpoint; best.pt (lowest validation loss);
                             epoch_NNNN.pt the last few epochs
    RUN/log.csv              epoch,train_loss,val_loss,images_per_s,seconds
    RUN/.lock                "PID HOST" of the training that writes the run (run_lock)

The training options and their rules are ``trainconfig.TrainConfig``.
"""
import csv
import io
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..base.atomic import atomic_open, clean_orphans, is_no_space, no_space_error
from ..base.choices import CHECKPOINTS
from ..base.errors import fail

__all__ = ["CONFIG_FILE", "LOG_FILE", "SPLIT_FILE", "NOISE_FILE",
           "FIT_CHECK_FILE", "CHECKPOINT_DIR", "LOG_COLUMNS", "LOG_OPTIONAL_COLUMNS",
           "config_path", "log_path", "checkpoint_dir", "checkpoint_file",
           "epoch_checkpoint_file", "read_config", "read_config_or_none", "write_json",
           "has_noise_model", "noise_path",
           "write_config", "write_log", "read_log_rows", "read_log_columns", "checkpoint_path",
           "existing_checkpoint", "reference_name", "is_run", "LOCK_FILE", "run_lock",
           "read_lock", "reference_and_modes"]

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"               # one run, one writer (run_lock)
LOG_FILE = "log.csv"
SPLIT_FILE = "split.npz"
NOISE_FILE = "noise.npz"          # the noise model of the whitened loss (noise.NoiseModel)
FIT_CHECK_FILE = "fit_check.json"  # the fit check's result (fitcheck.fit_check)
CHECKPOINT_DIR = "checkpoints"
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "images_per_s", "seconds")
# written when every epoch has it: the median pose correction (degrees) of --refine-pose
LOG_OPTIONAL_COLUMNS = ("pose_correction_deg",)



# ============================================================================ paths

def config_path(run_dir: str) -> str:
    return os.path.join(os.fspath(run_dir), CONFIG_FILE)


def log_path(run_dir: str) -> str:
    return os.path.join(os.fspath(run_dir), LOG_FILE)


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.fspath(run_dir), CHECKPOINT_DIR)


def checkpoint_file(run_dir: str, name: str = "last") -> str:
    """``RUN/checkpoints/<name>.pt`` (whether or not it exists)."""
    return os.path.join(checkpoint_dir(run_dir), name + ".pt")


def epoch_checkpoint_file(run_dir: str, epoch: int) -> str:
    return os.path.join(checkpoint_dir(run_dir), "epoch_%04d.pt" % int(epoch))


def is_run(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a (prepared) training run."""
    return os.path.isfile(config_path(run_dir))


def reference_name(ref: str) -> str:
    """The name of the copy of the reference model in RUN (``reference.pdb`` or ``.cif``)."""
    name = os.path.basename(ref).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return "reference.cif" if name.endswith((".cif", ".mmcif")) else "reference.pdb"


# ============================================================================ config

def read_config(run_dir: str) -> Dict:
    """``RUN/config.json``; a one-line NmaemError when it is missing or unreadable."""
    path = config_path(run_dir)
    if not os.path.isfile(path):
        fail(run_dir, "not a training run (no config.json)")
    try:
        with open(path) as fh:
            return json.load(fh)
    except ValueError as exc:
        fail(path, "unreadable run configuration (%s)" % exc)


def read_config_or_none(run_dir: str) -> Optional[Dict]:
    """``RUN/config.json`` as a dict, or None when it is not there (yet)."""
    path = config_path(run_dir)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def has_noise_model(cfg: Dict) -> bool:
    """Whether the run was trained with the whitened likelihood, whose noise model it
    keeps (:func:`noise_path`): what input whitening and the per-particle fit need."""
    return cfg.get("loss") == "whitened"


def noise_path(run_dir: str, cfg: Dict) -> str:
    """The run's noise model file (``cfg["noise"]``; ``NOISE_FILE`` for runs written before
    the key existed)."""
    return os.path.join(run_dir, cfg.get("noise") or NOISE_FILE)


def reference_and_modes(run_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """Absolute paths of the run's reference model and modes file named in its
    config.json (None where absent: no config, or a run without modes)."""
    cfg = read_config_or_none(run_dir)
    if cfg is None:
        return None, None
    ref, modes = cfg.get("reference"), cfg.get("modes")
    return (os.path.abspath(os.path.join(os.fspath(run_dir), ref)) if ref else None,
            os.path.abspath(os.path.join(os.fspath(run_dir), modes)) if modes else None)


def write_json(path: str, obj: object) -> None:
    """Write ``obj`` as indented, sorted JSON, atomically."""
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")


def write_config(run_dir: str, cfg: Dict) -> None:
    write_json(config_path(run_dir), cfg)


# ============================================================================ log

def write_log(run_dir: str, history: Sequence[Dict]) -> None:
    """``RUN/log.csv``: one row per epoch of ``history`` (LOG_COLUMNS, then those of
    LOG_OPTIONAL_COLUMNS that every epoch has), atomically."""
    columns = LOG_COLUMNS + tuple(k for k in LOG_OPTIONAL_COLUMNS
                                  if history and all(k in h for h in history))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for h in history:
        w.writerow([h["epoch"]] + ["%.8g" % h[k] for k in columns[1:]])
    with atomic_open(log_path(run_dir), "w") as fh:
        fh.write(buf.getvalue())


def read_log_rows(run_dir: str) -> List[Dict[str, float]]:
    """The rows of ``RUN/log.csv`` (list of dicts of floats); [] when absent. Rows that
    are not numbers (a partly written line) are skipped."""
    fn = log_path(run_dir)
    if not os.path.isfile(fn):
        return []
    rows = []
    with open(fn) as fh:
        for row in csv.DictReader(fh):
            try:
                rows.append({k: float(v) for k, v in row.items() if v not in (None, "")})
            except ValueError:
                continue
    return rows


def read_log_columns(path: str) -> Dict[str, np.ndarray]:
    """The columns of a ``log.csv`` file as float arrays (NaN where not a number)."""
    cols = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                try:
                    val = float(v)
                except (TypeError, ValueError):
                    val = np.nan
                cols.setdefault(k, []).append(val)
    return {k: np.asarray(v) for k, v in cols.items()}


# ============================================================================ checkpoints

def existing_checkpoint(run_dir: str, name: str = "last") -> Optional[str]:
    """``RUN/checkpoints/<name>.pt`` (``last`` or ``best``) when it exists, else None."""
    fn = checkpoint_file(run_dir, name)
    return fn if os.path.isfile(fn) else None


def checkpoint_path(run_dir: str, checkpoint: Optional[str] = None) -> str:
    """The file of ``checkpoint``: ``last`` (default; the last epoch), ``best`` (the epoch of
    lowest validation loss) or a path; a one-line NmaemError when it is missing."""
    name = checkpoint or "last"
    if name in CHECKPOINTS:
        path = checkpoint_file(run_dir, name)
        if not os.path.isfile(path):
            fail(run_dir, "no trained model (checkpoints/%s.pt missing%s)" % (
                name, "; runs of nmaem before best.pt existed have only last.pt"
                if name == "best" and existing_checkpoint(run_dir, "last") else ""))
        return path
    if not os.path.isfile(name):
        fail(name, "checkpoint file not found")
    return name


# ============================================================================ one writer

def read_lock(run_dir: str) -> Optional[Tuple[int, str]]:
    """(pid, host) of the lock of ``run_dir``, or None when there is none. An unreadable lock
    gives (0, "?")."""
    try:
        with open(os.path.join(os.fspath(run_dir), LOCK_FILE)) as fh:
            pid, host = fh.read().split()[:2]
        return int(pid), host
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return (0, "?")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # another user's process
        return True
    return True


class run_lock:
    """Exclusive lock of a run folder while one training writes it (a context manager).

    ``RUN/.lock`` is created with O_CREAT | O_EXCL and holds "PID HOST"; it is removed on
    exit. A lock of a dead process of this host is stale: it is replaced, with a message
    through ``log``. A live one (or one of another host, which cannot be checked) is a
    one-line NmaemError. The folder is created if missing, and removed on exit when it is
    still empty (a refused or failed new run leaves nothing behind). Only the launching
    process takes it (DDP workers run under their launcher's lock).
    """

    def __init__(self, run_dir: str, log: Callable[[str], object] = print) -> None:
        import socket
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self.log = log
        self.host = socket.gethostname()
        self.created_dir = False

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            if is_no_space(exc):
                raise no_space_error(self.path) from None
            raise
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write("%d %s\n" % (os.getpid(), self.host))
        except OSError as exc:
            os.unlink(self.path)
            if is_no_space(exc):
                raise no_space_error(self.path) from None
            raise
        return True

    def _clean_orphans(self):
        """The temporary files of a killed run (atomic.clean_orphans): this process now
        owns the folder."""
        for folder in (self.run_dir, checkpoint_dir(self.run_dir)):
            clean_orphans(folder, log=self.log)

    def __enter__(self):
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            fail(self.run_dir, "is a file; the training run is a folder")
        if not os.path.isdir(self.run_dir):
            os.makedirs(self.run_dir)
            self.created_dir = True
        for _ in range(3):
            if self._try_create():
                self._clean_orphans()
                return self
            owner = read_lock(self.run_dir)
            if owner is None:          # removed meanwhile
                continue
            pid, host = owner
            if host == self.host and not _pid_alive(pid):
                self.log("train: %s: removing the stale lock of process %d on %s (it is no "
                         "longer running)" % (self.path, pid, host))
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            self._cleanup_dir()
            fail(self.run_dir, "another training (process %d on %s) is writing this run; "
                               "wait for it to end (if it is gone, remove %s)"
                 % (pid, host, LOCK_FILE))
        self._cleanup_dir()
        fail(self.run_dir, "could not take the lock %s" % LOCK_FILE)

    def _cleanup_dir(self):
        if self.created_dir:
            try:
                os.rmdir(self.run_dir)
            except OSError:
                pass

    def __exit__(self, *exc):
        owner = read_lock(self.run_dir)
        if owner is not None and owner == (os.getpid(), self.host):
            os.unlink(self.path)
        self._cleanup_dir()
        return False
