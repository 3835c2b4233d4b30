"""The package's layering rules, checked on the code itself.

* Reading particle files, converting Scipion particles (``nmaem_plugin.convert``), the run
  folder, the latent file, the option lists and the protocol modules do not import torch
  (checked in a fresh interpreter: ``'torch' in sys.modules``).
* ``core`` never imports pyworkflow or pwem.
* No module imports another module's private (underscore) names (parsed with ``ast``).
"""
import ast
import os
import subprocess
import sys
import unittest

import nmaem_plugin

PACKAGE = os.path.dirname(os.path.abspath(nmaem_plugin.__file__))


def _modules_loaded(statements):
    """Top-level package names in sys.modules after running ``statements`` in a fresh
    interpreter."""
    code = statements + "\nimport sys\nprint(' '.join(sorted(set(m.split('.')[0] for m in sys.modules))))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode)
    return set(p.stdout.split())


def _python_files(root=PACKAGE):
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(folder, f)


def _parse(path):
    with open(path) as fh:
        return ast.parse(fh.read(), path)


class TestTorchFree(unittest.TestCase):
    LIGHT_CORE = ["particles", "star", "cryosparc", "stacks", "poses", "runfolder", "latent",
                  "choices"]

    def test_particle_readers_and_run_folder_do_not_import_torch(self):
        stmts = "\n".join("import nmaem_plugin.core.%s" % m for m in self.LIGHT_CORE)
        stmts += "\nfrom nmaem_plugin.core.particles import read_particles"
        self.assertNotIn("torch", _modules_loaded(stmts))

    def test_reading_a_star_file_does_not_import_torch(self):
        star = os.path.join(PACKAGE, "tests", "data")
        files = sorted(f for f in os.listdir(star) if f.endswith(".star"))
        self.assertTrue(files)
        stmts = ("from nmaem_plugin.core.particles import read_particles\n"
                 "from nmaem_plugin.core.errors import NmaemError\n"
                 "for f in %r:\n"
                 "    try:\n"
                 "        read_particles(f)\n"
                 "    except NmaemError:\n"
                 "        pass\n" % [os.path.join(star, f) for f in files])
        self.assertNotIn("torch", _modules_loaded(stmts))

    def test_convert_and_protocols_do_not_import_torch(self):
        import importlib.util
        if importlib.util.find_spec("pwem") is None:     # (only the subprocess imports it)
            self.skipTest("Scipion (pwem) is not installed")
        loaded = _modules_loaded("import nmaem_plugin.convert\nimport nmaem_plugin.protocols\n"
                                 "import nmaem_plugin.viewers")
        for heavy in ("torch", "prody", "pykeops"):
            self.assertNotIn(heavy, loaded)


class TestImports(unittest.TestCase):
    def test_core_never_imports_scipion(self):
        for path in _python_files(os.path.join(PACKAGE, "core")):
            tree = _parse(path)
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    self.assertNotIn(n.split(".")[0], ("pyworkflow", "pwem"),
                                     "%s imports %s" % (os.path.relpath(path, PACKAGE), n))

    def test_no_module_imports_private_names(self):
        bad = []
        for path in _python_files():
            tree = _parse(path)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    for a in node.names:
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            bad.append("%s:%d %s" % (os.path.relpath(path, PACKAGE),
                                                     node.lineno, a.name))
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if any(p.startswith("_") and not p.startswith("__")
                               for p in a.name.split(".")):
                            bad.append("%s:%d %s" % (os.path.relpath(path, PACKAGE),
                                                     node.lineno, a.name))
        self.assertEqual(bad, [])


if __name__ == "__main__":
    unittest.main()
