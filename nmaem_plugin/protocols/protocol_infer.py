# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Infer z and shifts with a trained nmaem network: ``nmaem infer`` -> SetOfParticlesFlex.

A protocol of its own rather than an option of training: the same network is applied to
other particle sets (all particles after training on a subset, a new dataset with the
same box and pixel size), and continuing a training does not redo inference."""
import os
from enum import Enum

import numpy as np
import pyworkflow.protocol.params as params
from pwem.objects import SetOfParticlesFlex

from ..constants import PROGRAM_NAME
from ..core.base.choices import (CHECKPOINTS, EM_FIT_ITERATIONS_DEFAULT,
                                 FIT_ITERATIONS_DEFAULT, POPULATIONS)
from ..core.io.runfolder import existing_checkpoint, has_noise_model, read_config_or_none
from .protocol_base import NmaemProtBase
from .protocol_flex_common import (ATTR_LATENT_FILE, ATTR_RUN_DIR, ATTR_STAR_FILE,
                                   createSetOfParticlesFlex, runDirOf)


WEIGHTS = ["last epoch", "lowest validation loss"]
WEIGHTS_ARG = CHECKPOINTS               # nmaem infer --checkpoint
POPULATION_CHOICES = ["estimated from the particles (EM)", "the encoder's"]
POPULATION_ARG = POPULATIONS            # nmaem infer --population


class NmaemInferOutputs(Enum):
    outputParticles = SetOfParticlesFlex


class NmaemProtInfer(NmaemProtBase):
    """Normal-mode amplitudes z and 2D shifts of every particle, from a trained nmaem
    network.

    The output is a Flexibility Hub SetOfParticlesFlex: each particle keeps its id,
    image, CTF and pose, carries z (Angstrom, one value per mode) as its zFlex, and its
    transform includes the refined shift (new origin = origin - predicted shift) and, for a
    network trained with pose refinement, the refined rotation.
    """
    _label = "infer"
    _possibleOutputs = NmaemInferOutputs

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputNetwork", params.PointerParam, pointerClass="FlexInfo",
                      label="Trained network", important=True,
                      help="The output of 'nmaem - train'.")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      label="Input particles", important=True,
                      help="Particles with 3D alignment and CTF, with the box and pixel "
                           "size of the particles the network was trained on (usually the "
                           "same set, or a larger set it was trained on a subset of).")
        form.addParam("batchSize", params.IntParam, default=256, validators=[params.Positive],
                      label="Batch size",
                      help="Images per batch on the GPU; lower it when memory runs out.")
        form.addParam("weights", params.EnumParam, choices=WEIGHTS, default=0,
                      display=params.EnumParam.DISPLAY_COMBO,
                      expertLevel=params.LEVEL_ADVANCED, label="Network weights",
                      help="last epoch: the weights at the end of training (the method's "
                           "choice). lowest validation loss: the epoch whose loss on the "
                           "held-out tenth of the particles was lowest "
                           "(RUN/checkpoints/best.pt). On noisy data the validation loss "
                           "can rise while the latent space still improves "
                           "(https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/training.md"
                           "), so 'last epoch' is the default.")
        form.addParam("fitIterations", params.IntParam, default=FIT_ITERATIONS_DEFAULT,
                      validators=[params.GE(0)], expertLevel=params.LEVEL_ADVANCED,
                      label="Per-particle fit iterations",
                      help="After the encoder, each particle's amplitudes and shift are "
                           "fitted to its own image in the training likelihood, starting "
                           "from the encoder's values, with the encoder's population of "
                           "particles as the prior (Gauss-Newton iterations; each renders "
                           "the model d + 3 times per particle). It brings the models closer "
                           "to the images than the encoder alone ("
                           "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/training.md, "
                           "'Per-particle fit'). 0: the encoder's output. Applies to "
                           "networks trained with the whitened likelihood (the default "
                           "loss).")
        form.addParam("population", params.EnumParam, choices=POPULATION_CHOICES, default=1,
                      display=params.EnumParam.DISPLAY_COMBO,
                      expertLevel=params.LEVEL_ADVANCED, label="Population of particles",
                      help="The prior of the per-particle fit. The encoder's (the "
                           "default): one Gaussian with the encoder's mean and covariance, "
                           "shrunk toward the mean where the encoder is. Estimated from the "
                           "particles: a mixture of Gaussians deconvolved from the "
                           "particles' posteriors (EM, the number of components chosen by "
                           "BIC), begun by a search over the lowest normal modes; each "
                           "particle gets its posterior covariance (uncertainty) and the "
                           "summary the shrinkage check. Measured better on held-out and "
                           "simulated particles, about 8x slower on a CPU, and unreliable "
                           "after a very short training (https://github.com/scipion-em/"
                           "scipion-em-nmaem/blob/main/docs/training.md, 'The "
                           "population').")
        form.addParam("fitEnvelope", params.BooleanParam, default=True,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Estimate the images' envelope?",
                      help="Yes: the fit renders the model with an envelope exp(-B s^2/4) "
                           "for the fall-off of the particles' signal with resolution "
                           "(radiation damage, motion, what the model cannot follow), B "
                           "estimated by maximum likelihood on 512 particles "
                           "(https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/training.md"
                           ", 'Per-particle fit'). No: sharp renderings.")
        form.addParam("fitPose", params.BooleanParam, default=False,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Refine the rotations in the fit?",
                      help="Yes: the per-particle fit also refines each particle's rotation "
                           "(a local refinement of a few degrees, with a prior whose spread "
                           "is measured on the particles). It reduces random errors of the "
                           "input poses ("
                           "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/training.md"
                           ", 'Pose in the fit'); after a "
                           "network trained with pose refinement on consensus-type errors "
                           "it was measured to make the angles worse. Needs the fit.")
        form.addParam("foldShifts", params.BooleanParam, default=True,
                      expertLevel=params.LEVEL_ADVANCED, label="Refine the shifts?",
                      help="Yes: the predicted shift of each particle is folded into its "
                           "transform (origin - shift). No: the transforms are copied as "
                           "they are.")
        form.addParam("foldPoses", params.BooleanParam, default=True,
                      expertLevel=params.LEVEL_ADVANCED, label="Refine the angles?",
                      help="For a network trained with pose refinement, or with the "
                           "rotations refined in the fit: Yes puts each particle's refined "
                           "rotation (its correction applied to the input pose) in its "
                           "transform, so the set goes to RELION with the better poses. No: "
                           "the rotations are copied as they are. Otherwise they are "
                           "unchanged.")
        form.addParam("numberOfWorkers", params.IntParam, default=0,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.GE(0)],
                      label="Image reading processes",
                      help="DataLoader worker processes that read the images.")
        self._defineGpuParams(form)

    def _createFilenameTemplates(self):
        self._updateFilenamesDict({
            "star": self._getExtraPath("input_particles.star"),
            "latent": self._getExtraPath("latent.npz"),
            "outStar": self._getExtraPath("particles_nmaem.star"),
        })

    def _insertAllSteps(self):
        self._createFilenameTemplates()
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.inferStep)
        self._insertFunctionStep(self.createOutputStep)

    def inferStep(self):
        latent = self._getFileName("latent")
        if os.path.exists(latent):      # written atomically by nmaem: complete
            self.info("%s exists; not inferred again" % latent)
            return
        args = ["--particles", os.path.abspath(self._getFileName("star")),
                "--model", os.path.abspath(runDirOf(self.inputNetwork.get())),
                "-o", latent, "--batch", self.batchSize.get(),
                "--star", self._getFileName("outStar"),
                "--num-workers", self.numberOfWorkers.get(),
                "--checkpoint", WEIGHTS_ARG[self.weights.get()],
                "--force"]       # this protocol's own outputs, from an interrupted run
        if self._fitApplies():
            args += ["--fit-iterations", self._fitIterationsRun()]
            if self.fitPose.get():
                args += ["--fit-pose"]
            args += ["--population", POPULATION_ARG[self.population.get()]]
            if not self.fitEnvelope.get():
                args += ["--fit-bfactor", 0]
        else:
            args += ["--fit-iterations", 0]
        self.runNmaem("infer", args + self._deviceArgs())

    def createOutputStep(self):
        from ..convert import setOfParticlesFlexFromLatent
        inSet = self.inputParticles.get()
        out = createSetOfParticlesFlex(self)
        n = setOfParticlesFlexFromLatent(
            inSet, self._getFileName("latent"), out, starFile=self._getFileName("star"),
            foldShift=self.foldShifts.get(), foldPose=self.foldPoses.get(),
            flexAttributes={ATTR_RUN_DIR: runDirOf(self.inputNetwork.get()),
                            ATTR_LATENT_FILE: self._getFileName("latent"),
                            ATTR_STAR_FILE: self._getFileName("star")})
        self.info("%d particles with z and refined shifts" % n)
        self._defineOutputs(**{NmaemInferOutputs.outputParticles.name: out})
        self._defineSourceRelation(self.inputParticles, out)
        self._defineSourceRelation(self.inputNetwork, out)

    def _fitIterationsRun(self):
        """The iterations the fit runs: the form's, except that the default with the
        estimated population is that population's default (its resolution stages need
        more)."""
        n = self.fitIterations.get()
        if POPULATION_ARG[self.population.get()] == "em" and n == FIT_ITERATIONS_DEFAULT:
            return EM_FIT_ITERATIONS_DEFAULT
        return n

    def _fitApplies(self):
        """The per-particle fit runs: iterations > 0 and a network trained with the
        whitened likelihood (the only one with a noise model)."""
        run = runDirOf(self.inputNetwork.get()) if self.inputNetwork.get() else None
        cfg = read_config_or_none(run) if run else None
        return bool(self.fitIterations.get()) and bool(cfg) and has_noise_model(cfg)

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        info = self.inputNetwork.get()
        parts = self.inputParticles.get()
        run = runDirOf(info) if info is not None else None
        cfg = read_config_or_none(run) if run else None
        if info is None:
            errors.append("Choose the trained network.")
        elif run is None:
            errors.append("The chosen network is not an nmaem training output.")
        elif cfg is None or existing_checkpoint(run) is None:
            errors.append("The network's run folder %s has no trained network "
                          "(config.json and checkpoints/last.pt)." % run)
        elif (self.fitIterations.get() not in (0, FIT_ITERATIONS_DEFAULT)
              and not self._fitApplies()):
            errors.append("The network was trained with the %s loss; the per-particle fit "
                          "needs the whitened likelihood. Set 'Per-particle fit "
                          "iterations' to 0." % cfg.get("loss"))
        elif self.fitPose.get() and not self._fitApplies():
            errors.append("'Refine the rotations in the fit' needs the per-particle fit: "
                          "iterations above 0 and a network trained with the whitened "
                          "likelihood.")
        elif existing_checkpoint(run, WEIGHTS_ARG[self.weights.get()]) is None:
            errors.append("The network's run folder %s has no checkpoints/best.pt (it was "
                          "trained by an nmaem version without it); choose the weights of "
                          "the last epoch." % run)
        if parts is None:
            errors.append("Choose the input particles.")
            return errors
        errors += self.validateParticles(parts)
        if parts.getSize() == 0:
            errors.append("The input particle set is empty.")
        if cfg is not None and parts.getSize():
            from .protocol_train import imageBox
            box = imageBox(parts)
            apix = parts.getSamplingRate()
            if box is not None and box != cfg["box0"]:
                errors.append("The particles are %d px but the network was trained on "
                              "%d px images." % (box, cfg["box0"]))
            if apix and abs(apix - cfg["apix0"]) > 1e-4 * cfg["apix0"]:
                errors.append("The particles are at %.4f A/px but the network was trained "
                              "at %.4f A/px." % (apix, cfg["apix0"]))
        return errors

    def _latentStats(self):
        self._createFilenameTemplates()
        fn = self._getFileName("latent")
        if not os.path.exists(fn):
            return None
        from ..core.io.latent import read_latent
        return read_latent(fn)

    def _summary(self):
        lat = self._latentStats()
        if lat is None:
            return ["Not inferred yet."]
        z, shift, pose = lat.z, lat.shift, lat.pose_correction
        lines = ["%d particles, %d normal-mode amplitudes each (program %s)."
                 % (len(z), z.shape[1], PROGRAM_NAME)]
        if z.shape[1]:
            lines.append("|z| median %.3g A; z std per mode: %s A."
                         % (float(np.median(np.linalg.norm(z, axis=1))),
                            ", ".join("%.3g" % v for v in z.std(0))))
        lines.append("Predicted shift: median %.3g A."
                     % float(np.median(np.linalg.norm(shift, axis=1))))
        if pose is not None:
            lines.append("Pose correction: median %.3g degrees."
                         % float(np.degrees(np.median(np.linalg.norm(pose, axis=1)))))
        lines.extend(uncertaintyLines(lat, self._nAtoms()))
        return lines

    def _nAtoms(self):
        """M, the atoms of the network's modes (for RMSD units), or None."""
        from ..core.analysis.labels import modes_atom_count
        from ..core.io.runfolder import reference_and_modes
        try:
            modes = reference_and_modes(runDirOf(self.inputNetwork.get()))[1]
            return modes_atom_count(modes) if modes and os.path.isfile(modes) else None
        except Exception:       # a summary never fails on a broken run folder
            return None

    def _methods(self):
        stats = self._latentStats()
        if stats is None:
            return []
        text = ("The trained nmaem encoder [Nashed2022] gave the amplitudes of %d normal "
                "modes and a refined 2D shift for each of %d particles."
                % (stats.z.shape[1], stats.n))
        if self._fitApplies():
            text += (" Each particle's amplitudes and shift were then fitted to its image "
                     "(%d Gauss-Newton iterations in the training likelihood, with %s "
                     "as the prior%s)." % (
                         self._fitIterationsRun(),
                         "the encoder's population" if self.population.get() else
                         "a population of particles estimated by deconvolution (EM)",
                         ", and an envelope B-factor estimated by maximum likelihood"
                         if self.fitEnvelope.get() else ""))
            if self.fitPose.get():
                text += (" The fit also refined each particle's rotation, with a Gaussian "
                         "prior whose spread was measured on the particles.")
        return [text]

    def _citations(self):
        return ["Nashed2022", "Paszke2019"]


def uncertaintyLines(lat, nAtoms=None):
    """The summary lines of a latent's population estimate: the posterior sd of the
    particles (``z_cov``; also as RMSD over the ``nAtoms`` atoms of the modes when known),
    the population's components and the shrinkage check's verdict; for a latent written
    without them, a line that says so."""
    lines = []
    if lat.z_cov is None:
        lines.append("No per-particle uncertainty (z_cov) in this latent: it was made "
                     "without the population estimate (Population: em).")
    else:
        sd = lat.z_sd()
        med, p95 = float(np.median(sd)), float(np.percentile(sd, 95))
        line = ("Posterior sd of z: median %.3g A of amplitude (95th percentile %.3g A)"
                % (med, p95))
        if nAtoms:
            line += (", %.2f A RMSD (%.2f) over the model's %d atoms"
                     % (med / np.sqrt(nAtoms), p95 / np.sqrt(nAtoms), nAtoms))
        lines.append(line + ".")
    if lat.population is not None:
        k = len(np.atleast_1d(lat.population.get("weights", [1])))
        lines.append("Population estimated by deconvolution: %d Gaussian component(s)." % k)
    if lat.shrinkage is not None:
        lines.append(lat.shrinkage.verdict()[0].upper() + lat.shrinkage.verdict()[1:] + ".")
    return lines
