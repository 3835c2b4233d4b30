# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""The maps of the states protocol (``nmaem states --reconstruct``): each state's map in
central sections with its model's contour, the FSC curves of every state, and the table of
every state's map against every state's model (drawn by ``core.analysis.mapfigure``)."""
import os

import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, MessageView, MSG_INFO, ProtocolViewer

from ..protocols import NmaemProtStates
from .viewer_common import figurePlotter


class NmaemStatesViewer(ProtocolViewer):
    """Each state's map (central sections, low-passed to its resolution, with the contour
    of its model's map), the half-map and map-model FSC curves, and the states x models
    correlation table."""
    _label = "nmaem state maps"
    _environments = [DESKTOP_TKINTER]
    _targets = [NmaemProtStates]

    def _defineParams(self, form):
        form.addSection(label="State maps")
        form.addParam("stateNumber", params.IntParam, default=1, label="State",
                      help="The state whose map is shown (1 = state_01).")
        form.addParam("doShowMap", params.LabelParam, label="Map sections and FSC",
                      help="Central sections (xy, xz, yz through the box centre) of the "
                           "state's RELION map low-passed to its half-map resolution, the "
                           "contour of its model's map (the renderer's form factors), and "
                           "its FSC curves: half maps (0.143) and map against model (0.5).")
        form.addParam("doShowCurves", params.LabelParam, label="FSC curves of all states",
                      help="The half-map FSC of every state's map and the FSC of each map "
                           "with its own model.")
        form.addParam("doShowTable", params.LabelParam, label="States x models table",
                      help="Correlation of every state's map with every state's model map, "
                           "both low-passed to the coarsest state resolution: each row's "
                           "maximum should be its own state.")

    def _getVisualizeDict(self):
        return {"doShowMap": self._showMap, "doShowCurves": self._showCurves,
                "doShowTable": self._showTable}

    def _listing(self):
        from ..core.analysis.states import read_states_json
        prot = self.protocol
        prot._createFilenameTemplates()
        fn = prot._getFileName("statesJson")
        return read_states_json(fn) if os.path.exists(fn) else None

    def _rows(self):
        listing = self._listing()
        if listing is None:
            return None, [MessageView("The states are not assigned yet.", title="nmaem",
                                      msgType=MSG_INFO, tkParent=self.getTkRoot())]
        rows = [r for r in listing["states"] if r.get("map")]
        if not rows:
            return None, [MessageView("This run made no maps (Reconstruct each state: No, "
                                      "or too few particles).", title="nmaem",
                                      msgType=MSG_INFO, tkParent=self.getTkRoot())]
        return (listing, rows), None

    def _folder(self):
        return self.protocol._getFileName("states")

    def _showMap(self, paramName=None):
        from ..core.analysis.fsc import lowpass
        from ..core.analysis.mapfigure import draw_state_map
        from ..core.analysis.statemaps import read_fsc_json
        from ..core.io.maps import read_map
        got, views = self._rows()
        if got is None:
            return views
        rows = [r for r in got[1] if r["state"] == self.stateNumber.get()]
        if not rows:
            return [MessageView("State %d has no map (states with maps: %s)." % (
                self.stateNumber.get(), ", ".join(str(r["state"]) for r in got[1])),
                title="nmaem", msgType=MSG_INFO, tkParent=self.getTkRoot())]
        row, folder = rows[0], self._folder()
        vol, apix = read_map(os.path.join(folder, row["map"]))
        model = read_map(os.path.join(folder, row["model_map"]))[0]
        info = read_fsc_json(os.path.join(folder, row["fsc"]))
        res = info["resolution_0143"]
        curves = [(label, info[key]["frequency"], info[key]["fsc"], thr,
                   info[rkey] if info[ckey] else None)
                  for label, key, thr, rkey, ckey in (
                      ("half maps", "half_map_fsc", 0.143, "resolution_0143",
                       "fsc_0143_crossed"),
                      ("map vs model", "model_map_fsc", 0.5, "model_map_resolution_05",
                       "model_fsc_05_crossed"))]
        return [figurePlotter(draw_state_map, lowpass(vol, apix, res), lowpass(model, apix, res),
                              apix, curves, title="%s: %d particles" % (
                                  row["name"], row["n_particles"]),
                              windowTitle="nmaem: %s map" % row["name"])]

    def _showCurves(self, paramName=None):
        from ..core.analysis.statemaps import read_fsc_json
        got, views = self._rows()
        if got is None:
            return views
        infos = [(r, read_fsc_json(os.path.join(self._folder(), r["fsc"]))) for r in got[1]]
        return [figurePlotter(_drawCurves, infos, windowTitle="nmaem: state FSC curves")]

    def _showTable(self, paramName=None):
        got, views = self._rows()
        if got is None:
            return views
        corr = got[0].get("map_model_correlation")
        lines = ["Correlation of each state's map (rows) with each state's model map "
                 "(columns), low-passed to %.1f A:" % corr["resolution"], "",
                 "map \\ model  " + "  ".join("%9s" % m for m in corr["models"])]
        for name, row in zip(corr["maps"], corr["table"]):
            lines.append("%-12s " % name + "  ".join("%9.3f" % v for v in row))
        return [MessageView("\n".join(lines), title="nmaem: states x models",
                            msgType=MSG_INFO, tkParent=self.getTkRoot())]


def _drawCurves(infos, fig=None):
    """Half-map FSC (solid) and map-model FSC (dashed) of each state."""
    from ..core.base.figures import prepare_figure
    fig = prepare_figure(fig, 7.0, 4.5)
    ax = fig.subplots()
    for row, info in infos:
        line, = ax.plot(info["half_map_fsc"]["frequency"], info["half_map_fsc"]["fsc"],
                        lw=1.2, label="%s half maps: %.1f A" % (row["name"],
                                                                 info["resolution_0143"]))
        ax.plot(info["model_map_fsc"]["frequency"], info["model_map_fsc"]["fsc"], lw=1.0,
                ls="--", color=line.get_color(),
                label="%s vs model: %.1f A" % (row["name"], info["model_map_resolution_05"]))
    for thr in (0.143, 0.5):
        ax.axhline(thr, color="grey", lw=0.6, ls=":")
    ax.set_ylim(-0.2, 1.05)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC")
    ax.legend(fontsize=7)
    return fig
