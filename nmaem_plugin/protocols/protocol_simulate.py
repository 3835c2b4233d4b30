# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Simulate particles: ``nmaem simulate`` -> SetOfParticles with ground truth."""
import json
import os
from enum import Enum

import pyworkflow.protocol.params as params
from pwem.objects import AtomStruct, SetOfAtomStructs, SetOfParticles

from ..core.base.choices import DISTRIBUTIONS
from ..constants import ATTR_FRAME, SIM_LIKE, SIM_MORPH, SIM_SOURCES, SIM_TRAJECTORY
from .protocol_base import NmaemProtBase


class NmaemSimulateOutputs(Enum):
    outputParticles = SetOfParticles
    outputFrames = SetOfAtomStructs
    outputReference = AtomStruct


class NmaemProtSimulate(NmaemProtBase):
    """Synthetic particle images of a moving molecule, with known ground truth.

    The frames of the motion come from a morph between two models, from a multi-model
    trajectory, or (to make a synthetic twin of a real dataset) from one model rendered
    with the poses, origins and CTFs of existing particles. Each particle is a frame
    drawn from a distribution, projected with its pose (Coulomb potential of the atoms,
    band-limited), modulated by its CTF, shifted, with white noise at a chosen SNR.
    Every output particle carries the frame it was made from (attribute _nmaem_frame).
    """
    _label = "simulate particles"
    _possibleOutputs = NmaemSimulateOutputs

    # ------------------------------------------------------------------ form
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputSource", params.EnumParam, choices=SIM_SOURCES, default=SIM_MORPH,
                      label="Frames from", important=True,
                      help="'morph': frames interpolated linearly between a reference and "
                           "a target model (atoms matched, target superposed on the "
                           "reference). 'trajectory': the models of one multi-model file. "
                           "'existing particles': the reference model rendered with the "
                           "poses, origins and CTFs of a particle set (its synthetic twin).")
        form.addParam("referenceStructure", params.PointerParam, pointerClass="AtomStruct",
                      condition="inputSource != %d" % SIM_TRAJECTORY,
                      label="Reference model",
                      help="Frame 0 of the morph, or the model rendered with the poses of "
                           "existing particles (it must then be docked in their "
                           "consensus map).")
        form.addParam("targetStructure", params.PointerParam, pointerClass="AtomStruct",
                      condition="inputSource == %d" % SIM_MORPH,
                      label="Target model",
                      help="Last frame of the morph: the same molecule in another "
                           "conformation (atoms are matched by chain, residue and name).")
        form.addParam("numberOfFrames", params.IntParam, default=50,
                      condition="inputSource == %d" % SIM_MORPH,
                      validators=[params.Range(2, 10000, "between 2 and 10000")],
                      label="Frames of the morph",
                      help="Number of conformations from reference to target.")
        form.addParam("trajectoryStructure", params.PointerParam, pointerClass="AtomStruct",
                      condition="inputSource == %d" % SIM_TRAJECTORY,
                      label="Trajectory (multi-model)",
                      help="A multi-model PDB/mmCIF file; each model is a frame (same "
                           "atoms in every model).")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      condition="inputSource == %d" % SIM_LIKE,
                      label="Particles to imitate",
                      help="Particles with 3D alignment and CTF: their poses, origins, "
                           "CTFs, box and pixel size are used, and the output particles "
                           "keep their ids.")

        form.addSection(label="Dataset")
        form.addParam("numberOfParticles", params.IntParam, default=10000,
                      validators=[params.Positive],
                      label="Number of particles",
                      help="How many images to make. With existing particles, at most "
                           "their number (the first ones, by id).")
        form.addParam("distribution", params.EnumParam, choices=DISTRIBUTIONS, default=0,
                      label="Distribution over frames",
                      help="'uniform': every frame equally likely. 'continuous': three "
                           "overlapping Gaussian populations. 'discontinuous': three "
                           "separated populations with empty frames between them.")
        form.addParam("boxSize", params.IntParam, default=128,
                      condition="inputSource != %d" % SIM_LIKE,
                      validators=[params.Range(8, 4096, "between 8 and 4096")],
                      label="Box size (px)",
                      help="Image size in pixels (even). The molecule is centred in the "
                           "box.")
        form.addParam("samplingRate", params.FloatParam, default=1.0,
                      condition="inputSource != %d" % SIM_LIKE,
                      validators=[params.Positive],
                      label="Pixel size (A/px)",
                      help="Sampling rate of the images in Angstrom per pixel.")
        form.addParam("addNoise", params.BooleanParam, default=True,
                      label="Add noise?",
                      help="White Gaussian noise at the SNR below; 'No' gives clean "
                           "(CTF-modulated) images.")
        form.addParam("snrDb", params.FloatParam, default=-20.0, condition="addNoise",
                      label="SNR (dB)",
                      help="10 log10(variance of the clean CTF-modulated images / "
                           "variance of the noise). -20 dB is typical of real particles.")
        form.addParam("shiftStd", params.FloatParam, default=0.0,
                      condition="inputSource != %d" % SIM_LIKE,
                      validators=[params.GE(0)],
                      label="Shift standard deviation (A)",
                      help="Random 2D shifts of the particles (Gaussian, Angstrom). "
                           "They are written as the particles' origins unless the next "
                           "option hides them.")
        form.addParam("unknownShifts", params.BooleanParam, default=False,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Hide the shifts?",
                      help="Write zero origins: the shifts are then only in the ground "
                           "truth, for the encoder to find.")
        form.addParam("seed", params.IntParam, default=0,
                      label="Random seed",
                      help="The same parameters and seed give identical images.")

        form.addSection(label="Optics")
        form.addParam("defocusMean", params.FloatParam, default=1.0,
                      condition="inputSource != %d" % SIM_LIKE,
                      validators=[params.Positive],
                      label="Defocus mean (um)",
                      help="Mean of the log-normal defocus distribution, micrometres.")
        form.addParam("defocusStd", params.FloatParam, default=0.3,
                      condition="inputSource != %d" % SIM_LIKE,
                      validators=[params.GE(0)],
                      label="Defocus standard deviation (um)",
                      help="Standard deviation of the log-normal defocus, micrometres.")
        form.addParam("voltage", params.FloatParam, default=300.0,
                      condition="inputSource != %d" % SIM_LIKE,
                      validators=[params.Positive],
                      label="Voltage (kV)", help="Acceleration voltage.")
        form.addParam("sphericalAberration", params.FloatParam, default=2.7,
                      condition="inputSource != %d" % SIM_LIKE,
                      validators=[params.GE(0)],
                      label="Spherical aberration (mm)", help="Cs of the objective lens.")
        form.addParam("amplitudeContrast", params.FloatParam, default=0.1,
                      condition="inputSource != %d" % SIM_LIKE,
                      validators=[params.Range(0, 1, "between 0 and 1")],
                      label="Amplitude contrast",
                      help="Fraction of amplitude contrast (0.07-0.1 for vitreous ice).")
        self._defineGpuParams(form)

    # ------------------------------------------------------------------ files
    def _createFilenameTemplates(self):
        self._updateFilenamesDict({
            "like": self._getExtraPath("input_particles.star"),
            "likeStacks": self._getExtraPath("input_stacks"),
            "dataset": self._getExtraPath("dataset"),
            "star": self._getExtraPath("dataset", "particles.star"),
            "truth": self._getExtraPath("dataset", "ground_truth.npz"),
            "framesPdb": self._getExtraPath("dataset", "frames.pdb"),
            "reference": self._getExtraPath("dataset", "reference.pdb"),
            "frames": self._getExtraPath("frames"),
        })

    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._createFilenameTemplates()
        if self.inputSource.get() == SIM_LIKE:
            self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.simulateStep)
        self._insertFunctionStep(self.createOutputStep)

    def convertInputStep(self):
        from ..convert import writeSetOfParticles
        star = self._getFileName("like")
        n = writeSetOfParticles(self.inputParticles.get(), star,
                                stackDir=self._getFileName("likeStacks"))
        self.info("wrote %d particles to %s" % (n, star))

    def simulateStep(self):
        if os.path.exists(self._getFileName("star")):   # written last: the dataset is complete
            self.info("%s exists; not simulated again" % self._getFileName("star"))
            return
        src = self.inputSource.get()
        args = ["-o", self._getFileName("dataset"), "--overwrite",
                "--n", self.numberOfParticles.get(),
                "--distribution", DISTRIBUTIONS[self.distribution.get()],
                "--seed", self.seed.get()]
        if src == SIM_TRAJECTORY:
            args += ["--trajectory", self._path(self.trajectoryStructure)]
        else:
            args += ["--ref", self._path(self.referenceStructure)]
        if src == SIM_MORPH:
            args += ["--target", self._path(self.targetStructure),
                     "--frames", self.numberOfFrames.get()]
        if src == SIM_LIKE:
            args += ["--like", self._getFileName("like")]
        else:
            args += ["--box", self.boxSize.get(), "--apix", self.samplingRate.get(),
                     "--defocus-mean", self.defocusMean.get(),
                     "--defocus-std", self.defocusStd.get(),
                     "--shift-std", self.shiftStd.get(),
                     "--voltage", self.voltage.get(), "--cs", self.sphericalAberration.get(),
                     "--amp-contrast", self.amplitudeContrast.get()]
        if self.unknownShifts.get():
            args += ["--unknown-shifts"]
        if self.addNoise.get():
            args += ["--snr-db", self.snrDb.get()]
        else:
            args += ["--no-noise"]
        self.runNmaem("simulate", args + self._deviceArgs())

    @staticmethod
    def _path(pointer):
        return os.path.abspath(pointer.get().getFileName())

    def createOutputStep(self):
        import numpy as np
        from ..convert import readSetOfParticles
        with np.load(self._getFileName("truth"), allow_pickle=False) as f:
            frame = np.asarray(f["frame"], dtype=np.int64)
        parts = self._createSetOfParticles()
        readSetOfParticles(self._getFileName("star"), parts,
                           extraAttributes={ATTR_FRAME: frame})
        if self.inputSource.get() == SIM_LIKE:
            parts.setAcquisition(self.inputParticles.get().getAcquisition().clone())

        os.makedirs(self._getFileName("frames"), exist_ok=True)
        files = self.splitModels(self._getFileName("framesPdb"),
                                 os.path.join(self._getFileName("frames"), "frame_%05d.pdb"))
        frames = self._createSetOfPDBs(suffix="frames")
        for k, fn in enumerate(files):
            a = AtomStruct(filename=os.path.relpath(fn))
            a.setObjId(k + 1)
            frames.append(a)
        reference = AtomStruct(filename=os.path.relpath(self._getFileName("reference")))

        outputs = NmaemSimulateOutputs
        self._defineOutputs(**{outputs.outputParticles.name: parts,
                               outputs.outputFrames.name: frames,
                               outputs.outputReference.name: reference})
        for src in self._sources():
            for out in (parts, frames, reference):
                self._defineSourceRelation(src, out)

    def _sources(self):
        s = self.inputSource.get()
        if s == SIM_MORPH:
            return [self.referenceStructure, self.targetStructure]
        if s == SIM_TRAJECTORY:
            return [self.trajectoryStructure]
        return [self.referenceStructure, self.inputParticles]

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        s = self.inputSource.get()
        needed = {SIM_MORPH: ["referenceStructure", "targetStructure"],
                  SIM_TRAJECTORY: ["trajectoryStructure"],
                  SIM_LIKE: ["referenceStructure", "inputParticles"]}[s]
        for name in needed:
            obj = getattr(self, name).get()
            if obj is None:
                errors.append("Choose the %s." % self.getParam(name).label.get().lower())
            elif isinstance(obj, AtomStruct):
                errors += self.validateStructure(obj, "The model")
        if s == SIM_LIKE and self.inputParticles.get() is not None:
            errors += self.validateParticles(self.inputParticles.get())
        if s != SIM_LIKE and self.boxSize.get() % 2:
            errors.append("The box size must be even.")
        return errors

    def _readParams(self):
        self._createFilenameTemplates()
        fn = self._getFileName("truth")
        if not os.path.exists(fn):
            return None
        import numpy as np
        with np.load(fn, allow_pickle=False) as f:
            return json.loads(str(f["params"])) if "params" in f.files else None

    def _summary(self):
        p = self._readParams()
        if p is None:
            return ["Particles not simulated yet."]
        snr = ("no noise" if p.get("snr_db") is None
               else "SNR %.1f dB (measured %.2f dB)" % (p["snr_db"], p["measured_snr_db"]))
        return ["%d particles of %d px at %.3f A/px from %d frame(s), %s distribution, %s."
                % (p["n"], p["box"], p["apix"], p["frames"], p["distribution"], snr)]

    def _methods(self):
        p = self._readParams()
        if p is None:
            return []
        src = SIM_SOURCES[self.inputSource.get()]
        return ["We simulated %d particle images (%d px, %.3f A/px) from %d conformations "
                "(%s) with nmaem [Nashed2022]: projected Coulomb potential of the atoms "
                "(electron form factors read with GEMMI [Wojdyr2022]), RELION CTF and %s."
                % (p["n"], p["box"], p["apix"], p["frames"], src,
                   "no noise" if p.get("snr_db") is None
                   else "white noise at %.1f dB SNR" % p["snr_db"])]

    def _citations(self):
        return ["Nashed2022", "Wojdyr2022"]
