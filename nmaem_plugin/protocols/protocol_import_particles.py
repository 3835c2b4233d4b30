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

The checks of its form are ``inputchecks`` (shared with the workflow template).
"""
import os
from enum import Enum

import pyworkflow.protocol.params as params
from pwem.objects import AtomStruct, SetOfParticles

from ..inputchecks import modelParticlesProblems, particleFileProblems
from .protocol_base import NmaemProtBase


class NmaemImportParticlesOutputs(Enum):
    outputParticles = SetOfParticles
    outputStructure = AtomStruct


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
