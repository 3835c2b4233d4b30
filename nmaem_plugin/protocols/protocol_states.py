# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""States of the latent landscape as classes: ``nmaem states`` (which particles) and
``nmaem export --z`` (each state's model) -> a SetOfClassesStructFlex, the models as a
SetOfAtomStructFlex and one plain SetOfParticles per state; with "Reconstruct" (on when
RELION is found) ``nmaem states --reconstruct`` gives each state's RELION map and its
model, validated: a SetOfVolumes with half-maps and a SetOfFSCs; optionally ``nmaem
refine-states`` (each state's all-atom model refined against its own particles) -> a
SetOfAtomStructs of the refined models."""
import os
from enum import Enum

import pyworkflow.protocol.params as params
from pyworkflow.object import Boolean, Float, Integer, String
from pwem.objects import (FSC, AtomStruct, ClassStructFlex, Particle, SetOfAtomStructs,
                          SetOfAtomStructFlex, SetOfClassesStructFlex, SetOfFSCs,
                          SetOfVolumes, Volume)

from ..constants import PROGRAM_NAME
from ..core.base.relion import INSTALL_HINT, find_relion
from .protocol_base import NmaemProtBase
from .protocol_flex_common import (ATTR_N_PARTICLES, ATTR_STATE, createSetOfAtomStructFlex,
                                   hubFlexInfo, modelStructFlex)

STATES_MAXIMA, STATES_KMEANS, STATES_RANGES = range(3)
STATES_CHOICES = ["density maxima (PC1) and their basins", "k-means clusters",
                  "ranges of PC coordinates"]


class NmaemStatesOutputs(Enum):
    outputClasses = SetOfClassesStructFlex
    outputStructures = SetOfAtomStructFlex
    outputVolumes = SetOfVolumes
    outputFSCs = SetOfFSCs
    outputRefinedStructures = SetOfAtomStructs


def stateParticlesName(k):
    """Name of the output SetOfParticles of state ``k`` (1-based)."""
    return "outputParticlesState%02d" % k


class NmaemProtStates(NmaemProtBase):
    """States of the conformational landscape, each a class of particles you can refine.

    The particles' z are cut into states (the basins of the density maxima along PC1,
    k-means clusters, or boxes of PC coordinates you give). Outputs: a
    SetOfClassesStructFlex (Flexibility Hub) whose classes hold the particles of each
    state with the state's all-atom model (an AtomStructFlex carrying its z) as the
    representative; the models as a SetOfAtomStructFlex; and the particles of each state
    as a plain SetOfParticles for RELION, cryoSPARC or any subset/reconstruct protocol.

    With "Reconstruct" (on by default when RELION is installed: RELION_HOME or PATH), each
    state's particles are reconstructed by relion_reconstruct (CTF-corrected, their
    refined poses and origins) on two halves and on all of them, without the model: a
    SetOfVolumes (each map with its half-maps, for postprocessing, local resolution or
    model building) and a SetOfFSCs (per state: half maps, and map against the state's
    model). The viewer shows the maps' sections with the model's contour and the curves.

    Optionally each state's model is then refined against the state's own particles
    (every atom, beyond the normal modes; stopped by a held-out half of the particles):
    the refined models as a SetOfAtomStructs.
    """
    _label = "states"
    _possibleOutputs = NmaemStatesOutputs

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticlesFlex",
                      label="Particles with z", important=True,
                      help="The output of 'nmaem - infer' (or a subset of it).")
        form.addParam("inputNetwork", params.PointerParam, pointerClass="FlexInfo",
                      allowsNull=True, label="Trained network (optional)",
                      help="The training whose reference and modes give each state's model. "
                           "Empty: the network recorded with the particles.")
        form.addParam("statesMode", params.EnumParam, choices=STATES_CHOICES,
                      default=STATES_MAXIMA, label="States from",
                      help="'density maxima': one state per peak of the particles' density "
                           "along PC1, holding every particle of its basin (the basins split "
                           "PC1 at the lowest density between peaks). 'k-means': K clusters "
                           "of z. 'ranges': one state per line of PC intervals you type.")
        form.addParam("numberOfClusters", params.IntParam, default=3,
                      condition="statesMode == %d" % STATES_KMEANS,
                      validators=[params.Positive], label="Number of states (K)",
                      help="k-means on the particles' z (k-means++, 10 restarts).")
        form.addParam("seed", params.IntParam, default=0,
                      condition="statesMode == %d" % STATES_KMEANS,
                      expertLevel=params.LEVEL_ADVANCED, label="Random seed",
                      help="Seed of the k-means initialisation.")
        self._defineMaximaParams(form, condition="statesMode == %d" % STATES_MAXIMA)
        form.addParam("ranges", params.TextParam, default="",
                      condition="statesMode == %d" % STATES_RANGES, label="PC ranges (A)",
                      help="One state per line: PC:LOW:HIGH intervals separated by commas, "
                           "e.g. '1:-5:5' or '1:-5:5, 2:0:3' (PC coordinates in Angstrom "
                           "from the reference, z = 0; the latent viewer shows their "
                           "range). A particle goes to the first state whose intervals "
                           "all hold it, to none otherwise.")
        form.addParam("doReconstruct", params.BooleanParam,
                      default=find_relion() is not None, label="Reconstruct each state?",
                      help="Each state's map from its own particles with RELION "
                           "(relion_reconstruct, CTF-corrected, the particles' poses and "
                           "origins), on two random halves and on all of them, without the "
                           "model; then the half-map FSC (0.143) and the FSC of the map "
                           "with the state's model (0.5), and a table of every state's map "
                           "against every state's model. Needs RELION: %s." % INSTALL_HINT)
        form.addParam("refineGeometry", params.BooleanParam, default=True,
                      label="Refine the models' geometry?",
                      help="Restrained energy minimisation of each state's model with OpenMM, "
                           "as in 'export models'. No: the plain X0 + U z models.")
        form.addParam("refineStates", params.BooleanParam, default=False,
                      label="Refine the models against the particles?",
                      help="Refine each state's all-atom model (from its exported model) "
                           "against the state's particles, every atom, with geometry "
                           "restraints and OpenMM (nmaem refine-states). Half of each "
                           "state's particles refine, the other half decides when to stop; "
                           "a state whose held-out half does not prefer the refined model "
                           "keeps its start model. Output: the refined models "
                           "(outputRefinedStructures). Needs the particles' images.")
        form.addParam("refineBox", params.IntParam, default=0,
                      condition="refineStates", expertLevel=params.LEVEL_ADVANCED,
                      label="Refinement box (px)",
                      help="The images are Fourier-cropped to this box for the refinement "
                           "(even; 0: the training box). Larger boxes use finer detail and "
                           "cost more (the time grows about as the box squared).")
        form.addParam("refineRounds", params.IntParam, default=3,
                      condition="refineStates", expertLevel=params.LEVEL_ADVANCED,
                      validators=[params.Positive], label="Refinement rounds (at most)",
                      help="Each round: L-BFGS on the refinement half, stopped by the "
                           "held-out half, then OpenMM; the next round starts only when "
                           "the held-out half preferred the last one's model.")

    def _createFilenameTemplates(self):
        self._updateFilenamesDict({
            "latent": self._getExtraPath("latent.npz"),
            "ids": self._getExtraPath("latent_ids.npy"),
            "states": self._getExtraPath("states"),
            "statesFile": self._getExtraPath("states", "states.npz"),
            "statesJson": self._getExtraPath("states", "states.json"),
            "models": self._getExtraPath("models"),
            "listing": self._getExtraPath("models", "models.json"),
            "star": self._getExtraPath("input_particles.star"),
            "refined": self._getExtraPath("refined"),
            "refineJson": self._getExtraPath("refined", "refine.json"),
        })

    def _rangeLines(self):
        return self._textLines(self.ranges)

    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._createFilenameTemplates()
        self._insertFunctionStep(self.writeLatentStep)
        if self.doReconstruct.get() or self.refineStates.get():
            self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.statesStep)
        if not self.doReconstruct.get():    # with maps, the states' own models are used
            self._insertFunctionStep(self.modelsStep)
        if self.refineStates.get():
            self._insertFunctionStep(self.refineStep)
        self._insertFunctionStep(self.createOutputStep)

    def statesStep(self):
        args = ["--latent", self._getFileName("latent"), "-o", self._getFileName("states"),
                "--model", os.path.abspath(self._runDir()), "--force"]
        mode = self.statesMode.get()
        if mode == STATES_MAXIMA:
            args += ["--maxima"] + self._maximaArgs()
        elif mode == STATES_KMEANS:
            args += ["--kmeans", self.numberOfClusters.get(), "--seed", self.seed.get()]
        else:
            for line in self._rangeLines():
                args += ["--range", line.replace(" ", "")]
        if self.doReconstruct.get():
            args += ["--particles", self._getFileName("star"), "--reconstruct"]
            if not self.refineGeometry.get():
                args.append("--no-refine")
        self.runNmaem("states", args)

    def modelsStep(self):
        """One model per state at its representative z (``nmaem export --z``)."""
        from ..core.analysis.states import read_states
        _, _, z, _ = read_states(self._getFileName("statesFile"))
        args = ["--latent", self._getFileName("latent"),
                "--model", os.path.abspath(self._runDir()),
                "-o", self._getFileName("models"), "--overwrite"]
        for zk in z:
            args += ["--z", ",".join("%.9g" % v for v in zk)]
        if not self.refineGeometry.get():
            args.append("--no-refine")
        self.runNmaem("export", args)

    def refineStep(self):
        """Each state's model refined against its particles (``nmaem refine-states``)."""
        args = ["--states", self._getFileName("states"),
                "--model", os.path.abspath(self._runDir()),
                "--particles", self._getFileName("star"),
                "--latent", self._getFileName("latent"),
                "-o", self._getFileName("refined"), "--force"]
        if self.refineBox.get():
            args += ["--box", self.refineBox.get()]
        args += ["--rounds", self.refineRounds.get()]
        self.runNmaem("refine-states", args)

    def _refinedOutput(self):
        """The refined models as a SetOfAtomStructs (state number, whether refined, the
        held-out gain and the RMSD to the start on each)."""
        listing = self._readJsonResult("refineJson")
        out = self._createSetOfPDBs(suffix="refined")
        for row in listing["states"]:
            a = AtomStruct(filename=os.path.join(self._getFileName("refined"), row["name"],
                                                 "refined.pdb"))
            a.setObjId(row["state"])
            setattr(a, ATTR_STATE, Integer(row["state"]))
            setattr(a, "_nmaem_refined", Boolean(bool(row.get("refined"))))
            setattr(a, "_nmaem_refineStatus", String(row.get("status", "")))
            setattr(a, "_nmaem_heldoutGain", Float(float(row.get("heldout_gain") or 0.0)))
            setattr(a, "_nmaem_rmsdToStart", Float(float(row["rmsd_to_start"])))
            out.append(a)
        return out

    def createOutputStep(self):
        import numpy as np
        from ..convert import copySetInfo
        from ..core.analysis.states import read_states, read_states_json
        label, _, z, count = read_states(self._getFileName("statesFile"))
        listing = read_states_json(self._getFileName("statesJson"))
        modelFiles = self._modelFiles(listing)
        ids = np.load(self._getFileName("ids"))
        parts = self.inputParticles.get()
        info = hubFlexInfo(parts, self._runDir())

        structs = createSetOfAtomStructFlex(self, "states")
        structs.setFlexInfo(info)
        reps = []
        for k, (row, fn) in enumerate(zip(listing["states"], modelFiles)):
            a = modelStructFlex(fn, row["z"], row.get("pc_coords"), info)
            a.setObjId(k + 1)
            setattr(a, ATTR_N_PARTICLES, Integer(int(count[k])))
            setattr(a, ATTR_STATE, Integer(k + 1))
            structs.append(a)
            reps.append(a)

        classes = self._createSetOfClassesStructFlex(self.inputParticles, progName=PROGRAM_NAME)
        stateOf = {int(i): int(s) for i, s in zip(ids, label)}
        plains = []
        for k in range(len(z)):     # one class at a time, as SetOfClasses expects
            cls = ClassStructFlex(progName=PROGRAM_NAME)
            copySetInfo(cls, parts)
            cls.setObjId(k + 1)
            row = listing["states"][k]
            cls.setRepresentative(modelStructFlex(reps[k].getFileName(), row["z"],
                                                  row.get("pc_coords"), info))
            classes.append(cls)
            enabled = classes[k + 1]
            enabled.enableAppend()
            plain = self._createSetOfParticles(suffix="State%02d" % (k + 1))
            plain.copyInfo(parts)
            for p in parts.iterItems(orderBy="id"):
                if stateOf.get(int(p.getObjId()), -1) != k:
                    continue
                item = p.clone()
                setattr(item, ATTR_STATE, Integer(k + 1))
                enabled.append(item)
                q = Particle()
                q.copy(p, copyId=True)
                plain.append(q)
            classes.update(enabled)
            plains.append(plain)
        classes.write()
        outputs = {NmaemStatesOutputs.outputClasses.name: classes,
                   NmaemStatesOutputs.outputStructures.name: structs}
        for k, plain in enumerate(plains):
            outputs[stateParticlesName(k + 1)] = plain
        if self.doReconstruct.get():
            outputs.update(self._mapOutputs(listing, parts.getSamplingRate()))
        if self.refineStates.get():
            outputs[NmaemStatesOutputs.outputRefinedStructures.name] = self._refinedOutput()
        self._defineOutputs(**outputs)
        for out in outputs.values():
            self._defineSourceRelation(self.inputParticles, out)

    def _modelFiles(self, listing):
        """Each state's model file: the states' own (refined) models with maps, else the
        models of 'nmaem export --z'."""
        if self.doReconstruct.get():
            return [os.path.join(self._getFileName("states"), row["model"]) for row in
                    listing["states"]]
        models = self._readJsonResult("listing")["models"]
        return [os.path.join(self._getFileName("models"), m["file"]) for m in models]

    def _mapOutputs(self, listing, apix):
        """The SetOfVolumes (maps with their half-maps; the id is the state's number) and
        the SetOfFSCs (per state with a map: half maps, and map against model)."""
        from ..core.analysis.statemaps import read_fsc_json
        folder = self._getFileName("states")
        vols = self._createSetOfVolumes()
        vols.setSamplingRate(apix)
        fscs = self._createSetOfFSCs()
        for row in listing["states"]:
            if not row.get("map"):
                continue
            vol = Volume(location=os.path.join(folder, row["map"]))
            vol.setSamplingRate(apix)
            vol.setHalfMaps([os.path.join(folder, row["half1"]),
                             os.path.join(folder, row["half2"])])
            vol.setObjId(row["state"])
            vol.setObjLabel(row["name"])
            setattr(vol, ATTR_STATE, Integer(row["state"]))
            vols.append(vol)
            info = read_fsc_json(os.path.join(folder, row["fsc"]))
            for key, what in (("half_map_fsc", "half maps"), ("model_map_fsc", "map vs model")):
                curve = info[key]
                fsc = FSC(objLabel="%s: %s" % (row["name"], what))
                fsc.setData(curve["frequency"], curve["fsc"])
                fscs.append(fsc)
        vols.write()
        fscs.write()
        return {NmaemStatesOutputs.outputVolumes.name: vols,
                NmaemStatesOutputs.outputFSCs.name: fscs}

    def _createSetOfClassesStructFlex(self, particlesPointer, progName=PROGRAM_NAME):
        import pyworkflow.utils as pwutils
        fn = self._getPath("classes_struct_flex.sqlite")
        pwutils.cleanPath(fn)
        classes = SetOfClassesStructFlex(filename=fn)
        classes.setImages(particlesPointer)
        return classes

    # ------------------------------------------------------------------ info
    def _validate(self):
        parts = self.inputParticles.get()
        if parts is None:
            return ["Choose the particles with z."]
        if parts.getSize() < 2:
            return ["States need at least 2 particles."]
        errors, d = self.validateParticlesWithZ(parts)
        if self.doReconstruct.get():
            if find_relion() is None:
                errors.append("Reconstructing the states needs RELION (relion_reconstruct): "
                              "%s; or answer No to 'Reconstruct each state?'." % INSTALL_HINT)
        if self.doReconstruct.get() or self.refineStates.get():
            errors += self.validateParticles(parts, "The particles")
        mode = self.statesMode.get()
        if mode == STATES_KMEANS and self.numberOfClusters.get() > parts.getSize():
            errors.append("%d states for %d particles." % (self.numberOfClusters.get(),
                                                           parts.getSize()))
        elif mode == STATES_RANGES:
            from ..core.base.errors import NmaemError
            from ..core.analysis.states import parse_range
            lines = self._rangeLines()
            if not lines:
                errors.append("Type at least one line of PC ranges.")
            for line in lines:
                try:
                    box = parse_range(line)
                except NmaemError as exc:
                    errors.append(str(exc).replace("--range", "PC ranges"))
                    continue
                if d and max(c for c, _, _ in box) > d:
                    errors.append("PC ranges '%s': the particles have %d PCs." % (line, d))
        return errors

    def _summary(self):
        listing = self._readJsonResult("statesJson")
        if listing is None:
            return ["States not assigned yet."]
        n = len(listing["states"])
        lines = ["%d state%s (%s) of %d particles, %d assigned."
                 % (n, "" if n == 1 else "s", STATES_CHOICES[self.statesMode.get()],
                    listing["n_particles"], listing["n_assigned"])]
        for row in listing["states"]:
            rmsd = row.get("rmsd_to_reference")
            lines.append("State %d: %d particles%s%s." % (
                row["state"], row["n_particles"],
                "" if rmsd is None else ", model %.2f A RMSD from the reference" % rmsd,
                "" if row.get("resolution_0143") is None else
                "; map %.1f A (half maps, FSC 0.143), model vs map %.1f A (FSC 0.5)"
                % (row["resolution_0143"], row["model_map_resolution_05"])))
        corr = listing.get("map_model_correlation")
        if corr:
            own = sum(corr["diagonal_is_row_maximum"])
            lines.append("%d of %d maps correlate best with their own state's model (maps "
                         "and models low-passed to %.1f A)." % (own, len(corr["maps"]),
                                                                 corr["resolution"]))
        refined = self._readJsonResult("refineJson") if self.refineStates.get() else None
        for row in (refined or {}).get("states", []):
            lines.append("State %d refined against %d particles: %s (held-out gain %.1f, "
                         "%.2f A from the start model)."
                         % (row["state"], row["n_particles"], row["status"],
                            row.get("heldout_gain") or 0.0, row["rmsd_to_start"]))
        return lines

    def _methods(self):
        listing = self._readJsonResult("statesJson")
        if listing is None:
            return []
        return ["We divided the particles into %d states (%s) of the nmaem latent space "
                "[Nashed2022]." % (len(listing["states"]),
                                   STATES_CHOICES[self.statesMode.get()])]

    def _citations(self):
        return ["Nashed2022"]

