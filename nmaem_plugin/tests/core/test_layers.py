"""The package's layering rules, checked on the code itself.

* ``core`` is a stack of layers, one folder each (``LAYERS``, lowest first, as in
  docs/architecture.md): a module imports modules of its own folder and of the folders below
  it only. Every import counts (module level, inside functions, under ``TYPE_CHECKING``);
  an upward one is named by file and line.
* No import cycle anywhere in the package, in the graph of all imports (those inside
  functions included); a cycle is printed.
* A subpackage's ``__init__.py`` is a one-paragraph docstring and imports nothing.
* No module of ``core`` is longer than ``MAX_LINES`` unless its docstring says why (a line
  starting ``Size:``).
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


# the layers of core, lowest first (docs/architecture.md): a module may import its own layer
# and the layers before it in this list
LAYERS = ["base", "io", "physics", "modes", "sim", "learn", "inference", "analysis", "report",
          "cli"]
MAX_LINES = 500
CORE = "nmaem_plugin.core"


def module_name(path, root=PACKAGE):
    """(dotted module name, is a package's __init__) of a file of the package."""
    rel = os.path.relpath(path, os.path.dirname(root))[:-3].split(os.sep)
    if rel[-1] == "__init__":
        return ".".join(rel[:-1]), True
    return ".".join(rel), False


def imports_of(source, module, is_package, exists):
    """(line, imported module) for every import statement of ``source`` (the text of module
    ``module``; all depths, ``TYPE_CHECKING`` blocks included) that names a module for which
    ``exists(name)`` is true. ``from X import y`` counts as an import of ``X.y`` when that is a
    module, else of ``X``; relative imports are resolved."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if exists(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:
                target = base + "." + a.name
                if exists(target):
                    out.append((node.lineno, target))
                elif exists(base):
                    out.append((node.lineno, base))
    return out


def package_modules():
    """{dotted name: path} of every module (and package __init__) of nmaem_plugin."""
    mods = {}
    for path in _python_files():
        mods[module_name(path)[0]] = path
    return mods


def import_graph():
    """{module: {(line, imported module of nmaem_plugin), ...}} over the whole package."""
    mods = package_modules()
    graph = {}
    for name, path in mods.items():
        with open(path) as fh:
            graph[name] = set(imports_of(fh.read(), name, path.endswith("__init__.py"),
                                         mods.__contains__))
    return graph


def layer_of(module):
    """The layer (folder of core) of a dotted module name; None outside core's layers."""
    parts = module.split(".")
    if parts[:2] != CORE.split(".") or len(parts) < 3:
        return None
    return parts[2]


def upward_imports(graph):
    """"file:line: A imports B (layer a below layer b)" for every import of a core module
    from a layer below it, and for every import by core of a module of nmaem_plugin outside
    core other than the package root (its version)."""
    bad = []
    for module, targets in sorted(graph.items()):
        if layer_of(module) is None:
            continue
        rank = LAYERS.index(layer_of(module))
        for line, target in sorted(targets):
            where = "%s:%d: %s imports %s" % (module.replace(".", "/") + ".py", line, module,
                                              target)
            if target == "nmaem_plugin" or target == CORE:
                continue
            if not target.startswith(CORE + "."):
                bad.append(where + " (outside core)")
            elif layer_of(target) not in LAYERS:
                bad.append(where + " (not a layer of core)")
            elif LAYERS.index(layer_of(target)) > rank:
                bad.append(where + " (layer %s imports layer %s, which is above it)"
                           % (layer_of(module), layer_of(target)))
    return bad


def find_cycles(graph):
    """One cycle [a, b, ..., a] per strongly connected component of more than one module
    (or with an import of itself) of ``graph`` ({module: {(line, module), ...}})."""
    edges = {m: sorted({t for _, t in ts if t in graph}) for m, ts in graph.items()}
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v):                         # Tarjan, iterative over each node's successors
        work = [(v, iter(edges[v]))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(edges[w])))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:
        members = set(comp)
        start = min(comp)
        if len(comp) == 1 and start not in edges[start]:
            continue
        # a shortest path back to start inside the component
        prev, frontier, found = {start: None}, [start], None
        while frontier and found is None:
            nxt = []
            for u in frontier:
                for w in edges[u]:
                    if w == start:
                        found = u
                        break
                    if w in members and w not in prev:
                        prev[w] = u
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path, u = [start], found
        while u is not None and u != start:
            path.insert(1, u)
            u = prev[u]
        cycles.append(path + [start])
    return cycles


class TestLayerTools(unittest.TestCase):
    """The checkers below find what they look for (hand-made sources and graphs)."""

    def test_imports_of_resolves_every_form(self):
        mods = {"p", "p.a", "p.a.x", "p.a.y", "p.b", "p.b.z"}
        src = ("import p.a.x\nfrom . import y\nfrom .y import f\n"
               "def g():\n    from ..b import z\n    from ..b.z import h\n"
               "if T:\n    from p.b import z as q\nimport os\n")
        got = imports_of(src, "p.a.x", False, mods.__contains__)
        self.assertEqual(got, [(1, "p.a.x"), (2, "p.a.y"), (3, "p.a.y"), (5, "p.b.z"),
                               (6, "p.b.z"), (8, "p.b.z")])
        self.assertEqual(imports_of("from . import x", "p.a", True, mods.__contains__),
                         [(1, "p.a.x")])

    def test_upward_imports_are_named(self):
        io, physics = CORE + ".io.star", CORE + ".physics.renderer"
        graph = {io: {(12, physics)}, physics: {(3, io)}, CORE + ".cli.main": {(1, "nmaem_plugin")}}
        bad = upward_imports(graph)
        self.assertEqual(len(bad), 1)
        self.assertIn("nmaem_plugin/core/io/star.py:12", bad[0])
        self.assertIn("layer io imports layer physics", bad[0])
        self.assertEqual(upward_imports({io: {(1, "nmaem_plugin.convert")}})[0][-14:],
                         "(outside core)")

    def test_find_cycles_prints_each_cycle(self):
        g = {"a": {(1, "b")}, "b": {(1, "c")}, "c": {(1, "a"), (2, "d")}, "d": set(),
             "e": {(1, "e")}, "f": {(1, "d")}}
        self.assertEqual(sorted(find_cycles(g)), [["a", "b", "c", "a"], ["e", "e"]])
        self.assertEqual(find_cycles({"a": {(1, "b")}, "b": set()}), [])


class TestLayers(unittest.TestCase):
    def test_core_is_made_of_the_layers(self):
        core = os.path.join(PACKAGE, "core")
        folders = sorted(d for d in os.listdir(core)
                         if os.path.isdir(os.path.join(core, d)) and not d.startswith("__"))
        self.assertEqual(folders, sorted(LAYERS))
        loose = sorted(f for f in os.listdir(core) if f.endswith(".py") and f != "__init__.py")
        self.assertEqual(loose, [], "modules of core outside a layer's folder")

    def test_layers_point_one_way(self):
        bad = upward_imports(import_graph())
        self.assertEqual(bad, [], "\n" + "\n".join(bad))

    def test_no_import_cycle(self):
        cycles = find_cycles(import_graph())
        self.assertEqual(cycles, [], "\n" + "\n".join(" -> ".join(c) for c in cycles))

    def test_subpackage_inits_are_a_docstring(self):
        for layer in LAYERS:
            path = os.path.join(PACKAGE, "core", layer, "__init__.py")
            tree = _parse(path)
            doc = ast.get_docstring(tree)
            self.assertTrue(doc, "%s has no docstring" % path)
            self.assertEqual(len(tree.body), 1, "%s holds more than its docstring" % path)
            self.assertNotIn("\n\n", doc.strip(), "%s: more than one paragraph" % path)

    def test_modules_are_short_or_say_why(self):
        long = []
        for path in _python_files(os.path.join(PACKAGE, "core")):
            with open(path) as fh:
                n = sum(1 for _ in fh)
            if n <= MAX_LINES:
                continue
            doc = ast.get_docstring(_parse(path)) or ""
            if not any(line.startswith("Size:") for line in doc.splitlines()):
                long.append("%s: %d lines, no 'Size:' reason in its docstring"
                            % (os.path.relpath(path, PACKAGE), n))
        self.assertEqual(long, [])


class TestTorchFree(unittest.TestCase):
    # torch-free modules: everything in base and io, and what the viewers draw with (the
    # state maps' viewer: mapfigure, fsc, statemaps, and the model maps of physics.density)
    LIGHT_CORE = ["io.particles", "io.star", "io.cryosparc", "io.stacks", "io.poses",
                  "io.runfolder", "io.latent", "base.choices"]

    def test_base_io_and_the_viewers_figures_do_not_import_torch(self):
        core = os.path.join(PACKAGE, "core")
        names = sorted(module_name(p)[0] for layer in ("base", "io")
                       for p in _python_files(os.path.join(core, layer)))
        names += [CORE + ".report.figures", CORE + ".analysis.labels",
                  CORE + ".learn.convergence", CORE + ".analysis.mapfigure",
                  CORE + ".analysis.fsc", CORE + ".analysis.statemaps",
                  CORE + ".physics.density"]
        self.assertIn(CORE + ".io.table", names)
        loaded = _modules_loaded("\n".join("import %s" % n for n in names))
        for heavy in ("torch", "prody", "pykeops", "matplotlib"):
            self.assertNotIn(heavy, loaded)

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
