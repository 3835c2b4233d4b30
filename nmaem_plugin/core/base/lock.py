"""One writer per output: a lock file (torch-free).

A lock is a file created with ``O_CREAT | O_EXCL`` that holds ``"PID HOST"`` and is
removed when its writer ends (also on errors and signals: the ``with`` block unwinds). A
second writer is refused in one line naming the holder. A lock of a dead process of this
host is stale: it is replaced, with a message. A lock of another host cannot be checked
and is refused. Used by every command that writes a folder or a file another process may
write: the run folder of ``nmaem train`` (``io.runfolder.run_lock``, ``RUN/.lock``) and the
outputs of every other command (``io.outputs.command_outputs``, ``.nmaem-<key>.lock``).
"""
import os
import socket
from typing import Callable, Optional, Tuple, Union

from .errors import fail

__all__ = ["FileLock", "read_lock", "pid_alive", "HOST"]

HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether the process ``pid`` of this host runs (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                # PermissionError: another user's process
        return True
    return True


def read_lock(path: Union[str, "os.PathLike[str]"]) -> Optional[Tuple[int, str]]:
    """(pid, host) of the lock file ``path``; None when there is none; (0, "?") when it is
    unreadable."""
    try:
        with open(os.fspath(path)) as fh:
            pid, host = fh.read().split()[:2]
        return int(pid), host
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return (0, "?")


class FileLock:
    """The lock file ``path`` for ``target`` (what the messages name), a context manager.

    ``what`` names the writer in the refusal ("another <what> (process P on H) is writing
    <target>..."); ``log`` receives the stale-lock message. Creating the lock is the first
    write into the folder, so a folder that cannot be written (read-only, no permission,
    full) is refused here, in one line, before any work.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"], target: str,
                 what: str = "nmaem command", log: Optional[Callable[[str], object]] = None,
                 holding: str = "this output") -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.target, self.what, self.holding = target, what, holding
        self.log = log or (lambda m: None)
        self.held = False

    def _try_create(self) -> bool:
        from .errors import os_error
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise os_error(exc, os.path.dirname(self.path), "cannot write into this "
                           "folder") from None
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write("%d %s\n" % (os.getpid(), HOST))
        except OSError as exc:
            os.unlink(self.path)
            raise os_error(exc, self.path) from None
        return True

    def acquire(self) -> "FileLock":
        """Take the lock, or raise a one-line NmaemError."""
        for _ in range(3):
            if self._try_create():
                self.held = True
                return self
            owner = read_lock(self.path)
            if owner is None:              # removed meanwhile
                continue
            pid, host = owner
            if host == HOST and pid != os.getpid() and not pid_alive(pid):
                self.log("nmaem: %s: removing the stale lock of process %d on %s (it is no "
                         "longer running)" % (self.path, pid, host))
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            fail(self.target, "another %s (process %d on %s) is writing %s; wait for it to "
                              "end (if it is gone, remove %s)"
                 % (self.what, pid, host, self.holding, os.path.basename(self.path)))
        fail(self.target, "could not take the lock %s" % os.path.basename(self.path))

    def release(self) -> None:
        """Remove the lock when this process holds it."""
        if self.held and read_lock(self.path) == (os.getpid(), HOST):
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.held = False

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> bool:
        self.release()
        return False
