# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Scipion plugin ``nmaem_plugin``.

The package is used in two ways:

* by Scipion, which discovers it through the ``pyworkflow.plugin`` entry point
  and reads ``Plugin`` (and ``protocols``, ``viewers``, ``bibtex``);
* by the ``nmaem`` command line (``nmaem_plugin.core``), which must work
  without Scipion installed and must not pay for importing it.

``Plugin`` is therefore built lazily (PEP 562 module ``__getattr__``): importing
``nmaem_plugin`` imports nothing from Scipion until Scipion asks for ``Plugin``.
"""
import os

__version__ = "0.1.0"

_HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(_HERE, "data")


def _make_plugin_class():
    import pwem

    class Plugin(pwem.Plugin):
        """Scipion plugin class of nmaem.

        The heavy work runs as the ``nmaem`` command (``python -m nmaem_plugin``)
        in the Python environment Scipion runs in; there are no external binaries
        to install, so ``validateInstallation`` checks that the scientific
        dependencies import.
        """
        _homeVar = ""
        _pathVars = []
        _supportedVersions = [__version__]
        _url = "https://github.com/scipion-em/scipion-em-nmaem"
        _installErrors = None          # validateInstallation's answer, once per process

        @classmethod
        def _defineVariables(cls):
            pass

        @classmethod
        def getNmaemCommand(cls):
            """The program runJob runs: this interpreter with ``-m nmaem_plugin``."""
            import sys
            return sys.executable, "-m nmaem_plugin"

        @classmethod
        def validateInstallation(cls):
            """Return a list of error messages (empty when the install is usable).

            The dependencies are imported in a child process run as the protocols run
            ``nmaem`` (this interpreter, without ``-O``), once per process: Scipion's
            project window runs under ``python -O``, where importing prody fails with
            biopython 1.81 (the version scipion-em pins; an ``assert`` with a side effect),
            though ``nmaem`` itself never runs that way. Each failure names the package,
            the exception and where it was raised."""
            if cls._installErrors is None:
                cls._installErrors = dependency_errors()
            return list(cls._installErrors)

        @classmethod
        def defineBinaries(cls, env):
            """Nothing to compile or download: dependencies come from pip."""
            pass

        def getTemplates(self):
            """The workflow templates of ``templates/*.json.template`` (``scipion3
            template``), as templates whose aliases are checked for what they mean
            before the project is created (``nmaem_plugin.workflow_template``)."""
            from .workflow_template import pluginTemplates
            return pluginTemplates(self.getName())

    return Plugin


DEPENDENCIES = ("torch", "prody", "gemmi", "pykeops", "mrcfile", "starfile")

_IMPORT_CHECK = """
import importlib, json, sys, traceback
out = {}
for mod in sys.argv[1:]:
    try:
        importlib.import_module(mod)
    except BaseException as exc:
        tb = traceback.extract_tb(exc.__traceback__)
        where = "%s:%d" % (tb[-1].filename, tb[-1].lineno) if tb else ""
        out[mod] = "%s: %s%s" % (type(exc).__name__, str(exc).splitlines()[0] if str(exc)
                                 else "", " (at %s)" % where if where else "")
sys.stdout.write("\\nNMAEM-IMPORTS " + json.dumps(out) + "\\n")
"""


def dependency_errors(python=None, modules=DEPENDENCIES, timeout=300):
    """The error messages of the dependencies that ``python`` (default: this interpreter)
    cannot import, checked in a child process run without ``-O`` as ``nmaem`` runs;
    [] when all import. Each names the package, the exception and where it was raised."""
    import json
    import subprocess
    import sys
    cmd = [python or sys.executable, "-c", _IMPORT_CHECK] + list(modules)
    env = dict(os.environ)
    env.pop("PYTHONOPTIMIZE", None)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("NMAEM-IMPORTS ")]
        if not lines:
            raise ValueError("no answer (exit status %d): %s" % (
                p.returncode, (p.stderr.strip().splitlines() or [""])[-1]))
        failed = json.loads(lines[-1][len("NMAEM-IMPORTS "):])
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return ["nmaem could not check its Python packages with %s: %s" % (cmd[0], exc)]
    return ["nmaem needs the Python package '%s' in Scipion's environment (%s): importing "
            "it fails with %s" % (mod, cmd[0], failed[mod]) for mod in modules if mod in failed]


def __getattr__(name):
    if name == "Plugin":
        cls = _make_plugin_class()
        globals()["Plugin"] = cls
        return cls
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def load_tests(loader, standard_tests, pattern):
    """Let ``scipion3 tests nmaem_plugin`` (unittest's loadTestsFromName) find the tests.

    Set ``NMAEM_TEST_PATTERN`` (default ``test*.py``) to run a subset.
    """
    pattern = os.environ.get("NMAEM_TEST_PATTERN", "test*.py")
    suite = loader.discover(start_dir=os.path.join(_HERE, "tests"), pattern=pattern,
                            top_level_dir=os.path.dirname(_HERE))
    standard_tests.addTests(suite)
    return standard_tests
