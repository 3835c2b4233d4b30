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

    def test_validate_installation_names_a_missing_package(self):
        import importlib
        import nmaem_plugin
        real = importlib.import_module

        def fake(name, *a, **k):
            if name == "pykeops":
                raise ImportError("No module named 'pykeops'")
            return real(name, *a, **k)
        importlib.import_module = fake
        try:
            errors = nmaem_plugin.Plugin.validateInstallation()
        finally:
            importlib.import_module = real
        self.assertEqual(len(errors), 1)
        self.assertIn("pykeops", errors[0])

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
