"""RELION STAR files: parsing (3.0, 3.1+ with optics) into a ``ParticleTable``, and writing.

Reading follows the conventions of ``particles.py``. Writing (:func:`write_star`)
produces RELION 3.1 files (``data_optics`` + ``data_particles``), floats written with
Python's shortest exact representation, so that a write-read round trip is exact.
"""
import os
import shlex
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ..base.atomic import atomic_open
from ..base.errors import NmaemError, fail
from .table import (ANGLES, CTF_OPTICS, CTF_PARTICLE, ParticleTable, split_image_names,
                    stack_resolver)
from .stacks import stack_box

__all__ = ["read_star_blocks", "read_star_layout", "particle_block", "read_star", "write_star"]

# Particle columns that write_star produces itself from the table's fields (or that a
# RELION 3.1 particle block must not carry, being optics properties or 3.0 units).
_OWN_PARTICLE_COLUMNS = set(
    ["rlnImageName", "rlnOpticsGroup", "rlnOriginXAngst", "rlnOriginYAngst",
     "rlnOriginX", "rlnOriginY", "rlnPhaseShift", "rlnCtfBfactor", "rlnMagnification",
     "rlnDetectorPixelSize", "rlnPixelSize", "rlnImagePixelSize", "rlnImageSize",
     "rlnImageDimensionality"] + ANGLES + CTF_PARTICLE + CTF_OPTICS)
_OWN_OPTICS_COLUMNS = set(["rlnOpticsGroup", "rlnOpticsGroupName", "rlnImagePixelSize",
                           "rlnImageSize", "rlnImageDimensionality"] + CTF_OPTICS)


# ============================================================================ parsing

def _tokens(line):
    if '"' in line or "'" in line:
        return shlex.split(line, posix=True)
    return line.split()


def read_star_blocks(path: str) -> Dict[str, pd.DataFrame]:
    """Parse a STAR file into ``{block name: DataFrame}`` (loops and key-value blocks).

    Numbers are parsed exactly (Python's float); a column is int64 when every value is
    an integer, float64 when every value is a number, str otherwise. Any structural
    problem raises a one-line NmaemError naming the file and the line.
    """
    _, blocks = _parse(path)
    out = OrderedDict()
    for k, v in blocks.items():
        if isinstance(v, dict):
            v = _columns(path, list(v.keys()), [list(v.values())]) if v else pd.DataFrame()
        else:
            v = _columns(path, v[0], v[1])
        out[k] = v
    return out


def read_star_layout(path: str) -> Tuple[List[str], Dict[str, Tuple[List[str], List[int]]]]:
    """The text of a STAR file as :func:`read_star_blocks` parses it: (its lines, without
    line ends; ``{loop block name: (column labels, 0-based line number of each row)}``),
    for writers that keep a file's own text (``starsubset.py``)."""
    lines, blocks = _parse(path)
    return lines, OrderedDict((k, (v[0], v[2])) for k, v in blocks.items()
                              if not isinstance(v, dict))


def particle_block(path: str, blocks: Dict[str, Sequence[str]]) -> str:
    """The name of the particle table among ``blocks`` (name -> column labels):
    ``particles``, else the first block with ``rlnImageName``, else the first block other
    than ``optics`` with columns; a one-line error naming ``path`` when there is none."""
    if "particles" in blocks:
        return "particles"
    cands = [k for k, v in blocks.items() if "rlnImageName" in v]
    if not cands:
        cands = [k for k, v in blocks.items() if k != "optics" and len(v)]
    if not cands:
        fail(path, "no particle table (no data_particles block or loop with rlnImageName)")
    return cands[0]


def _parse(path):
    """(lines, {name: key-value dict, or (labels, rows of tokens, row line numbers)})."""
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
            rows, row_lines = [], []
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
                row_lines.append(i)
                i += 1
            if len(set(labels)) != len(labels):
                fail(path, "duplicate column labels")
            blocks[name] = (labels, rows, row_lines)
        elif s.startswith("_"):
            tok = _tokens(s)
            if len(tok) != 2:
                fail(path, "line %d: expected '_label value'" % i)
            cur = blocks[name]
            if not isinstance(cur, dict):
                fail(path, "line %d: key-value item after a loop in the same block" % i)
            cur[tok[0][1:]] = tok[1]
        else:
            fail(path, "line %d: unexpected text %r (corrupt STAR file?)" % (i, s[:40]))
    if not blocks:
        fail(path, "no data_ block (not a STAR file?)")
    return lines, blocks


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

def read_star(path: str, root: Optional[str] = None) -> ParticleTable:
    """A :class:`ParticleTable` of a RELION STAR particle file (3.0 or 3.1+)."""
    blocks = read_star_blocks(path)
    optics = blocks.get("optics")
    parts = blocks[particle_block(path, {k: list(v.columns) for k, v in blocks.items()})]
    n = len(parts)
    if n == 0:
        fail(path, "no particles in the particle table")
    cols = set(parts.columns)
    has = cols.__contains__
    resolve = stack_resolver(path, root)

    if has("rlnImageName"):
        image_names = parts["rlnImageName"].to_numpy().astype(str)
        stack_paths, stack_index = split_image_names(path, image_names, resolve)
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
            box = np.array([stack_box(s) for s in uniq], dtype=np.int64)[inv]

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


def write_star(path: str, table: ParticleTable,
               extra_columns: Optional[pd.DataFrame] = None) -> None:
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

    with atomic_open(path, "w") as fh:
        fh.write("# written by nmaem\n")
        _write_loop(fh, "optics", opt)
        _write_loop(fh, "particles", part)
