"""The Scipion side of the package: discovery, installation check, citations, light imports."""
import subprocess
import sys
import unittest


class TestPlugin(unittest.TestCase):
    def test_scipion_discovers_the_plugin(self):
        import pwem
        plugins = pwem.Domain.getPlugins()
        self.assertIn("nmaem_plugin", plugins)
        module = plugins["nmaem_plugin"]
        self.assertTrue(issubclass(module.Plugin, pwem.Plugin))
        self.assertEqual(module.Plugin.validateInstallation(), [])
        self.assertIn("Nashed2022", module._bibtex)
        self.assertIn("Bakan2011", module._bibtex)

    def test_installation_check_reports_what_really_happened(self):
        """A package that is missing and one whose import raises (as prody's does under
        ``python -O`` with biopython 1.81): each named with the exception and where it was
        raised, in a child process run as nmaem runs."""
        import os
        import tempfile
        from nmaem_plugin import dependency_errors
        tmp = tempfile.mkdtemp(prefix="nmaem-deps-")
        os.makedirs(os.path.join(tmp, "brokenpkg"))
        init = os.path.join(tmp, "brokenpkg", "__init__.py")
        with open(init, "w") as fh:
            fh.write("x = 1\nraise ValueError(\"could not convert string to float: 'A'\")\n")
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([tmp] + ([old] if old else []))
        try:
            errors = dependency_errors(modules=("gemmi", "brokenpkg", "nosuchpkg_nmaem"))
        finally:
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old
        self.assertEqual(len(errors), 2, errors)
        self.assertIn("'brokenpkg'", errors[0])
        self.assertIn("ValueError: could not convert string to float: 'A' (at %s:2)" % init,
                      errors[0])
        self.assertIn("'nosuchpkg_nmaem'", errors[1])
        self.assertIn("ModuleNotFoundError: No module named 'nosuchpkg_nmaem'", errors[1])

    def test_installation_check_as_scipion_starts_the_gui(self):
        """Scipion opens the project window with ``python -O``: there every nmaem protocol
        must pass its installation check (Execute is refused otherwise), and be marked
        installed in the protocol tree."""
        code = ("import json, sys; from pwem import Domain; import nmaem_plugin; "
                "assert sys.flags.optimize == 1; "
                "prots = [c for n, c in Domain.getProtocols().items() "
                "if n.startswith('NmaemProt') and c.getClassLabel(False)]; "
                "print(json.dumps(dict(plugin=nmaem_plugin.Plugin.validateInstallation(), "
                "errors={c.__name__: c.validateInstallation() for c in prots}, "
                "names=sorted(c.__name__ for c in prots))))")
        p = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True,
                           timeout=600)
        self.assertEqual(p.returncode, 0, p.stderr)
        import json
        res = json.loads(p.stdout.strip().splitlines()[-1])
        self.assertEqual(res["plugin"], [])
        self.assertEqual(res["errors"], {n: [] for n in res["errors"]})
        # every protocol of the plugin (but the base class) is installed in the GUI
        from nmaem_plugin import protocols
        ours = sorted(n for n, c in vars(protocols).items()
                      if isinstance(c, type) and n.startswith("NmaemProt")
                      and n != "NmaemProtBase")
        self.assertEqual(res["names"], ours)

    def test_command_line_does_not_import_scipion(self):
        """`nmaem` must work without Scipion and not pay for importing it."""
        code = ("import sys; from nmaem_plugin.core.cli.main import build_parser; "
                "build_parser(); "
                "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pwem', 'pyworkflow')))")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.strip(), "[]")

    def test_load_tests_finds_the_suite(self):
        import nmaem_plugin
        suite = nmaem_plugin.load_tests(unittest.TestLoader(), unittest.TestSuite(), None)
        ids = []
        stack = [suite]
        while stack:
            s = stack.pop()
            if isinstance(s, unittest.TestSuite):
                stack.extend(s)
            else:
                ids.append(s.id())
        self.assertTrue(any(i.startswith("nmaem_plugin.tests.core.test_imaging.") for i in ids))
        self.assertTrue(any(i.startswith("nmaem_plugin.tests.scipion.test_plugin.") for i in ids))


if __name__ == "__main__":
    unittest.main()


class TestSummary(unittest.TestCase):
    """`make test` prints the runner's count and names each failed test (what CI's tail shows)."""

    def test_summary_names_failed_tests(self):
        import io
        import logging
        import os
        import tempfile
        from pyworkflow.tests.tests import GTestResult
        from nmaem_plugin.tests import summary

        class Inner(unittest.TestCase):
            def test_passes(self):
                self.assertTrue(True)

            def test_fails(self):
                self.assertEqual(1, 2, "one is not two")

        # the inner runner's report goes only to this stream: in the real runner's log its
        # '[  FAILED  ] 1 tests' would be read as the suite's own count
        stream = io.StringIO()
        log = logging.getLogger("pyworkflow.tests.tests")
        saved = log.handlers[:], log.level, log.propagate
        log.handlers = [logging.StreamHandler(stream)]
        log.setLevel(logging.INFO)
        log.propagate = False
        try:
            result = GTestResult()
            unittest.defaultTestLoader.loadTestsFromTestCase(Inner).run(result)
            result.doReport()
        finally:
            log.handlers, log.level, log.propagate = saved
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "tests.log")
            with open(path, "w") as f:
                f.write(stream.getvalue())
            out = io.StringIO()
            real = sys.stdout
            sys.stdout = out
            try:
                summary.main(path)
            finally:
                sys.stdout = real
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[-1], "tests: 1 passed, 1 failed")
        self.assertEqual(len(lines), 2)
        self.assertIn("test_fails", lines[0])  # the runner's own name for it
        self.assertIn("AssertionError", lines[0])
        self.assertIn("one is not two", lines[0])
