"""One run, one writer: RUN/.lock (runfolder.run_lock), taken by ``nmaem train`` and
``train.train`` in the launching process."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest

from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.io.runfolder import LOCK_FILE, read_lock, run_lock

NMAEM = [sys.executable, "-m", "nmaem_plugin"]


def md5(path):
    with open(path, "rb") as fh:
        return hashlib.md5(fh.read()).hexdigest()


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


class LockTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nmaem-lock-")
        self.run_dir = os.path.join(self.tmp, "run")
        self.msgs = []

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def lock(self):
        return run_lock(self.run_dir, log=self.msgs.append)

    def write_lock(self, pid, host=None):
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, LOCK_FILE), "w") as fh:
            fh.write("%d %s\n" % (pid, host or socket.gethostname()))

    def test_taken_and_released(self):
        with self.lock():
            self.assertEqual(read_lock(self.run_dir), (os.getpid(), socket.gethostname()))
            with open(os.path.join(self.run_dir, "config.json"), "w") as fh:
                fh.write("{}")
        self.assertIsNone(read_lock(self.run_dir))
        self.assertFalse(os.path.exists(os.path.join(self.run_dir, LOCK_FILE)))

    def test_released_on_error(self):
        with self.assertRaises(RuntimeError):
            with self.lock():
                raise RuntimeError("boom")
        self.assertIsNone(read_lock(self.run_dir))

    def test_new_empty_folder_removed_after_failure(self):
        with self.assertRaises(RuntimeError):
            with self.lock():
                raise RuntimeError("boom")
        self.assertFalse(os.path.exists(self.run_dir))

    def test_second_writer_refused(self):
        with self.lock():
            with self.assertRaises(NmaemError) as cm:
                with self.lock():
                    self.fail("second writer got the lock")
            self.assertIn("another training (process %d" % os.getpid(), str(cm.exception))
            # the holder's lock is intact
            self.assertEqual(read_lock(self.run_dir), (os.getpid(), socket.gethostname()))
        self.assertIsNone(read_lock(self.run_dir))

    def test_stale_lock_replaced(self):
        pid = dead_pid()
        self.write_lock(pid)
        with self.lock():
            self.assertEqual(read_lock(self.run_dir)[0], os.getpid())
        self.assertEqual(len(self.msgs), 1)
        self.assertIn("stale lock of process %d" % pid, self.msgs[0])

    def test_other_host_refused(self):
        self.write_lock(12345, host="another-host.example")
        with self.assertRaises(NmaemError) as cm:
            with self.lock():
                pass
        self.assertIn("another-host.example", str(cm.exception))
        self.assertEqual(read_lock(self.run_dir), (12345, "another-host.example"))

    def test_train_function_refused_while_locked(self):
        from nmaem_plugin.core.learn.train import train
        self.write_lock(os.getpid())
        with self.assertRaises(NmaemError) as cm:
            train(self.run_dir, resume=True, log=lambda *a: None)
        self.assertIn("another training", str(cm.exception))

    def test_cli_resume_refused_while_running(self):
        """A second ``nmaem train -o RUN --resume`` while the first one writes RUN."""
        os.makedirs(self.run_dir)
        cfg = os.path.join(self.run_dir, "config.json")
        with open(cfg, "w") as fh:
            json.dump({"epochs": 1}, fh)
        before = md5(cfg)
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        try:
            self.write_lock(holder.pid)
            p = subprocess.run(NMAEM + ["train", "-o", self.run_dir, "--resume"],
                               capture_output=True, text=True, timeout=300)
        finally:
            holder.kill()
            holder.wait()
        self.assertEqual(p.returncode, 2, p.stderr)
        last = p.stderr.strip().splitlines()[-1]
        self.assertEqual(last, "nmaem: error: %s: another training (process %d on %s) is "
                               "writing this run; wait for it to end (if it is gone, remove "
                               "%s)" % (self.run_dir, holder.pid, socket.gethostname(),
                                        LOCK_FILE))
        self.assertEqual(md5(cfg), before)
        self.assertEqual(read_lock(self.run_dir)[0], holder.pid)   # not taken over


if __name__ == "__main__":
    unittest.main()
