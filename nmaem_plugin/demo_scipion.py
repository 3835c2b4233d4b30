"""``make demo``: the Scipion workflow on the bundled adenylate kinase models.

A Scipion project is created headless and the plugin's protocols run in it, to the end,
exactly as a user would chain them in the GUI:

    import atomic structure (open AK, 4AKE)  import atomic structure (closed AK, 1AKE)
      -> nmaem - simulate particles (open -> closed morph, discontinuous distribution)
      -> nmaem - compute normal modes (16 modes of the simulation's reference, closed as target)
      -> nmaem - train -> nmaem - infer -> nmaem - export models (density maxima)
      -> nmaem - evaluate

It prints the accuracy figures, where the project lives and the command that opens it in
the Scipion GUI. Run as ``python -m nmaem_plugin.demo_scipion [--project NAME]`` with the
Scipion environment variables set (the Makefile sets them).
"""
import argparse
import json
import os
import re
import shlex
import sys
import threading

from nmaem_plugin import DATA_DIR
from nmaem_plugin.demo import print_results


# lines of a protocol's log worth showing while it runs: nmaem's progress (epochs,
# images/s, ETA), its one-line errors and the steps' results
# the progress lines of nmaem (stdout and stderr: Progress writes to stderr), the per-particle
# fit's and the refinement's included, so that the console is never silent for minutes
PROGRESS = re.compile(r"epoch|images/s|ETA|nmaem: (error|warning)|^(states|export|infer|"
                      r"simulate|modes|evaluate|train|fit|calibration|refine|report)\b", re.I)


def _follow(path, pos):
    """New complete lines of the file ``path`` after byte ``pos``: (lines, new pos)."""
    if not os.path.exists(path):
        return [], pos
    with open(path, "rb") as fh:
        fh.seek(pos)
        data = fh.read()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", "replace").splitlines(), pos + end


def _printProgress(prot, stop, poll=2.0):
    """Print the progress lines of ``prot``'s stdout and stderr logs until ``stop`` is set
    (reads files only: the project database stays with the main thread)."""
    pos = {}
    while True:
        stopping = stop.wait(poll)
        try:
            logs = [p for p in prot.getLogPaths() if p.endswith((".stdout", ".stderr"))]
        except Exception:       # the working folder is not assigned yet
            logs = []
        for log in logs:
            lines, pos[log] = _follow(log, pos.get(log, 0))
            for line in lines:
                if PROGRESS.search(line.strip()):
                    print("  %s" % line.strip(), flush=True)
        if stopping:
            return


def _launch(project, prot):
    """Launch ``prot`` (its own process) and print its progress lines while it runs."""
    label = prot.getObjLabel()
    print("running: %s" % label, flush=True)
    stop = threading.Event()
    follower = threading.Thread(target=_printProgress, args=(prot, stop), daemon=True)
    follower.start()
    try:
        project.launchProtocol(prot, wait=True)
    finally:
        stop.set()
        follower.join()
    if not prot.isFinished():
        logs = [p for p in prot.getLogPaths() if os.path.exists(p)]
        tail = ""
        if logs:
            with open(logs[-1]) as fh:
                tail = "".join(fh.readlines()[-30:])
        raise SystemExit("demo: protocol '%s' failed; its log ends with:\n%s" % (label, tail))
    return prot


def gui_command(project_name):
    """The shell command that opens the project in the Scipion GUI with everything the
    protocols launched from it need (Scipion's folders, its interpreter)."""
    names = ("SCIPION_HOME", "SCIPION_USER_DATA", "SCIPION_LOCAL_CONFIG", "SCIPION_PYTHON",
             "KEOPS_CACHE_FOLDER")
    env = " ".join("%s=%s" % (k, shlex.quote(os.environ[k])) for k in names
                   if os.environ.get(k))
    return "%s %s -m scipion project %s" % (env, shlex.quote(sys.executable),
                                           shlex.quote(project_name))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nmaem_plugin.demo_scipion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", default="nmaem_demo", help="project name (default nmaem_demo)")
    p.add_argument("--n", type=int, default=3000, help="particles to simulate (default 3000)")
    p.add_argument("--box", type=int, default=64, help="box in pixels (default 64)")
    p.add_argument("--apix", type=float, default=2.4, help="pixel size in A (default 2.4)")
    p.add_argument("--snr-db", type=float, default=-10.0, help="SNR in dB (default -10)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    args = p.parse_args(argv)

    # a plain virtual environment: Scipion's domain and configuration files
    os.environ.setdefault("SCIPION_DOMAIN", "pwem")
    os.environ.setdefault("SCIPION_NOTIFY", "False")
    home = os.environ.setdefault("SCIPION_HOME", os.path.abspath(".scipion"))
    os.environ.setdefault("SCIPION_LOCAL_CONFIG", os.path.join(home, "config", "scipion.conf"))
    if not os.path.exists(os.path.join(home, "config", "hosts.conf")):
        import subprocess
        subprocess.run([sys.executable, "-m", "scipion", "config", "--unattended"], check=True,
                       stdout=subprocess.DEVNULL)
    import pyworkflow
    if not os.environ.get("SCIPION_PYTHON"):
        os.environ["SCIPION_PYTHON"] = sys.executable
        pyworkflow.PYTHON = sys.executable
    from pwem.protocols import ProtImportPdb
    from pyworkflow.project import Manager

    from nmaem_plugin.constants import SIM_MORPH
    from nmaem_plugin.protocols import (NmaemProtComputeModes, NmaemProtEvaluate,
                                        NmaemProtExport, NmaemProtInfer, NmaemProtSimulate,
                                        NmaemProtTrain)
    from nmaem_plugin.protocols.protocol_export import EXPORT_MAXIMA

    manager = Manager()
    if manager.hasProject(args.project):
        print("demo: replacing the previous demo project '%s'" % args.project)
        manager.deleteProject(args.project)
    project = manager.createProject(args.project)
    os.chdir(project.getPath())

    def new(cls, objLabel=None, **kw):
        prot = project.newProtocol(cls, **kw)
        if objLabel:
            prot.setObjLabel(objLabel)
        return prot

    imports = {}
    for name, label in (("ak_open_4ake.pdb", "open AK (4AKE)"),
                        ("ak_closed_1ake.pdb", "closed AK (1AKE)")):
        prot = new(ProtImportPdb, objLabel="import " + label,
                   inputPdbData=ProtImportPdb.IMPORT_FROM_FILES,
                   pdbFile=os.path.join(DATA_DIR, name))
        imports[name] = _launch(project, prot)

    sim = new(NmaemProtSimulate, objLabel="simulate open -> closed", inputSource=SIM_MORPH,
              numberOfFrames=50, numberOfParticles=args.n, distribution=2, boxSize=args.box,
              samplingRate=args.apix, addNoise=True, snrDb=args.snr_db, shiftStd=1.0, seed=0)
    sim.referenceStructure.set(imports["ak_open_4ake.pdb"].outputPdb)
    sim.targetStructure.set(imports["ak_closed_1ake.pdb"].outputPdb)
    _launch(project, sim)

    modes = new(NmaemProtComputeModes, objLabel="16 normal modes", numberOfModes=16)
    modes.inputStructure.set(sim.outputReference)
    modes.targetStructure.set(imports["ak_closed_1ake.pdb"].outputPdb)
    _launch(project, modes)

    train = new(NmaemProtTrain, objLabel="train", numberOfEpochs=args.epochs, autoBatch=False,
                batchSize=64, encoder=1)
    train.inputParticles.set(sim.outputParticles)
    train.inputStructure.set(sim.outputReference)
    train.inputModes.set(modes.outputModes)
    _launch(project, train)

    infer = new(NmaemProtInfer, objLabel="infer")
    infer.inputNetwork.set(train.outputNetwork)
    infer.inputParticles.set(sim.outputParticles)
    _launch(project, infer)

    export = new(NmaemProtExport, objLabel="models at the density maxima",
                 exportMode=EXPORT_MAXIMA)
    export.inputParticles.set(infer.outputParticles)
    _launch(project, export)

    evaluate = new(NmaemProtEvaluate, objLabel="evaluate against the ground truth")
    evaluate.inputParticles.set(infer.outputParticles)
    evaluate.simulatedParticles.set(sim.outputParticles)
    _launch(project, evaluate)

    with open(evaluate._getExtraPath("evaluation.json")) as fh:
        ev = json.load(fh)
    print_results(ev, args)
    print("  %d all-atom models exported in %s" % (export.outputAtomStructs.getSize(),
                                                   os.path.abspath(export._getExtraPath())))
    print()
    print("project: %s" % project.getPath())
    print("open it in the Scipion GUI with (or: make gui):\n  %s" % gui_command(args.project))
    return 0


if __name__ == "__main__":
    sys.exit(main())
