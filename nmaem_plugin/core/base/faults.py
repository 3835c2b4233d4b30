"""Fault injection at named points, for the tests (torch-free, a no-op unless asked).

The environment variable ``NMAEM_FAULT`` holds ``ACTION@POINT[#N]`` items separated by
``;``. ``POINT`` is a shell pattern matched against the names passed to :func:`fault_point`:
every file write passes the file's name (``base.atomic``, before the temporary file is
made: ``particles.star``, ``pc1_03.pdb``, ``latent.npz``, ...). ``#N``: the N-th matching
point of the process (default the first). ``ACTION``:

* ``sigterm``: the process sends itself SIGTERM (the command's handler runs as for a
  ``kill``), ``sigkill``: SIGKILL (nothing can clean up: what a power loss leaves);
* ``nospace``, ``efbig``, ``erofs``: that ``OSError`` is raised there (a full disk, the
  file-size limit, a read-only file system).

Example: ``NMAEM_FAULT='sigterm@*.pdb#3' nmaem export ...`` stops before the third model.
The points are counted per command (``cli.main`` resets the counts).
"""
import errno
import fnmatch
import os
import signal
from typing import Dict

__all__ = ["fault_point", "reset_faults", "FAULT_ENV"]

FAULT_ENV = "NMAEM_FAULT"
_COUNTS: Dict[str, int] = {}
_ERRORS = {"nospace": errno.ENOSPC, "efbig": errno.EFBIG, "erofs": errno.EROFS}


def reset_faults() -> None:
    """Count the points from zero again (``cli.main`` does at each command)."""
    _COUNTS.clear()


def fault_point(name: str) -> None:
    """Trigger the fault that ``NMAEM_FAULT`` asks for at the point ``name``, if any."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(";"):
        action, _, point = item.strip().partition("@")
        point, _, nth = point.partition("#")
        if not point or not fnmatch.fnmatchcase(os.path.basename(name), point):
            continue
        _COUNTS[item] = _COUNTS.get(item, 0) + 1
        if _COUNTS[item] != int(nth or 1):
            continue
        if action == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action in _ERRORS:
            code = _ERRORS[action]
            raise OSError(code, os.strerror(code), name)
        else:
            raise ValueError("%s: unknown action %r" % (FAULT_ENV, action))
