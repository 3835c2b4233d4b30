"""Screenshots of the nmaem protocol forms and viewers (the documented GUI check,
docs/gui-check.md). Needs an X display (Xvfb), ImageMagick ``import`` and ``convert``.

    python bench/gui_screenshots.py --project TestNmaemViewers -o docs/screenshots

The project must hold the outputs of the nmaem protocols: the one that
``python -m scipion tests nmaem_plugin.tests.scipion.test_viewers.TestNmaemViewers`` makes
(simulate, compute modes, train, infer) is used by default. Each screenshot is taken in
its own process (one Tk form per process, see ../shared/scipion-gui-headless.md).
"""
import argparse
import importlib
import os
import subprocess
import sys

FORMS = ["NmaemProtComputeModes", "NmaemProtSimulate", "NmaemProtTrain", "NmaemProtInfer",
         "NmaemProtExport", "NmaemProtEvaluate"]
# viewer, target protocol class, target output (None: the protocol), shown view
VIEWERS = [("NmaemLatentViewer", "NmaemProtInfer", None, "_showLandscape", "viewer_latent"),
           ("NmaemLatentViewer", "NmaemProtInfer", None, "_showAmplitudes",
            "viewer_latent_amplitudes"),
           ("NmaemTrainingViewer", "NmaemProtTrain", None, "_showCurves", "viewer_training"),
           ("NmaemModesViewer", "NmaemProtComputeModes", "outputModes", "_showOverview",
            "viewer_modes")]


def _shoot(window_id, out, width=1100):
    raw = out + ".raw.png"
    subprocess.check_call(["import", "-window", str(window_id), raw])
    subprocess.check_call(["convert", raw, "-trim", "-resize", "%dx>" % width, "-colors", "256",
                           "PNG8:" + out])
    os.remove(raw)


def _project(name):
    # before gui.form (a circular import); importlib, so that no unused name is bound
    importlib.import_module("pyworkflow.gui.project")
    from pyworkflow.project import Manager
    project = Manager().loadProject(name)
    os.chdir(project.getPath())
    return project


def _lastRun(project, className):
    runs = [r for r in project.getRuns() if r.getClassName() == className]
    return runs[-1] if runs else None


def form_child(name, className, out):
    project = _project(name)
    from pyworkflow.gui.form import FormWindow
    import nmaem_plugin.protocols as protocols
    prot = project.newProtocol(getattr(protocols, className))
    w = FormWindow("Protocol: " + prot.getClassLabel(), prot, lambda *a: None)

    def shot():
        w.root.update()
        _shoot(w.root.wm_frame(), out)
        w.root.master.destroy() if w.root.master else w.root.destroy()
    w.root.after(3000, shot)
    w.show()


def viewer_child(name, viewerName, protClass, output, method, out):
    project = _project(name)
    import matplotlib
    matplotlib.use("TkAgg")
    from pyworkflow.gui.plotter import Plotter
    Plotter.setBackend("TkAgg")
    import matplotlib.pyplot as plt
    from pyworkflow.plugin import Domain
    from pyworkflow.viewer import DESKTOP_TKINTER
    prot = _lastRun(project, protClass)
    obj = getattr(prot, output) if output else prot
    # as the project window does: the viewers Scipion finds for the object
    found = [v for v in Domain.findViewers(obj, DESKTOP_TKINTER) if v.__name__ == viewerName]
    viewer = found[0](project=project, protocol=obj)

    def quit(code):
        plt.close("all")
        root = viewer.getTkRoot()
        root.master.destroy() if root.master else root.destroy()
        os._exit(code)

    def shot_form():
        try:
            root = viewer.getTkRoot()
            root.update()
            _shoot(root.wm_frame(), out.replace(".png", "_form.png"), width=700)
            views = getattr(viewer, method)()
            for v in views:
                v.show()
            root.after(2500, shot_plot, views)
        except Exception:
            import traceback
            traceback.print_exc()
            quit(1)

    def shot_plot(views):
        try:
            fig = views[0].getFigure()
            fig.canvas.draw()
            win = fig.canvas.manager.window
            win.update()
            _shoot(win.wm_frame(), out)
            quit(0)
        except Exception:
            import traceback
            traceback.print_exc()
            quit(1)

    # visualize() builds the viewer's form and enters the Tk loop
    from pyworkflow.gui.form import FormWindow
    real_show = FormWindow.show

    def show(self, *a, **k):
        self.root.after(3000, shot_form)
        real_show(self, *a, **k)
    FormWindow.show = show
    viewer.visualize(obj)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", default="TestNmaemViewers")
    ap.add_argument("-o", "--output", default="docs/screenshots")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        (form_child if kind == "form" else viewer_child)(args.project, *rest)
        return
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    me = os.path.abspath(__file__)
    jobs = [["form", c, os.path.join(out, "form_%s.png" % c[len("NmaemProt"):].lower())]
            for c in FORMS]
    jobs += [["viewer", v, p, o or "", m, os.path.join(out, f + ".png")]
             for v, p, o, m, f in VIEWERS]
    for job in jobs:
        for _ in range(3):      # matplotlib's display probe fails now and then on a busy Xvfb
            rc = subprocess.call([sys.executable, me, "--project", args.project, "--child"]
                                 + job, timeout=180)
            if rc == 0:
                break
        print("%s %s" % ("ok  " if rc == 0 else "FAIL", job[-1]))


if __name__ == "__main__":
    main()
