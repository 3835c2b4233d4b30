# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""The states of an nmaem states protocol: each state's model thumbnail with its particle
count and share (``core.report.figures.states_overview``), the listing, and the models."""
import os

import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from ..protocols import NmaemProtStates
from .viewer_common import figurePlotter, modelViews, projectPath


class NmaemStatesViewer(ProtocolViewer):
    """States side by side: their models' thumbnails, particle counts and shares, and the
    models' RMSD to the reference ("Analyze results" of a states protocol)."""
    _label = "nmaem states"
    _environments = [DESKTOP_TKINTER]
    _targets = [NmaemProtStates]

    def _defineParams(self, form):
        form.addSection(label="States")
        form.addParam("doShowStates", params.LabelParam, label="States and their models",
                      help="Each state's model (X0 + U z at the state's representative "
                           "z) drawn along z, y and x, with its number of particles, its "
                           "share of all particles and its RMSD to the reference.")
        form.addParam("doShowListing", params.LabelParam, label="states.json",
                      help="The listing nmaem states wrote: per state its count, z, PC "
                           "coordinates and files.")
        form.addParam("doShowModels", params.LabelParam, label="Open the models",
                      help="The states' all-atom models in ChimeraX when the chimera "
                           "plugin is installed; otherwise their paths.")

    def _getVisualizeDict(self):
        return {"doShowStates": self._showStates, "doShowListing": self._showListing,
                "doShowModels": self._showModels}

    def _visualize(self, obj, **kwargs):
        self.setProtocol(obj)
        return self._showStates()

    def statesDir(self):
        """The protocol's ``nmaem states`` folder when it holds a listing, else None."""
        folder = projectPath(self.getProject(), self.protocol._getExtraPath("states"))
        return folder if os.path.isfile(os.path.join(folder, "states.json")) else None

    def _showStates(self, paramName=None):
        from ..core.report import figures
        folder = self.statesDir()
        if folder is None:
            return [self.errorMessage("No states yet (the protocol has not finished).",
                                      "nmaem states")]
        return [figurePlotter(figures.states_overview, folder,
                              windowTitle="nmaem states: %s" % self.protocol.getObjLabel())]

    def _showListing(self, paramName=None):
        folder = self.statesDir()
        if folder is None:
            return [self.errorMessage("No states.json yet.", "nmaem states")]
        return [self.textView([os.path.join(folder, "states.json")], "nmaem states")]

    def _showModels(self, paramName=None):
        structs = getattr(self.protocol, "outputStructures", None)
        if structs is None:
            return [self.errorMessage("No models yet.", "nmaem states")]
        files = [projectPath(self.getProject(), s.getFileName())
                 for s in structs.iterItems(orderBy="id")]
        return modelViews(files, "the states' models", tkParent=self.getTkRoot())
