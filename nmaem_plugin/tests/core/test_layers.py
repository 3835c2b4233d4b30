"""The package's layering rules, checked on the code itself.

* Reading particle files, converting Scipion particles (``nmaem_plugin.convert``), the run
  folder, the latent file, the option lists and the protocol modules do not import torch
  (checked in a fresh interpreter: ``'torch' in sys.modules``).
* ``core`` never imports pyworkflow or pwem.
* No module imports another module's private (underscore) names (parsed with ``ast``).
* The public functions and methods of the core modules that docs/architecture.md lists as
  typed carry type hints on every parameter and on their return (``inspect.signature``).
"""
import ast
import importlib
import inspect
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
    LIGHT_CORE = ["io.particles", "io.star", "io.cryosparc", "io.stacks", "io.poses",
                  "io.runfolder", "io.latent", "base.choices"]

    def test_particle_readers_and_run_folder_do_not_import_torch(self):
        stmts = "\n".join("import nmaem_plugin.core.%s" % m for m in self.LIGHT_CORE)
        stmts += "\nfrom nmaem_plugin.core.io.particles import read_particles"
        self.assertNotIn("torch", _modules_loaded(stmts))

    def test_reading_a_star_file_does_not_import_torch(self):
        star = os.path.join(PACKAGE, "tests", "data")
        files = sorted(f for f in os.listdir(star) if f.endswith(".star"))
        self.assertTrue(files)
        stmts = ("from nmaem_plugin.core.io.particles import read_particles\n"
                 "from nmaem_plugin.core.base.errors import NmaemError\n"
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


def typed_modules():
    """Every core module, dotted from ``core`` (all of them carry type hints on their public
    API)."""
    core = os.path.join(PACKAGE, "core")
    return sorted(os.path.relpath(p, core)[:-3].replace(os.sep, ".")
                  for p in _python_files(core) if not p.endswith("__init__.py"))


def missing_hints(func, skip_return=False):
    """Names of ``func``'s parameters without an annotation (``self``/``cls``, *args and
    **kwargs aside), and "return" when its return is not annotated."""
    sig = inspect.signature(func)
    out = [p.name for p in sig.parameters.values()
           if p.name not in ("self", "cls")
           and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
           and p.annotation is inspect.Parameter.empty]
    if not skip_return and sig.return_annotation is inspect.Signature.empty:
        out.append("return")
    return out


def public_callables(module):
    """(qualified name, function, is __init__) of the public functions of ``module`` and the
    public methods (properties' getters, class and static methods) and ``__init__`` of its
    public classes; only those defined in the module itself."""
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj, False
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, property):
                    member = member.fget
                elif isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if inspect.isfunction(member) and member.__module__ == module.__name__:
                    yield "%s.%s" % (name, attr), member, attr == "__init__"


class TestTypeHints(unittest.TestCase):
    def test_missing_hints_sees_what_is_missing(self):
        def plain(a, b: int = 0, *args, c=1, **kwargs) -> int:
            return 0

        def typed(self, a: int, *args: int, **kw: str) -> None:
            pass
        self.assertEqual(missing_hints(plain), ["a", "c"])
        self.assertEqual(missing_hints(typed), [])
        self.assertEqual(missing_hints(lambda x: x), ["x", "return"])

    def test_typed_modules_are_typed(self):
        names = typed_modules()
        self.assertIn("physics.renderer", names)
        bad = []
        for name in names:
            module = importlib.import_module("nmaem_plugin.core." + name)
            for qual, func, is_init in public_callables(module):
                miss = missing_hints(func, skip_return=is_init)
                if miss:
                    bad.append("%s.%s: %s" % (name, qual, ", ".join(miss)))
        self.assertEqual(bad, [])


if __name__ == "__main__":
    unittest.main()
