"""``read_particles``: a particle file (RELION STAR 3.0, 3.1+, 5 or cryoSPARC .cs) read by its
reader (``star.read_star``, ``cryosparc.read_cs``, chosen by the extension) into a
``table.ParticleTable`` whose metadata is validated (``table.check_table``)."""
import os
from typing import Optional

from ..base.errors import fail, require_file
from .table import ParticleTable, check_table

__all__ = ["read_particles"]


def read_particles(path: str, root: Optional[str] = None) -> "ParticleTable":
    """Read a RELION STAR (3.0, 3.1+) or cryoSPARC .cs particle file; see the module doc."""
    path = require_file(path, "particle file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".cs":
        from .cryosparc import read_cs
        return check_table(read_cs(path, root))
    if ext == ".star":
        from .star import read_star
        return check_table(read_star(path, root))
    fail(path, "unknown particle file type %r (expected .star or .cs)" % ext)
