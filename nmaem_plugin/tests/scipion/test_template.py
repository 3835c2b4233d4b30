"""The plugin's workflow template (``templates/facility_chain.json.template``): listed by
Scipion, parsed, every protocol created with its links; launched headless by Scipion's own
launcher (``python -m scipion template ID alias=value ... --nogui``, a subprocess) on the
shared chain's simulated particles it runs to the end, and its outputs are those of the
same protocols chained by hand (the shared chain plus states and export); bad aliases stop
the launcher with one line naming the alias, before any project exists.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyworkflow as pw
import starfile
from pyworkflow.project import Manager
from pyworkflow.tests import setupTestProject

from nmaem_plugin import DATA_DIR
from nmaem_plugin.constants import ATTR_EIGENVALUE
from nmaem_plugin.tests.scipion import chain, scipion_base

TEMPLATE_ID = "nmaem_plugin-facility_chain"
CLASSES = ["NmaemProtImportParticles", "NmaemProtComputeModes", "NmaemProtTrain",
           "NmaemProtInfer", "NmaemProtStates", "NmaemProtExport"]
# protocol class -> {pointer attribute: (class of the protocol it points to, output)}
LINKS = {
    "NmaemProtComputeModes": {"inputStructure": ("NmaemProtImportParticles",
                                                 "outputStructure")},
    "NmaemProtTrain": {"inputParticles": ("NmaemProtImportParticles", "outputParticles"),
                       "inputStructure": ("NmaemProtImportParticles", "outputStructure"),
                       "inputModes": ("NmaemProtComputeModes", "outputModes")},
    "NmaemProtInfer": {"inputParticles": ("NmaemProtImportParticles", "outputParticles"),
                       "inputNetwork": ("NmaemProtTrain", "outputNetwork")},
    "NmaemProtStates": {"inputParticles": ("NmaemProtInfer", "outputParticles"),
                        "inputNetwork": ("NmaemProtTrain", "outputNetwork")},
    "NmaemProtExport": {"inputParticles": ("NmaemProtInfer", "outputParticles"),
                        "inputNetwork": ("NmaemProtTrain", "outputNetwork")},
}
# the launched chain must finish within this (the scheduler sleeps up to 2 minutes
# between its checks of each protocol's inputs)
RUN_TIMEOUT = 1800


def launcherEnv():
    """The environment of ``python -m scipion template``: Scipion's launcher runs
    ``python`` from the PATH for the project scripts, so this interpreter's folder goes
    first."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["SCIPION_NOTIFY"] = "False"
    return env


def launch(args, log=None):
    """Run Scipion's template launcher: (returncode, output); with ``log``, its output
    goes to that file and the Popen is returned at once. (The scheduler processes it
    forks keep its standard output open, so a pipe would never reach its end.)"""
    cmd = [sys.executable, "-m", "scipion", "template", TEMPLATE_ID] + list(args)
    if log is not None:
        with open(log, "w") as fh:
            return subprocess.Popen(cmd, env=launcherEnv(), stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
    p = subprocess.run(cmd, env=launcherEnv(), capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=300)
    return p.returncode, p.stdout + p.stderr


def pluginTemplate():
    from pyworkflow.template import TemplateList
    tl = TemplateList()
    tl.addPluginTemplates(TEMPLATE_ID)
    found = [t for t in tl.templates if t.getObjId() == TEMPLATE_ID]
    return found[0] if found else None


def simulate(outDir, n=40, box=32, apix=2.5):
    """A small noise-free simulation with the CLI (particles.star, reference.pdb), in the
    test's own folder (replaced when a previous run left one)."""
    subprocess.run([sys.executable, "-m", "nmaem_plugin", "simulate", "--ref",
                    os.path.join(DATA_DIR, "ak_open_4ake.pdb"), "--target",
                    os.path.join(DATA_DIR, "ak_closed_1ake.pdb"), "--frames", "4", "--n",
                    str(n), "--box", str(box), "--apix", str(apix), "--no-noise",
                    "--device", "cpu", "-o", outDir, "--force"], check=True,
                   capture_output=True)
    return os.path.join(outDir, "particles.star"), os.path.join(outDir, "reference.pdb")


class TestTemplateAliases(scipion_base.NmaemBaseTest):
    """Listing, parsing, protocol creation, and the one-line messages of bad aliases."""

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.star, cls.model = simulate(os.path.abspath(cls.proj.getPath("sim")))
        # the same particles without poses (a STAR of picked particles)
        blocks = starfile.read(cls.star, always_dict=True)
        parts = blocks["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt",
                                                  "rlnAnglePsi"])
        root = os.path.dirname(cls.star)
        parts["rlnImageName"] = [
            "%s@%s" % (i, os.path.join(root, p)) for i, p in
            (n.split("@", 1) for n in parts["rlnImageName"])]
        cls.noPoses = os.path.abspath(cls.proj.getPath("no_poses.star"))
        starfile.write({"optics": blocks["optics"], "particles": parts}, cls.noPoses,
                       overwrite=True)

    def test_listed_and_parsed(self):
        t = pluginTemplate()
        self.assertIsNotNone(t, "Scipion does not list %s" % TEMPLATE_ID)
        self.assertIn("--nogui", t.description)
        t.replaceEnvVariables()
        t.parseContent()
        # required: particles and model; the rest optional with their defaults
        self.assertEqual(sorted(p.getAlias() for p in t.params.values()),
                         ["model", "particles"])
        self.assertEqual(sorted(set(t.aliases())),
                         sorted(["particles", "model", "pixelSize", "box", "epochs", "modes",
                                 "gpus", "refineModels"]))

    def test_creates_every_protocol_with_its_links(self):
        t = pluginTemplate()
        t.replaceEnvVariables()
        t.parseContent()
        t.setParamValue("particles", self.star)
        t.setParamValue("model", self.model)
        t.setParamValue("epochs", "3")
        path = t.createTemplateFile()
        try:
            with open(path) as fh:
                entries = json.load(fh)
            self.assertEqual([e["object.className"] for e in entries], CLASSES)
            self.proj.loadProtocols(path)
        finally:
            os.remove(path)
        runs = {p.getClassName(): p for p in self.proj.getRuns(refresh=True)}
        for cls in CLASSES:
            self.assertIn(cls, runs)
        imp = runs["NmaemProtImportParticles"]
        self.assertEqual(imp.particlesFile.get(), self.star)
        self.assertEqual(imp.modelFile.get(), self.model)
        self.assertEqual(runs["NmaemProtTrain"].numberOfEpochs.get(), 3)
        self.assertTrue(runs["NmaemProtTrain"].doCheck.get())
        for cls, links in LINKS.items():
            for attr, (srcCls, output) in links.items():
                ptr = getattr(runs[cls], attr)
                self.assertEqual(ptr.getObjValue().getObjId(), runs[srcCls].getObjId(),
                                 "%s.%s" % (cls, attr))
                self.assertEqual(ptr.getExtended(), output, "%s.%s" % (cls, attr))

    def assertOneLine(self, args, alias, words, rc=None):
        name = "nmaem_bad_%d" % int(time.time() * 1000)
        code, out = launch(list(args) + ["project_name=%s" % name, "--nogui"])
        lines = [ln for ln in out.splitlines() if "nmaem template" in ln]
        self.assertNotEqual(code, 0, out)
        if rc is not None:
            self.assertEqual(code, rc, out)
        self.assertEqual(len(lines), 1, out)
        self.assertIn("alias '%s'" % alias, lines[0])
        for w in words:
            self.assertIn(w, lines[0])
        self.assertNotIn("Traceback", out)
        self.assertFalse(Manager().hasProject(name), "a project was created: %s" % out)

    def test_bad_aliases(self):
        missing = os.path.abspath(self.proj.getPath("nothing_here.star"))
        self.assertOneLine(["particles=" + missing, "model=" + self.model], "particles",
                           [missing, "no such file"], rc=os.EX_DATAERR)
        self.assertOneLine(["particles=" + self.noPoses, "model=" + self.model], "particles",
                           [self.noPoses, "no poses"], rc=os.EX_DATAERR)
        undocked = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
        self.assertOneLine(["particles=" + self.star, "model=" + undocked], "model",
                           ["not docked"], rc=os.EX_DATAERR)
        self.assertOneLine(["particles=" + self.star, "model=" + self.model, "pixelSize=1.2"],
                           "pixelSize", ["1.2", "2.5"], rc=os.EX_DATAERR)
        self.assertOneLine(["particles=" + self.star, "model=" + self.model, "box=64"],
                           "box", ["64", "32"], rc=os.EX_DATAERR)
        self.assertOneLine(["particles=" + self.star], "model", ["missing"])


class TestTemplateRun(scipion_base.NmaemBaseTest):
    """The template launched headless on the shared chain's particles runs to the end,
    and gives what the same protocols chained by hand give."""

    @classmethod
    def setUpClass(cls):
        chain.use(cls)
        cls.sim._createFilenameTemplates()
        cls.star = os.path.abspath(cls.sim._getFileName("star"))
        cls.model = os.path.abspath(cls.sim.outputReference.getFileName())
        cls.name = "nmaem_template_%d" % int(time.time())
        cls.launcher = launch(["particles=" + cls.star, "model=" + cls.model,
                               "modes=%d" % chain.N_MODES, "epochs=%d" % chain.EPOCHS,
                               "gpus=0", "refineModels=false", "project_name=" + cls.name,
                               "--nogui"], log=os.path.abspath("template_launcher.log"))
        # meanwhile, the hand-made chain's last two steps (the shared chain has the others)
        from nmaem_plugin.protocols import NmaemProtExport, NmaemProtStates
        cls.states = cls.newProtocol(NmaemProtStates, objLabel="states by hand",
                                     refineGeometry=False)
        cls.states.inputParticles.set(cls.infer.outputParticles)
        cls.states.inputNetwork.set(cls.train.outputNetwork)
        cls._launch(cls.states)
        cls.export = cls.newProtocol(NmaemProtExport, objLabel="export by hand",
                                     refineGeometry=False)
        cls.export.inputParticles.set(cls.infer.outputParticles)
        cls.export.inputNetwork.set(cls.train.outputNetwork)
        cls._launch(cls.export)
        cls.launcher.wait(timeout=300)
        with open(os.path.abspath("template_launcher.log")) as fh:
            cls.launcherOutput = fh.read()
        cls.runs = cls.waitForProject(cls.name)

    @classmethod
    def waitForProject(cls, name):
        """{class name: protocol} of the launched project once every protocol has
        finished (a failure raises at the timeout with the protocols' states)."""
        from pyworkflow.project import Project
        if not Manager().hasProject(name):
            raise AssertionError("the launcher created no project:\n%s" % cls.launcherOutput)
        path = Manager().getProjectPath(name)
        cls.tplPath = path
        t0 = time.time()
        while True:
            proj = Project(pw.Config.getDomain(), path)
            proj.load()
            runs = {p.getClassName(): p for p in proj.getRuns(refresh=True)}
            if len(runs) == len(CLASSES) and all(p.isFinished() for p in runs.values()):
                return runs
            if time.time() - t0 > RUN_TIMEOUT:
                raise AssertionError("the launched project %s did not finish in %d s: %s\n%s"
                                     % (name, RUN_TIMEOUT,
                                        {k: p.getStatus() for k, p in runs.items()},
                                        "".join(scipion_base.log_tail(p, 20)
                                                for p in runs.values())))
            time.sleep(10)

    def setUp(self):
        os.chdir(self.proj.getPath())     # the hand-made chain's sets are relative to it

    def out(self, cls, name):
        """Output ``name`` of the launched project's protocol of class ``cls``."""
        return getattr(self.runs[cls], name)

    def mine(self, fn):
        """``fn()`` run in the launched project's folder (its sets' databases are
        relative to it); the tests otherwise run in the shared chain's project."""
        cwd = os.getcwd()
        os.chdir(self.tplPath)
        try:
            return fn()
        finally:
            os.chdir(cwd)

    def test_launcher_output(self):
        self.assertEqual(self.launcher.returncode, 0, self.launcherOutput)
        self.assertIn("Scheduling project %s" % self.name, self.launcherOutput)

    def test_each_protocol_ran_once(self):
        """A single-root workflow: the scheduler launched every protocol once."""
        for cls, prot in self.runs.items():
            log = os.path.join(self.tplPath, prot._getLogsPath("schedule.log"))
            with open(log) as fh:
                self.assertEqual(fh.read().count("Launching the protocol"), 1, cls)

    def test_particles_as_imported_by_hand(self):
        mine = self.out("NmaemProtImportParticles", "outputParticles")
        # the simulation's particles as its project stores them (a fresh load)
        hand = self.proj.getProtocol(self.sim.getObjId()).outputParticles
        self.assertEqual(mine.getSize(), hand.getSize())
        self.assertEqual(mine.getAlignment(), hand.getAlignment())
        self.assertTrue(mine.hasCTF())
        self.assertAlmostEqual(mine.getSamplingRate(), hand.getSamplingRate(), places=6)
        a = self.mine(lambda: {p.getObjId(): (p.getTransform().getMatrix(),
                                              p.getCTF().getDefocusU())
                               for p in mine.iterItems()})
        self.assertEqual(len(a), hand.getSize())
        for p in hand.iterItems():
            m, du = a[p.getObjId()]
            np.testing.assert_allclose(m, p.getTransform().getMatrix(), atol=1e-5)
            self.assertAlmostEqual(du, p.getCTF().getDefocusU(), places=2)

    def test_modes_as_by_hand(self):
        """The same modes: the same reference file and settings give the same ANM
        eigenvalues."""
        mine = self.out("NmaemProtComputeModes", "outputModes")
        hand = self.modes.outputModes
        self.assertEqual(type(mine), type(hand))
        self.assertEqual(mine.getSize(), chain.N_MODES)
        ev = self.mine(lambda: [getattr(m, ATTR_EIGENVALUE).get()
                                for m in mine.iterItems(orderBy="id")])
        evHand = [getattr(m, ATTR_EIGENVALUE).get() for m in hand.iterItems(orderBy="id")]
        np.testing.assert_allclose(ev, evHand, rtol=1e-4)

    def test_outputs_as_by_hand(self):
        pairs = [(self.out("NmaemProtTrain", "outputNetwork"), self.train.outputNetwork),
                 (self.out("NmaemProtInfer", "outputParticles"), self.infer.outputParticles),
                 (self.out("NmaemProtStates", "outputClasses"), self.states.outputClasses),
                 (self.out("NmaemProtStates", "outputStructures"),
                  self.states.outputStructures),
                 (self.out("NmaemProtExport", "outputAtomStructs"),
                  self.export.outputAtomStructs)]
        for mine, hand in pairs:
            self.assertEqual(type(mine), type(hand))
        zm = self.out("NmaemProtInfer", "outputParticles")
        zh = self.infer.outputParticles
        self.assertEqual(zm.getSize(), zh.getSize())
        self.assertEqual(self.mine(lambda: sorted(p.getObjId() for p in zm.iterItems())),
                         sorted(p.getObjId() for p in zh.iterItems()))
        self.assertEqual(self.mine(lambda: len(zm.getFirstItem().getZFlex())),
                         len(zh.getFirstItem().getZFlex()))
        self.assertEqual(self.out("NmaemProtExport", "outputAtomStructs").getSize(),
                         self.export.outputAtomStructs.getSize())
        # every state's particles are particles of the set, each in one state at most
        classes = self.out("NmaemProtStates", "outputClasses")
        seen = self.mine(lambda: [p.getObjId() for c in classes.iterItems()
                                  for p in c.iterItems()])
        self.assertGreater(len(seen), 0)
        self.assertEqual(len(seen), len(set(seen)))
        self.assertTrue(set(seen) <= set(self.mine(lambda: [p.getObjId()
                                                            for p in zm.iterItems()])))

    def test_flexibility_hub_attributes(self):
        """What scipion-em-flexutils' dimension reduction, landscape scoring, FlexConsensus
        and optimal-clusters protocols read from a SetOfParticlesFlex (docs/scipion.md)."""
        parts = self.out("NmaemProtInfer", "outputParticles")
        self.assertEqual(parts.getFlexInfo().getProgName(), "nmaem")
        self.assertGreater(parts.getSamplingRate(), 0)

        def read():
            first = parts.getFirstItem()
            return (first.getZFlex().size, first.getFlexInfo().getProgName(),
                    np.array([p.getZFlex() for p in parts.iterItems()]),
                    np.array([p.getZRed() for p in parts.iterItems()]))
        size, prog, z, zred = self.mine(read)
        self.assertEqual(size, chain.N_MODES)     # a numpy array
        self.assertEqual(prog, "nmaem")
        self.assertEqual(z.shape, (parts.getSize(), chain.N_MODES))
        self.assertEqual(zred.shape[0], parts.getSize())
        # zRed: coordinates on orthogonal axes of the same spread as z about 0
        np.testing.assert_allclose((zred ** 2).sum(), (z ** 2).sum(), rtol=1e-3)
