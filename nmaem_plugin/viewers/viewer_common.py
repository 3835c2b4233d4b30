# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""What the nmaem viewers share: a pwem ``EmPlotter`` filled by a ``core.report.figures``
function, project paths, and opening atomic models in ChimeraX when the chimera plugin
is installed. Only pyworkflow at the top (matplotlib is imported when a plot is made)."""
import os

from pyworkflow.viewer import MessageView, MSG_INFO


def figurePlotter(plotFunction, *args, windowTitle="nmaem", **kwargs):
    """An EmPlotter whose figure ``plotFunction(*args, fig=figure, **kwargs)`` draws
    (a function of ``nmaem_plugin.core.report.figures``). The figure's own layout is kept."""
    from pwem.viewers.plotter import EmPlotter
    plotter = EmPlotter(x=1, y=1, windowTitle=windowTitle)
    plotFunction(*args, fig=plotter.getFigure(), **kwargs)
    plotter.tightLayoutOn = False      # core.report.figures uses matplotlib's constrained layout
    return plotter


def projectPath(project, path):
    """``path`` (relative to the project, as protocols store it) made absolute."""
    if not path:
        return path
    if os.path.isabs(path) or project is None:
        return os.path.abspath(path)
    return os.path.join(project.getPath(), path)


def launchFailureMessage(prot, project=None):
    """Why a protocol launched from a viewer gave no output, pointing to logs that exist:
    its log files when Scipion wrote them, otherwise the interpreter Scipion launches
    protocols with (``SCIPION_PYTHON``), the usual cause of a run that never started."""
    import pyworkflow
    logs = [projectPath(project, p) for p in prot.getLogPaths()]
    logs = [p for p in logs if os.path.isfile(p)]
    what = "The protocol '%s' (%s)" % (prot.getObjLabel(), prot.getStatusMessage())
    if logs:
        return "%s gave no output; see its logs:\n\n%s" % (what, "\n".join(logs))
    return ("%s did not start: Scipion wrote no log. Scipion runs protocols with the "
            "interpreter '%s' (SCIPION_PYTHON), which must be a Python with Scipion "
            "installed; 'make gui' sets it to the virtual environment's Python. Messages of "
            "a run that did not start are in the terminal the GUI was started from."
            % (what, pyworkflow.PYTHON))


def chimeraProgram():
    """The ChimeraX executable of the Scipion chimera plugin, or None when the plugin
    (scipion-em-chimera) or the program is not installed."""
    import importlib.util
    if importlib.util.find_spec("chimera") is None:
        return None
    try:
        from pwem.viewers.viewer_chimera import Chimera
        prog = Chimera.getProgram()
    except Exception:  # a broken chimera plugin must not break the viewer
        return None
    return prog if prog and os.path.exists(prog) else None


def modelViews(files, what, tkParent=None):
    """Views that open atomic model files: ChimeraX when available, else a message
    with the paths (for any molecular viewer)."""
    files = [os.path.abspath(f) for f in files]
    if chimeraProgram() is not None:
        from pwem.viewers.viewer_chimera import ChimeraView
        return [ChimeraView(files)]
    msg = ("%s:\n\n%s\n\nChimeraX opens it when the Scipion chimera plugin "
           "(scipion-em-chimera) is installed; any molecular viewer reads it."
           % (what, "\n".join(files)))
    return [MessageView(msg, title="nmaem: %s" % what, msgType=MSG_INFO, tkParent=tkParent)]
