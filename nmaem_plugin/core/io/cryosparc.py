"""cryoSPARC ``.cs`` particle files into a ``ParticleTable`` (RELION conventions).

* **cryoSPARC .cs** (numpy structured array):

  - ``alignments3D/pose`` is a rotation vector v (axis * angle, radians). With R(v) the
    usual Rodrigues matrix I + sin(t) K + (1 - cos(t)) K^2 (K the cross-product matrix
    of the unit axis, t = |v|), RELION's matrix is the transpose: **A = R(v)^T = R(-v)**.
    Evidence: cryoDRGN's ``parse_pose_csparc`` stores expmap(v)^T (standard Rodrigues)
    in the same pose file in which ``parse_pose_star`` stores ``R_from_relion(euler)``,
    which equals RELION's A (checked numerically); pyem's ``csparc2star`` applies RELION's
    matrix -> Euler decomposition to its ``expmap``, whose skew matrix is the negative
    of the standard one, i.e. to R(v)^T. Both agree.
  - ``alignments3D/shift`` is in pixels and has RELION's origin sign:
    **origin (Angstrom) = +shift * psize**, with psize ``alignments3D/psize_A`` (the
    pixel size the alignment was done at) or ``blob/psize_A`` when that is absent.
    Evidence: cryoDRGN stores ``rlnOriginX/Y`` and ``alignments3D/shift`` unchanged as
    the same translation; pyem copies the shift into ``rlnOriginX/Y``.
  - CTF: ``ctf/df1_A``, ``ctf/df2_A`` -> defocus U, V (Angstrom); ``ctf/df_angle_rad`` and
    ``ctf/phase_shift_rad`` -> degrees; ``ctf/accel_kv``, ``ctf/cs_mm``,
    ``ctf/amp_contrast``, ``ctf/bfactor`` as they are.
  - Images: ``blob/path``, ``blob/idx`` (0-based), ``blob/shape`` (ny, nx),
    ``blob/psize_A``. Optics group = ``ctf/exp_group_id`` + 1.
  - Files without ``alignments3D`` (e.g. 2D classification) have no poses; files without
    ``blob/path`` have no images. Heterogeneous-refinement shift rescaling of old
    cryoSPARC versions (cryoDRGN's ``--hetrefine``) is not applied.
"""
from typing import Optional

import numpy as np
import pandas as pd

from ..base.errors import fail
from .table import ParticleTable, stack_resolver
from .poses import cryosparc_pose_to_matrix, matrix_to_euler

__all__ = ["read_cs"]


def read_cs(path: str, root: Optional[str] = None) -> ParticleTable:
    """A :class:`ParticleTable` of a cryoSPARC .cs file (see the module docstring)."""
    try:
        cs = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types on corrupt input
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        fail(path, "not a readable cryoSPARC .cs file: truncated or corrupt (%s: %s)"
             % (type(e).__name__, reason))
    if not isinstance(cs, np.ndarray) or cs.dtype.names is None or cs.ndim != 1:
        fail(path, "not a cryoSPARC .cs file (expected a numpy structured array)")
    names = set(cs.dtype.names)
    n = len(cs)
    if n == 0:
        fail(path, "no particles")

    def get(k, dtype=np.float64):
        return np.asarray(cs[k]).astype(dtype) if k in names else None

    def dec(a):
        return np.array([x.decode("utf-8") if isinstance(x, bytes) else str(x)
                         for x in a.tolist()], dtype=str)

    image_names = stack_paths = stack_index = None
    if "blob/path" in names:
        rel = dec(cs["blob/path"])
        rel = np.array([r[1:] if r.startswith(">") else r for r in rel.tolist()], dtype=str)
        stack_index = (get("blob/idx", np.int64) if "blob/idx" in names
                       else np.zeros(n, dtype=np.int64))
        resolve = stack_resolver(path, root)
        uniq, inv = np.unique(rel, return_inverse=True)
        stack_paths = np.array([resolve(u) for u in uniq], dtype=str)[inv]
        image_names = np.array(["%06d@%s" % (i + 1, r) for i, r in zip(stack_index, rel)],
                               dtype=str)
    if "blob/psize_A" in names:
        apix = get("blob/psize_A")
    elif "alignments3D/psize_A" in names:
        apix = get("alignments3D/psize_A")
    else:
        fail(path, "no pixel size (missing blob/psize_A)")
    if "blob/shape" in names:
        shp = np.asarray(cs["blob/shape"]).astype(np.int64).reshape(n, -1)
        box = shp[:, -1].copy()
    else:
        box = np.zeros(n, dtype=np.int64)

    euler = origin = None
    if "alignments3D/pose" in names:
        A = cryosparc_pose_to_matrix(get("alignments3D/pose").reshape(n, 3))
        euler = np.stack(matrix_to_euler(A), axis=1).astype(np.float64)
        if "alignments3D/shift" in names:
            ps = get("alignments3D/psize_A")
            ps = apix if ps is None else ps
            origin = get("alignments3D/shift").reshape(n, 2) * ps[:, None]

    def deg(k):
        v = get(k)
        return None if v is None else np.rad2deg(v)

    og = get("ctf/exp_group_id", np.int64)
    og = np.ones(n, dtype=np.int64) if og is None else og + 1
    zeros = np.zeros(n)
    ps = deg("ctf/phase_shift_rad")
    bf = get("ctf/bfactor")
    return ParticleTable(
        path=path, n=n, image_names=image_names, stack_paths=stack_paths,
        stack_index=stack_index, euler=euler, origin=origin,
        defocus_u=get("ctf/df1_A"), defocus_v=get("ctf/df2_A"),
        defocus_angle=deg("ctf/df_angle_rad"),
        phase_shift=zeros.copy() if ps is None else ps,
        ctf_bfactor=zeros.copy() if bf is None else bf,
        voltage=get("ctf/accel_kv"), cs=get("ctf/cs_mm"), amp_contrast=get("ctf/amp_contrast"),
        apix=apix, box=box, optics_group=og,
        extra=pd.DataFrame(index=pd.RangeIndex(n)), optics=None)
