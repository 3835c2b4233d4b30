"""Subsets of a particle file that keep the file: the chosen rows, everything else as it was.

A state's particles go back to the user's own tools (re-extraction at full size, RELION or
cryoSPARC jobs), so a subset keeps every column and data block of the input, not only the
fields nmaem reads:

* **STAR** (:func:`write_star_subset`): the input's text, line for line (comments, the
  optics table, key-value blocks, every column of every row, numbers as they were written,
  image names as they were: relative to the RELION project folder, as RELION expects), with
  the rows of the particle table (``star.particle_block``) reduced to the chosen ones in
  the order given. Rows are those of ``star.read_star`` (one parser, ``star.read_star_layout``).
* **cryoSPARC .cs** (:func:`write_cs_subset`): the chosen rows of the input's structured
  array, all its fields (``uid``, ``blob/...``, ``ctf/...``, ``alignments3D/...``, ...),
  written with the official ``cryosparc-tools`` library (``cryosparc.dataset.Dataset``),
  which also reads it back.

Both write atomically (``atomic.py``); ``rows`` are 0-based rows of the input file.
"""
import os
from typing import Sequence

import numpy as np

from ..base.atomic import atomic_open, atomic_path
from ..base.errors import NmaemError, fail

__all__ = ["write_star_subset", "write_cs_subset", "write_subset", "SUBSET_FORMATS"]

SUBSET_FORMATS = ("star", "cs")


def _rows(rows, n, path):
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        fail(path, "row %d asked of a file of %d particles"
             % (int(rows.max() if rows.max() >= n else rows.min()) + 1, n))
    return rows


def write_star_subset(src: str, dst: str, rows: Sequence[int]) -> None:
    """Write the STAR file ``src`` with only the particle rows ``rows`` to ``dst``
    (module docstring)."""
    from .star import particle_block, read_star_layout
    src = os.fspath(src)
    lines, loops = read_star_layout(src)
    name = particle_block(src, {k: v[0] for k, v in loops.items()})
    if name not in loops:
        fail(src, "the particle table %r is not a loop" % name)
    row_lines = loops[name][1]
    rows = _rows(rows, len(row_lines), src)
    with atomic_open(dst, "w") as fh:
        if not row_lines:
            fh.write("\n".join(lines) + "\n")
            return
        first, last = row_lines[0], row_lines[-1]
        for ln in lines[:first]:
            fh.write(ln + "\n")
        for r in rows.tolist():
            fh.write(lines[row_lines[r]] + "\n")
        for ln in lines[last + 1:]:
            fh.write(ln + "\n")


def write_cs_subset(src: str, dst: str, rows: Sequence[int]) -> None:
    """Write the rows ``rows`` of the cryoSPARC file ``src`` with all its fields to ``dst``
    with cryosparc-tools (module docstring)."""
    src = os.fspath(src)
    try:
        from cryosparc.dataset import Dataset
    except ImportError:
        raise NmaemError("writing cryoSPARC .cs subsets needs the cryosparc-tools package "
                         "(pip install cryosparc-tools)")
    try:
        data = Dataset.load(src)
    except Exception as exc:     # the library raises several types on corrupt input
        fail(src, "not readable by cryosparc-tools (%s)" % (str(exc).splitlines() or [""])[0])
    rows = _rows(rows, len(data), src)
    sub = data.take(rows)
    with atomic_path(dst) as tmp:
        with open(tmp, "wb") as fh:
            sub.save(fh)


def write_subset(src: str, dst: str, rows: Sequence[int]) -> None:
    """:func:`write_star_subset` or :func:`write_cs_subset`, by the extensions of ``src``
    and ``dst`` (which must agree)."""
    ext = os.path.splitext(os.fspath(src))[1].lower()
    out = os.path.splitext(os.fspath(dst))[1].lower()
    if ext != out:
        raise NmaemError("%s: a subset of a %s file keeps its format (got %s)" % (dst, ext, out))
    if ext == ".star":
        write_star_subset(src, dst, rows)
    elif ext == ".cs":
        write_cs_subset(src, dst, rows)
    else:
        fail(src, "unknown particle file type %r (expected .star or .cs)" % ext)
