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

from ..base.atomic import atomic_open, clean_orphans
from ..base.lock import FileLock, read_lock as read_lock_file
from ..base.choices import CHECKPOINTS
from ..base.errors import NmaemError, fail, os_error, require_file

__all__ = ["CONFIG_FILE", "LOG_FILE", "SPLIT_FILE", "NOISE_FILE",
           "FIT_CHECK_FILE", "CHECKPOINT_DIR", "LOG_COLUMNS", "LOG_OPTIONAL_COLUMNS",
           "config_path", "log_path", "checkpoint_dir", "checkpoint_file",
           "epoch_checkpoint_file", "read_config", "read_config_or_none", "write_json",
           "has_noise_model", "noise_path",
           "write_config", "write_log", "read_log_rows", "read_log_columns", "checkpoint_path",
           "existing_checkpoint", "reference_name", "is_run", "LOCK_FILE", "run_lock",
           "read_lock", "reference_and_modes", "check_config", "CONFIG_KEYS"]

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

class ConfigError(NmaemError, ValueError):
    """An unreadable ``config.json``: a one-line error, and a ValueError for the readers
    that catch one."""


# the keys every reader of a run needs (training writes them all; runs of every version
# have them), and their kinds: a number, a whole number, text, a list of numbers
CONFIG_KEYS = dict(particles="text", reference="text", n_modes="int", n_atoms="int",
                   n_particles="int", n_train="int", n_val="int", box="int", apix="number",
                   box0="int", apix0="number", centre="numbers", offset="numbers",
                   epochs="int", batch="int", lr="number", seed="int", loss="text",
                   filters="numbers", hidden="numbers", z_scale="number",
                   shift_scale="number")


def _kind_ok(v, kind):
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "number":
        return number and np.isfinite(v)
    if kind == "int":
        return number and float(v) == int(v)
    if kind == "text":
        return isinstance(v, str) and v != ""
    return isinstance(v, list) and all(_kind_ok(x, "number") for x in v)


def check_config(cfg: object, path: str) -> Dict:
    """``cfg`` (read from ``path``) when it holds every key of ``CONFIG_KEYS`` of its kind
    and ``modes`` (a file name, or null for a run without modes); else a one-line
    NmaemError naming the key (the file was edited or cut)."""
    if not isinstance(cfg, dict):
        fail(path, "not a run configuration (expected a JSON object)")
    for k, kind in CONFIG_KEYS.items():
        if k not in cfg:
            fail(path, "missing the key %r: not a whole run configuration (edited, or "
                       "written by another program?)" % k)
        if not _kind_ok(cfg[k], kind):
            fail(path, "%r is %s, expected %s" % (k, json.dumps(cfg[k])[:40], dict(
                number="a number", int="a whole number", text="a file name or word",
                numbers="a list of numbers")[kind]))
    if "modes" not in cfg or not (cfg["modes"] is None or _kind_ok(cfg["modes"], "text")):
        fail(path, "missing the key 'modes' (a file name, or null): not a whole run "
                   "configuration")
    return cfg


def read_config(run_dir: str) -> Dict:
    """``RUN/config.json``, checked (:func:`check_config`); a one-line NmaemError when it is
    missing, unreadable or incomplete."""
    path = config_path(run_dir)
    if os.path.isdir(path):
        fail(path, "is a folder, not the run configuration")
    if not os.path.isfile(path):
        fail(run_dir, "not a training run (no config.json)")
    try:
        with open(path) as fh:
            return check_config(json.load(fh), path)
    except ValueError as exc:
        fail(path, "unreadable run configuration (%s)" % exc)
    except OSError as exc:
        fail(path, "cannot read the run configuration (%s)" % exc.strerror)


def read_config_or_none(run_dir: str) -> Optional[Dict]:
    """``RUN/config.json`` as a dict, or None when it is not there (yet); a one-line
    NmaemError (a ValueError) when it is not JSON."""
    path = config_path(run_dir)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        try:
            return json.load(fh)
        except ValueError as exc:
            raise ConfigError("%s: not readable as JSON (%s)" % (path, exc)) from None


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
    return require_file(name, "checkpoint file (--checkpoint takes last, best or a file)")


# ============================================================================ one writer

def read_lock(run_dir: str) -> Optional[Tuple[int, str]]:
    """(pid, host) of the lock of ``run_dir``, or None when there is none. An unreadable lock
    gives (0, "?")."""
    return read_lock_file(os.path.join(os.fspath(run_dir), LOCK_FILE))


class run_lock:
    """Exclusive lock of a run folder while one training writes it (a context manager):
    ``RUN/.lock``, a ``base.lock.FileLock`` (a stale lock of a dead process of this host is
    replaced with a message through ``log``; a live one, or one of another host, is a
    one-line NmaemError). The folder is created if missing, and removed on exit when it is
    still empty (a refused or failed new run leaves nothing behind). Only the launching
    process takes it (DDP workers run under their launcher's lock).
    """

    def __init__(self, run_dir: str, log: Callable[[str], object] = print) -> None:
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self.lock = FileLock(self.path, self.run_dir, "training", log=log,
                             holding="this run")
        self.log = log
        self.created_dir = False

    def __enter__(self) -> "run_lock":
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            fail(self.run_dir, "is a file; the training run is a folder")
        if not os.path.isdir(self.run_dir):
            try:
                os.makedirs(self.run_dir)
            except OSError as exc:
                raise os_error(exc, self.run_dir, "cannot create the run folder") from None
            self.created_dir = True
        try:
            self.lock.acquire()
        except BaseException:
            self._cleanup_dir()
            raise
        for folder in (self.run_dir, checkpoint_dir(self.run_dir)):
            clean_orphans(folder, log=self.log)     # temporary files of a killed run
        return self

    def _cleanup_dir(self):
        if self.created_dir:
            try:
                os.rmdir(self.run_dir)
            except OSError:
                pass

    def __exit__(self, *exc: object) -> bool:
        self.lock.release()
        self._cleanup_dir()
        return False
