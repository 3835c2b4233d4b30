"""The output policy of every ``nmaem`` command, written once (torch-free).

1. An output never replaces one of the command's inputs: paths are compared after
   resolving links (``os.path.realpath``) and, where both exist, by ``os.path.samefile``
   (hard links, bind mounts).
2. An existing output is refused unless the command is given ``--force`` (``--overwrite``
   is kept as its alias where it existed: simulate, export).
3. An output file must not be a folder, an output folder must not be a file, and the folder
   that will hold an output file must exist.

Every refusal is a one-line :class:`~nmaem_plugin.core.errors.NmaemError` naming the
output (``nmaem: error: <path>: <problem>``, exit status 2), raised before any work, so
nothing of the user's is touched. The training run folder has its own rule
(:func:`check_run_dir`): a new run goes into a new or empty folder; an existing run is
continued with ``--resume``.
"""
import os
from typing import Collection, Iterable, List, Optional, Union

from ..base.atomic import clean_orphans
from ..base.errors import fail

__all__ = ["same_path", "check_output_file", "check_output_dir", "check_run_dir",
           "FORCE_HINT", "OVERWRITE_HINT", "run_files"]

FORCE_HINT = "choose another output or pass --force"
OVERWRITE_HINT = "choose another -o or pass --force (or its alias --overwrite)"


def run_files(run_dir: Optional[Union[str, "os.PathLike[str]"]]) -> List[str]:
    """The files at the top of a training run folder (inputs of infer, export, evaluate,
    report: an output must not replace them)."""
    if run_dir is None or not os.path.isdir(os.fspath(run_dir)):
        return []
    run_dir = os.fspath(run_dir)
    return [os.path.join(run_dir, f) for f in sorted(os.listdir(run_dir))
            if os.path.isfile(os.path.join(run_dir, f))]


def same_path(a: Union[str, "os.PathLike[str]"], b: Union[str, "os.PathLike[str]"]) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (links resolved)."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inputs(inputs):
    return [os.fspath(p) for p in (inputs or ()) if p is not None]


def _refuse_inputs(path, inputs, what="output"):
    for inp in _inputs(inputs):
        if same_path(path, inp):
            fail(path, "the %s would replace the input %s; choose another output"
                 % (what, inp))


def check_output_file(path: Optional[Union[str, "os.PathLike[str]"]],
                      inputs: Optional[Iterable[Optional[Union[str, "os.PathLike[str]"]]]] = (),
                      force: bool = False, what: str = "output",
                      hint: str = FORCE_HINT) -> Optional[str]:
    """Refuse (NmaemError) to write the file ``path``: onto one of ``inputs``, onto a
    folder, into a missing folder, or onto an existing file without ``force``.
    Returns ``path``."""
    if path is None:
        return None
    path = os.fspath(path)
    if os.path.isdir(path):
        fail(path, "is a folder; the %s is a file" % what)
    _refuse_inputs(path, inputs, what)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(path, "the output folder does not exist")
    if os.path.lexists(path) and not force:
        fail(path, "already exists; " + hint)
    clean_orphans(folder)        # temporary files of a killed run (atomic.py)
    return path


def check_output_dir(path: Union[str, "os.PathLike[str]"], products: Iterable[str] = (),
                     inputs: Optional[Iterable[Optional[Union[str, "os.PathLike[str]"]]]] = (),
                     force: bool = False, hint: str = FORCE_HINT) -> str:
    """Refuse (NmaemError) to write the files ``products`` (names relative to the folder
    ``path``): when ``path`` is a file, when a product would replace one of ``inputs``, or,
    without ``force``, when a product already exists. The folder itself may exist (its
    other files are left alone). Returns ``path``."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        fail(path, "is a file; the output is a folder")
    if os.path.isdir(path):
        for inp in _inputs(inputs):
            if same_path(path, inp):
                fail(path, "the output folder is the input %s; choose another output" % inp)
    targets = [os.path.join(path, p) for p in products]
    for t in targets:
        _refuse_inputs(t, inputs)
    existing = [t for t in targets if os.path.lexists(t)]
    if existing and not force:
        fail(existing[0], "already exists (%d of the %d output files do); %s"
             % (len(existing), len(targets), hint))
    clean_orphans(path)          # temporary files of a killed run (atomic.py)
    return path


def check_run_dir(path: Union[str, "os.PathLike[str]"], is_run: bool,
                  ignore: Collection[str] = (".lock",)) -> str:
    """A new training run goes into a new folder or an empty one: refuse (NmaemError) a
    file, and a folder that holds other files and is not a run (``is_run``: whether it holds
    one; the caller then answers ``--resume``). Returns ``path``."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        fail(path, "is a file; the training run is a folder")
    if os.path.isdir(path) and not is_run:
        others = sorted(f for f in os.listdir(path) if f not in ignore)
        if others:
            fail(path, "holds other files (%s%s) and is not a training run; choose a new or "
                       "empty folder" % (", ".join(others[:3]),
                                         ", ..." if len(others) > 3 else ""))
    return path
