# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Compute normal modes: ``nmaem modes`` on an atomic model -> SetOfNormalModes."""
import json
import os
from enum import Enum

import pyworkflow.protocol.params as params
from pyworkflow.object import Float, Integer, String
from pwem.objects import NormalMode, SetOfNormalModes

from ..constants import ATTR_ANIMATION, ATTR_EIGENVALUE, ATTR_MODE_INDEX, ATTR_OVERLAP
from ..core.base.choices import CG_CHOICES
from .protocol_base import NmaemProtBase


class NmaemComputeModesOutputs(Enum):
    outputModes = SetOfNormalModes


class NmaemProtComputeModes(NmaemProtBase):
    """Normal modes of a reference atomic model for nmaem.

    The model is coarse-grained (one node per residue by default), an anisotropic
    network model (ProDy) gives the Hessian, and its lowest non-rigid modes are
    interpolated onto every atom (PyKeOps) and made orthonormal. The result is the
    modes.npz file that training uses, and a SetOfNormalModes for Scipion viewers.
    With a target model, the summary reports how much of the motion to it the modes
    span (cumulative overlap) and the best RMSD they can reach (floor RMSD).
    """
    _label = "compute normal modes"
    _possibleOutputs = NmaemComputeModesOutputs

    # ------------------------------------------------------------------ form
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputStructure", params.PointerParam, pointerClass="AtomStruct",
                      label="Reference atomic model", important=True,
                      help="The model to deform (PDB or mmCIF). For real data it must be "
                           "docked in the consensus map the particle poses refer to, "
                           "because nmaem rotates it about the map's box centre.")
        form.addParam("numberOfModes", params.IntParam, default=16,
                      validators=[params.Range(1, 200, "between 1 and 200")],
                      label="Number of modes",
                      help="How many non-rigid normal modes to keep (d, the size of the "
                           "latent vector). The six rigid-body modes are excluded. 16 is "
                           "a good start; fewer modes make training easier, more modes "
                           "describe more complex motions.")
        form.addParam("cg", params.EnumParam, choices=CG_CHOICES, default=0,
                      label="Coarse graining",
                      help="Nodes of the elastic network: 'ca' = one node per residue "
                           "(CA of amino acids, C4' or P of nucleotides), the usual ANM; "
                           "'backbone' = protein and nucleic-acid backbone atoms; 'heavy' "
                           "= all heavy atoms (slow for large models).")
        form.addParam("cutoff", params.FloatParam, default=15.0,
                      validators=[params.Positive],
                      label="Cutoff (A)",
                      help="Nodes closer than this distance (Angstrom) are joined by a "
                           "spring. 15 A is the usual value for CA networks; use about "
                           "7-10 A for 'heavy'.")
        form.addParam("gamma", params.FloatParam, default=1.0, validators=[params.Positive],
                      label="Spring constant (gamma)",
                      help="Force constant of the springs. It scales the eigenvalues only; "
                           "the modes do not depend on it.")
        form.addParam("targetStructure", params.PointerParam, pointerClass="AtomStruct",
                      allowsNull=True, label="Target model (optional)",
                      help="A second conformation of the same molecule. The summary then "
                           "shows the overlap of the modes with the motion to it and the "
                           "floor RMSD: the smallest RMSD to the target that any "
                           "combination of the modes can reach.")
        form.addParam("animationAmplitude", params.FloatParam, default=3.0,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="Animation amplitude (A)",
                      help="Largest atom displacement in the per-mode animation files "
                           "(multi-model PDB) and the VMD NMWiz file written with the modes.")
        self._defineGpuParams(form)

    # ------------------------------------------------------------------ files
    def _createFilenameTemplates(self):
        self._updateFilenamesDict({
            "modes": self._getExtraPath("modes.npz"),
            "animations": self._getExtraPath("animations"),
            "animation": self._getExtraPath("animations", "mode_%(mode)02d.pdb"),
            "report": self._getExtraPath("modes_report.json"),
        })

    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._createFilenameTemplates()
        self._insertFunctionStep(self.computeModesStep)
        self._insertFunctionStep(self.createOutputStep)

    def computeModesStep(self):
        out = self._getFileName("modes")
        if os.path.exists(out):       # a resumed run: the atomic write is complete
            self.info("%s exists; not computed again" % out)
            return
        args = [os.path.abspath(self.inputStructure.get().getFileName()),
                "-o", out,
                "--n-modes", self.numberOfModes.get(),
                "--cg", CG_CHOICES[self.cg.get()],
                "--cutoff", self.cutoff.get(),
                "--gamma", self.gamma.get(),
                "--export", self._getFileName("animations"),
                "--amplitude", self.animationAmplitude.get(),
                "--force"]       # this protocol's own outputs, from an interrupted run
        if self.targetStructure.get() is not None:
            args += ["--target", os.path.abspath(self.targetStructure.get().getFileName())]
        self.runNmaem("modes", args + self._deviceArgs())

    def createOutputStep(self):
        import numpy as np
        fn = self._getFileName("modes")
        with np.load(fn, allow_pickle=False) as f:
            eigen = np.asarray(f["eigenvalues"], dtype=float)
            d, natoms = f["modes"].shape[:2]
            coll = (np.asarray(f["collectivity"], dtype=float) if "collectivity" in f.files
                    else np.full(d, np.nan))
            overlap = (np.asarray(f["target_overlap"], dtype=float)
                       if "target_overlap" in f.files else None)
            report = {"n_modes": int(d), "n_atoms": int(natoms),
                      "eigenvalues": eigen.tolist(), "collectivity": coll.tolist()}
            for key in ("target_cumulative_overlap", "target_floor_rmsd", "target_rmsd",
                        "target_n_matched", "target_overlap"):
                if key in f.files:
                    v = f[key]
                    report[key] = v.tolist() if v.ndim else v.item()
        from ..core.base.atomic import atomic_open
        with atomic_open(self._getFileName("report"), "w") as fh:
            json.dump(report, fh, indent=1)

        modes = SetOfNormalModes(filename=self._getPath("modes.sqlite"))
        modes.setPdb(self.inputStructure.get())
        for k in range(d):
            m = NormalMode(modeFile=os.path.relpath(fn), collectivity=float(coll[k]))
            m.setObjId(k + 1)
            setattr(m, ATTR_MODE_INDEX, Integer(k))
            setattr(m, ATTR_EIGENVALUE, Float(float(eigen[k])))
            anim = self._getFileName("animation", mode=k + 1)
            if os.path.exists(anim):
                setattr(m, ATTR_ANIMATION, String(os.path.relpath(anim)))
            if overlap is not None:
                setattr(m, ATTR_OVERLAP, Float(float(overlap[k])))
                m.setScore(abs(float(overlap[k])))
            modes.append(m)
        self._defineOutputs(**{NmaemComputeModesOutputs.outputModes.name: modes})
        self._defineSourceRelation(self.inputStructure, modes)

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        errors += self.validateStructure(self.inputStructure.get(), "The reference model")
        tgt = self.targetStructure.get()
        if tgt is not None:
            errors += self.validateStructure(tgt, "The target model")
        return errors

    def _readReport(self):
        return self._readJsonResult("report")

    def _summary(self):
        report = self._readReport()
        if report is None:
            return ["Normal modes not computed yet."]
        lines = ["%d normal modes on %d atoms (%s coarse graining, cutoff %g A)."
                 % (report["n_modes"], report["n_atoms"], CG_CHOICES[self.cg.get()],
                    self.cutoff.get())]
        coll = report.get("collectivity")
        if coll:
            lines.append("Collectivity: " + ", ".join("%.2f" % c for c in coll))
        if "target_floor_rmsd" in report:
            cum = report.get("target_cumulative_overlap") or [float("nan")]
            lines.append("Target: %s atoms matched, RMSD %.2f A to the reference; "
                         "cumulative overlap of the %d modes %.3f; floor RMSD %.2f A."
                         % (report.get("target_n_matched", "?"), report.get("target_rmsd", 0.0),
                            report["n_modes"], cum[-1], report["target_floor_rmsd"]))
        return lines

    def _methods(self):
        report = self._readReport()
        if report is None:
            return []
        text = ("We computed %d normal modes of the atomic model %s with an anisotropic "
                "network model [Bakan2011] (%s nodes, cutoff %g A), interpolated them onto "
                "all %d atoms [Charlier2021] and made them orthonormal, with nmaem "
                "[Nashed2022]." % (report["n_modes"], self.getObjectTag("inputStructure"),
                                   CG_CHOICES[self.cg.get()], self.cutoff.get(),
                                   report["n_atoms"]))
        if "target_floor_rmsd" in report:
            text += (" The modes reach the target %s to a floor RMSD of %.2f A."
                     % (self.getObjectTag("targetStructure"), report["target_floor_rmsd"]))
        return [text]

    def _citations(self):
        return ["Nashed2022", "Bakan2011", "Charlier2021", "Wojdyr2022"]
