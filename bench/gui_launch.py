"""The GUI check of launching (docs/gui-check.md): in Scipion's real project window, a
protocol run from its form's Execute button and the latent viewer's "show model", with
screenshots. Needs an X display (Xvfb), xdotool and ImageMagick ``import``/``convert``,
and Scipion's environment as ``make gui`` sets it (SCIPION_PYTHON above all).

    python bench/gui_launch.py --project NmaemGuiCheck -o docs/screenshots

Steps, each scheduled in the project window's Tk loop:

1. open the project (``ProjectWindow``, as ``scipion project NAME`` does);
2. open the form of a new states protocol (3 k-means states of the inference's particles)
   as the protocol tree does (``ProtocolsView._openProtocolForm``), capture it
   (``form_states.png``) and click its Execute button with xdotool (a real X click);
3. wait until Scipion has run it (a separate process started with SCIPION_PYTHON), then
   capture the project window with the run selected (``project_launched.png``);
4. open the latent viewer of the inference as "Analyze results" does, select its
   "All-atom models" tab, click the eye of "Show the all-atom model" with xdotool: the viewer
   launches an export protocol in the project and shows the model (ChimeraX when installed,
   else a message with the file); capture that window (``show_model.png``).

It runs under ``python -O`` (it starts itself so when it is not), as Scipion runs the
project window: an installation check that fails there (prody under -O with biopython
1.81) refuses Execute, and this check sees it.

It prints one line per check and a JSON summary (statuses, logs, files) to
``gui_launch.json`` in the output folder; exit status 0 when every check passed.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import threading
import time

TIMEOUT = 600         # the whole check (s)
RUN_TIMEOUT = 300     # one launched protocol (s)


def shoot(window_id, out):
    """The window, trimmed, in 256 colours without dithering (small files)."""
    raw = out + ".raw.png"
    subprocess.check_call(["import", "-window", str(window_id), raw])
    subprocess.check_call(["convert", raw, "-trim", "+dither", "-colors", "256", "PNG8:" + out])
    os.remove(raw)


def click(widget):
    """A real X click (xdotool) at the centre of a Tk widget."""
    widget.update_idletasks()
    x = widget.winfo_rootx() + widget.winfo_width() // 2
    y = widget.winfo_rooty() + widget.winfo_height() // 2
    subprocess.check_call(["xdotool", "mousemove", str(x), str(y), "click", "1"])


def walk(widget):
    yield widget
    for child in widget.winfo_children():
        yield from walk(child)


class Check:
    def __init__(self, projectName, outDir):
        import importlib
        importlib.import_module("pyworkflow.gui.project")   # before gui.form: circular import
        from pyworkflow.project import Manager
        self.manager = Manager()
        self.projPath = self.manager.getProjectPath(projectName)
        self.out = outDir
        self.results = {"project": projectName, "checks": {}}
        self.forms = []
        self._t0 = time.time()

    # ------------------------------------------------------------------ helpers
    def ok(self, name, passed, detail=""):
        self.results["checks"][name] = {"passed": bool(passed), "detail": detail}
        print("%s %s %s" % ("ok  " if passed else "FAIL", name, detail), flush=True)

    def finish(self, code=None):
        if code is None:
            code = 0 if all(c["passed"] for c in self.results["checks"].values()) else 1
        with open(os.path.join(self.out, "gui_launch.json"), "w") as fh:
            json.dump(self.results, fh, indent=1)
        os._exit(code)

    def later(self, ms, func, *args):
        def run():
            try:
                func(*args)
            except Exception:
                import traceback
                traceback.print_exc()
                self.ok(func.__name__, False, "exception")
                self.finish(1)
        self.window.root.after(ms, run)

    def runs(self):
        return self.window.project.getRuns(refresh=True)

    def lastRun(self, className):
        found = [r for r in self.runs() if r.getClassName() == className]
        return found[-1] if found else None

    def protocolState(self, protId):
        prot = self.window.project.getProtocol(protId)
        logs = [p for p in prot.getLogPaths()]
        return prot, {"status": prot.getStatus(), "label": prot.getObjLabel(),
                      "logs": {os.path.relpath(p, self.projPath): os.path.isfile(p)
                               for p in logs}}

    def stdoutLog(self, prot):
        return os.path.relpath(prot.getStdoutLog(), self.projPath)

    # ------------------------------------------------------------------ steps
    def start(self):
        from pyworkflow.gui.form import FormWindow
        from pyworkflow.gui.project import ProjectWindow
        realShow = FormWindow.show
        forms = self.forms

        def show(form, *a, **k):       # remember each form the GUI opens
            forms.append(form)
            return realShow(form, *a, **k)
        FormWindow.show = show
        self.window = ProjectWindow(self.projPath)
        self.window.root.geometry("1100x800+0+0")
        self.later(12000, self.openStatesForm)
        self.window.show()

    def openStatesForm(self):
        from nmaem_plugin.protocols import NmaemProtStates
        from nmaem_plugin.protocols.protocol_states import STATES_KMEANS
        project = self.window.project
        infer = self.lastRun("NmaemProtInfer")
        prot = project.newProtocol(NmaemProtStates, statesMode=STATES_KMEANS,
                                   numberOfClusters=3, refineGeometry=False)
        prot.inputParticles.set(infer.outputParticles)
        self.before = {r.getObjId() for r in self.runs()}
        self.later(4000, self.clickExecute)
        # as the protocol tree does; it enters a nested Tk loop until the form closes
        self.window.getViewWidget()._openProtocolForm(prot)

    def clickExecute(self):
        form = self.forms[-1]
        form.root.update()
        shoot(form.root.wm_frame(), os.path.join(self.out, "form_states.png"))
        click(form.btnExecute)
        self.launchedAt = time.time()
        self.later(3000, self.waitLaunched)

    def waitLaunched(self):
        new = [r for r in self.runs() if r.getObjId() not in self.before]
        if not new:
            if time.time() - self.launchedAt > 30:
                self.ok("execute button launches the protocol", False, "no new run")
                return self.finish(1)
            return self.later(2000, self.waitLaunched)
        prot, state = self.protocolState(new[0].getObjId())
        if prot.isActive() and time.time() - self.launchedAt < RUN_TIMEOUT:
            return self.later(3000, self.waitLaunched)
        self.results["launched"] = state
        logsOk = state["logs"].get(self.stdoutLog(prot), False)
        self.ok("protocol launched from the GUI finishes", prot.isFinished(),
                "%s: %s" % (state["label"], state["status"]))
        self.ok("the launched run's log exists", logsOk, self.stdoutLog(prot))
        outputs = [name for name, _ in prot.iterOutputAttributes()]
        self.results["launched"]["outputs"] = outputs
        self.ok("it has outputs", bool(outputs), ", ".join(outputs))
        view = self.window.getViewWidget()
        view.refreshRuns()
        view._selectItemProtocol(prot)
        view.runsGraphCanvas.xview_moveto(1.0)      # the new run is the rightmost box
        self.launched = prot
        self.later(4000, self.shootProject)

    def shootProject(self):
        self.window.root.update()
        shoot(self.window.root.wm_frame(), os.path.join(self.out, "project_launched.png"))
        self.later(500, self.openLatentViewer)

    def openLatentViewer(self):
        infer = self.lastRun("NmaemProtInfer")
        self.before = {r.getObjId() for r in self.runs()}
        self.nForms = len(self.forms)
        self.later(5000, self.clickShowModel)
        # as the "Analyze results" button does (the first viewer found for the run)
        self.window.getViewWidget()._analyzeResults(infer, None)

    def clickShowModel(self):
        from tkinter import ttk
        if len(self.forms) == self.nForms:
            self.ok("analyze results opens the latent viewer", False, "no viewer form")
            return self.finish(1)
        form = self.forms[-1]
        self.ok("analyze results opens the latent viewer", True, form.root.title())
        tabs = [w for w in walk(form.root) if isinstance(w, ttk.Notebook)]
        tabs[0].select(1)                               # the "All-atom models" tab
        form.root.update()
        widget = form.widgetDict["doShowModel"]
        from pyworkflow.utils import Message
        eye = [w for w in walk(widget.btnFrame) if w.winfo_class() == "Button"
               and str(w.cget("text")) == Message.LABEL_BUTTON_VIS]
        self.clickedAt = time.time()
        self.viewerForm = form
        # the viewer launches the export and waits for it in the Tk thread: watch from here
        self.later(3000, self.waitModel)
        click(eye[0])

    def waitModel(self):
        out = subprocess.run(["xdotool", "search", "--name", "^nmaem: "],
                             capture_output=True, text=True).stdout.split()
        if not out:
            if time.time() - self.clickedAt > RUN_TIMEOUT:
                self.ok("show model opens a window", False, "none after %d s" % RUN_TIMEOUT)
                return self.finish(1)
            return self.later(2000, self.waitModel)
        win = out[-1]
        title = subprocess.run(["xdotool", "getwindowname", win], capture_output=True,
                               text=True).stdout.strip()
        time.sleep(1)
        shoot(win, os.path.join(self.out, "show_model.png"))
        new = [r for r in self.runs() if r.getObjId() not in self.before]
        if new:
            prot, state = self.protocolState(new[-1].getObjId())
            self.results["show_model"] = state
            self.ok("show model's export protocol finishes", prot.isFinished(),
                    "%s: %s" % (state["label"], state["status"]))
            self.ok("the export's log exists", state["logs"].get(self.stdoutLog(prot), False),
                    self.stdoutLog(prot))
            files = [a.getFileName() for a in getattr(prot, "outputAtomStructs", [])]
            self.results["show_model"]["files"] = files
            exist = [os.path.isfile(os.path.join(self.projPath, f)) for f in files]
            self.ok("the model file exists", files and all(exist), ", ".join(files))
        else:
            self.ok("show model's export protocol finishes", False, "no new run")
        self.results["show_model_window"] = title
        self.ok("show model opens a window", True, title)
        self.finish()


def main():
    if not sys.flags.optimize:
        # as Scipion starts the project window (pyworkflow's pw_project: python -O -m scipion
        # project NAME): the installation check and the forms' validation run optimised
        os.execv(sys.executable, [sys.executable, "-O"] + sys.argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", default="NmaemGuiCheck")
    ap.add_argument("-o", "--output", default="docs/screenshots")
    args = ap.parse_args()
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    for f in glob.glob(os.path.join(out, "*.raw.png")):
        os.remove(f)
    check = Check(args.project, out)

    def watchdog():
        time.sleep(TIMEOUT)
        print("FAIL timeout after %d s" % TIMEOUT, flush=True)
        check.finish(2)
    threading.Thread(target=watchdog, daemon=True).start()
    check.start()


if __name__ == "__main__":
    sys.exit(main())
