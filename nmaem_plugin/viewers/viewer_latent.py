# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Latent space of nmaem particles: the landscape (``core.report.figures.latent_landscape``), the
mode amplitudes, and all-atom models at chosen points, made by an ``NmaemProtExport``
launched in the project (so the model files are recorded) and opened in ChimeraX."""
import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer
from pwem.objects import SetOfParticlesFlex

from ..constants import ATTR_FRAME, ATTR_Z_SD, PROGRAM_NAME
from ..protocols import NmaemProtEvaluate, NmaemProtInfer, NmaemProtTrain
from ..protocols.protocol_flex_common import runDirOf
from .viewer_common import (figurePlotter, launchFailureMessage, modelViews,
                            projectPath)

POINT_PC1, POINT_CLUSTER, POINT_Z = range(3)
POINT_CHOICES = ["a value of PC1 (z1 when d = 1)", "a k-means cluster centre",
                 "amplitudes z that I type"]


def latentOfParticles(particles):
    """(ids, z (N,d), frames (N,) or None) of a SetOfParticlesFlex, in id order.
    Frames are the ground-truth ``_nmaem_frame`` of simulated particles (None when any
    particle lacks it)."""
    import numpy as np
    ids, z, frames = [], [], []
    for p in particles.iterItems(orderBy="id"):
        ids.append(p.getObjId())
        z.append(np.asarray(p.getZFlex(), dtype=np.float64))
        f = getattr(p, ATTR_FRAME, None)
        frames.append(None if f is None or f.get() is None else int(f.get()))
    d = len(z[0]) if z else 0
    z = np.asarray(z, dtype=np.float64).reshape(-1, d)
    fr = None if (not frames or any(f is None for f in frames)) else np.asarray(frames)
    return np.asarray(ids, dtype=np.int64), z, fr


def uncertaintyOfParticles(particles):
    """Each particle's posterior sd of z (``_nmaem_zSd``, from a latent with ``z_cov``)
    in id order, or None when any particle lacks it."""
    import numpy as np
    sd = []
    for p in particles.iterItems(orderBy="id"):
        v = getattr(p, ATTR_Z_SD, None)
        if v is None or v.get() is None:
            return None
        sd.append(float(v.get()))
    return np.asarray(sd)


class NmaemLatentViewer(ProtocolViewer):
    """Latent landscape of nmaem particles (PCA, density maxima along PC1, PC1-PC2
    density, mode amplitudes; split by ground-truth frame for simulated particles) and
    all-atom models at a chosen point or cluster."""
    _label = "nmaem latent space"
    _environments = [DESKTOP_TKINTER]
    _targets = [NmaemProtInfer, NmaemProtEvaluate, NmaemProtTrain, SetOfParticlesFlex]

    @classmethod
    def can_handle_this_instance(cls, instance):
        if isinstance(instance, SetOfParticlesFlex):
            info = instance.getFlexInfo()
            return info is not None and info.getProgName() == PROGRAM_NAME
        return True

    def _defineParams(self, form):
        form.addSection(label="Latent space")
        form.addParam("doShowLandscape", params.LabelParam, label="Latent landscape",
                      help="d = 1: histogram of z. d > 1: explained variance of the "
                           "principal components, PC1 histogram with its density maxima, "
                           "PC1-PC2 density (hexagonal bins). Simulated particles: PC1 "
                           "by ground-truth frame.")
        form.addParam("doShowAmplitudes", params.LabelParam, label="Mode amplitudes",
                      help="One histogram per amplitude z_l (Angstrom).")
        form.addParam("doShowUncertainty", params.LabelParam,
                      label="Per-particle uncertainty",
                      help="The PC1-PC2 plane coloured by the particles' posterior sd of "
                           "z (sqrt of the trace of each particle's posterior covariance, "
                           "from an inference with the population estimated from the "
                           "particles), and its histogram: where the images say little.")
        form.addParam("doShowShrinkage", params.LabelParam, label="Shrinkage check",
                      help="The particles' likelihood as the landscape's spread about its "
                           "mean is scaled (1 = as inferred): a maximum clearly above 1 "
                           "says the landscape is shrunk toward its mean.")
        form.addParam("colourByFrame", params.BooleanParam, default=True,
                      label="Split by ground-truth frame?",
                      help="Simulated particles (with the _nmaem_frame attribute): add "
                           "PC1 histograms per group of frames.")
        form.addParam("bandwidth", params.StringParam, default="isj",
                      expertLevel=params.LEVEL_ADVANCED, label="KDE bandwidth",
                      help="Bandwidth of the density along PC1 whose maxima are marked: "
                           "a number (A) or 'isj', 'silverman', 'scott'.")
        form.addSection(label="All-atom models")
        form.addParam("pointKind", params.EnumParam, choices=POINT_CHOICES,
                      default=POINT_PC1, label="Model at",
                      help="The model X0 + U z is made by an 'nmaem - export models' "
                           "protocol launched in the project (its output records the "
                           "file), then opened in ChimeraX when the chimera plugin is "
                           "installed. PC1 value: the mean z moved along PC1 to that "
                           "coordinate. Cluster: the centre of a k-means cluster of z. "
                           "Amplitudes: the z you type.")
        lo, hi, mid, unit = self.pcRangeForForm()
        form.addParam("pc1Value", params.FloatParam, default=mid,
                      condition="pointKind == %d" % POINT_PC1,
                      label="PC1 position (%s)" % unit,
                      help="Position along PC1 as %s (the top axis of the landscape's "
                           "PC1 histogram): the mean z moved along PC1 to there. It must "
                           "lie within the particles' range, %s (the default is the "
                           "median particle)." % (unit, "%.3g to %.3g" % (lo, hi)
                                                  if lo is not None else "shown once "
                                                  "the particles have z"))
        form.addParam("numberOfClusters", params.IntParam, default=5,
                      condition="pointKind == %d" % POINT_CLUSTER,
                      validators=[params.Positive], label="Number of clusters (K)")
        form.addParam("clusterNumber", params.IntParam, default=1,
                      condition="pointKind == %d" % POINT_CLUSTER, validators=[params.Positive],
                      label="Cluster", help="1 = the largest cluster.")
        form.addParam("amplitudes", params.StringParam, default="",
                      condition="pointKind == %d" % POINT_Z, label="Amplitudes z (A)",
                      help="d comma-separated numbers.")
        form.addParam("doShowModel", params.LabelParam, label="Show the all-atom model")

    def _getVisualizeDict(self):
        return {"doShowLandscape": self._showLandscape,
                "doShowAmplitudes": self._showAmplitudes,
                "doShowUncertainty": self._showUncertainty,
                "doShowShrinkage": self._showShrinkage,
                "doShowModel": self._showModel}

    def _visualize(self, obj, **kwargs):
        """Without the form: the landscape of ``obj``'s particles."""
        self.setProtocol(obj)
        return self._showLandscape()

    # ------------------------------------------------------------------ data
    def getParticles(self):
        """The SetOfParticlesFlex shown: the target set, the protocol's output, or for a
        training the output of the last inference made with its network."""
        obj = self.protocol
        if isinstance(obj, SetOfParticlesFlex):
            return obj
        if isinstance(obj, NmaemProtTrain):
            net = getattr(obj, "outputNetwork", None)
            run = runDirOf(net) if net is not None else None
            found = None
            for prot in self.getProject().getRuns(refresh=False):
                out = getattr(prot, "outputParticles", None)
                if (isinstance(prot, NmaemProtInfer) and out is not None
                        and run is not None and runDirOf(out) == run):
                    found = out
            return found
        return getattr(obj, "outputParticles", None)

    def getLatent(self):
        """(ids, z, frames) of the particles, read once per viewer."""
        if getattr(self, "_latentCache", None) is None:
            parts = self.getParticles()
            if parts is None:
                return None
            self._latentCache = latentOfParticles(parts)
        return self._latentCache

    def nAtoms(self):
        """M, the atoms of the modes of the particles' training run (for RMSD units), or
        None when the run folder or its modes file is not found."""
        if getattr(self, "_nAtomsCache", None) is None:
            import os
            from ..core.base.errors import NmaemError
            from ..core.analysis.labels import modes_atom_count
            from ..core.io.runfolder import reference_and_modes
            parts = self.getParticles()
            run = runDirOf(parts) if parts is not None else None
            n = 0
            if run:
                _, modes = reference_and_modes(projectPath(self.getProject(), run))
                if modes and os.path.isfile(modes):
                    try:
                        n = modes_atom_count(modes)
                    except NmaemError:
                        n = 0
            self._nAtomsCache = n
        return self._nAtomsCache or None

    def pcUnit(self):
        d = self.getLatent()[1].shape[1] if self.getLatent() is not None else 2
        name = "z1" if d == 1 else "PC1"
        return ("A RMSD along %s from the reference" % name if self.nAtoms() else
                "A of amplitude along %s" % name)

    def pcRangeForForm(self):
        """(low, high, median, unit) of the particles along PC1 in the form's units
        (low, high, median None without data)."""
        try:
            data = self.getLatent()
        except Exception:   # a broken set must not break the form
            data = None
        if data is None or len(data[1]) < 2 or data[1].shape[1] == 0:
            return None, None, None, "A RMSD along PC1 from the reference"
        import numpy as np
        from ..core.analysis.labels import pc_coordinates, rmsd_per_angstrom
        _, pc = pc_coordinates(data[1])
        x = pc[:, 0] * rmsd_per_angstrom(self.nAtoms())
        return float(x.min()), float(x.max()), round(float(np.median(x)), 3), self.pcUnit()

    def _noData(self):
        if isinstance(self.protocol, NmaemProtTrain):
            msg = ("No particles with z from this training yet: run 'nmaem - infer' with "
                   "its network, then open this viewer again.")
        else:
            msg = "No nmaem particles with z to show (the protocol has no output yet)."
        return [self.errorMessage(msg, "nmaem latent space")]

    def _maximaKwargs(self):
        bw = (self.bandwidth.get() or "isj").strip()
        try:
            return {"bandwidth": float(bw)}
        except ValueError:
            return {"bandwidth": bw}

    # ------------------------------------------------------------------ views
    def _showLandscape(self, paramName=None):
        from ..core.report import figures
        data = self.getLatent()
        if data is None or len(data[1]) < 2 or data[1].shape[1] == 0:
            return self._noData()
        _, z, frames = data
        if not self.colourByFrame.get():
            frames = None
        return [figurePlotter(figures.latent_landscape, z, frames=frames,
                              maxima_kwargs=self._maximaKwargs(), n_atoms=self.nAtoms(),
                              title=self.getParticlesLabel(),
                              windowTitle="nmaem latent landscape")]

    def getParticlesLabel(self):
        """The name of the shown particles' protocol (the figure's title)."""
        label = self.protocol.getObjLabel() if hasattr(self.protocol, "getObjLabel") else ""
        return "Latent landscape: %s" % label if label else None

    def _showAmplitudes(self, paramName=None):
        from ..core.report import figures
        data = self.getLatent()
        if data is None or len(data[1]) == 0 or data[1].shape[1] == 0:
            return self._noData()
        return [figurePlotter(figures.mode_amplitudes, data[1],
                              windowTitle="nmaem mode amplitudes")]

    def _showUncertainty(self, paramName=None):
        from ..core.report.uncertainty import uncertainty_landscape
        data = self.getLatent()
        if data is None or len(data[1]) < 2 or data[1].shape[1] == 0:
            return self._noData()
        sd = uncertaintyOfParticles(self.getParticles())
        if sd is None:
            return [self.errorMessage(
                "These particles have no per-particle uncertainty (z_cov): infer them with "
                "'Population of particles' estimated from the particles.",
                "nmaem uncertainty")]
        return [figurePlotter(uncertainty_landscape, data[1], sd,
                              windowTitle="nmaem per-particle uncertainty")]

    def _showShrinkage(self, paramName=None):
        import os
        from ..core.io.latent import read_latent
        from ..core.report.uncertainty import shrinkage_figure
        from ..protocols.protocol_flex_common import ATTR_LATENT_FILE
        parts = self.getParticles()
        info = parts.getFlexInfo() if parts is not None else None
        attr = getattr(info, ATTR_LATENT_FILE, None) if info is not None else None
        fn = attr.get() if attr is not None else None
        fn = projectPath(self.getProject(), fn) if fn else None
        check = read_latent(fn).shrinkage if fn and os.path.exists(fn) else None
        if check is None:
            return [self.errorMessage(
                "No shrinkage check for these particles: it is made by an inference with "
                "the per-particle fit.", "nmaem shrinkage check")]
        return [figurePlotter(shrinkage_figure, check,
                              windowTitle="nmaem shrinkage check")]

    def chosenPoint(self):
        """(z of the chosen point (d,), label) from the form."""
        import numpy as np
        from ..core.analysis.landscape import kmeans
        from ..core.analysis.labels import pc_position
        _, z, _ = self.getLatent()
        kind = self.pointKind.get()
        if kind == POINT_PC1:
            value = self.pc1Value.get()
            if value is None:
                raise ValueError("type a PC1 position")
            point = pc_position(z, value, 0, self.nAtoms())   # range-checked
            name = "z1" if z.shape[1] == 1 else "PC1"
            unit = " RMSD" if self.nAtoms() else ""
            return point, "%s = %.2f A%s" % (name, float(value), unit)
        if kind == POINT_CLUSTER:
            k, c = self.numberOfClusters.get(), self.clusterNumber.get()
            if c > k:
                raise ValueError("cluster %d of %d clusters" % (c, k))
            centres, _, counts = kmeans(z, k, seed=0)
            return centres[c - 1], "cluster %d of %d (%d particles)" % (c, k, counts[c - 1])
        values = [float(v) for v in self.amplitudes.get().replace(";", ",").split(",")
                  if v.strip()]
        if len(values) != z.shape[1]:
            raise ValueError("%d amplitudes given, the particles have d = %d"
                             % (len(values), z.shape[1]))
        return np.asarray(values), "z = %s" % ", ".join("%.2f" % v for v in values)

    def exportProtocol(self, point, label):
        """A new NmaemProtExport (given amplitudes) on the shown particles."""
        from ..protocols import NmaemProtExport
        from ..protocols.protocol_export import EXPORT_Z
        prot = self.getProject().newProtocol(
            NmaemProtExport, exportMode=EXPORT_Z,
            amplitudes=", ".join("%.4f" % v for v in point))
        prot.setObjLabel("nmaem model at %s" % label)
        prot.inputParticles.set(self.getParticles())
        return prot

    def _showModel(self, paramName=None):
        data = self.getLatent()
        if data is None or len(data[1]) < 2:
            return self._noData()
        try:
            point, label = self.chosenPoint()
        except Exception as exc:  # bad numbers typed in the form
            return [self.errorMessage(str(exc), "nmaem model")]
        prot = self.exportProtocol(point, label)
        project = self.getProject()
        project.launchProtocol(prot, wait=True)
        prot = project.getProtocol(prot.getObjId()) or prot
        out = getattr(prot, "outputAtomStructs", None)
        if out is None or out.getSize() == 0:
            return [self.errorMessage(launchFailureMessage(prot, project), "nmaem model")]
        files = [a.getFileName() for a in out]
        return modelViews([projectPath(project, f) for f in files],
                          "All-atom model at %s" % label, tkParent=self.getTkRoot())
