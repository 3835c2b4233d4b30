"""The one exception type that ``nmaem`` reports as a one-line error, and the one-line
forms of the file system's errors (:func:`os_error`: a full disk, the file-size limit, a
read-only folder, no permission)."""
import errno
import os
from typing import NoReturn, Optional, Union

__all__ = ["NmaemError", "fail", "is_no_space", "no_space_error", "os_error", "NO_SPACE",
           "require_file", "require_folder", "warning"]

# a full disk, an exceeded quota, the file-size limit (EFBIG): "no space" for the user
NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


class NmaemError(Exception):
    """Bad input or an impossible request.

    The message is one line and names the file (when there is one) and the problem;
    the command line prints ``nmaem: error: <message>`` and exits with status 2.
    """


def fail(path: object, problem: object) -> NoReturn:
    """Raise :class:`NmaemError` with the ``path: problem`` message layout."""
    if path is None:
        raise NmaemError(str(problem))
    raise NmaemError("%s: %s" % (path, problem))


def warning(text: str) -> None:
    """One line ``nmaem: warning: <text>`` on stderr (the command goes on)."""
    import sys
    sys.stderr.write("nmaem: warning: %s\n" % str(text).replace("\n", " "))


def require_file(path: Union[str, "os.PathLike[str]"], what: str = "file") -> str:
    """``path`` when it names a file that can be read; else a one-line NmaemError that says
    which: a folder given as a file, no such file, no permission to read it."""
    p = os.fspath(path)
    if os.path.isdir(p):
        fail(p, "is a folder, not a %s" % what)
    if not os.path.exists(p):
        fail(p, "no such %s" % what)
    if not os.access(p, os.R_OK):
        fail(p, "cannot read this %s (permission denied)" % what)
    return p


def require_folder(path: Union[str, "os.PathLike[str]"], what: str = "folder") -> str:
    """``path`` when it names a folder; else a one-line NmaemError: a file given as a
    folder, or no such folder."""
    p = os.fspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        fail(p, "is a file, not a %s" % what)
    if not os.path.isdir(p):
        fail(p, "no such %s" % what)
    return p


def _no_space_cause(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def is_no_space(exc: Optional[BaseException]) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk, a quota or the
    file-size limit (EFBIG)."""
    return _no_space_cause(exc) is not None


def no_space_error(path: Union[str, "os.PathLike[str]"],
                   exc: Optional[BaseException] = None) -> NmaemError:
    """The one-line error of a full disk (or, when ``exc`` is EFBIG, the file-size limit)."""
    cause = _no_space_cause(exc)
    if cause is not None and cause.errno == errno.EFBIG:
        return NmaemError("file too large for this process's file-size limit (ulimit -f) "
                          "writing %s: raise the limit or write elsewhere" % os.fspath(path))
    return NmaemError("no space left on device writing %s" % os.fspath(path))


def os_error(exc: OSError, path: Union[str, "os.PathLike[str]", None] = None,
             what: str = "cannot write") -> NmaemError:
    """A one-line NmaemError for the OSError ``exc`` met on ``path`` (default: the
    exception's file): a full disk or the file-size limit as :func:`no_space_error`, else
    ``<path>: <what>: <the system's reason>``."""
    path = os.fspath(path) if path is not None else (exc.filename or "")
    if is_no_space(exc):
        return no_space_error(path, exc)
    reason = exc.strerror or str(exc)
    return NmaemError("%s: %s: %s" % (path, what, reason) if path else "%s: %s" % (what, reason))
