# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""What every nmaem protocol shares: running ``nmaem`` through ``runJob``, GPU
selection, checks of input particles, and splitting multi-model PDB files.

No heavy imports here (Scipion imports every plugin's protocols at start-up): the work
runs in the ``nmaem`` command; steps read what earlier steps wrote to disk.
"""
import json
import os
import shlex

import pyworkflow.protocol.params as params
from pwem.constants import ALIGN_PROJ
from pwem.protocols import EMProtocol


class NmaemProtBase(EMProtocol):
    """Base class of the nmaem protocols (not shown in the GUI)."""
    _label = None

    # ------------------------------------------------------------------ form helpers
    @staticmethod
    def _defineGpuParams(form, useGpuHelp=None, gpuListLabel="GPU ID", gpuListHelp=None):
        """Hidden GPU parameters: Scipion shows them in the form's header and its queue
        and GPU-list machinery fills them. Protocols that use several GPUs pass their own
        label and help texts."""
        form.addHidden(params.USE_GPU, params.BooleanParam, default=True,
                       label="Use GPU?",
                       help=useGpuHelp or ("Run on the GPU when one is available (CUDA). "
                                           "With 'No' the command runs on the CPU."))
        form.addHidden(params.GPU_LIST, params.StringParam, default="0",
                       label=gpuListLabel,
                       help=gpuListHelp or ("The GPU to use (CUDA device number, as in "
                                            "nvidia-smi). Only the first one is used."))

    @staticmethod
    def _defineMaximaParams(form, condition=None):
        """The density-maxima settings of ``nmaem export --maxima`` and ``nmaem evaluate``
        (docs/analysis.md), advanced; ``condition`` shows them only in some modes."""
        kw = dict(expertLevel=params.LEVEL_ADVANCED)
        if condition:
            kw["condition"] = condition
        form.addParam("bandwidth", params.StringParam, default="isj", label="KDE bandwidth",
                      help="Bandwidth of the kernel density on PC1 whose maxima are found: "
                           "a number, or 'isj' (improved Sheather-Jones), 'silverman' or "
                           "'scott'.", **kw)
        form.addParam("minHeight", params.FloatParam, default=0.1,
                      validators=[params.Range(0, 1)], label="Minimum height",
                      help="Keep maxima at least this fraction of the highest one.", **kw)
        form.addParam("minProminence", params.FloatParam, default=0.1,
                      validators=[params.Range(0, 1)], label="Minimum prominence",
                      help="Keep maxima that rise at least this fraction of their height "
                           "above the dip to any higher maximum.", **kw)
        form.addParam("minSignificance", params.FloatParam, default=3.0,
                      validators=[params.GE(0)], label="Minimum significance",
                      help="... and rise at least this many standard errors of the density "
                           "estimate above that dip (0 keeps bumps of the sample's own "
                           "noise).", **kw)

    def _maximaArgs(self):
        """Command-line arguments of the settings of :meth:`_defineMaximaParams`."""
        return ["--bandwidth", self.bandwidth.get(), "--min-height", self.minHeight.get(),
                "--min-prominence", self.minProminence.get(),
                "--min-significance", self.minSignificance.get()]

    def _readJsonResult(self, key):
        """The JSON file of filename template ``key``, or None while it is not written
        (nmaem writes it atomically, so a file that exists is complete)."""
        self._createFilenameTemplates()
        fn = self._getFileName(key)
        if not os.path.exists(fn):
            return None
        with open(fn) as fh:
            return json.load(fh)

    # ------------------------------------------------------------------ running nmaem
    def _deviceArgs(self):
        """``--device`` arguments for the command: cpu when the GPU is switched off,
        otherwise nothing (nmaem picks cuda when the visible device exists)."""
        if self.hasAttribute(params.USE_GPU) and not self.getAttributeValue(params.USE_GPU, True):
            return ["--device", "cpu"]
        return []

    def _nmaemEnviron(self):
        import pyworkflow.utils as pwutils
        env = pwutils.Environ(os.environ)
        if (self.hasAttribute(params.GPU_LIST) and self.getAttributeValue(params.USE_GPU, True)):
            gpus = [str(g) for g in self.getGpuList()]
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[0]
        return env

    def runNmaem(self, subcommand, args, stdout=None):
        """Run ``nmaem SUBCOMMAND ARGS...`` with Scipion's Python through runJob (so that
        logs, queues and GPU selection apply). ``args`` is a list of strings; ``stdout``, a
        file that receives the command's standard output (``nmaem evaluate``'s JSON)."""
        from nmaem_plugin import Plugin
        program, prefix = Plugin.getNmaemCommand()
        line = " ".join([prefix, subcommand] + [shlex.quote(str(a)) for a in args])
        if stdout is not None:
            line += " > " + shlex.quote(str(stdout))
        self.runJob(program, line, env=self._nmaemEnviron(), numberOfMpi=1)

    # ------------------------------------------------------------------ steps
    def convertInputStep(self):
        """Write ``inputParticles`` as the RELION STAR ``self._getFileName("star")`` that
        nmaem reads (non-MRC stacks converted into extra/input_stacks). The STAR is
        renamed into place when complete, so a re-run after a failure skips a finished
        conversion."""
        from ..convert import writeSetOfParticles
        star = self._getFileName("star")
        if os.path.exists(star):
            self.info("%s exists; not written again" % star)
            return
        tmp = self._getExtraPath("input_particles.tmp.star")
        n = writeSetOfParticles(self.inputParticles.get(), tmp,
                                stackDir=self._getExtraPath("input_stacks"))
        os.replace(tmp, star)
        self.info("wrote %d particles to %s" % (n, star))

    # ------------------------------------------------------------------ checks
    @staticmethod
    def validateParticles(particles, label="Input particles"):
        """Error messages for particles nmaem cannot use: no 3D (projection) alignment,
        no CTF, no acquisition. Empty list when they are fine."""
        errors = []
        if particles is None:
            return ["%s: none selected." % label]
        if particles.getAlignment() != ALIGN_PROJ:
            errors.append("%s have no 3D alignment (alignment: %s). nmaem needs the poses "
                          "of a 3D refinement (RELION, cryoSPARC, ...)."
                          % (label, particles.getAlignment()))
        if not particles.hasCTF():
            errors.append("%s have no CTF. Estimate the CTF (or import it with the "
                          "particles) before using nmaem." % label)
        acq = particles.getAcquisition()
        if acq is None or acq.getVoltage() is None:
            errors.append("%s have no acquisition (voltage, Cs, amplitude contrast)." % label)
        if not particles.getSamplingRate():
            errors.append("%s have no sampling rate." % label)
        return errors

    @staticmethod
    def validateStructure(structure, label="The atomic model"):
        """Error messages for an AtomStruct that nmaem cannot read: none selected, a
        missing file, a map registered as an atomic structure, or a file with no atom
        records. A cheap look at the file (its name and first 256 KiB), for the form;
        the command itself reports any other problem in one line in the log."""
        if structure is None:
            return ["%s: none selected." % label]
        fn = structure.getFileName()
        if not fn or not os.path.isfile(fn):
            return ["%s file %s does not exist." % (label, fn)]
        name = fn.lower()
        if name.endswith(".gz"):
            name = name[:-3]
        if name.endswith((".mrc", ".map", ".ccp4", ".mrcs", ".st", ".vol", ".spi")):
            return ["%s %s is a map, not an atomic model (PDB or mmCIF needed)." % (label, fn)]
        import gzip
        try:
            opener = gzip.open if fn.lower().endswith(".gz") else open
            with opener(fn, "rb") as fh:
                head = fh.read(1 << 18)
        except OSError as exc:
            return ["%s %s cannot be read: %s" % (label, fn, exc)]
        if not any(k in head for k in (b"ATOM", b"HETATM", b"_atom_site.")):
            return ["%s %s holds no atom records (ATOM/HETATM or mmCIF _atom_site): not a "
                    "PDB or mmCIF model." % (label, fn)]
        return []

    # ------------------------------------------------------------------ particles with z
    @staticmethod
    def _textLines(param):
        """The non-empty lines of a text parameter, stripped."""
        return [ln.strip() for ln in (param.get() or "").splitlines() if ln.strip()]

    def _runDir(self):
        """The training run folder of the protocol's ``inputNetwork`` when one is chosen,
        else the one the ``inputParticles`` (Flexibility Hub particles) record."""
        from .protocol_flex_common import runDirOf
        net = self.inputNetwork.get() if self.hasAttribute("inputNetwork") else None
        if net is not None:
            return runDirOf(net)
        parts = self.inputParticles.get()
        return runDirOf(parts) if parts is not None else None

    def validateParticlesWithZ(self, particles):
        """(errors, d) for particles with z used with the run of :meth:`_runDir`: a
        trained network is known and has its config.json, the particles have amplitudes
        and as many as the network's modes. ``d``: the particles' number of amplitudes."""
        from ..core.io.runfolder import read_config_or_none
        errors = []
        run = self._runDir()
        cfg = read_config_or_none(run) if run else None
        if run is None:
            errors.append("No trained network: choose one (the particles do not record an "
                          "nmaem training).")
        elif cfg is None:
            errors.append("The network's run folder %s has no config.json." % run)
        first = particles.getFirstItem()
        d = len(first.getZFlex()) if hasattr(first, "getZFlex") else 0
        if d == 0:
            errors.append("The particles have no normal-mode amplitudes (zFlex).")
        elif cfg is not None and d != int(cfg["n_modes"]):
            errors.append("The particles have %d amplitudes (zFlex) but the network uses %d "
                          "modes." % (d, cfg["n_modes"]))
        return errors, d

    def writeLatentStep(self):
        """latent.npz of the input particles' z (``convert.latentFromParticlesFlex``: rows
        in id order, shifts zero) and their ids, the filename templates "latent" and
        "ids"."""
        from ..convert import latentFromParticlesFlex
        latentFromParticlesFlex(self.inputParticles.get(), self._getFileName("latent"),
                                self._getFileName("ids"))

    # ------------------------------------------------------------------ files
    @staticmethod
    def splitModels(pdbFile, pattern):
        """Write each MODEL of a multi-model PDB file to ``pattern % k`` (k = 0, 1, ...),
        header lines repeated in each; returns the list of files. A file without MODEL
        records is one model."""
        header, models, current = [], [], None
        with open(pdbFile) as fh:
            for line in fh:
                rec = line[:6]
                if rec.startswith("MODEL"):
                    current = []
                elif rec.startswith("ENDMDL"):
                    if current is not None:
                        models.append(current)
                    current = None
                elif rec.startswith("END"):
                    continue
                elif current is not None:
                    current.append(line)
                elif rec.startswith(("ATOM", "HETATM", "TER", "ANISOU")):
                    current = None
                    models.append([line]) if not models else models[-1].append(line)
                else:
                    header.append(line)
        if current:
            models.append(current)
        from ..core.base.atomic import atomic_open
        out = []
        for k, lines in enumerate(models):
            fn = pattern % k
            with atomic_open(fn, "w") as fh:        # the output policy's writer
                fh.writelines(header)
                fh.writelines(lines)
                fh.write("END\n")
            out.append(fn)
        return out
