# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Train the nmaem autoencoder: ``nmaem train`` -> the run folder, recorded in a FlexInfo."""
import os
import shutil
from enum import Enum

import pyworkflow.protocol.params as params
from pwem.objects import FlexInfo

from ..constants import PROGRAM_NAME
from ..core.base.choices import (ENCODERS, LOSSES, LR_SCHEDULES, POSE_INPUT_DEFAULT, POSE_INPUTS,
                                 RENDER_ROUTES)
from ..core.io.runfolder import existing_checkpoint, read_config_or_none, read_log_rows
from .protocol_base import NmaemProtBase
from .protocol_flex_common import (ATTR_APIX, ATTR_BOX, ATTR_EPOCHS, ATTR_LATENT_DIM,
                                   ATTR_RUN_DIR, runDirOf)


class NmaemTrainOutputs(Enum):
    outputNetwork = FlexInfo


def imageBox(particles):
    """Box size (px) of the particle images: the MRC header of the first image, else the
    set's dimensions; None when unknown."""
    first = particles.getFirstItem()
    if first is None:
        return None
    fn = first.getFileName() or ""
    if ":" in os.path.basename(fn):
        fn = fn[:fn.rindex(":")]
    try:
        from ..core.io.stacks import is_mrc, stack_box
        if is_mrc(fn) and os.path.exists(fn):
            return stack_box(fn, default=None)
        dim = particles.getXDim()
        return int(dim) if dim else None
    except Exception:   # an unreadable image is reported by the command itself
        return None


def checkModesMatch(modesFile, structureFile):
    """An error message when the modes file was not computed on the model, else None.
    Reads only the atom ids and coordinates (numpy, gemmi)."""
    try:
        from ..core.base.errors import NmaemError
        from ..core.modes.modesfile import check_modes_match, load_modes
        from ..core.physics.structure import read_model
        check_modes_match(load_modes(modesFile), read_model(structureFile))
    except NmaemError as exc:
        return ("The normal modes do not belong to the reference model: %s. Compute the "
                "modes on this reference (or choose the model they were computed on)." % exc)
    except Exception as exc:
        return "Cannot read the modes (%s) or the reference (%s): %s" % (
            modesFile, structureFile, exc)
    return None


class NmaemProtTrain(NmaemProtBase):
    """Train the nmaem network on particles with known poses and CTF.

    An encoder (a CNN) predicts, for each particle image, a 2D shift and the amplitudes z
    of the normal modes; a physics decoder renders the deformed atomic model X0 + U z at
    the particle's pose with its CTF, and training minimises the difference with the
    image (Nashed et al. 2022). The trained network (the run folder with its checkpoints
    and log) is the output; run 'infer' to get z for every particle.

    Training can be continued: pressing Continue on a stopped or failed run resumes from
    its last checkpoint, and 'Continue a previous training' resumes another protocol's
    run (for example with more epochs).
    """
    _label = "train"
    _possibleOutputs = NmaemTrainOutputs

    # ------------------------------------------------------------------ form
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("doContinue", params.BooleanParam, default=False,
                      label="Continue a previous training?",
                      help="Yes: resume the network of a previous nmaem training from its "
                           "last checkpoint (its run folder is copied into this protocol, "
                           "the previous one is left untouched). Its particles, reference, "
                           "modes, box, encoder and loss are kept; epochs (the new total), "
                           "batch size and learning rate may change. A previous training "
                           "without any checkpoint cannot be continued: start a fresh one.")
        form.addParam("continueNetwork", params.PointerParam, pointerClass="FlexInfo",
                      condition="doContinue", label="Training to continue",
                      help="The output network of a previous nmaem training protocol.")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      condition="not doContinue", label="Input particles", important=True,
                      help="Particles with a 3D alignment (poses of a consensus refinement) "
                           "and CTF, for example from RELION or cryoSPARC. They are written "
                           "to a RELION STAR file for nmaem (images used in place when they "
                           "are MRC stacks).")
        form.addParam("inputStructure", params.PointerParam, pointerClass="AtomStruct",
                      condition="not doContinue", label="Reference atomic model",
                      important=True,
                      help="The model X0 that is deformed, docked in the consensus map that "
                           "the poses refer to (nmaem rotates it about that map's centre). "
                           "It must be the model the normal modes were computed on.")
        form.addParam("inputModes", params.PointerParam, pointerClass="SetOfNormalModes",
                      condition="not doContinue", label="Normal modes", important=True,
                      help="The output of 'nmaem - compute normal modes' on the reference "
                           "model (its modes.npz file is used).")
        form.addParam("useAllModes", params.BooleanParam, default=True,
                      condition="not doContinue", label="Use all the modes?",
                      help="Yes: every mode of the set is a dimension of the latent space. "
                           "No: only the first N (the lowest-frequency ones), below.")
        form.addParam("numberOfModes", params.IntParam, default=8,
                      condition="not doContinue and not useAllModes",
                      validators=[params.GE(0)], label="Number of modes to use",
                      help="Use the first N modes (the lowest-frequency ones) as the latent "
                           "space; 0 learns the shifts only.")

        form.addSection(label="Training")
        form.addParam("cropImages", params.BooleanParam, default=False,
                      condition="not doContinue", label="Crop the images for training?",
                      help="No: train on the particles' box. Yes: Fourier-crop the images "
                           "to the box below first, which is faster at the cost of "
                           "resolution.")
        form.addParam("boxSize", params.IntParam, default=64,
                      condition="not doContinue and cropImages", validators=[params.Positive],
                      label="Training box (px)",
                      help="The box (even) the images are Fourier-cropped to. The paper "
                           "encoder needs at least 32 px, the small one 8 px.")
        form.addParam("numberOfEpochs", params.IntParam, default=200,
                      validators=[params.Positive], label="Epochs",
                      help="Passes over the training images (the total, counting the epochs "
                           "of a continued training). The paper trains for 200 epochs.")
        form.addParam("autoBatch", params.BooleanParam, default=True,
                      label="Automatic batch size?",
                      help="Yes: min(256, max(16, training images / 64)) images per "
                           "optimisation step, so that small datasets still get enough "
                           "steps; the paper uses 256. No: the batch size below.")
        form.addParam("batchSize", params.IntParam, default=256, condition="not autoBatch",
                      validators=[params.Positive], label="Batch size",
                      help="Images per optimisation step, over all GPUs. Lower it when the "
                           "GPU runs out of memory.")
        form.addParam("learningRate", params.FloatParam, default=1e-3,
                      validators=[params.Positive], label="Learning rate",
                      help="Step size of the Adam optimiser (the paper uses 1e-3).")
        form.addParam("lrSchedule", params.EnumParam, choices=LR_SCHEDULES, default=0,
                      display=params.EnumParam.DISPLAY_HLIST,
                      expertLevel=params.LEVEL_ADVANCED, label="Learning-rate schedule",
                      help="constant: the learning rate above throughout (the paper). "
                           "cosine: decays from it to 0 over the epochs "
                           "(https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/training.md).")
        form.addParam("encoder", params.EnumParam, choices=ENCODERS, default=0,
                      condition="not doContinue", label="Encoder",
                      help="'paper': the paper's CNN (filters 32-64-128-256-512, MLP 512, "
                           "256). 'small': filters 8-16-32, MLP 64, 32, for quick trials on "
                           "small boxes.")
        form.addParam("autoEncoderBox", params.BooleanParam, default=True,
                      condition="not doContinue", expertLevel=params.LEVEL_ADVANCED,
                      label="Automatic encoder box?",
                      help="Yes: the encoder sees the training box up to 128 px, 128 px "
                           "above. No: the box below.")
        form.addParam("encoderBox", params.IntParam, default=128,
                      condition="not doContinue and not autoEncoderBox",
                      validators=[params.Positive], expertLevel=params.LEVEL_ADVANCED,
                      label="Encoder box (px)",
                      help="The box the encoder sees: the images Fourier-cropped to it (even "
                           "number of pixels, at most the training box). The decoder and the "
                           "loss use the whole training box; a smaller encoder box mainly "
                           "saves time on large boxes.")
        form.addParam("loss", params.EnumParam, choices=LOSSES, default=0,
                      condition="not doContinue", label="Loss",
                      help="'whitened' (default, for real particles): the Gaussian likelihood "
                           "of each image given its rendering, weighted by the noise spectrum "
                           "estimated from the particles' background, with each particle's "
                           "grey scale and offset solved (RELION-normalised images, ice "
                           "thickness). 'l2': the paper's squared difference; it assumes the "
                           "images are in the renderer's units, as simulated particles are. "
                           "'corr': 1 - correlation of each image with its rendering. "
                           "See "
                           "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/likelihood.md.")
        form.addParam("limitHighResolution", params.BooleanParam, default=False,
                      condition="not doContinue and loss == 0",
                      expertLevel=params.LEVEL_ADVANCED, label="Limit the highest resolution?",
                      help="No: the whitened loss uses frequencies up to Nyquist of the "
                           "training box. Yes: up to the resolution below.")
        form.addParam("resolutionHigh", params.FloatParam, default=8.0,
                      condition="not doContinue and loss == 0 and limitHighResolution",
                      validators=[params.Positive], expertLevel=params.LEVEL_ADVANCED,
                      label="Highest resolution (A)",
                      help="The whitened loss ignores finer frequencies.")
        form.addParam("limitLowResolution", params.BooleanParam, default=False,
                      condition="not doContinue and loss == 0",
                      expertLevel=params.LEVEL_ADVANCED, label="Limit the lowest resolution?",
                      help="No: the whitened loss uses every frequency but zero. Yes: down "
                           "to the resolution below.")
        form.addParam("resolutionLow", params.FloatParam, default=100.0,
                      condition="not doContinue and loss == 0 and limitLowResolution",
                      validators=[params.Positive], expertLevel=params.LEVEL_ADVANCED,
                      label="Lowest resolution (A)",
                      help="The whitened loss ignores coarser frequencies.")
        form.addParam("useMask", params.BooleanParam, default=False,
                      condition="not doContinue and loss == 0",
                      expertLevel=params.LEVEL_ADVANCED, label="Mask the images?",
                      help="Yes: a soft circular mask on images and renderings against "
                           "neighbouring particles, of the radius below.")
        form.addParam("maskRadius", params.FloatParam, default=100.0,
                      condition="not doContinue and loss == 0 and useMask",
                      validators=[params.Positive], expertLevel=params.LEVEL_ADVANCED,
                      label="Mask radius (A)", help="Radius of the soft circular mask.")
        form.addParam("whitenInput", params.BooleanParam, default=True,
                      condition="not doContinue and loss == 0",
                      expertLevel=params.LEVEL_ADVANCED, label="Whiten the encoder's input?",
                      help="Give the encoder each image filtered by the inverse square root "
                           "of the noise spectrum estimated from the particles, so that its "
                           "noise is white ("
                           "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/training.md"
                           ", 'Input whitening'). No: the "
                           "images as they are.")
        form.addParam("refinePose", params.BooleanParam, default=False,
                      condition="not doContinue", label="Refine the poses?",
                      help="Also learn a small rotation per particle that corrects the "
                           "consensus pose (a rotation vector applied in the model's frame, "
                           "zero at the start, with a Gaussian prior on its angle). It "
                           "corrects what a consensus refinement of a flexible molecule "
                           "leaves (the alignment followed one domain); set the largest "
                           "correction above the largest expected misalignment. The "
                           "inference protocol then puts the refined angles in each "
                           "particle's transform. See "
                           "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/training.md"
                           ", 'Pose refinement'.")
        form.addParam("maxPoseCorrection", params.FloatParam, default=5.0,
                      condition="not doContinue and refinePose",
                      expertLevel=params.LEVEL_ADVANCED, label="Largest correction (deg)",
                      help="The correction angle is bounded by this many degrees.")
        form.addParam("posePriorSd", params.FloatParam, default=3.0,
                      condition="not doContinue and refinePose",
                      expertLevel=params.LEVEL_ADVANCED, label="Prior sd of the correction (deg)",
                      help="Standard deviation of the Gaussian prior on the correction "
                           "angle: corrections the images do not ask for stay small.")
        form.addParam("poseInput", params.EnumParam, choices=POSE_INPUTS,
                      default=POSE_INPUTS.index(POSE_INPUT_DEFAULT),
                      condition="not doContinue and refinePose",
                      expertLevel=params.LEVEL_ADVANCED, label="Correction computed from",
                      display=params.EnumParam.DISPLAY_HLIST,
                      help="image: from the image's features, a correction per particle. "
                           "z: from the predicted conformation, so particles of one "
                           "conformation get one correction, as a consensus refinement "
                           "that aligned one domain leaves them ("
                           "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/training.md"
                           ", 'Pose "
                           "refinement').")
        form.addParam("doCheck", params.BooleanParam, default=True,
                      condition="not doContinue", label="Check the fit first?",
                      help="Before training, render the reference at the particles' poses "
                           "and CTFs and check that it explains the images better than with "
                           "shuffled poses. When it does not, training is refused with the "
                           "likely cause (model not docked in the consensus map, map origin, "
                           "pixel size, hand, inverted contrast). The verdict is in the "
                           "summary.")
        form.addParam("force", params.BooleanParam, default=False,
                      condition="not doContinue and doCheck",
                      expertLevel=params.LEVEL_ADVANCED, label="Train even if the check fails?",
                      help="Train although the fit check says the reference does not "
                           "explain the particles.")
        form.addParam("seed", params.IntParam, default=0, condition="not doContinue",
                      expertLevel=params.LEVEL_ADVANCED, label="Random seed",
                      help="Seed of the train/validation split, the initial weights and the "
                           "order of the images.")
        form.addParam("rmsdUnit", params.FloatParam, default=1.0, condition="not doContinue",
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="RMSD of one output unit (A)",
                      help="Deformation (RMSD, Angstrom) produced by one unit of the "
                           "network's output along a mode; sets the scale of z.")
        form.addParam("bf16", params.BooleanParam, default=False,
                      expertLevel=params.LEVEL_ADVANCED, label="bfloat16 encoder?",
                      help="Run the encoder under bfloat16 autocast (faster on recent GPUs; "
                           "the decoder and the loss stay in float32).")
        form.addParam("numberOfWorkers", params.IntParam, default=0,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.GE(0)],
                      label="Image reading processes",
                      help="DataLoader worker processes that read the images (0: the "
                           "training process reads them).")
        form.addParam("keepCheckpoints", params.IntParam, default=3,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.GE(1)],
                      label="Checkpoints kept",
                      help="Per-epoch checkpoints kept besides the last one.")
        form.addParam("autoMemory", params.BooleanParam, default=True,
                      expertLevel=params.LEVEL_ADVANCED, label="Automatic renderer memory?",
                      help="Yes: the renderer works in a quarter of the free RAM, half of "
                           "the free GPU memory. No: the budget below.")
        form.addParam("memoryBudget", params.FloatParam, default=4.0,
                      condition="not autoMemory",
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="Renderer memory budget (GiB)",
                      help="Working memory of the renderer: atoms and images are rendered in "
                           "chunks that fit, whatever the number of atoms (large complexes).")
        form.addParam("renderer", params.EnumParam, choices=list(RENDER_ROUTES), default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Renderer",
                      display=params.EnumParam.DISPLAY_HLIST,
                      help="Structure factor of the renderer: auto (the faster for the "
                           "model, box and device), gemm (matrix products, exact) or nufft "
                           "(FINUFFT on the CPU; needs the optional finufft package). See "
                           "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/imaging.md.")
        form.addParam("checkpointInEpochs", params.BooleanParam, default=False,
                      expertLevel=params.LEVEL_ADVANCED, label="Checkpoints within epochs?",
                      help="No: the last checkpoint is saved at the end of each epoch. Yes: "
                           "also every so many minutes within an epoch (very long epochs; a "
                           "continued training resumes from that batch; one process only).")
        form.addParam("checkpointMinutes", params.FloatParam, default=30.0,
                      condition="checkpointInEpochs",
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="Checkpoint every (minutes)",
                      help="Minutes between the checkpoints within an epoch.")
        self._defineGpuParams(
            form,
            useGpuHelp="Train on the GPU(s) (CUDA). With 'No' training runs on the CPU "
                       "(slow; for tests and tiny datasets).",
            gpuListLabel="GPU IDs",
            gpuListHelp="GPU(s) to use (CUDA device numbers, as in nvidia-smi). Several "
                        "GPUs (e.g. '0 1 2 3') train in data parallel "
                        "(DistributedDataParallel), one process per GPU; the batch "
                        "size is split between them.")

    # ------------------------------------------------------------------ files
    def _createFilenameTemplates(self):
        self._updateFilenamesDict({
            "star": self._getExtraPath("input_particles.star"),
            "run": self._getExtraPath("run"),
        })

    def _runDir(self):
        self._createFilenameTemplates()
        return self._getFileName("run")

    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._createFilenameTemplates()
        if not self.doContinue.get():
            self._insertFunctionStep(self.convertInputStep)
        # the settings a resumed run may change are step arguments: changing them and
        # pressing Continue runs the training step again (it then resumes)
        self._insertFunctionStep(self.trainStep, self.numberOfEpochs.get(),
                                 self._batch(), self.learningRate.get(),
                                 *self._renderArgs())
        self._insertFunctionStep(self.createOutputStep)

    def _gpuArgs(self):
        """--device / --gpus for the command, and whether CUDA_VISIBLE_DEVICES is set by
        the base class (one GPU) or by nmaem itself (several: --gpus)."""
        if not self.getAttributeValue(params.USE_GPU, True):
            return ["--device", "cpu"]
        gpus = [int(g) for g in self.getGpuList()]
        if len(gpus) > 1:
            return ["--gpus", ",".join(str(g) for g in gpus)]
        return []

    def _nmaemEnviron(self):
        env = NmaemProtBase._nmaemEnviron(self)
        if self.getAttributeValue(params.USE_GPU, True) and len(self.getGpuList()) > 1:
            env.pop("CUDA_VISIBLE_DEVICES", None)   # nmaem sets it from --gpus
        return env

    def _renderArgs(self):
        """--memory-budget, --renderer, --checkpoint-minutes: only when set (settings a
        continued training may change)."""
        args = []
        if not self.autoMemory.get():
            args += ["--memory-budget", self.memoryBudget.get()]
        if RENDER_ROUTES[self.renderer.get()] != "auto":
            args += ["--renderer", RENDER_ROUTES[self.renderer.get()]]
        if self.checkpointInEpochs.get():
            args += ["--checkpoint-minutes", self.checkpointMinutes.get()]
        return args

    # the form's numbers where a Yes/No chooses "automatic" (None: automatic)
    def _batch(self):
        return None if self.autoBatch.get() else self.batchSize.get()

    def _nModes(self):
        return None if self.useAllModes.get() else self.numberOfModes.get()

    def _box(self):
        return self.boxSize.get() if self.cropImages.get() else None

    def _encoderBox(self):
        return None if self.autoEncoderBox.get() else self.encoderBox.get()

    def trainStep(self, epochs, batch, lr, *renderArgs):
        """``renderArgs``: :meth:`_renderArgs` when the step was made (step arguments, like
        the others a continued training may change)."""
        run = self._getFileName("run")
        common = ["-o", run, "--epochs", epochs, "--batch", batch or "auto",
                  "--lr", lr,
                  "--num-workers", self.numberOfWorkers.get(),
                  "--keep", self.keepCheckpoints.get(),
                  "--lr-schedule", LR_SCHEDULES[self.lrSchedule.get()]]
        if self.bf16.get():
            common.append("--bf16")
        common += list(renderArgs)
        common += self._gpuArgs()

        if self.doContinue.get() and not os.path.exists(os.path.join(run, "config.json")):
            prev = runDirOf(self.continueNetwork.get())
            if prev is None or existing_checkpoint(prev) is None:
                raise Exception("The training to continue (%s) has no checkpoint; nothing to "
                                "resume. Start a fresh training instead." % prev)
            tmp = run + ".copy"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(prev, tmp)
            if os.path.isdir(run):      # a copy interrupted before its rename
                shutil.rmtree(run)
            os.replace(tmp, run)
            self.info("copied the run of the previous training %s to %s" % (prev, run))

        if os.path.exists(os.path.join(run, "config.json")):
            last = existing_checkpoint(run)
            done = len(read_log_rows(run))
            if last is None:
                self.info("RESUME: %s has no checkpoint (it stopped during its first "
                          "epoch); training restarts from epoch 1 with the run's settings"
                          % run)
            else:
                self.info("RESUME: continuing %s from its last checkpoint (%s, %d epoch(s) "
                          "done) up to %d epochs" % (run, last, done, epochs))
            self.runNmaem("train", common + ["--resume"])
            return

        if os.path.isdir(run):          # an empty or half-created folder: start again
            shutil.rmtree(run)
        modesFile = self.inputModes.get().getFirstItem().getModeFile()
        args = ["--particles", os.path.abspath(self._getFileName("star")),
                "--ref", os.path.abspath(self.inputStructure.get().getFileName()),
                "--modes", os.path.abspath(modesFile),
                "--encoder", ENCODERS[self.encoder.get()],
                "--loss", LOSSES[self.loss.get()],
                "--seed", self.seed.get(), "--rmsd-unit", self.rmsdUnit.get()]
        if self._nModes() is not None:
            args += ["--n-modes", self._nModes()]
        if self._box() is not None:
            args += ["--box", self._box()]
        if self._encoderBox() is not None:
            args += ["--encoder-box", self._encoderBox()]
        if LOSSES[self.loss.get()] == "whitened":
            for flag, use, param in (
                    ("--resolution-high", self.limitHighResolution, self.resolutionHigh),
                    ("--resolution-low", self.limitLowResolution, self.resolutionLow),
                    ("--mask-radius", self.useMask, self.maskRadius)):
                if use.get():
                    args += [flag, param.get()]
            if not self.whitenInput.get():
                args.append("--no-whiten-input")
        if self.refinePose.get():
            args += ["--refine-pose", "--max-pose-correction", self.maxPoseCorrection.get(),
                     "--pose-prior-sd", self.posePriorSd.get(),
                     "--pose-input", POSE_INPUTS[self.poseInput.get()]]
        if not self.doCheck.get():
            args.append("--no-check")
        elif self.force.get():
            args.append("--force")
        self.info("starting a new training in %s" % run)
        self.runNmaem("train", common + args)

    def createOutputStep(self):
        run = self._getFileName("run")
        cfg = read_config_or_none(run)
        if cfg is None or existing_checkpoint(run) is None:
            raise Exception("%s holds no trained network (config.json or "
                            "checkpoints/last.pt missing)" % run)
        info = FlexInfo(PROGRAM_NAME)
        info.setAttr(ATTR_RUN_DIR, run)
        info.setAttr(ATTR_LATENT_DIM, int(cfg["n_modes"]))
        info.setAttr(ATTR_EPOCHS, len(read_log_rows(run)))
        info.setAttr(ATTR_BOX, int(cfg["box"]))
        info.setAttr(ATTR_APIX, float(cfg["apix"]))
        self._defineOutputs(**{NmaemTrainOutputs.outputNetwork.name: info})
        if self.doContinue.get():
            self._defineSourceRelation(self.continueNetwork, info)
        else:
            for src in (self.inputParticles, self.inputStructure, self.inputModes):
                self._defineSourceRelation(src, info)

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        if self.doContinue.get():
            info = self.continueNetwork.get()
            prev = runDirOf(info) if info is not None else None
            if info is None:
                errors.append("Choose the training to continue.")
            elif prev is None:
                errors.append("The chosen network is not an nmaem training output.")
            elif read_config_or_none(prev) is None:
                errors.append("The training to continue has no run folder (%s/config.json "
                              "is missing)." % prev)
            elif existing_checkpoint(prev) is None:
                errors.append("The training to continue has no checkpoint (%s is missing): "
                              "there is nothing to resume. Set 'Continue a previous "
                              "training?' to No to start a fresh training."
                              % os.path.join(prev, "checkpoints", "last.pt"))
            return errors

        parts = self.inputParticles.get()
        ref = self.inputStructure.get()
        modes = self.inputModes.get()
        if parts is None:
            errors.append("Choose the input particles.")
        else:
            errors += self.validateParticles(parts)
            if parts.getSize() == 0:
                errors.append("The input particle set is empty.")
        if ref is None:
            errors.append("Choose the reference atomic model.")
        else:
            errors += self.validateStructure(ref, "The reference model")
        modesFile = None
        if modes is None:
            errors.append("Choose the normal modes.")
        else:
            first = modes.getFirstItem()
            modesFile = first.getModeFile() if first is not None else None
            if not modesFile or not os.path.exists(modesFile) or \
                    not modesFile.endswith(".npz"):
                errors.append("The normal modes have no nmaem modes file (modes.npz): "
                              "compute them with 'nmaem - compute normal modes'.")
                modesFile = None
            elif self._nModes() is not None and self._nModes() > modes.getSize():
                errors.append("Number of modes to use: %d, but the set has %d modes."
                              % (self._nModes(), modes.getSize()))
        if modesFile and ref is not None and os.path.exists(ref.getFileName()):
            msg = checkModesMatch(modesFile, ref.getFileName())
            if msg:
                errors.append(msg)
        # the option rules of nmaem train, written once (core.io.trainconfig.TrainConfig)
        from ..core.io.trainconfig import TrainConfig
        box = self._box()
        imgBox = (imageBox(parts) if (box is not None or self._encoderBox() is not None)
                  and parts is not None and parts.getSize() else None)
        options = TrainConfig(box=box, encoder=ENCODERS[self.encoder.get()],
                              encoder_box=self._encoderBox(),
                              loss=LOSSES[self.loss.get()],
                              lr_schedule=LR_SCHEDULES[self.lrSchedule.get()],
                              epochs=self.numberOfEpochs.get(),
                              batch=self._batch() or "auto",
                              lr=self.learningRate.get(),
                              max_pose_correction=self.maxPoseCorrection.get(),
                              pose_prior_sd=self.posePriorSd.get(),
                              pose_input=POSE_INPUTS[self.poseInput.get()])
        errors += ["Training options: %s." % msg for _, msg in options.problems(imgBox)]
        return errors

    def _warnings(self):
        if not self.doContinue.get() and LOSSES[self.loss.get()] == "l2" and \
                self.inputParticles.get() \
                is not None and self.inputParticles.get().getFirstItem() is not None and \
                not self.inputParticles.get().getFirstItem().hasAttribute("_nmaem_frame"):
            return ["The 'l2' loss assumes images in the renderer's units (simulated data); "
                    "for real particles use the 'whitened' loss (the default)."]
        return []

    def _summary(self):
        run = self._runDir()
        cfg = read_config_or_none(run)
        if cfg is None:
            return ["Training not started yet."]
        log = read_log_rows(run)
        lines = ["%d of %d epochs on %d particles (%d train / %d validation), %d px at "
                 "%.3f A/px, %d modes, %s encoder, %s loss."
                 % (len(log), cfg["epochs"], cfg["n_particles"], cfg["n_train"],
                    cfg["n_val"], cfg["box"], cfg["apix"], cfg["n_modes"], cfg["encoder"],
                    cfg["loss"])]
        check = cfg.get("fit_check")
        if check:
            lines.append("Fit check: %s. %s" % (check.get("verdict", "?"),
                                                check.get("message", "")))
        elif cfg.get("fit_check", 0) is None:
            lines.append("Fit check: not run.")
        if log:
            last = log[-1]
            lines.append("Last epoch: training loss %.5g, validation loss %.5g, %.0f "
                         "images/s." % (last.get("train_loss", float("nan")),
                                        last.get("val_loss", float("nan")),
                                        last.get("images_per_s", float("nan"))))
        if self.doContinue.get():
            lines.append("Continued from %s." % runDirOf(self.continueNetwork.get()))
        return lines

    def _methods(self):
        cfg = read_config_or_none(self._runDir())
        if cfg is None:
            return []
        return ["We trained the nmaem autoencoder [Nashed2022] (PyTorch [Paszke2019]) on %d "
                "particles (%d px, %.3f A/px) for %d epochs (Adam, learning rate %g, batch "
                "%d, %s loss, %s encoder): it predicts each particle's 2D shift and the "
                "amplitudes of %d normal modes of the reference model, rendered with the "
                "particle's pose and CTF."
                % (cfg["n_particles"], cfg["box"], cfg["apix"],
                   len(read_log_rows(self._runDir())), cfg["lr"], cfg["batch"],
                   cfg["loss"], cfg["encoder"], cfg["n_modes"])]

    def _citations(self):
        return ["Nashed2022", "Paszke2019"]
