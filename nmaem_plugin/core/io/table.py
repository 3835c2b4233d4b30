"""The particle table: per-particle metadata in RELION conventions, from any reader.

Conventions
===========

Everything is converted on reading to RELION's conventions (``poses.py``), in the units
of the project: Angstrom, degrees.

* **Poses** are RELION Euler angles (rot, tilt, psi) in degrees; the rotation matrix is
  RELION's A (``poses.euler_to_matrix``), which takes a model point r to A r before the
  projection along z.
* **Origins** are RELION 3.1 ``rlnOriginXAngst/YAngst`` in Angstrom: the translation that
  RELION applies to the particle image to centre it (the particle centre sits at image
  centre - origin). RELION 3.0 ``rlnOriginX/Y`` are in pixels of the particle image and are
  multiplied by its pixel size. An absent origin means zero (RELION's default);
  ``origin`` is then None and :meth:`ParticleTable.origin_or_zero` gives zeros.
* **Pixel size** (``apix``): ``rlnImagePixelSize`` of the optics group (3.1+); for 3.0
  files ``rlnDetectorPixelSize`` (micrometre) * 1e4 / ``rlnMagnification``, or
  ``rlnImagePixelSize`` / ``rlnPixelSize`` when present.
* **Image names** are ``index@path`` with a 1-based index (a name without ``@`` is a
  single image, index 1). Relative paths are looked up, in order, under ``root`` (when
  given), the metadata file's folder and each of its parents (RELION and cryoSPARC write
  paths relative to their project folder, which is often a parent of the file's folder);
  the first place where the stack exists wins, otherwise the path is taken relative to
  ``root`` or to the file's folder. cryoSPARC's leading ``>`` (exported/imported blobs)
  is removed.

Readers: ``star.py`` (RELION STAR 3.0/3.1+), ``cryosparc.py`` (cryoSPARC .cs), both through
``particles.read_particles``, which validates what they read (:func:`check_table`); images of
a table are read by ``stacks.ImageStack``.
"""
import os
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ..base.errors import fail
from .poses import euler_to_matrix

__all__ = ["ParticleTable", "check_table", "stack_resolver", "split_image_names",
           "ANGLES", "CTF_PARTICLE", "CTF_OPTICS", "ID_COLUMN"]

ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
CTF_PARTICLE = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
CTF_OPTICS = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
# the particle's id (Scipion's object id, constants.STAR_ID_COLUMN); absent: ids 1..N
ID_COLUMN = "rlnImageId"


@dataclass
class ParticleTable:
    """Per-particle metadata in RELION conventions (see the module docstring).

    Arrays have N rows; fields that the file does not have are None (poses, origins,
    CTF, images), except ``phase_shift`` and ``ctf_bfactor`` (zeros when absent).
    ``box`` is 0 where the image size is unknown (RELION 3.0 files whose stacks are
    not there). ``optics`` is the file's optics table (None for 3.0 and .cs files); its
    columns are carried through :func:`write_star`.
    """
    path: str
    n: int
    image_names: Optional[np.ndarray]
    stack_paths: Optional[np.ndarray]
    stack_index: Optional[np.ndarray]
    euler: Optional[np.ndarray]
    origin: Optional[np.ndarray]
    defocus_u: Optional[np.ndarray]
    defocus_v: Optional[np.ndarray]
    defocus_angle: Optional[np.ndarray]
    phase_shift: np.ndarray
    ctf_bfactor: np.ndarray
    voltage: Optional[np.ndarray]
    cs: Optional[np.ndarray]
    amp_contrast: Optional[np.ndarray]
    apix: np.ndarray
    box: np.ndarray
    optics_group: np.ndarray
    extra: pd.DataFrame
    optics: Optional[pd.DataFrame] = field(default=None)

    # ------------------------------------------------------------------ checks
    def require(self, poses: bool = True, ctf: bool = True,
                images: bool = False) -> "ParticleTable":
        """Raise NmaemError naming the file and the missing columns, if any."""
        if poses and self.euler is None:
            fail(self.path, "no poses (missing %s)" % ", ".join(ANGLES))
        if ctf:
            missing = [c for c, v in zip(CTF_PARTICLE + CTF_OPTICS,
                                         (self.defocus_u, self.defocus_v, self.defocus_angle,
                                          self.voltage, self.cs, self.amp_contrast))
                       if v is None]
            if missing:
                fail(self.path, "no CTF (missing %s)" % ", ".join(missing))
        if images and self.stack_paths is None:
            fail(self.path, "no particle images (missing rlnImageName / blob/path)")
        return self

    # ------------------------------------------------------------------ views
    def subset(self, idx: np.ndarray) -> "ParticleTable":
        """A new table with the rows ``idx`` (integer indices or a boolean mask)."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (self.n,):
                raise ValueError("boolean mask of length %d for %d particles"
                                 % (idx.size, self.n))
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                changes[f.name] = v[idx]
        changes["extra"] = self.extra.iloc[idx].reset_index(drop=True)
        changes["n"] = int(idx.size)
        return replace(self, **changes)

    def rotation_matrices(self) -> np.ndarray:
        """(N, 3, 3) float64 RELION matrices A of the poses."""
        self.require(poses=True, ctf=False)
        return euler_to_matrix(self.euler[:, 0], self.euler[:, 1], self.euler[:, 2])

    def ids(self) -> np.ndarray:
        """(N,) int64 particle ids: the ``rlnImageId`` column, or 1..N when absent."""
        if ID_COLUMN in self.extra.columns:
            return self.extra[ID_COLUMN].to_numpy().astype(np.int64)
        return np.arange(1, self.n + 1, dtype=np.int64)

    def origin_or_zero(self) -> np.ndarray:
        """(N, 2) origins in Angstrom, zeros when the file has none."""
        if self.origin is None:
            return np.zeros((self.n, 2))
        return self.origin

    def __len__(self):
        return self.n



def _first_bad(values, ok):
    """0-based index of the first row of ``values`` (N,) or (N, k) where ``ok`` is False."""
    good = ok(values)
    if good.ndim > 1:
        good = good.all(axis=tuple(range(1, good.ndim)))
    bad = np.flatnonzero(~good)
    return int(bad[0]) if bad.size else None


def check_table(table: ParticleTable,
                warn: Optional[Callable[[str], None]] = None) -> ParticleTable:
    """Validate the metadata of a table just read; returns it.

    Fails (one line, naming the file and the first bad row, 1-based) on NaN or infinite
    angles, origins or defocus, a negative defocus, and a pixel size that is not a positive
    number. Duplicated particles (the same image twice) are a warning (``warn``, default: a
    line on stderr), not an error.
    """
    finite = np.isfinite
    checks = [("euler", "angle (%s)" % ", ".join(ANGLES), finite),
              ("origin", "origin", finite),
              ("defocus_u", "defocus (rlnDefocusU)", finite),
              ("defocus_v", "defocus (rlnDefocusV)", finite),
              ("defocus_angle", "defocus angle (rlnDefocusAngle)", finite),
              ("defocus_u", "defocus (rlnDefocusU)", lambda v: v >= 0),
              ("defocus_v", "defocus (rlnDefocusV)", lambda v: v >= 0),
              ("apix", "pixel size", lambda v: finite(v) & (v > 0))]
    for name, label, ok in checks:
        v = getattr(table, name)
        if v is None or len(v) == 0:
            continue
        v = np.asarray(v, dtype=np.float64)
        k = _first_bad(v, ok)
        if k is None:
            continue
        shown = np.array2string(v[k], precision=6) if v.ndim > 1 else "%g" % v[k]
        problem = "non-finite" if not np.all(finite(v[k])) else (
            "negative" if name.startswith("defocus") else "non-positive")
        fail(table.path, "row %d: %s %s %s%s" % (
            k + 1, problem, label, shown,
            " (optics group %d)" % int(table.optics_group[k]) if name == "apix" else ""))
    if table.stack_paths is not None and table.n > 1:
        keys = np.char.add(np.char.add(table.stack_index.astype(str), "@"),
                           table.stack_paths.astype(str))
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        dup = counts > 1
        if dup.any():
            rows = np.flatnonzero(keys == keys[first[dup][np.argmin(first[dup])]])
            msg = ("nmaem: warning: %s: %d particle(s) appear more than once (same image); "
                   "first: rows %d and %d" % (table.path, int((counts[dup] - 1).sum()),
                                             rows[0] + 1, rows[1] + 1))
            if warn is None:
                import sys
                sys.stderr.write(msg + "\n")
            else:
                warn(msg)
    return table


def stack_resolver(path: str, root: Optional[str] = None) -> Callable[[str], str]:
    """Function: relative stack path -> absolute path (see the module docstring)."""
    base = os.path.dirname(os.path.abspath(path))
    dirs = []
    if root is not None:
        dirs.append(os.path.abspath(os.fspath(root)))
    d = base
    while True:
        dirs.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    default = dirs[0]
    cache = {}

    def resolve(rel):
        if rel in cache:
            return cache[rel]
        if os.path.isabs(rel):
            out = os.path.normpath(rel)
        else:
            out = os.path.normpath(os.path.join(default, rel))
            for d in dirs:
                cand = os.path.join(d, rel)
                if os.path.isfile(cand):
                    out = os.path.normpath(cand)
                    break
        cache[rel] = out
        return out
    return resolve


def split_image_names(path: str, names: Sequence[str], resolve: Callable[[str], str]
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """(absolute stack paths, 0-based indices) of ``index@stack`` image names."""
    idx = np.empty(len(names), dtype=np.int64)
    rels = []
    for k, nm in enumerate(names):
        if "@" in nm:
            a, b = nm.split("@", 1)
            try:
                idx[k] = int(a) - 1
            except ValueError:
                fail(path, "row %d: bad image name %r (expected index@stack)" % (k + 1, nm))
            if idx[k] < 0:
                fail(path, "row %d: bad image index in %r (indices start at 1)" % (k + 1, nm))
        else:
            b = nm
            idx[k] = 0
        rels.append(b)
    uniq, inv = np.unique(np.asarray(rels, dtype=str), return_inverse=True)
    absu = np.array([resolve(u) for u in uniq], dtype=str)
    return absu[inv], idx
