"""Tests of nmaem_plugin.core.base.threads: the rule on hand-made inputs (cores, hyper-threads,
CPU quotas, other processes' load, the option, the environment), the readers on hand-made
/proc and /sys files, and the command line's first line."""
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.base.threads import (THREAD_VARIABLES, cgroup_cpu_limit, choose_threads,
                                            other_load, physical_cores, thread_rule,
                                            use_threads)


class TestThreadRule(unittest.TestCase):

    def test_option_then_environment_then_machine(self):
        self.assertEqual(thread_rule(3, "1", 2, 2, 5.0), (3, "asked (--threads)"))
        n, why = thread_rule(None, "1", 8, 4, 0.0)
        self.assertEqual(n, 1)
        self.assertIn("OMP_NUM_THREADS=1", why)
        self.assertEqual(thread_rule(None, "", 2, 2, 0.0)[0], 2)      # empty: not set
        self.assertEqual(thread_rule(None, "4,2", 2, 2, 0.0)[0], 4)   # nested levels: the outer
        with self.assertRaises(NmaemError):
            thread_rule(0, None, 2, 2, 0.0)
        with self.assertRaises(NmaemError):
            thread_rule(None, "many", 2, 2, 0.0)

    def test_other_processes_take_cores(self):
        # the case of the issue: two cores, another job holds one
        n, why = thread_rule(None, None, 2, 2, 1.0)
        self.assertEqual(n, 1)
        self.assertIn("load 1.00", why)
        self.assertEqual(thread_rule(None, None, 2, 2, 0.0)[0], 2)    # idle
        self.assertEqual(thread_rule(None, None, 2, 2, 0.2)[0], 2)    # below a quarter core
        self.assertEqual(thread_rule(None, None, 2, 2, 0.3)[0], 1)    # above it
        self.assertEqual(thread_rule(None, None, 16, 16, 3.5)[0], 12)
        self.assertEqual(thread_rule(None, None, 2, 2, 6.0)[0], 1)    # never fewer than one
        self.assertEqual(thread_rule(None, None, 4, 4, None)[0], 4)   # load unknown

    def test_physical_cores_and_quota_cap(self):
        n, why = thread_rule(None, None, 8, 4, 0.0)                  # 2 hyper-threads per core
        self.assertEqual(n, 4)
        self.assertIn("4 physical", why)
        self.assertEqual(thread_rule(None, None, 8, None, 0.0)[0], 8)  # topology unknown
        n, why = thread_rule(None, None, 8, 8, 0.0, quota=1.5)       # cgroup: 1.5 CPUs
        self.assertEqual(n, 2)
        self.assertIn("quota", why)
        self.assertEqual(thread_rule(None, None, 8, 8, 1.0, quota=2.0)[0], 1)


class TestReaders(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nmaem_threads_")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, rel, text):
        path = os.path.join(self.tmp, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        return path

    def test_load_of_other_processes(self):
        # another job running for a while: 1-minute average 1, two runnable (it and us)
        self.assertAlmostEqual(other_load(self.write("a", "1.02 0.95 0.60 2/310 4242\n")), 1.0)
        # a job that has just ended: the average still remembers it, nothing else runs now
        self.assertEqual(other_load(self.write("b", "0.90 0.70 0.40 1/300 4243\n")), 0.0)
        # a job that has just started: not yet in the average
        self.assertAlmostEqual(other_load(self.write("c", "0.10 0.05 0.01 2/300 4244\n")), 0.1)
        self.assertIsNone(other_load(os.path.join(self.tmp, "missing")))
        self.assertIsNone(other_load(self.write("d", "garbage\n")))

    def test_physical_cores_from_sysfs(self):
        # 4 logical CPUs, 2 cores with 2 hyper-threads each
        for cpu, core in ((0, 0), (1, 1), (2, 0), (3, 1)):
            self.write("cpu/cpu%d/topology/physical_package_id" % cpu, "0\n")
            self.write("cpu/cpu%d/topology/core_id" % cpu, "%d\n" % core)
        sysfs = os.path.join(self.tmp, "cpu")
        self.assertEqual(physical_cores({0, 1, 2, 3}, sysfs), 2)
        self.assertEqual(physical_cores({0, 2}, sysfs), 1)            # one core's two threads
        self.assertEqual(physical_cores({0, 1}, sysfs), 2)
        self.assertIsNone(physical_cores({0, 7}, sysfs))              # cpu7 unknown

    def test_cgroup_quota(self):
        self.assertAlmostEqual(cgroup_cpu_limit(os.path.dirname(
            self.write("v2/cpu.max", "150000 100000\n"))), 1.5)
        self.assertIsNone(cgroup_cpu_limit(os.path.dirname(self.write("v2max/cpu.max",
                                                                      "max 100000\n"))))
        self.write("v1/cpu/cpu.cfs_quota_us", "200000\n")
        self.write("v1/cpu/cpu.cfs_period_us", "100000\n")
        self.assertAlmostEqual(cgroup_cpu_limit(os.path.join(self.tmp, "v1")), 2.0)
        self.write("v1none/cpu/cpu.cfs_quota_us", "-1\n")
        self.write("v1none/cpu/cpu.cfs_period_us", "100000\n")
        self.assertIsNone(cgroup_cpu_limit(os.path.join(self.tmp, "v1none")))
        self.assertIsNone(cgroup_cpu_limit(os.path.join(self.tmp, "none")))

    def test_choose_threads_reads_the_environment_given(self):
        self.assertEqual(choose_threads(None, {"OMP_NUM_THREADS": "3"})[0], 3)
        self.assertEqual(choose_threads(2, {"OMP_NUM_THREADS": "3"})[0], 2)
        n, _ = choose_threads(None, {})
        self.assertGreaterEqual(n, 1)
        self.assertLessEqual(n, len(os.sched_getaffinity(0)))

    def test_use_threads_sets_and_restores(self):
        import torch
        before = {k: os.environ.get(k) for k in THREAD_VARIABLES}
        torch_before = torch.get_num_threads()
        other = 1 if torch_before != 1 else 2
        with use_threads(other):
            for k in THREAD_VARIABLES:
                self.assertEqual(os.environ[k], str(other))
            self.assertEqual(torch.get_num_threads(), other)
        self.assertEqual({k: os.environ.get(k) for k in THREAD_VARIABLES}, before)
        self.assertEqual(torch.get_num_threads(), torch_before)


class TestCommandLine(unittest.TestCase):
    """The first line of a command says how many threads and why."""

    def run_modes(self, *extra, env=None):
        tmp = tempfile.mkdtemp(prefix="nmaem_threads_cli_")
        self.addCleanup(shutil.rmtree, tmp, True)
        e = dict(os.environ, **(env or {}))
        return subprocess.run(
            [sys.executable, "-m", "nmaem_plugin", "modes", os.path.join(DATA_DIR, "ak_open_4ake.pdb"), "--n-modes", "1",
             "--device", "cpu", "-o", os.path.join(tmp, "m.npz")] + list(extra),
            capture_output=True, text=True, env=e, timeout=300)

    def test_first_line(self):
        p = self.run_modes("--threads", "1", env={"OMP_NUM_THREADS": "2"})
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.splitlines()[0], "threads: 1 (asked (--threads))")
        p = self.run_modes(env={"OMP_NUM_THREADS": "1"})
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.splitlines()[0],
                         "threads: 1 (OMP_NUM_THREADS=1 in the environment)")

    def test_bad_thread_count_is_one_line_error(self):
        p = self.run_modes("--threads", "0")
        self.assertEqual(p.returncode, 2)
        self.assertEqual(p.stderr.strip().splitlines(),
                         ["nmaem: error: --threads must be at least 1, not 0"])


if __name__ == "__main__":
    unittest.main()
