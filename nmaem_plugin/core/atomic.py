"""Atomic file output: write to a temporary file beside the target, then rename."""
import contextlib
import os
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a temporary path in the target's folder; on success it replaces ``path``.

    The file gets the usual permissions (0666 less the umask). On an exception the
    temporary file is removed and ``path`` is left as it was. ``suffix`` keeps an
    extension for writers that choose the format from it (``.npz``, ``.cif``).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path),
                               suffix=".tmp" + suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
