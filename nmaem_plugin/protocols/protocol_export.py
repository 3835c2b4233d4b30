# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Deformed all-atom models at chosen latent points: ``nmaem export`` -> SetOfAtomStructFlex."""
import os
from enum import Enum

import pyworkflow.protocol.params as params
from pyworkflow.object import Float, Integer, String
from pwem.objects import SetOfAtomStructFlex

from ..core.base.choices import MODEL_FORMATS
from .protocol_base import NmaemProtBase
from .protocol_flex_common import (ATTR_KIND, ATTR_N_PARTICLES, ATTR_RMSD_REF,
                                   createSetOfAtomStructFlex, hubFlexInfo, modelStructFlex)

EXPORT_PCS, EXPORT_KMEANS, EXPORT_MAXIMA, EXPORT_Z = range(4)
EXPORT_CHOICES = ["principal component traversal", "k-means centres", "density maxima (PC1)",
                  "given amplitudes"]
FORMATS = MODEL_FORMATS


class NmaemExportOutputs(Enum):
    outputAtomStructs = SetOfAtomStructFlex


class NmaemProtExport(NmaemProtBase):
    """All-atom models X0 + U z at chosen points of the latent space of nmaem particles.

    The points are steps along principal components of the particles' z, k-means
    centres, density maxima along PC1, or amplitudes you give. Each model of the output
    set carries its z (Angstrom), its RMSD to the reference (|z|/sqrt(M)) and the number
    of particles it represents.
    """
    _label = "export models"
    _possibleOutputs = NmaemExportOutputs

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticlesFlex",
                      label="Particles with z", important=True,
                      help="The output of 'nmaem - infer' (or a subset of it): the z of "
                           "these particles define the principal components, clusters and "
                           "maxima.")
        form.addParam("inputNetwork", params.PointerParam, pointerClass="FlexInfo",
                      allowsNull=True, label="Trained network (optional)",
                      help="The training whose reference model and modes are deformed. "
                           "Empty: the network recorded with the particles.")
        form.addParam("exportMode", params.EnumParam, choices=EXPORT_CHOICES,
                      default=EXPORT_PCS, label="Models at",
                      help="'principal component traversal': evenly spaced steps along "
                           "each chosen PC, from a low to a high percentile of the "
                           "particles. 'k-means centres': the centres of K clusters of z. "
                           "'density maxima': the peaks of the particles' density along PC1 "
                           "(the mean z of the particles near each). 'given amplitudes': "
                           "models at the z you type.")
        form.addParam("pcs", params.StringParam, default="1",
                      condition="exportMode == %d" % EXPORT_PCS, label="Principal components",
                      help="Comma-separated PC numbers to traverse, e.g. '1' or '1,2'.")
        form.addParam("steps", params.IntParam, default=10, validators=[params.Range(2, 1000)],
                      condition="exportMode == %d" % EXPORT_PCS, label="Models per PC",
                      help="Number of evenly spaced models along each PC.")
        form.addParam("lowPercentile", params.FloatParam, default=5.0,
                      condition="exportMode == %d" % EXPORT_PCS,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Range(0, 100)],
                      label="Traversal start (percentile)",
                      help="First model at this percentile of the particles' PC coordinate.")
        form.addParam("highPercentile", params.FloatParam, default=95.0,
                      condition="exportMode == %d" % EXPORT_PCS,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Range(0, 100)],
                      label="Traversal end (percentile)",
                      help="Last model at this percentile of the particles' PC coordinate.")
        form.addParam("numberOfClusters", params.IntParam, default=5,
                      condition="exportMode == %d" % EXPORT_KMEANS,
                      validators=[params.Positive], label="Number of clusters (K)",
                      help="k-means on the particles' z (k-means++, 10 restarts); one model "
                           "per cluster centre.")
        form.addParam("seed", params.IntParam, default=0,
                      condition="exportMode == %d" % EXPORT_KMEANS,
                      expertLevel=params.LEVEL_ADVANCED, label="Random seed",
                      help="Seed of the k-means initialisation.")
        self._defineMaximaParams(form, condition="exportMode == %d" % EXPORT_MAXIMA)
        form.addParam("amplitudes", params.TextParam, default="",
                      condition="exportMode == %d" % EXPORT_Z, label="Amplitudes (A)",
                      help="One model per line: d comma-separated amplitudes in Angstrom "
                           "(d = number of modes), e.g. '10, -5, 0, 2'.")
        form.addParam("fileFormat", params.EnumParam, choices=FORMATS, default=0,
                      label="File format", help="PDB or mmCIF model files.")
        form.addParam("refineGeometry", params.BooleanParam, default=True,
                      label="Refine the geometry?",
                      help="Restrained energy minimisation of each model with OpenMM "
                           "(amber99sb-ILDN, implicit solvent, heavy atoms pulled to the "
                           "normal-mode positions): restores bond lengths, angles and clashes "
                           "that linear modes distort, moving atoms about 0.5 A. Each model is "
                           "validated (bond and angle rms deviations, clashes, Ramachandran "
                           "outliers). No: the plain X0 + U z models ("
                           "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/analysis.md).")
        form.addParam("hydrogens", params.BooleanParam, default=False,
                      condition="refineGeometry", expertLevel=params.LEVEL_ADVANCED,
                      label="Write hydrogens?",
                      help="Keep the hydrogens added for the refinement in the model files.")

    def _createFilenameTemplates(self):
        self._updateFilenamesDict({
            "latent": self._getExtraPath("latent.npz"),
            "ids": self._getExtraPath("latent_ids.npy"),
            "models": self._getExtraPath("models"),
            "listing": self._getExtraPath("models", "models.json"),
            "done": self._getExtraPath("models", "models.csv"),
        })

    def _zLines(self):
        return self._textLines(self.amplitudes)

    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._createFilenameTemplates()
        self._insertFunctionStep(self.writeLatentStep)
        self._insertFunctionStep(self.exportStep)
        self._insertFunctionStep(self.createOutputStep)

    def exportStep(self):
        if os.path.exists(self._getFileName("done")):   # models.csv is written last
            self.info("%s exists; not exported again" % self._getFileName("done"))
            return
        mode = self.exportMode.get()
        args = ["--latent", self._getFileName("latent"),
                "--model", os.path.abspath(self._runDir()),
                "-o", self._getFileName("models"), "--overwrite",
                "--format", FORMATS[self.fileFormat.get()]]
        if mode == EXPORT_PCS:
            args += ["--pcs", self.pcs.get().replace(" ", ""), "--steps", self.steps.get(),
                     "--low", self.lowPercentile.get(), "--high", self.highPercentile.get()]
        elif mode == EXPORT_KMEANS:
            args += ["--kmeans", self.numberOfClusters.get(), "--seed", self.seed.get()]
        elif mode == EXPORT_MAXIMA:
            args += ["--maxima"] + self._maximaArgs()
        else:
            for line in self._zLines():
                args += ["--z", ",".join(v.strip() for v in line.replace(";", ",").split(",")
                                         if v.strip())]
        if not self.refineGeometry.get():
            args.append("--no-refine")
        elif self.hydrogens.get():
            args.append("--hydrogens")
        self.runNmaem("export", args)

    def createOutputStep(self):
        """A SetOfAtomStructFlex: each model an AtomStructFlex with its z (zFlex), its PC
        coordinates (zRed) and the particles' FlexInfo with the run's reference and
        modes (the numbers come from models.json: nmaem export counts the particles)."""
        listing = self._readListing()
        out = createSetOfAtomStructFlex(self, "models")
        info = hubFlexInfo(self.inputParticles.get(), self._runDir())
        out.setFlexInfo(info)
        for k, m in enumerate(listing["models"]):
            a = modelStructFlex(os.path.join(self._getFileName("models"), m["file"]), m["z"],
                                m.get("pc_coords"), info)
            a.setObjId(k + 1)
            setattr(a, ATTR_N_PARTICLES, Integer(int(m.get("n_particles") or 0)))
            setattr(a, ATTR_KIND, String(m["kind"]))
            setattr(a, ATTR_RMSD_REF, Float(float(m["rmsd_to_reference"])))
            out.append(a)
        self._defineOutputs(**{NmaemExportOutputs.outputAtomStructs.name: out})
        self._defineSourceRelation(self.inputParticles, out)
        if self.inputNetwork.get() is not None:
            self._defineSourceRelation(self.inputNetwork, out)

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        parts = self.inputParticles.get()
        if parts is None:
            return ["Choose the particles with z."]
        if parts.getSize() == 0:
            return ["The input particle set is empty."]
        zErrors, d = self.validateParticlesWithZ(parts)
        errors += zErrors
        mode = self.exportMode.get()
        if mode == EXPORT_PCS:
            try:
                pcs = [int(v) for v in self.pcs.get().split(",") if v.strip()]
            except ValueError:
                pcs = None
            if not pcs or min(pcs) < 1 or (d and max(pcs) > d):
                errors.append("Principal components: comma-separated numbers between 1 and "
                              "%d (got '%s')." % (d, self.pcs.get()))
            if parts.getSize() < 2:
                errors.append("A principal component traversal needs at least 2 particles.")
        elif mode == EXPORT_KMEANS and self.numberOfClusters.get() > parts.getSize():
            errors.append("%d clusters for %d particles." % (self.numberOfClusters.get(),
                                                             parts.getSize()))
        elif mode == EXPORT_Z:
            lines = self._zLines()
            if not lines:
                errors.append("Type at least one line of amplitudes.")
            for line in lines:
                try:
                    vals = [float(v) for v in line.replace(";", ",").split(",") if v.strip()]
                except ValueError:
                    vals = None
                if vals is None or len(vals) != d:
                    errors.append("Amplitudes '%s': need %d numbers." % (line, d))
        return errors

    def _readListing(self):
        return self._readJsonResult("listing")

    def _summary(self):
        listing = self._readListing()
        if listing is None:
            return ["Models not exported yet."]
        lines = ["%d all-atom models (%s, %d atoms, d = %d) from %d particles."
                 % (len(listing["models"]), EXPORT_CHOICES[self.exportMode.get()],
                    listing["n_atoms"], listing["d"], listing["n_particles"] or 0)]
        if listing.get("pca"):
            ev = listing["pca"]["explained_variance_ratio"]
            lines.append("PCA explained variance: %s."
                         % ", ".join("PC%d %.1f%%" % (k + 1, 100 * v)
                                     for k, v in enumerate(ev[:4])))
        rmsd = [m["rmsd_to_reference"] for m in listing["models"]]
        if rmsd:
            lines.append("RMSD to the reference: %.2f to %.2f A." % (min(rmsd), max(rmsd)))
        val = [m["validation"] for m in listing["models"] if m.get("validation")]
        if val:
            lines.append("Refined geometry (worst model): bond rms deviation %.3f A, angle rms "
                         "%.1f deg, %d clashes < 2.2 A, %d Ramachandran outliers; refinement "
                         "moved atoms by at most %.2f A rms."
                         % (max(v["bond_rmsd"] for v in val),
                            max(v["angle_rmsd"] for v in val),
                            max(v["close_contacts"] for v in val),
                            max(v["ramachandran_outliers"] for v in val),
                            max(v.get("rmsd_to_plain") or 0.0 for v in val)))
        return lines

    def _methods(self):
        listing = self._readListing()
        if listing is None:
            return []
        return ["We wrote %d all-atom models X0 + U z at %s of the nmaem latent space "
                "[Nashed2022]." % (len(listing["models"]),
                                   EXPORT_CHOICES[self.exportMode.get()])]

    def _citations(self):
        return ["Nashed2022"]
