# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Checks of the files a user hands the plugin, made before anything runs: refined
particles (a RELION STAR or cryoSPARC .cs with poses, CTFs and image stacks) and an atomic
model docked in their map. Used by the import protocol's form (``_validate``) and by the
workflow template's alias checks (``workflow_template``). No Scipion and no torch: the
readers of ``core.io`` and ``core.physics.structure`` are imported when a check runs.
"""
import os

# a pixel size given by the user must agree with the file's to this relative tolerance
APIX_TOLERANCE = 0.01


def readParticleTable(path):
    """(ParticleTable, None) or (None, problem) for a particle file."""
    from .core.base.errors import NmaemError
    from .core.io.particles import read_particles
    try:
        return read_particles(path), None
    except NmaemError as exc:
        text = str(exc)
        prefix = "%s: " % path
        return None, text[len(prefix):] if text.startswith(prefix) else text
    except Exception as exc:  # an unreadable file of any other kind: say what it is
        return None, "cannot be read (%s: %s)" % (type(exc).__name__, exc)


def particleFileProblems(path, samplingRate=0.0):
    """The problem (one line, without the path) that makes ``path`` unusable as refined
    particles for nmaem, or None: no such file, unreadable, no poses (angles), no CTF, no
    acquisition (voltage), image stacks missing, or a pixel size ``samplingRate`` (A/px;
    0: the file's) that differs from the file's."""
    if not path:
        return "no particle file given"
    if not os.path.isfile(path):
        return "no such file"
    table, problem = readParticleTable(path)
    if problem:
        return problem
    if table.n == 0:
        return "no particles in the file"
    if table.euler is None:
        return ("no poses (angles) in the file: nmaem needs the particles of a 3D "
                "refinement (RELION run_data.star, cryoSPARC particles .cs)")
    if table.defocus_u is None:
        return "no CTF (defocus) in the file"
    if table.voltage is None:
        return "no acquisition (voltage, Cs, amplitude contrast) in the file"
    if table.stack_paths is None:
        return "no image names in the file"
    missing = sorted({str(p) for p in table.stack_paths if not os.path.isfile(str(p))})
    if missing:
        return "%d image stack(s) missing, first %s" % (len(missing), missing[0])
    apix = sorted({round(float(a), 6) for a in table.apix})
    if len(apix) != 1:
        return "particles of several pixel sizes (%s A/px)" % ", ".join("%g" % a for a in apix)
    sr = float(samplingRate or 0.0)
    if sr < 0:
        return "pixel size %g A/px is negative" % sr
    if sr > 0 and abs(sr - apix[0]) > APIX_TOLERANCE * apix[0]:
        return ("pixel size %g A/px given, but the file says %g A/px" % (sr, apix[0]))
    return None


def modelParticlesProblems(modelPath, particlesPath):
    """The problem (one line) that shows the atomic model ``modelPath`` is not docked in
    the map the poses of ``particlesPath`` refer to, or None: nmaem takes the model's
    coordinates in that map's frame, whose centre (the rotation centre of the poses) is
    at (D//2) * apix in x, y and z for the particles' box D and pixel size apix
    (docs/conventions.md). A model whose centre of mass is more than a quarter of the box
    from there, or whose atoms reach beyond the box, is in another frame (or of another
    molecule, or at another pixel size). The fit check of the training (``nmaem check``)
    tests the match itself, image by image; this is the cheap look before anything runs."""
    import numpy as np
    from .core.base.errors import NmaemError
    from .core.io.stacks import stack_box
    from .core.physics.structure import read_model
    try:
        model = read_model(modelPath)
    except NmaemError as exc:
        return str(exc)
    except Exception as exc:
        return "%s cannot be read as an atomic model (%s)" % (modelPath, exc)
    if model.n_atoms == 0:
        return "%s holds no atoms" % modelPath
    table, problem = readParticleTable(particlesPath)
    if problem:
        return None       # reported for the particle file itself
    apix = float(table.apix[0])
    box = stack_box(str(table.stack_paths[0]))
    size = box * apix
    centre = np.full(3, (box // 2) * apix)
    com = model.coords.mean(axis=0)
    off = float(np.linalg.norm(com - centre))
    if off > size / 4.0:
        return ("%s is not docked in the particles' map: its centre of mass (%.0f, %.0f, "
                "%.0f) A is %.0f A from the box centre (%.0f A, for %d px at %g A/px); "
                "nmaem takes the model in the frame of the consensus map the poses refer to"
                % (modelPath, com[0], com[1], com[2], off, centre[0], box, apix))
    reach = float(np.abs(model.coords - centre).max())
    if reach > size / 2.0 * np.sqrt(3.0):
        return ("%s does not fit the particles' box: atoms reach %.0f A from its centre, "
                "the box is %.0f A (%d px at %g A/px)" % (modelPath, reach, size, box, apix))
    return None
