# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Training curves of an nmaem run (``RUN/log.csv``; ``core.report.figures.training_curves``)."""
import os

import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer
from pwem.objects import FlexInfo

from ..constants import PROGRAM_NAME
from ..protocols import NmaemProtTrain
from ..protocols.protocol_flex_common import runDirOf
from .viewer_common import figurePlotter, projectPath


class NmaemTrainingViewer(ProtocolViewer):
    """Loss on the training and validation particles per epoch and the training speed
    (images/s), read from the run's log.csv (also while the training runs)."""
    _label = "nmaem training curves"
    _environments = [DESKTOP_TKINTER]
    _targets = [NmaemProtTrain, FlexInfo]

    @classmethod
    def can_handle_this_instance(cls, instance):
        if isinstance(instance, FlexInfo):
            return instance.getProgName() == PROGRAM_NAME and runDirOf(instance) is not None
        return True

    def _defineParams(self, form):
        form.addSection(label="Training")
        form.addParam("doShowCurves", params.LabelParam, label="Training curves",
                      help="Training and validation loss per epoch; images per second; "
                           "whether the validation loss has levelled off (relative change "
                           "of its mean over the last 3 epochs against the 3 before). "
                           "Can be opened while the training runs.")
        form.addParam("doShowLog", params.LabelParam, label="log.csv",
                      help="The per-epoch table (epoch, train_loss, val_loss, "
                           "images_per_s, seconds).")

    def _getVisualizeDict(self):
        return {"doShowCurves": self._showCurves, "doShowLog": self._showLog}

    def _visualize(self, obj, **kwargs):
        self.setProtocol(obj)
        return self._showCurves()

    def runDir(self):
        """The run folder (absolute) of the target training or network."""
        obj = self.protocol
        if isinstance(obj, NmaemProtTrain):
            net = getattr(obj, "outputNetwork", None)
            run = runDirOf(net) if net is not None else None
            if run is None:                       # still running: its own folder
                run = obj._getExtraPath("run")
        else:
            run = runDirOf(obj)
        return projectPath(self.getProject(), run) if run else None

    def trainingName(self):
        """The name of the run shown: the label of the training protocol (for a network,
        the training whose output it is), else the run folder's protocol folder."""
        obj = self.protocol
        if isinstance(obj, NmaemProtTrain):
            return obj.getObjLabel()
        run = runDirOf(obj)
        project = self.getProject()
        if project is not None and run:
            for prot in project.getRuns(refresh=False):
                net = getattr(prot, "outputNetwork", None)
                if (isinstance(prot, NmaemProtTrain) and net is not None
                        and runDirOf(net) == run):
                    return prot.getObjLabel()
        parts = os.path.normpath(run or "").split(os.sep)
        return parts[-3] if len(parts) >= 3 else (run or "nmaem training")

    def logFile(self):
        run = self.runDir()
        fn = os.path.join(run, "log.csv") if run else None
        return fn if fn and os.path.isfile(fn) else None

    def _showCurves(self, paramName=None):
        from ..core.report import figures
        fn = self.logFile()
        if fn is None:
            return [self.errorMessage("No log.csv yet: no epoch of this training has "
                                      "finished.", "nmaem training")]
        # while the training runs, log.csv holds the epochs finished so far (it is
        # replaced whole after each epoch); training_curves draws whatever is there
        return [figurePlotter(figures.training_curves, fn, title=self.trainingName(),
                              windowTitle="nmaem training curves")]

    def _showLog(self, paramName=None):
        fn = self.logFile()
        if fn is None:
            return [self.errorMessage("No log.csv yet.", "nmaem training")]
        return [self.textView([fn], "nmaem training log")]
