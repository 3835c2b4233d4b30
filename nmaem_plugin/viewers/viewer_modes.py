# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Normal modes computed by nmaem: eigenvalues, collectivity, per-residue fluctuation,
overlap with a target and the floor RMSD (``core.report.figures.modes_overview``), and the
animation of one mode (multi-model PDB) in ChimeraX."""
import os

import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer
from pwem.objects import SetOfNormalModes

from ..constants import ATTR_ANIMATION, ATTR_MODE_INDEX
from ..protocols import NmaemProtComputeModes
from .viewer_common import figurePlotter, modelViews, projectPath


def isNmaemModes(modes):
    first = modes.getFirstItem() if modes is not None and modes.getSize() else None
    return first is not None and hasattr(first, ATTR_MODE_INDEX)


class NmaemModesViewer(ProtocolViewer):
    """Diagnostics of nmaem normal modes and the animation of a chosen mode."""
    _label = "nmaem normal modes"
    _environments = [DESKTOP_TKINTER]
    _targets = [NmaemProtComputeModes, SetOfNormalModes]

    @classmethod
    def can_handle_this_instance(cls, instance):
        if isinstance(instance, SetOfNormalModes):
            return isNmaemModes(instance)
        return True

    def _defineParams(self, form):
        form.addSection(label="Normal modes")
        form.addParam("doShowOverview", params.LabelParam, label="Mode diagnostics",
                      help="ANM eigenvalue spectrum, collectivity of each mode, per-residue "
                           "fluctuation (sum over modes of |u|^2/eigenvalue) and, when the "
                           "modes were computed with a target, the overlap of each mode "
                           "with the displacement to the target, the cumulative overlap "
                           "and the floor RMSD (the best RMSD any amplitudes reach).")
        form.addParam("modeNumber", params.IntParam, default=1, validators=[params.Positive],
                      label="Mode", help="Mode to animate (1 = lowest eigenvalue).")
        form.addParam("doShowAnimation", params.LabelParam, label="Show the mode's animation",
                      help="The multi-model PDB X0 + a sin(2 pi k/20) u of the mode, opened "
                           "in ChimeraX when the chimera plugin is installed (play it with "
                           "'coordset #1'); otherwise the file's path is shown.")

    def _getVisualizeDict(self):
        return {"doShowOverview": self._showOverview, "doShowAnimation": self._showAnimation}

    def _visualize(self, obj, **kwargs):
        self.setProtocol(obj)
        return self._showOverview()

    def getModes(self):
        obj = self.protocol
        if isinstance(obj, SetOfNormalModes):
            return obj
        return getattr(obj, "outputModes", None)

    def modesFile(self):
        modes = self.getModes()
        if modes is None or not modes.getSize():
            return None
        fn = projectPath(self.getProject(), modes.getFirstItem().getModeFile())
        return fn if os.path.isfile(fn) else None

    def _showOverview(self, paramName=None):
        from ..core.report import figures
        fn = self.modesFile()
        if fn is None:
            return [self.errorMessage("No modes file (the protocol has no output yet).",
                                      "nmaem modes")]
        return [figurePlotter(figures.modes_overview, fn, windowTitle="nmaem normal modes")]

    def animationFile(self, number):
        """The animation PDB of mode ``number`` (1-based), or None."""
        modes = self.getModes()
        if modes is None:
            return None
        for m in modes.iterItems():
            if getattr(m, ATTR_MODE_INDEX).get() == number - 1:
                anim = getattr(m, ATTR_ANIMATION, None)
                return projectPath(self.getProject(), anim.get()) if anim is not None else None
        return None

    def _showAnimation(self, paramName=None):
        n = self.modeNumber.get()
        fn = self.animationFile(n)
        if fn is None or not os.path.isfile(fn):
            size = self.getModes().getSize() if self.getModes() is not None else 0
            return [self.errorMessage("No animation for mode %d (the set has %d modes)."
                                      % (n, size), "nmaem modes")]
        return modelViews([fn], "Animation of mode %d (multi-model PDB)" % n,
                          tkParent=self.getTkRoot())
