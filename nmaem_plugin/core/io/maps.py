"""3D maps (MRC): reading a map with its voxel size, writing one atomically.

Arrays are ``[z, y, x]`` float32 (as mrcfile and RELION lay them out); the voxel size is the
header's (Angstrom). A map written here has its origin at 0 (RELION's convention: voxel
D//2 is the centre of the box the poses refer to, docs/conventions.md).
"""
import os
import warnings
from typing import Tuple

import numpy as np

from ..base.atomic import atomic_open
from ..base.errors import fail

__all__ = ["read_map", "write_map", "write_mrc"]


def read_map(path: str) -> Tuple[np.ndarray, float]:
    """(volume (D, D, D) float32 ``[z, y, x]``, voxel size in Angstrom) of an MRC map; a
    one-line error naming the file when it is missing, unreadable or not a cube."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        fail(path, "no such map file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mrcfile
            with mrcfile.open(path, permissive=True) as m:
                data = None if m.data is None else np.array(m.data, dtype=np.float32)
                apix = float(m.voxel_size.x)
    except Exception as exc:  # mrcfile raises several types on corrupt input
        fail(path, "not a readable MRC map (%s)" % (str(exc).splitlines() or [""])[0][:160])
    if data is None or data.ndim != 3 or len(set(data.shape)) != 1:
        fail(path, "not a cubic 3D map (shape %s)" % (None if data is None else data.shape,))
    return data, apix


def write_map(path: str, volume: np.ndarray, apix: float) -> None:
    """Write ``volume`` (D, D, D) ``[z, y, x]`` as a float32 MRC map of voxel size ``apix``,
    atomically."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError("write_map expects a (D, D, D) volume, got %s" % (volume.shape,))
    write_mrc(path, volume, apix, stack=False)


def write_mrc(path: str, data: np.ndarray, apix: float, stack: bool) -> None:
    """Write ``data`` (3D, float32) as an MRC file, a stack of images (``stack``) or a
    volume, of voxel size ``apix``, atomically: mrcfile makes the header (a write-only
    MrcInterpreter, as its documentation describes), the bytes go through ``atomic_open``
    (checked, synced). The label is fixed text (mrcfile's default holds the time): the same
    data give the same bytes."""
    from mrcfile.mrcinterpreter import MrcInterpreter
    m = MrcInterpreter()
    m._create_default_attributes()
    m.set_data(np.asarray(data, dtype=np.float32))
    if stack:
        m.set_image_stack()
    else:
        m.set_volume()
    m.voxel_size = float(apix)
    m.update_header_stats()
    m.header.label[0] = b"written by nmaem"
    m.header.nlabl = 1
    with atomic_open(os.fspath(path)) as fh:
        m._iostream = fh
        try:
            m.flush()
        finally:
            m._iostream = None
