"""RELION's programs: where they are and how they are run (the one home of that rule).

A RELION program (``relion_reconstruct``, ...) is ``$RELION_HOME/bin/PROGRAM`` when the
``RELION_HOME`` variable names a folder that has it, otherwise the first one on ``PATH``.
RELION is optional: a missing program is a one-line :class:`NmaemError` saying how to
install it (``apt-get install relion`` on Debian/Ubuntu gives RELION 3.1, or set
``RELION_HOME``). A program that fails is a one-line error that quotes RELION's own error
text (its ``ERROR`` lines, or its last lines of output). Torch-free: the protocols use
:func:`find_relion` to tell whether RELION is there.
"""
import os
import shutil
import subprocess
from typing import Callable, List, Optional, Sequence

from .errors import NmaemError

__all__ = ["find_relion", "relion_program", "run_relion", "relion_error_text", "INSTALL_HINT"]

INSTALL_HINT = ("install RELION (on Debian/Ubuntu: apt-get install relion) or set RELION_HOME "
                "to the folder whose bin/ holds it")


def find_relion(program: str = "relion_reconstruct") -> Optional[str]:
    """The path of RELION's ``program``: ``$RELION_HOME/bin/program``, else the one on
    ``PATH``; None when neither exists."""
    home = os.environ.get("RELION_HOME")
    if home:
        cand = os.path.join(home, "bin", program)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return shutil.which(program)


def relion_program(program: str = "relion_reconstruct") -> str:
    """:func:`find_relion`, or a one-line :class:`NmaemError` saying how to install it."""
    path = find_relion(program)
    if path is None:
        where = ("RELION_HOME=%s/bin or PATH" % os.environ["RELION_HOME"]
                 if os.environ.get("RELION_HOME") else "PATH")
        raise NmaemError("RELION's %s was not found (%s): %s" % (program, where, INSTALL_HINT))
    return path


def relion_error_text(output: str, limit: int = 400) -> str:
    """RELION's own error message in one line: its first line that starts with ``ERROR``
    and the reason that follows (up to the backtrace), else its last lines of output; at
    most ``limit`` characters."""
    lines = [ln.strip() for ln in (output or "").splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("ERROR")), None)
    if start is None:
        picked = lines[-3:]
    else:
        # RELION: "ERROR:", the reason (one or more lines), then "=== Backtrace ===" or a
        # second "ERROR:" block with the same reason
        picked = [lines[start]]
        for ln in lines[start + 1:]:
            if ln.startswith(("===", "in: ")) or ln.startswith("ERROR"):
                break
            picked.append(ln)
    text = " ".join(picked) or "no output"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_relion(program: str, args: Sequence[object], cwd: Optional[str] = None,
               log: Optional[Callable[[str], object]] = None) -> str:
    """Run RELION's ``program`` with ``args`` in ``cwd``; returns its output (stdout and
    stderr). A failure (non-zero exit, or a signal) is a one-line :class:`NmaemError`
    with RELION's own message (:func:`relion_error_text`)."""
    cmd: List[str] = [relion_program(program)] + [str(a) for a in args]
    if log is not None:
        log("relion: %s" % " ".join([program] + cmd[1:]))
    try:
        done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, errors="replace")
    except OSError as exc:
        raise NmaemError("%s could not be started (%s): %s" % (cmd[0], exc, INSTALL_HINT))
    if done.returncode != 0:
        how = ("exit status %d" % done.returncode if done.returncode > 0
               else "killed by signal %d" % -done.returncode)
        raise NmaemError("%s failed (%s): %s" % (program, how, relion_error_text(done.stdout)))
    return done.stdout
