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
            """Return a list of error messages (empty when the install is usable)."""
            import importlib
            errors = []
            for mod in ("torch", "prody", "gemmi", "pykeops", "mrcfile", "starfile"):
                try:
                    importlib.import_module(mod)
                except Exception as exc:  # any import failure makes the plugin unusable
                    errors.append("nmaem needs the Python package '%s' in Scipion's "
                                  "environment: %s" % (mod, exc))
            return errors

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
