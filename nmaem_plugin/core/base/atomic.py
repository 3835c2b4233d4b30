"""Atomic file output: every file ``nmaem`` writes goes through this module.

A file is written to a temporary file beside the target (one recognisable name,
``.nmaem-tmp.<host>.<pid>.<random>.<name>``), checked (it exists and is not empty),
flushed and synced to the disk, then renamed onto the target (and the folder synced), so
the target is either the old file or the complete new one, never a truncated one. On any
failure the temporary file is removed and the target left as it was. A full disk (ENOSPC)
or an exceeded quota (EDQUOT) becomes one line::

    nmaem: error: no space left on device writing <file>

Two forms: :func:`atomic_open` yields an open file object whose every byte goes through
:func:`_raw_write` (the one low-level write); :func:`atomic_path` yields the temporary
path, for writers that only take a path (prody's NMD writer). :func:`atomic_folder` does the
same for a folder of files (written into a temporary folder beside it, renamed when
complete). :func:`clean_orphans` removes the temporary files and folders of a killed run
(of this host, whose process is gone) at the start of the next command that writes into
that folder (``outputs.check_output_*``, ``runfolder.run_lock``).
"""
import contextlib
import errno
import io
import os
import re
import shutil
import socket
import sys
import tempfile
from typing import IO, Callable, Iterator, List, Optional, Union

from .errors import NmaemError

__all__ = ["atomic_path", "atomic_open", "atomic_savez", "atomic_copy", "atomic_folder",
           "clean_orphans", "is_no_space",
           "no_space_error", "TMP_PREFIX"]

TMP_PREFIX = ".nmaem-tmp."
NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "host")[:40] or "host"
_ORPHAN = re.compile(r"^%s([A-Za-z0-9-]+)\.(\d+)\." % re.escape(TMP_PREFIX))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_no_space(exc: Optional[BaseException]) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk or quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space_error(path: Union[str, "os.PathLike[str]"]) -> NmaemError:
    return NmaemError("no space left on device writing %s" % os.fspath(path))


def _raw_write(raw, data):
    """The one low-level write of :func:`atomic_open` files (tests replace it to
    simulate a full disk)."""
    return io.FileIO.write(raw, data)


class _File(io.FileIO):
    def write(self, data):
        return _raw_write(self, data)


def _tmp_for(path):
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="%s%s.%d." % (TMP_PREFIX, _HOST, os.getpid()),
                                   suffix="." + os.path.basename(path), dir=folder)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(path) from None
        raise
    os.close(fd)
    return tmp


def _sync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _finish(tmp, path, check_empty=True):
    """Check, sync, give the usual permissions and rename ``tmp`` onto ``path``."""
    if check_empty and os.path.getsize(tmp) == 0:
        raise NmaemError("%s: nothing was written (the writer left an empty file)" % path)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    _sync_folder(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def _guard(path, tmp):
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_no_space(exc):
            raise no_space_error(path) from None
        raise


@contextlib.contextmanager
def atomic_path(path: Union[str, "os.PathLike[str]"], suffix: str = "",
                check_empty: bool = True) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success it replaces ``path``.

    The temporary name ends with the target's name (writers that choose the format from
    the extension see it; ``suffix`` is accepted for older callers and ignored). The file
    must not be empty (``check_empty``); it is synced before the rename.
    """
    path = os.fspath(path)
    tmp = _tmp_for(path)
    with _guard(path, tmp):
        yield tmp
        _finish(tmp, path, check_empty)


@contextlib.contextmanager
def atomic_open(path: Union[str, "os.PathLike[str]"], mode: str = "wb",
                newline: Optional[str] = None, encoding: str = "utf-8",
                check_empty: bool = True) -> Iterator[IO]:
    """Yield a file open for writing (``wb`` or ``w``) that replaces ``path`` when the
    block ends without an error: flushed, synced and checked first."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_open writes new files: mode 'w' or 'wb'")
    path = os.fspath(path)
    tmp = _tmp_for(path)
    with _guard(path, tmp):
        raw = _File(tmp, "wb")
        buffered = io.BufferedWriter(raw)
        fh = (buffered if mode == "wb"
              else io.TextIOWrapper(buffered, encoding=encoding, newline=newline))
        try:
            yield fh
            fh.flush()
        except BaseException:
            with contextlib.suppress(Exception):
                fh.close()
            raise
        fh.close()
        _finish(tmp, path, check_empty)


def atomic_savez(path: Union[str, "os.PathLike[str]"],
                 **arrays: object) -> Union[str, "os.PathLike[str]"]:
    """``numpy.savez`` through :func:`atomic_open` (the same archive: stored, zip64
    entries, no pickles), with the archive closed on a failed write, so that a full disk
    leaves nothing half-closed behind."""
    import zipfile
    import numpy as np
    from numpy.lib import format as npy_format
    with atomic_open(path) as fh:
        with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED,
                             allowZip64=True) as zf:
            for name, value in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    npy_format.write_array(member, np.asanyarray(value), allow_pickle=False)
    return path


def atomic_copy(src: Union[str, "os.PathLike[str]"], path: Union[str, "os.PathLike[str]"],
                check_empty: bool = True) -> Union[str, "os.PathLike[str]"]:
    """Copy the file ``src`` to ``path`` through :func:`atomic_open`."""
    with open(src, "rb") as fin, atomic_open(path, "wb", check_empty=check_empty) as fout:
        while True:
            block = fin.read(1 << 20)
            if not block:
                break
            fout.write(block)
    return path


@contextlib.contextmanager
def atomic_folder(path: Union[str, "os.PathLike[str]"]) -> Iterator[str]:
    """Yield a new empty temporary folder beside ``path``; when the block ends without an
    error it replaces ``path`` (an existing folder there is removed once the new one is in
    place), otherwise it is removed and ``path`` left as it was. Its files are written by
    the caller (each through this module or by a program whose output is then checked)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    try:
        tmp = tempfile.mkdtemp(prefix="%s%s.%d." % (TMP_PREFIX, _HOST, os.getpid()),
                               suffix="." + os.path.basename(path), dir=parent)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(path) from None
        raise
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if os.path.lexists(path):
            if not os.path.isdir(path) or os.path.islink(path):
                raise NmaemError("%s: is not a folder; cannot replace it" % path)
            old = tempfile.mkdtemp(prefix="%s%s.%d." % (TMP_PREFIX, _HOST, os.getpid()),
                                   suffix=".old", dir=parent)
            os.rename(path, os.path.join(old, "previous"))
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:             # put the previous folder back
                os.rename(os.path.join(old, "previous"), path)
                os.rmdir(old)
            raise
        _sync_folder(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(exc):
            raise no_space_error(path) from None
        raise


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # exists, owned by another user
        return True
    return True


def clean_orphans(folder: Union[str, "os.PathLike[str]"],
                  log: Optional[Callable[[str], object]] = None) -> List[str]:
    """Remove the temporary files that killed ``nmaem`` processes of this host left in
    ``folder``; returns their names. Files of live processes, and of other hosts (which
    cannot be checked), are left alone."""
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        m = _ORPHAN.match(name)
        if m is None or m.group(1) != _HOST:
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or _alive(pid):
            continue
        full = os.path.join(folder, name)
        try:
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)         # a folder of atomic_folder
            else:
                os.unlink(full)
        except OSError:
            continue
        removed.append(name)
    if removed:
        msg = ("nmaem: removed %d temporary file%s left by an interrupted run in %s"
               % (len(removed), "" if len(removed) == 1 else "s", folder))
        (log or (lambda m: sys.stderr.write(m + "\n")))(msg)
    return removed
