"""Particle image stacks (MRC): reading a table's images with bounded memory, writing stacks
(through ``maps.write_mrc``)."""
import os
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence, Tuple

import numpy as np

from ..base.errors import fail

if TYPE_CHECKING:
    from .table import ParticleTable

__all__ = ["ImageStack", "write_stack", "stack_box", "is_mrc", "MRC_EXTENSIONS"]

MRC_EXTENSIONS = (".mrc", ".mrcs", ".st", ".map")


def is_mrc(path: str) -> bool:
    """Whether ``path`` has an MRC file extension."""
    return os.path.splitext(os.fspath(path))[1].lower() in MRC_EXTENSIONS


def stack_box(stack: str, default: int = 0) -> int:
    """Image size of an MRC stack from its header, ``default`` when it cannot be read
    (``default=None``: raise the reading error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mrcfile
            with mrcfile.open(stack, header_only=True, permissive=True) as m:
                return int(m.header.nx)
    except Exception:
        if default is None:
            raise
        return default


class ImageStack:
    """Particle images of a :class:`ParticleTable`, read image by image from the MRC files.

    Only the requested images are read, each with one ``os.pread`` at its offset (after the
    1024-byte header and the extended header), so the resident memory holds the batch
    being read and nothing of the files: it does not grow with the dataset (memory maps
    would count every page touched, up to ``max_open`` whole stacks). At most ``max_open``
    stacks are kept open at a time (least recently used first closed). With ``check`` the constructor reads
    every stack's header once and raises a one-line NmaemError naming the file when a
    stack is missing or unreadable, an index is past its end, images are not square,
    the size differs from the table's box (``rlnImageSize``) or between stacks.
    """

    def __init__(self, table: "ParticleTable", check: bool = True, max_open: int = 32):
        table.require(poses=False, ctf=False, images=True)
        self.table = table
        self.max_open = max(1, int(max_open))
        self._open = OrderedDict()
        self._layouts = {}          # stack -> header layout (_layout)
        self._uniq, self._inv = np.unique(table.stack_paths, return_inverse=True)
        self._D = int(table.box[0]) if table.n and table.box[0] > 0 else None
        if check:
            self._check()
        if self._D is None:
            self._D = self._dims(self._uniq[0])[1]

    def _dims(self, stack):
        """(number of images, ny, nx) from the header only."""
        return self._layout(stack)[:3]

    def _layout(self, stack):
        """(number of images, ny, nx, data offset in bytes, numpy dtype) from the header,
        parsed once per stack (a stack reopened after the LRU closed it is not parsed
        again)."""
        if stack not in self._layouts:
            self._layouts[stack] = self._parse_header(stack)
        return self._layouts[stack]

    def _parse_header(self, stack):
        import mrcfile
        if not os.path.isfile(stack):
            fail(stack, "missing particle stack (referenced by %s)" % self.table.path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with mrcfile.open(stack, header_only=True, permissive=True) as m:
                    h = m.header
                    nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
                    mode = int(h.mode)
                    ext = int(h.nsymbt)
                    try:
                        dtype = mrcfile.utils.data_dtype_from_header(h)
                    except ValueError:           # a mode mrcfile does not know
                        dtype = None
        except Exception as e:
            fail(stack, "not a readable MRC file (%s)" % type(e).__name__)
        if dtype is None or min(nx, ny, nz) <= 0:
            fail(stack, "unsupported or corrupt MRC header (mode %d, size %dx%dx%d)"
                 % (mode, nx, ny, nz))
        itemsize = np.dtype(dtype).itemsize
        need = 1024 + ext + nx * ny * nz * itemsize
        if os.path.getsize(stack) < need:
            fail(stack, "truncated MRC file (%d bytes, header needs %d)"
                 % (os.path.getsize(stack), need))
        return nz, ny, nx, 1024 + ext, np.dtype(dtype)

    def _check(self):
        t = self.table
        for k, stack in enumerate(self._uniq.tolist()):
            rows = np.flatnonzero(self._inv == k)
            nz, ny, nx = self._dims(stack)
            if ny != nx:
                fail(stack, "images are not square (%d x %d)" % (nx, ny))
            last = int(t.stack_index[rows].max())
            if last >= nz:
                fail(stack, "image %d requested by %s, but the stack holds %d"
                     % (last + 1, t.path, nz))
            boxes = set(int(b) for b in t.box[rows].tolist() if b > 0)
            for b in boxes:
                if b != nx:
                    fail(stack, "images are %d px but %s says %d (rlnImageSize)"
                         % (nx, t.path, b))
            if self._D is None:
                self._D = nx
            elif nx != self._D:
                fail(stack, "images are %d px, other stacks of %s are %d px"
                     % (nx, t.path, self._D))

    def __len__(self):
        return self.table.n

    @property
    def shape(self) -> Tuple[int, int]:
        return (self._D, self._D)

    def _file(self, k):
        """(file descriptor, (nz, ny, nx, offset, dtype)) of stack ``k``, opened once."""
        stack = self._uniq[k]
        f = self._open.get(stack)
        if f is not None:
            self._open.move_to_end(stack)
            return f
        layout = self._layout(stack)           # missing, unreadable, truncated: one line
        try:
            fd = os.open(stack, os.O_RDONLY)
        except OSError as e:
            fail(stack, "cannot be opened (%s)" % e.strerror)
        self._open[stack] = f = (fd, layout)
        while len(self._open) > self.max_open:
            _, (old, _) = self._open.popitem(last=False)
            os.close(old)
        return f

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Images of the table rows ``indices`` (any order), float32 (n, D, D)."""
        ind = np.asarray(indices, dtype=np.int64).reshape(-1)
        if ind.size and (ind.min() < -self.table.n or ind.max() >= self.table.n):
            raise IndexError("particle index out of range (%d particles)" % self.table.n)
        ind = ind % max(self.table.n, 1)
        out = np.empty((ind.size, self._D, self._D), dtype=np.float32)
        ks = self._inv[ind]
        for k in np.unique(ks).tolist():
            where = np.flatnonzero(ks == k)
            local = self.table.stack_index[ind[where]]
            fd, (nz, ny, nx, offset, dtype) = self._file(k)
            if local.max() >= nz:
                fail(self._uniq[k], "image %d requested, but the stack holds %d"
                     % (int(local.max()) + 1, nz))
            if (ny, nx) != (self._D, self._D):
                fail(self._uniq[k], "images are %dx%d, expected %dx%d"
                     % (nx, ny, self._D, self._D))
            size = ny * nx * dtype.itemsize
            for w, i in zip(where.tolist(), local.tolist()):
                buf = os.pread(fd, size, offset + i * size)
                if len(buf) != size:
                    fail(self._uniq[k], "truncated: image %d is incomplete" % (i + 1))
                out[w] = np.frombuffer(buf, dtype=dtype).reshape(ny, nx)
        return out

    def close(self) -> None:
        for fd, _ in self._open.values():
            os.close(fd)
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def write_stack(path: str, images: np.ndarray, apix: float) -> None:
    """Write images (n, D, D) as a float32 MRC stack, atomically, with voxel size apix."""
    from .maps import write_mrc
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError("write_stack expects (n, D, D) images, got %s" % (images.shape,))
    write_mrc(os.fspath(path), images, apix, stack=True)
