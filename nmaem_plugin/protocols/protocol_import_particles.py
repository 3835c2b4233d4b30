# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Import refined particles (a RELION STAR or a cryoSPARC .cs file, with their poses and
CTFs) through nmaem's own readers: a SetOfParticles with 3D alignment and CTF, without
the RELION or cryoSPARC plugins (pwem's import of such files needs them); and, optionally,
the atomic model docked in their map, checked against them.

The model is imported here rather than by a second import protocol so that a workflow
(the plugin's template) has a single root: Scipion's scheduler (``pyworkflow/project/
scripts/schedule.py``) schedules the descendants of each root protocol, so a protocol
below two import protocols is scheduled, and run, twice.

``particleFileProblems`` and ``modelParticlesProblems`` are the checks this protocol's
form and the workflow template (``nmaem_plugin.template``) make before anything runs.
"""
import os
from enum import Enum

import pyworkflow.protocol.params as params
from pwem.objects import AtomStruct, SetOfParticles

from .protocol_base import NmaemProtBase

# a pixel size given by the user must agree with the file's to this relative tolerance
APIX_TOLERANCE = 0.01


class NmaemImportParticlesOutputs(Enum):
    outputParticles = SetOfParticles
    outputStructure = AtomStruct


def readParticleTable(path):
    """(ParticleTable, None) or (None, problem) for a particle file."""
    from ..core.errors import NmaemError
    from ..core.particles import read_particles
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
    from ..core.errors import NmaemError
    from ..core.stacks import stack_box
    from ..core.structure import read_model
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


class NmaemProtImportParticles(NmaemProtBase):
    """Import refined particles from a RELION STAR file (3.0, 3.1+ or 5, e.g. a 3D
    refinement's run_data.star) or a cryoSPARC .cs file (exported particles of a
    refinement), with their poses, origins, CTFs and acquisition, as a SetOfParticles with
    3D alignment.

    The file is read by nmaem's own readers (the ones ``nmaem`` itself uses), so neither
    the RELION nor the cryoSPARC plugin is needed. The images stay where they are (the
    set points at the stacks the file names). Particle ids: the file's rlnImageId column
    when it has one, else 1..N in file order.
    """
    _label = "import refined particles and model"
    _possibleOutputs = NmaemImportParticlesOutputs

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("particlesFile", params.PathParam, important=True,
                      label="Particle file (.star or .cs)",
                      help="The particles of a 3D refinement with their poses and CTFs: "
                           "a RELION STAR file (run_data.star of a 3D auto-refine, or any "
                           "STAR with rlnAngleRot/Tilt/Psi, origins and defocus) or a "
                           "cryoSPARC .cs file (exported from a refinement job; the image "
                           "paths it names are resolved relative to the file's folder).")
        form.addParam("samplingRate", params.FloatParam, default=0.0,
                      validators=[params.GE(0)], label="Pixel size (A/px)",
                      help="The particles' pixel size. 0: the one the file gives. "
                           "A value that differs from the file's by more than 1 % is an "
                           "error (the wrong file, or the wrong pixel size).")
        form.addParam("modelFile", params.PathParam, allowsNull=True,
                      label="Atomic model (optional)",
                      help="The reference atomic model (PDB or mmCIF), docked in the "
                           "consensus map the particles' poses refer to (its coordinates in "
                           "that map's frame). Checked against the particles (its centre "
                           "near the box centre, its atoms inside the box) and copied into "
                           "the project as outputStructure.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.createOutputStep)

    def createOutputStep(self):
        import shutil
        from ..convert import readSetOfParticles
        parts = self._createSetOfParticles()
        readSetOfParticles(os.path.abspath(self.particlesFile.get()), parts)
        outputs = NmaemImportParticlesOutputs
        out = {outputs.outputParticles.name: parts}
        if self.modelFile.get():
            dst = self._getExtraPath(os.path.basename(self.modelFile.get()))
            shutil.copyfile(self.modelFile.get(), dst)
            out[outputs.outputStructure.name] = AtomStruct(filename=os.path.relpath(dst))
        self._defineOutputs(**out)

    def _validate(self):
        path = self.particlesFile.get()
        problem = particleFileProblems(path, self.samplingRate.get())
        if problem:
            return ["%s: %s" % (path, problem)]
        model = self.modelFile.get()
        if model:
            if not os.path.isfile(model):
                return ["%s: no such file" % model]
            problem = modelParticlesProblems(model, path)
            if problem:
                return [problem]
        return []

    def _summary(self):
        out = getattr(self, NmaemImportParticlesOutputs.outputParticles.name, None)
        if out is None:
            return ["Particles from %s (not imported yet)." % self.particlesFile.get()]
        return ["%d particles from %s, %g A/px, with 3D alignment and CTF."
                % (out.getSize(), self.particlesFile.get(), out.getSamplingRate())]

    def _methods(self):
        out = getattr(self, NmaemImportParticlesOutputs.outputParticles.name, None)
        if out is None:
            return []
        return ["%d refined particles (poses and CTFs) were imported from %s."
                % (out.getSize(), os.path.basename(self.particlesFile.get()))]
