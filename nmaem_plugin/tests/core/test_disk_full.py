"""Full disks and failed writes (core/atomic.py): every command that meets "no space left
on device" while writing exits with status 2 and one line
``nmaem: error: no space left on device writing <file>``, leaves no truncated output and
no temporary file, and leaves its inputs as they were (md5).

The full disk is simulated in two ways:

- the one low-level write of ``atomic_open`` (``atomic._raw_write``) is replaced, in a
  child process, by one that writes part of the data of one chosen output file and then
  raises ENOSPC (as a file system that fills up mid-file does); the code under test is
  run unchanged through ``nmaem``'s ``main``;
- where the machine allows it (root, ``mount -t tmpfs``), a real small tmpfs fills up.

One tiny dataset (12 particles, 32 px), its modes, a 1-epoch run and its latent file are
made once through the command line.
"""
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

from nmaem_plugin import DATA_DIR
from nmaem_plugin.tests.core.cli_fixture import NMAEM, md5, nmaem, tiny_chain

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")
F = {}
TRAIN = ("--epochs", "2", "--batch", "4", "--encoder", "small", "--loss", "l2", "--no-check",
         "--device", "cpu")

# the child process: replace atomic._raw_write, then run nmaem's main. Arguments: the
# name the output file ends with, how many such files to let through, how many bytes of
# the chosen one are written before the disk is "full", then nmaem's arguments.
RUNNER = textwrap.dedent('''
    import errno, os, sys
    from nmaem_plugin.core.base import atomic
    from nmaem_plugin.core.cli.main import main
    target, skip, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    real, seen, written = atomic._raw_write, [], {}

    def full_disk(raw, data):
        name = raw.name
        if not os.path.basename(name).endswith("." + target):
            return real(raw, data)
        if name not in seen:
            seen.append(name)
        if seen.index(name) < skip:
            return real(raw, data)
        view = memoryview(data).cast("B")
        room = budget - written.get(name, 0)
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        n = real(raw, view[:room])
        written[name] = written.get(name, 0) + n
        return n

    atomic._raw_write = full_disk
    sys.exit(main(sys.argv[4:]))
''')


def full_disk_nmaem(target, *args, skip=0, budget=100):
    return subprocess.run([sys.executable, F["runner"], target, str(skip), str(budget)]
                          + [str(a) for a in args], capture_output=True, text=True,
                          timeout=600)


def tree_md5(folder):
    return {os.path.relpath(f, folder): md5(f)
            for f in sorted(glob.glob(os.path.join(folder, "**"), recursive=True))
            if os.path.isfile(f)}


def temporaries(folder):
    return [f for f in glob.glob(os.path.join(folder, "**", ".nmaem-tmp.*"), recursive=True)]


def setUpModule():
    tmp = tempfile.mkdtemp(prefix="nmaem-diskfull-")
    F["runner"] = os.path.join(tmp, "runner.py")
    with open(F["runner"], "w") as fh:
        fh.write(RUNNER)
    F.update(tiny_chain(tmp, TRAIN[:1] + ("1",) + TRAIN[2:]))


def tearDownModule():
    shutil.rmtree(F["tmp"], ignore_errors=True)


class DiskCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="case-", dir=F["tmp"])
        self.inputs = {f: md5(f) for f in
                       [F["star"], F["ref"], F["modes"], F["latent"]]
                       + glob.glob(os.path.join(F["sim"], "stacks", "*"))
                       + glob.glob(os.path.join(F["run"], "*.*"))
                       + glob.glob(os.path.join(F["run"], "checkpoints", "*"))}

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def no_space(self, p, name):
        """Exit 2, one error line naming the file ``name``; the inputs unchanged."""
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("nmaem: error: ")]
        self.assertEqual(len(errors), 1, p.stderr)
        self.assertNotIn("Traceback", p.stderr)
        self.assertTrue(errors[0].startswith("nmaem: error: no space left on device writing "),
                        errors[0])
        self.assertTrue(errors[0].endswith(os.sep + name), errors[0])
        for f, h in self.inputs.items():
            self.assertEqual(md5(f), h, "input %s changed" % f)
        return errors[0]


class WriteWrapperTest(DiskCase):
    """ENOSPC from the low-level write, in the middle of one chosen output file."""

    def test_modes_export(self):
        out, exp = self.path("m.npz"), self.path("exp")
        p = full_disk_nmaem("mode_02.pdb", "modes", F["ref"], "--n-modes", "2", "--device",
                            "cpu", "-o", out, "--export", exp, budget=5000)
        self.no_space(p, "mode_02.pdb")
        # all or nothing (io.outputs): the modes file and the mode written before are gone
        self.assertEqual(os.listdir(self.tmp), [])

    def test_modes_file(self):
        out = self.path("m.npz")
        p = full_disk_nmaem("m.npz", "modes", F["ref"], "--n-modes", "2", "--device", "cpu",
                            "-o", out, budget=1000)
        self.no_space(p, "m.npz")
        self.assertEqual(os.listdir(self.tmp), [])

    def simulate(self, target, out, n, budget):
        return full_disk_nmaem(target, "simulate", "--ref", OPEN, "--target", CLOSED,
                               "--frames", "2", "--n", n, "--box", "32", "--apix", "3",
                               "--no-noise", "--device", "cpu", "--chunk", "4", "-o", out,
                               budget=budget)

    def test_simulate_stack(self):
        out = self.path("sim")
        p = self.simulate("particles_00001.mrcs", out, 8, 2000)
        self.no_space(p, "particles_00001.mrcs")
        # all or nothing (io.outputs): the stack written before is gone with the new folder
        self.assertFalse(os.path.exists(out))
        self.assertEqual(os.listdir(self.tmp), [])

    def test_simulate_truth(self):
        out = self.path("sim")
        p = self.simulate("ground_truth.npz", out, 4, 300)
        self.no_space(p, "ground_truth.npz")
        # all or nothing (io.outputs): the stacks written before are gone with the new folder
        self.assertFalse(os.path.exists(out))
        self.assertEqual(os.listdir(self.tmp), [])

    def train_copy(self):
        run = self.path("run")
        shutil.copytree(F["run"], run)
        return run

    def test_train_checkpoint(self):
        """Epoch 2's checkpoint meets a full disk: epoch 1's stays the last one, readable,
        and log.csv still ends at epoch 1; --resume then finishes the run."""
        run = self.train_copy()
        before = tree_md5(run)
        p = full_disk_nmaem("epoch_0002.pt", "train", "-o", run, "--resume", "--epochs", "2",
                            budget=4096)
        self.no_space(p, "epoch_0002.pt")
        self.assertEqual(temporaries(run), [])
        self.assertFalse(os.path.exists(os.path.join(run, ".lock")))
        after = tree_md5(run)
        for f in ("checkpoints/last.pt", "checkpoints/epoch_0001.pt", "log.csv", "modes.npz"):
            self.assertEqual(after[f], before[f], f)
        self.assertNotIn("checkpoints/epoch_0002.pt", after)
        import torch
        ck = torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)
        self.assertEqual(ck["epoch"], 1)
        p = nmaem("train", "-o", run, "--resume", "--epochs", "2")
        self.assertEqual(p.returncode, 0, p.stderr)
        ck = torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)
        self.assertEqual(ck["epoch"], 2)

    def test_train_log(self):
        """The training log meets a full disk after epoch 2's checkpoint: one line, the
        old log.csv kept whole."""
        run = self.train_copy()
        old_log = md5(os.path.join(run, "log.csv"))
        # the first log.csv write (at the start of the loop) passes, the second fails
        p = full_disk_nmaem("log.csv", "train", "-o", run, "--resume", "--epochs", "2",
                            skip=1, budget=10)
        self.no_space(p, "log.csv")
        self.assertEqual(md5(os.path.join(run, "log.csv")), old_log)
        self.assertEqual(temporaries(run), [])
        self.assertFalse(os.path.exists(os.path.join(run, ".lock")))

    def test_infer_latent(self):
        out = self.path("latent.npz")
        p = full_disk_nmaem("latent.npz", "infer", "--particles", F["star"], "--model",
                            F["run"], "-o", out, "--device", "cpu", budget=200)
        self.no_space(p, "latent.npz")
        self.assertEqual(os.listdir(self.tmp), [])

    def test_infer_latent_replaced_with_force(self):
        """--force onto an existing latent: a full disk leaves the old file whole."""
        out = self.path("latent.npz")
        shutil.copyfile(F["latent"], out)
        old = md5(out)
        p = full_disk_nmaem("latent.npz", "infer", "--particles", F["star"], "--model",
                            F["run"], "-o", out, "--device", "cpu", "--force", budget=200)
        self.no_space(p, "latent.npz")
        self.assertEqual(md5(out), old)
        self.assertEqual(os.listdir(self.tmp), ["latent.npz"])

    def test_export(self):
        out = self.path("models")
        p = full_disk_nmaem("pc1_02.pdb", "export", "--latent", F["latent"], "--model",
                            F["run"], "-o", out, "--pcs", "1", "--steps", "3", "--no-refine",
                            budget=3000)
        self.no_space(p, "pc1_02.pdb")
        # all or nothing (io.outputs): pc1_01.pdb, written before, is gone with the new folder
        self.assertFalse(os.path.exists(out))
        self.assertEqual(os.listdir(self.tmp), [])

    def test_report(self):
        out = self.path("report")
        p = full_disk_nmaem("index.html", "report", F["run"], "-o", out, "--latent",
                            F["latent"], budget=100)
        self.no_space(p, "index.html")
        # all or nothing (io.outputs): the figures written before are gone with the new folder
        self.assertFalse(os.path.exists(out))
        self.assertEqual(os.listdir(self.tmp), [])


class OrphanTest(DiskCase):
    """Temporary files of a killed process are removed by the next command writing there;
    those of a live process are not."""

    def test_orphans_cleaned_at_next_start(self):
        from nmaem_plugin.core.base import atomic
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        host = atomic._HOST
        orphan = self.path("%s%s.%d.abc123.latent.npz" % (atomic.TMP_PREFIX, host, dead.pid))
        live = self.path("%s%s.%d.abc123.other.npz" % (atomic.TMP_PREFIX, host, os.getppid()))
        other_host = self.path("%sotherhost.%d.abc123.x.npz" % (atomic.TMP_PREFIX, dead.pid))
        for f in (orphan, live, other_host):
            with open(f, "wb") as fh:
                fh.write(b"partial")
        p = nmaem("infer", "--particles", F["star"], "--model", F["run"], "-o",
                  self.path("latent.npz"), "--device", "cpu")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("removed 1 temporary file", p.stderr)
        self.assertFalse(os.path.exists(orphan))
        self.assertTrue(os.path.exists(live))
        self.assertTrue(os.path.exists(other_host))

    def test_run_orphans_cleaned_on_resume(self):
        from nmaem_plugin.core.base import atomic
        run = self.path("run")
        shutil.copytree(F["run"], run)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        orphan = os.path.join(run, "checkpoints", "%s%s.%d.x1.epoch_0002.pt"
                              % (atomic.TMP_PREFIX, atomic._HOST, dead.pid))
        with open(orphan, "wb") as fh:
            fh.write(b"partial")
        p = nmaem("train", "-o", run, "--resume")       # already done: nothing to train
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertFalse(os.path.exists(orphan))


class SigtermTest(DiskCase):
    """SIGTERM during training: one line, exit 143, lock released, the last checkpoint
    intact and resumable."""

    def test_sigterm_during_training(self):
        run = self.path("run")
        shutil.copytree(F["run"], run)
        last = os.path.join(run, "checkpoints", "last.pt")
        before = md5(last)
        errfile = open(self.path("stderr.txt"), "w+")
        self.addCleanup(errfile.close)
        proc = subprocess.Popen(NMAEM + ["train", "-o", run, "--resume", "--epochs", "400"],
                                stdout=subprocess.PIPE, stderr=errfile, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        # wait until the loop runs (the lock is there and an epoch line is printed)
        t0 = time.time()
        seen = ""
        while time.time() - t0 < 300:
            line = proc.stdout.readline()
            seen += line
            if "train: epoch 2/400" in line or not line:
                break
        self.assertIn("train: epoch 2/400", seen, seen)
        self.assertTrue(os.path.exists(os.path.join(run, ".lock")))
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        errfile.seek(0)
        err = errfile.read()
        self.assertEqual(proc.returncode, 143, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("nmaem: ")]
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith("nmaem: interrupted by SIGTERM; the run %s keeps "
                                            "its last checkpoint (epoch " % run), lines[0])
        self.assertIn("--resume", lines[0])
        self.assertNotIn("Traceback", err)
        self.assertFalse(os.path.exists(os.path.join(run, ".lock")))
        self.assertEqual(temporaries(run), [])
        import torch
        ck = torch.load(last, weights_only=True)
        self.assertNotEqual(md5(last), before)
        epoch = int(lines[0].split("(epoch ")[1].split(")")[0])
        self.assertEqual(ck["epoch"], epoch)
        self.assertGreaterEqual(epoch, 2)
        for f, h in self.inputs.items():
            self.assertEqual(md5(f), h, "input %s changed" % f)


def _tmpfs(size):
    """A fresh tmpfs of ``size`` (e.g. "1m") in a temporary folder, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        return None
    folder = tempfile.mkdtemp(prefix="nmaem-tmpfs-")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", folder],
                       capture_output=True)
    if p.returncode != 0:
        os.rmdir(folder)
        return None
    return folder


class TmpfsTest(DiskCase):
    """A real full disk: a small tmpfs (root only; skipped elsewhere)."""

    def mount(self, size):
        folder = _tmpfs(size)
        if folder is None:
            self.skipTest("cannot mount a tmpfs here (needs root)")
        self.addCleanup(lambda: (subprocess.run(["umount", folder]), os.rmdir(folder)))
        return folder

    def test_modes_export_real_full_disk(self):
        disk = self.mount("400k")
        out, exp = os.path.join(disk, "m.npz"), os.path.join(disk, "exp")
        p = nmaem("modes", F["ref"], "--n-modes", "2", "--device", "cpu", "-o", out,
                  "--export", exp)
        line = self.no_space(p, os.path.basename(p.stderr.strip().split()[-1]))
        self.assertEqual(temporaries(disk), [])
        import gemmi
        for f in glob.glob(os.path.join(exp, "*.pdb")):      # the ones written are whole
            st = gemmi.read_structure(f)
            self.assertEqual(len(st), 20, f)
        self.assertIn(disk, line)

    def test_simulate_real_full_disk(self):
        disk = self.mount("200k")
        out = os.path.join(disk, "sim")
        p = nmaem("simulate", "--ref", OPEN, "--target", CLOSED, "--frames", "2", "--n", "64",
                  "--box", "32", "--apix", "3", "--no-noise", "--device", "cpu", "--chunk",
                  "16", "-o", out)
        self.no_space(p, os.path.basename(p.stderr.strip().split()[-1]))
        self.assertFalse(os.path.exists(os.path.join(out, "particles.star")))
        self.assertEqual(temporaries(disk), [])


if __name__ == "__main__":
    unittest.main()
