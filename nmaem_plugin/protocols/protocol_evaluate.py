# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Accuracy of nmaem on simulated data: ``nmaem evaluate`` -> summary and per-particle RMSD."""
import json
import os
from enum import Enum

import numpy as np
import pyworkflow.protocol.params as params
from pyworkflow.object import Float
from pwem.objects import SetOfParticlesFlex

from ..constants import ATTR_FRAME
from ..core.io.runfolder import read_config_or_none
from .protocol_base import NmaemProtBase
from .protocol_flex_common import (ATTR_FLOOR_RMSD, ATTR_RMSD, createSetOfParticlesFlex,
                                   findSimulationDir, runDirOf)


class NmaemEvaluateOutputs(Enum):
    outputParticles = SetOfParticlesFlex


class NmaemProtEvaluate(NmaemProtBase):
    """Accuracy of the inferred conformations on a simulated dataset (synthetic data only).

    For every particle, the RMSD between X0 + U z (z inferred by nmaem) and the frame the
    particle was simulated from, compared with the floor RMSD (the best any amplitudes of
    the modes can reach) and with the undeformed reference; the PCA of z, its correlation
    with the true frame, the density maxima on PC1 and the shift error. The numbers are in
    the summary and in extra/evaluation.json; the output particles carry their RMSD.
    """
    _label = "evaluate (synthetic data)"
    _possibleOutputs = NmaemEvaluateOutputs

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticlesFlex",
                      label="Particles with z", important=True,
                      help="The output of 'nmaem - infer' run on simulated particles (or a "
                           "subset of it).")
        form.addParam("simulatedParticles", params.PointerParam,
                      pointerClass="SetOfParticles", label="Simulated particles",
                      important=True,
                      help="The particles of 'nmaem - simulate particles' that were given to "
                           "infer: their dataset folder holds the ground truth "
                           "(ground_truth.npz, frames.pdb).")
        self._defineMaximaParams(form)

    def _createFilenameTemplates(self):
        self._updateFilenamesDict({
            "star": self._getExtraPath("particles.star"),
            "latent": self._getExtraPath("latent.npz"),
            "ids": self._getExtraPath("latent_ids.npy"),
            "json": self._getExtraPath("evaluation.json"),
            "perParticle": self._getExtraPath("per_particle.npz"),
        })

    def _insertAllSteps(self):
        self._createFilenameTemplates()
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.writeLatentStep)
        self._insertFunctionStep(self.evaluateStep)
        self._insertFunctionStep(self.createOutputStep)

    def evaluateStep(self):
        out = self._getFileName("json")
        if os.path.exists(out):
            self.info("%s exists; not evaluated again" % out)
            return
        tmp = out + ".tmp"
        args = ["--latent", self._getFileName("latent"),
                "--particles", self._getFileName("star"),
                "--truth", findSimulationDir(self.simulatedParticles.get()),
                "--model", os.path.abspath(runDirOf(self.inputParticles.get())),
                "--per-particle", self._getFileName("perParticle"),
                "--force"] + self._maximaArgs()     # its own file, from an interrupted run
        self.runNmaem("evaluate", args, stdout=tmp)
        with open(tmp) as fh:
            result = json.load(fh)       # a complete JSON document
        self.info("evaluation summary: %s" % json.dumps(result.get("summary")))
        os.replace(tmp, out)

    def createOutputStep(self):
        flex = self.inputParticles.get()
        with np.load(self._getFileName("perParticle"), allow_pickle=False) as f:
            rmsd, floor = f["rmsd"], f["floor_rmsd"]
        ids = np.load(self._getFileName("ids"))
        byId = {int(i): k for k, i in enumerate(ids.tolist())}
        out = createSetOfParticlesFlex(self)
        from ..convert import copySetInfo
        copySetInfo(out, flex)
        for p in flex.iterItems(orderBy="id"):
            k = byId[int(p.getObjId())]
            setattr(p, ATTR_RMSD, Float(float(rmsd[k])))
            setattr(p, ATTR_FLOOR_RMSD, Float(float(floor[k])))
            out.append(p)
        self._defineOutputs(**{NmaemEvaluateOutputs.outputParticles.name: out})
        self._defineSourceRelation(self.inputParticles, out)
        self._defineSourceRelation(self.simulatedParticles, out)

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        flex, sim = self.inputParticles.get(), self.simulatedParticles.get()
        if flex is None or sim is None:
            return ["Choose the particles with z and the simulated particles."]
        if flex.getSize() == 0:
            return ["The particles with z are empty."]
        run = runDirOf(flex)
        if run is None or read_config_or_none(run) is None:
            errors.append("The particles with z do not record an nmaem training run (use the "
                          "output of 'nmaem - infer').")
        first = sim.getFirstItem()
        if first is None or not first.hasAttribute(ATTR_FRAME) or \
                findSimulationDir(sim) is None:
            errors.append("The simulated particles do not come from 'nmaem - simulate "
                          "particles' (no ground-truth frame per particle, or no "
                          "ground_truth.npz and frames.pdb next to their images): evaluate "
                          "works on synthetic data only.")
            return errors
        fid = flex.getFirstItem().getObjId()
        try:
            found = sim[fid] is not None
        except Exception:
            found = False
        if not found:
            errors.append("Particle %d of the particles with z is not among the simulated "
                          "particles: choose the simulation they were inferred from." % fid)
        return errors

    def _readResult(self):
        return self._readJsonResult("json")

    def _summary(self):
        r = self._readResult()
        if r is None:
            return ["Not evaluated yet."]
        s = r["summary"]
        lines = ["%d particles, d = %d modes, %s distribution over %d frames."
                 % (s["n_particles"], s["d"], s.get("distribution"), r["n_frames"]),
                 "Median RMSD to the true conformation: %.3f A (floor, the best the modes "
                 "allow: %.3f A; undeformed reference: %.3f A)."
                 % (s["median_rmsd"], s["median_floor_rmsd"], s["median_reference_rmsd"])]
        if s.get("pc1_explained_variance") is not None:
            corr = s.get("abs_corr_pc1_frame")
            lines.append("PC1 explains %.1f%% of the variance of z; |corr(PC1, true frame)| "
                         "= %s." % (100 * s["pc1_explained_variance"],
                                    "n/a" if corr is None else "%.3f" % corr))
        if s.get("n_maxima"):
            lines.append("%d density maxima on PC1, at frames %s, RMSD %s A."
                         % (s["n_maxima"], s["maxima_frames"],
                            ", ".join("%.2f" % v for v in s["maxima_rmsd"])))
        if s.get("shift_rmse") is not None:
            lines.append("Shift error (RMSE): %.3f A." % s["shift_rmse"])
        return lines

    def _methods(self):
        r = self._readResult()
        if r is None:
            return []
        s = r["summary"]
        return ["On %d simulated particles, the conformations inferred by nmaem [Nashed2022] "
                "had a median RMSD of %.2f A to the ground truth (floor %.2f A, undeformed "
                "reference %.2f A)." % (s["n_particles"], s["median_rmsd"],
                                        s["median_floor_rmsd"], s["median_reference_rmsd"])]

    def _citations(self):
        return ["Nashed2022"]
