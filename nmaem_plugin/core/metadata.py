"""Particle metadata (RELION STAR, cryoSPARC .cs) and particle image stacks (MRC).

Conventions
===========

Everything is converted on reading to RELION's conventions (``imaging.py``), in the units
of the project: Angstrom, degrees.

* **Poses** are RELION Euler angles (rot, tilt, psi) in degrees; the rotation matrix is
  RELION's A (``imaging.euler_to_matrix``), which takes a model point r to A r before the
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

Writing (:func:`write_star`) produces RELION 3.1 files (``data_optics`` +
``data_particles``), floats written with Python's shortest exact representation, so
that a write-read round trip is exact.
"""
import os
import shlex
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
from typing import Optional

import numpy as np
import pandas as pd

from .atomic import atomic_path
from .errors import NmaemError, fail
from .imaging import euler_to_matrix, matrix_to_euler

__all__ = ["ParticleTable", "read_particles", "write_star", "ImageStack", "write_stack",
           "read_star_blocks", "rotvec_to_matrix"]

ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
CTF_PARTICLE = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
CTF_OPTICS = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]

# Particle columns that write_star produces itself from the table's fields (or that a
# RELION 3.1 particle block must not carry, being optics properties or 3.0 units).
_OWN_PARTICLE_COLUMNS = set(
    ["rlnImageName", "rlnOpticsGroup", "rlnOriginXAngst", "rlnOriginYAngst",
     "rlnOriginX", "rlnOriginY", "rlnPhaseShift", "rlnCtfBfactor", "rlnMagnification",
     "rlnDetectorPixelSize", "rlnPixelSize", "rlnImagePixelSize", "rlnImageSize",
     "rlnImageDimensionality"] + ANGLES + CTF_PARTICLE + CTF_OPTICS)
_OWN_OPTICS_COLUMNS = set(["rlnOpticsGroup", "rlnOpticsGroupName", "rlnImagePixelSize",
                           "rlnImageSize", "rlnImageDimensionality"] + CTF_OPTICS)


# ============================================================================ table

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
    def require(self, poses=True, ctf=True, images=False):
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
    def subset(self, idx):
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

    def rotation_matrices(self):
        """(N, 3, 3) float64 RELION matrices A of the poses."""
        self.require(poses=True, ctf=False)
        return euler_to_matrix(self.euler[:, 0], self.euler[:, 1], self.euler[:, 2])

    def origin_or_zero(self):
        """(N, 2) origins in Angstrom, zeros when the file has none."""
        if self.origin is None:
            return np.zeros((self.n, 2))
        return self.origin

    def __len__(self):
        return self.n


# ============================================================================ STAR parsing

def _tokens(line):
    if '"' in line or "'" in line:
        return shlex.split(line, posix=True)
    return line.split()


def read_star_blocks(path):
    """Parse a STAR file into ``{block name: DataFrame}`` (loops and key-value blocks).

    Numbers are parsed exactly (Python's float); a column is int64 when every value is
    an integer, float64 when every value is a number, str otherwise. Any structural
    problem raises a one-line NmaemError naming the file and the line.
    """
    try:
        with open(path, "r", encoding="utf-8", errors="strict") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        fail(path, "no such file")
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        fail(path, "not a readable STAR text file (%s)" % type(e).__name__)

    blocks = OrderedDict()
    name = None
    i, n = 0, len(lines)
    while i < n:
        raw = lines[i]
        s = raw.strip()
        i += 1
        if not s or s.startswith("#"):
            continue
        if s.startswith("data_"):
            name = s[5:].split()[0] if len(s) > 5 else ""
            blocks[name] = {}
            continue
        if name is None:
            fail(path, "line %d: content before any data_ block (not a STAR file?)" % i)
        if s.split()[0] == "loop_":
            labels = []
            while i < n:
                t = lines[i].strip()
                if not t or (t.startswith("#") and not labels):
                    i += 1
                    continue
                if t.startswith("_"):
                    labels.append(t.split()[0][1:])
                    i += 1
                    continue
                break
            if not labels:
                fail(path, "line %d: loop_ without column labels" % i)
            rows = []
            while i < n:
                t = lines[i].strip()
                if not t:
                    i += 1
                    # a blank line may separate rows or end the loop; continue until a
                    # keyword or the next block
                    continue
                if t.startswith("#"):
                    i += 1
                    continue
                if t.startswith("data_") or t.startswith("loop_") or t.startswith("_"):
                    break
                try:
                    tok = _tokens(t)
                except ValueError:
                    fail(path, "line %d: unbalanced quotes" % (i + 1))
                if len(tok) != len(labels):
                    fail(path, "line %d: %d values for %d columns (truncated or corrupt file?)"
                         % (i + 1, len(tok), len(labels)))
                rows.append(tok)
                i += 1
            blocks[name] = _columns(path, labels, rows)
        elif s.startswith("_"):
            tok = _tokens(s)
            if len(tok) != 2:
                fail(path, "line %d: expected '_label value'" % i)
            cur = blocks[name]
            if isinstance(cur, pd.DataFrame):
                fail(path, "line %d: key-value item after a loop in the same block" % i)
            cur[tok[0][1:]] = tok[1]
        else:
            fail(path, "line %d: unexpected text %r (corrupt STAR file?)" % (i, s[:40]))
    if not blocks:
        fail(path, "no data_ block (not a STAR file?)")
    out = OrderedDict()
    for k, v in blocks.items():
        if isinstance(v, dict):
            v = _columns(path, list(v.keys()), [list(v.values())]) if v else pd.DataFrame()
        out[k] = v
    return out


def _convert(values):
    arr = np.array(values, dtype=str)
    for dtype in (np.int64, np.float64):
        try:
            return arr.astype(dtype)   # numpy parses like Python's int() / float(): exact
        except (ValueError, OverflowError):
            pass
    return arr


def _columns(path, labels, rows):
    if len(set(labels)) != len(labels):
        fail(path, "duplicate column labels")
    if rows:
        cols = list(zip(*rows))
    else:
        cols = [()] * len(labels)
    data = OrderedDict((lab, _convert(c)) for lab, c in zip(labels, cols))
    return pd.DataFrame(data)


def _num(path, df, col, dtype=np.float64):
    try:
        return df[col].to_numpy().astype(dtype)
    except (ValueError, TypeError):
        fail(path, "column %s holds non-numeric values" % col)


# ============================================================================ reading

def read_particles(path, root=None):
    """Read a RELION STAR (3.0, 3.1+) or cryoSPARC .cs particle file; see the module doc."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        fail(path, "no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".cs":
        return _read_cs(path, root)
    if ext == ".star":
        return _read_star(path, root)
    fail(path, "unknown particle file type %r (expected .star or .cs)" % ext)


def _resolver(path, root):
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


def _split_names(path, names, resolve):
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


def _stack_box(stack):
    """Image size of an MRC stack from its header, 0 when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mrcfile
            with mrcfile.open(stack, header_only=True, permissive=True) as m:
                return int(m.header.nx)
    except Exception:
        return 0


def _read_star(path, root):
    blocks = read_star_blocks(path)
    optics = blocks.get("optics")
    if "particles" in blocks:
        parts = blocks["particles"]
    else:
        cands = [k for k, v in blocks.items() if "rlnImageName" in v.columns]
        if not cands:
            cands = [k for k, v in blocks.items() if k != "optics" and len(v.columns)]
        if not cands:
            fail(path, "no particle table (no data_particles block or loop with rlnImageName)")
        parts = blocks[cands[0]]
    n = len(parts)
    if n == 0:
        fail(path, "no particles in the particle table")
    cols = set(parts.columns)
    has = cols.__contains__
    resolve = _resolver(path, root)

    if has("rlnImageName"):
        image_names = parts["rlnImageName"].to_numpy().astype(str)
        stack_paths, stack_index = _split_names(path, image_names, resolve)
    else:
        image_names = stack_paths = stack_index = None

    def pcol(c):
        return _num(path, parts, c) if has(c) else None

    euler = None
    if all(has(c) for c in ANGLES):
        euler = np.stack([_num(path, parts, c) for c in ANGLES], axis=1)

    # optics: per-particle arrays, from the optics table or from particle columns
    if optics is not None and len(optics):
        if "rlnOpticsGroup" not in optics.columns:
            fail(path, "optics table without rlnOpticsGroup")
        if not has("rlnOpticsGroup"):
            if len(optics) != 1:
                fail(path, "particles lack rlnOpticsGroup but there are %d optics groups"
                     % len(optics))
            og = np.full(n, int(optics["rlnOpticsGroup"].iloc[0]), dtype=np.int64)
        else:
            og = _num(path, parts, "rlnOpticsGroup", np.int64)
        ids = _num(path, optics, "rlnOpticsGroup", np.int64)
        if len(set(ids.tolist())) != len(ids):
            fail(path, "duplicate rlnOpticsGroup in the optics table")
        pos = {g: k for k, g in enumerate(ids.tolist())}
        unknown = sorted(set(og.tolist()) - set(pos))
        if unknown:
            fail(path, "particles refer to optics group %d, absent from data_optics"
                 % unknown[0])
        row = np.array([pos[g] for g in og.tolist()], dtype=np.int64)

        def ocol(c):
            if c in optics.columns:
                return _num(path, optics, c)[row]
            return pcol(c)
        apix = None
        for c in ("rlnImagePixelSize", "rlnPixelSize"):
            if c in optics.columns:
                apix = _num(path, optics, c)[row]
                break
        if apix is None:
            fail(path, "optics table without rlnImagePixelSize")
        box = (_num(path, optics, "rlnImageSize", np.int64)[row]
               if "rlnImageSize" in optics.columns else None)
        voltage, cs, q0 = (ocol(c) for c in CTF_OPTICS)
        opt_keep = optics
    else:
        og = (_num(path, parts, "rlnOpticsGroup", np.int64) if has("rlnOpticsGroup")
              else np.ones(n, dtype=np.int64))
        voltage, cs, q0 = (pcol(c) for c in CTF_OPTICS)
        if has("rlnImagePixelSize"):
            apix = pcol("rlnImagePixelSize")
        elif has("rlnPixelSize"):
            apix = pcol("rlnPixelSize")
        elif has("rlnDetectorPixelSize") and has("rlnMagnification"):
            mag = pcol("rlnMagnification")
            if np.any(mag <= 0):
                fail(path, "rlnMagnification must be positive")
            apix = pcol("rlnDetectorPixelSize") * 1e4 / mag
        else:
            fail(path, "no pixel size (missing rlnImagePixelSize, or rlnDetectorPixelSize "
                 "and rlnMagnification)")
        box = _num(path, parts, "rlnImageSize", np.int64) if has("rlnImageSize") else None
        opt_keep = None
    if box is None:
        box = np.zeros(n, dtype=np.int64)
        if stack_paths is not None:
            uniq, inv = np.unique(stack_paths, return_inverse=True)
            box = np.array([_stack_box(s) for s in uniq], dtype=np.int64)[inv]

    if has("rlnOriginXAngst") and has("rlnOriginYAngst"):
        origin = np.stack([pcol("rlnOriginXAngst"), pcol("rlnOriginYAngst")], axis=1)
    elif has("rlnOriginX") and has("rlnOriginY"):
        origin = np.stack([pcol("rlnOriginX"), pcol("rlnOriginY")], axis=1) * apix[:, None]
    else:
        origin = None

    zeros = np.zeros(n)
    return ParticleTable(
        path=path, n=n, image_names=image_names, stack_paths=stack_paths,
        stack_index=stack_index, euler=euler, origin=origin,
        defocus_u=pcol("rlnDefocusU"), defocus_v=pcol("rlnDefocusV"),
        defocus_angle=pcol("rlnDefocusAngle"),
        phase_shift=pcol("rlnPhaseShift") if has("rlnPhaseShift") else zeros.copy(),
        ctf_bfactor=pcol("rlnCtfBfactor") if has("rlnCtfBfactor") else zeros.copy(),
        voltage=voltage, cs=cs, amp_contrast=q0,
        apix=np.asarray(apix, dtype=np.float64), box=np.asarray(box, dtype=np.int64),
        optics_group=np.asarray(og, dtype=np.int64),
        extra=parts.reset_index(drop=True), optics=opt_keep)


def rotvec_to_matrix(v):
    """Rodrigues matrix R(v) = exp([v]_x) of rotation vectors v (..., 3), float64.

    R(v) @ x = x rotated by |v| radians about v/|v| (right-handed). RELION's A for a
    cryoSPARC pose v is R(v)^T (module docstring).
    """
    v = np.asarray(v, dtype=np.float64)
    t = np.linalg.norm(v, axis=-1)
    safe = np.where(t > 0, t, 1.0)
    w = v / safe[..., None]
    K = np.zeros(v.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2] = -w[..., 2], w[..., 1]
    K[..., 1, 0], K[..., 1, 2] = w[..., 2], -w[..., 0]
    K[..., 2, 0], K[..., 2, 1] = -w[..., 1], w[..., 0]
    s, c = np.sin(t)[..., None, None], (1.0 - np.cos(t))[..., None, None]
    return np.eye(3) + s * K + c * (K @ K)


def _read_cs(path, root):
    try:
        cs = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types on corrupt input
        fail(path, "not a readable cryoSPARC .cs file (%s)" % type(e).__name__)
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
        resolve = _resolver(path, root)
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
        A = np.swapaxes(rotvec_to_matrix(get("alignments3D/pose").reshape(n, 3)), -1, -2)
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


# ============================================================================ writing

def _fmt_column(values):
    a = np.asarray(values)
    if a.dtype.kind == "f":
        return [repr(float(x)) for x in a.tolist()]
    if a.dtype.kind in "iub":
        return [str(int(x)) for x in a.tolist()]
    out = []
    for x in a.tolist():
        s = x.decode() if isinstance(x, bytes) else str(x)
        if s == "" or any(ch.isspace() for ch in s):
            if '"' in s:
                raise NmaemError("cannot write a STAR value with spaces and quotes: %r" % s)
            s = '"%s"' % s
        out.append(s)
    return out


def _write_loop(fh, name, columns):
    fh.write("\n# version 30001\n\ndata_%s\n\nloop_\n" % name)
    labels = list(columns.keys())
    for k, lab in enumerate(labels, 1):
        fh.write("_%s #%d\n" % (lab, k))
    cols = [_fmt_column(columns[lab]) for lab in labels]
    for row in zip(*cols):
        fh.write(" ".join(row))
        fh.write("\n")
    fh.write("\n")


def _optics_groups(table):
    """Assign optics groups so that each one has a single set of optics values.

    Returns (per-particle group ids, list of (group id, representative row)). Ids of
    the table are kept where they are consistent; conflicting rows get new ids.
    """
    keys = [table.optics_group, table.apix, table.box]
    for v in (table.voltage, table.cs, table.amp_contrast):
        if v is not None:
            keys.append(v)
    combos = {}
    gid = np.empty(table.n, dtype=np.int64)
    used = {}
    next_id = int(table.optics_group.max()) + 1 if table.n else 1
    reps = []
    for i, key in enumerate(zip(*[k.tolist() for k in keys])):
        if key not in combos:
            g = int(key[0])
            if g in used or g < 1:
                g = next_id
                next_id += 1
            used[g] = key
            combos[key] = g
            reps.append((g, i))
        gid[i] = combos[key]
    return gid, sorted(reps)


def write_star(path, table, extra_columns=None):
    """Write ``table`` as a RELION 3.1 STAR file (data_optics + data_particles), atomically.

    Image names are written relative to the STAR file's folder when the stack lies
    inside it, absolute otherwise. Particle columns of ``table.extra`` that this
    function does not produce itself are carried through; ``extra_columns`` (name ->
    array of N values) are added last and replace columns of the same name. Optics
    columns of ``table.optics`` are carried for groups whose id is unchanged.
    """
    path = os.fspath(path)
    n = table.n
    outdir = os.path.dirname(os.path.abspath(path))
    if table.stack_paths is None:
        fail(path, "cannot write a particle STAR without image names")
    gid, reps = _optics_groups(table)

    # optics table
    opt = OrderedDict()
    opt["rlnOpticsGroup"] = np.array([g for g, _ in reps], dtype=np.int64)
    rows = np.array([i for _, i in reps], dtype=np.int64)
    src = None
    if table.optics is not None and "rlnOpticsGroup" in table.optics.columns:
        src = {int(g): k for k, g in enumerate(table.optics["rlnOpticsGroup"].tolist())}
    names = []
    for g, i in reps:
        nm = "opticsGroup%d" % g
        if (src is not None and int(table.optics_group[i]) == g and g in src
                and "rlnOpticsGroupName" in table.optics.columns):
            nm = str(table.optics["rlnOpticsGroupName"].iloc[src[g]])
        names.append(nm)
    opt["rlnOpticsGroupName"] = np.array(names, dtype=str)
    opt["rlnImagePixelSize"] = table.apix[rows].astype(np.float64)
    opt["rlnImageSize"] = table.box[rows].astype(np.int64)
    opt["rlnImageDimensionality"] = np.full(len(reps), 2, dtype=np.int64)
    for lab, v in zip(CTF_OPTICS, (table.voltage, table.cs, table.amp_contrast)):
        if v is not None:
            opt[lab] = np.asarray(v, dtype=np.float64)[rows]
    if src is not None:
        for c in table.optics.columns:
            if c in _OWN_OPTICS_COLUMNS:
                continue
            col = table.optics[c].to_numpy()
            vals, ok = [], True
            for g, i in reps:
                if int(table.optics_group[i]) == g and g in src:
                    vals.append(col[src[g]])
                else:
                    ok = False
                    break
            if ok:
                opt[c] = np.array(vals, dtype=col.dtype)

    # particle table
    part = OrderedDict()
    rel = []
    for p, i in zip(table.stack_paths.tolist(), table.stack_index.tolist()):
        ap = os.path.abspath(p)
        r = os.path.relpath(ap, outdir)
        name = ap if (r == os.pardir or r.startswith(os.pardir + os.sep)) else r
        rel.append("%06d@%s" % (i + 1, name))
    part["rlnImageName"] = np.array(rel, dtype=str)
    part["rlnOpticsGroup"] = gid
    if table.euler is not None:
        for k, lab in enumerate(ANGLES):
            part[lab] = table.euler[:, k].astype(np.float64)
    if table.origin is not None:
        part["rlnOriginXAngst"] = table.origin[:, 0].astype(np.float64)
        part["rlnOriginYAngst"] = table.origin[:, 1].astype(np.float64)
    for lab, v in zip(CTF_PARTICLE, (table.defocus_u, table.defocus_v, table.defocus_angle)):
        if v is not None:
            part[lab] = np.asarray(v, dtype=np.float64)
    part["rlnPhaseShift"] = np.asarray(table.phase_shift, dtype=np.float64)
    part["rlnCtfBfactor"] = np.asarray(table.ctf_bfactor, dtype=np.float64)
    if table.extra is not None:
        for c in table.extra.columns:
            if c not in _OWN_PARTICLE_COLUMNS and c not in part:
                part[c] = table.extra[c].to_numpy()
    for c, v in (extra_columns or {}).items():
        v = np.asarray(v)
        if v.ndim != 1 or len(v) != n:
            raise ValueError("extra column %s: %s values for %d particles"
                             % (c, v.shape, n))
        part[c] = v

    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write("# written by nmaem\n")
            _write_loop(fh, "optics", opt)
            _write_loop(fh, "particles", part)


# ============================================================================ images

def _open_mrc(path, mode="r"):
    import mrcfile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old files without the MAP id, odd machine stamps
        return mrcfile.mmap(path, mode=mode, permissive=True)


class ImageStack:
    """Particle images of a :class:`ParticleTable`, read through MRC memory maps.

    Only the requested images are read; at most ``max_open`` stacks are kept mapped at
    a time (least recently used first closed). With ``check`` the constructor reads
    every stack's header once and raises a one-line NmaemError naming the file when a
    stack is missing or unreadable, an index is past its end, images are not square,
    the size differs from the table's box (``rlnImageSize``) or between stacks.
    """

    def __init__(self, table, check=True, max_open=32):
        table.require(poses=False, ctf=False, images=True)
        self.table = table
        self.max_open = max(1, int(max_open))
        self._open = OrderedDict()
        self._uniq, self._inv = np.unique(table.stack_paths, return_inverse=True)
        self._D = int(table.box[0]) if table.n and table.box[0] > 0 else None
        if check:
            self._check()
        if self._D is None:
            self._D = self._dims(self._uniq[0])[1]

    def _dims(self, stack):
        """(number of images, ny, nx) from the header only."""
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
        except Exception as e:
            fail(stack, "not a readable MRC file (%s)" % type(e).__name__)
        itemsize = {0: 1, 1: 2, 2: 4, 4: 8, 6: 2, 12: 2}.get(mode)
        if itemsize is None or min(nx, ny, nz) <= 0:
            fail(stack, "unsupported or corrupt MRC header (mode %d, size %dx%dx%d)"
                 % (mode, nx, ny, nz))
        need = 1024 + ext + nx * ny * nz * itemsize
        if os.path.getsize(stack) < need:
            fail(stack, "truncated MRC file (%d bytes, header needs %d)"
                 % (os.path.getsize(stack), need))
        return nz, ny, nx

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
    def shape(self):
        return (self._D, self._D)

    def _data(self, k):
        stack = self._uniq[k]
        m = self._open.get(stack)
        if m is not None:
            self._open.move_to_end(stack)
            return m.data
        if not os.path.isfile(stack):
            fail(stack, "missing particle stack (referenced by %s)" % self.table.path)
        try:
            m = _open_mrc(stack)
        except Exception as e:
            fail(stack, "not a readable MRC file (%s)" % type(e).__name__)
        if m.data is None:
            m.close()
            fail(stack, "no image data (truncated MRC file?)")
        self._open[stack] = m
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return m.data

    def read(self, indices):
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
            data = self._data(k)
            if data.ndim == 2:
                data = data[None]
            if local.max() >= data.shape[0]:
                fail(self._uniq[k], "image %d requested, but the stack holds %d"
                     % (int(local.max()) + 1, data.shape[0]))
            if data.shape[1:] != (self._D, self._D):
                fail(self._uniq[k], "images are %dx%d, expected %dx%d"
                     % (data.shape[2], data.shape[1], self._D, self._D))
            order = np.argsort(local, kind="stable")
            out[where[order]] = data[local[order]]
        return out

    def close(self):
        for m in self._open.values():
            m.close()
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


def write_stack(path, images, apix):
    """Write images (n, D, D) as a float32 MRC stack, atomically, with voxel size apix."""
    import mrcfile
    path = os.fspath(path)
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError("write_stack expects (n, D, D) images, got %s" % (images.shape,))
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(images)
            m.set_image_stack()
            m.voxel_size = float(apix)
            m.update_header_stats()
            # mrcfile's default label holds the creation time: the same data must give
            # the same bytes (reproducible datasets), so the label is fixed text
            m.header.label[0] = b"written by nmaem"
            m.header.nlabl = 1
