"""The output policy itself (``io.outputs.command_outputs``), without any command: a manifest
of what an output holds; only our files replaced, and with --force exactly those; files in
the way refused; all or nothing (an error, a signal, a kill); one writer at a time. Plain
files and child processes that import only the torch-free ``io`` layer (fast)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import unittest

from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.base.lock import read_lock
from nmaem_plugin.core.io.outputs import check_outputs, command_outputs, manifest_path


def write(path, text):
    with open(path, "w") as fh:
        fh.write(text)


def read(path):
    with open(path) as fh:
        return fh.read()


def tree(folder):
    """{relative path: content} of every file under ``folder``, hidden ones included."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = read(p)
    return out


def child(code, *args):
    """A Python child process running ``code`` (torch-free imports only)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


class PolicyCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nmaem-policy-")
        self.out = os.path.join(self.tmp, "out")
        self.msgs = []

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def outputs(self, products=(), **kw):
        return command_outputs(self.out, "demo", products=products, log=self.msgs.append, **kw)

    def produce(self, names, tag="v1", **kw):
        """One run of the command 'demo' writing ``names`` (content: tag:name)."""
        with self.outputs(names, **kw) as out:
            for n in names:
                write(out.path(n), "%s:%s" % (tag, n))

    def manifest(self):
        with open(manifest_path(self.out, "demo")) as fh:
            return json.load(fh)


class ManifestTest(PolicyCase):
    def test_manifest_lists_what_was_written(self):
        names = ["a.pdb", "b.json", "stacks/s1.mrcs"]
        self.produce(names)
        m = self.manifest()
        self.assertTrue(m["complete"])
        self.assertEqual(sorted(m["files"]), sorted(names))
        for n in names:
            self.assertEqual(m["files"][n], os.path.getsize(os.path.join(self.out, n)))
        self.assertEqual(m["dirs"], ["stacks"])
        self.assertFalse(os.path.exists(os.path.join(self.out, ".nmaem-demo.lock")))

    def test_files_added_during_the_run_are_listed(self):
        with self.outputs(["a.txt"]) as out:
            write(out.path("a.txt"), "a")
            write(out.path("late.txt"), "late")        # a name known only now
        self.assertEqual(sorted(self.manifest()["files"]), ["a.txt", "late.txt"])

    def test_names_outside_the_folder_refused(self):
        with self.assertRaises(ValueError):
            with self.outputs(["../x"]):
                pass


class ForceTest(PolicyCase):
    def test_earlier_output_refused_without_force(self):
        self.produce(["a.txt", "b.txt"])
        before = tree(self.out)
        with self.assertRaises(NmaemError) as cm:
            self.produce(["a.txt"], tag="v2")
        self.assertIn("already holds the output of an earlier nmaem demo", str(cm.exception))
        self.assertIn("--force", str(cm.exception))
        self.assertEqual(tree(self.out), before)

    def test_force_removes_exactly_the_earlier_files(self):
        """A smaller second result leaves nothing of the larger first one; the user's own
        files in the folder are kept."""
        self.produce(["a.txt", "b.txt", "sub/c.txt"])
        write(os.path.join(self.out, "notes.txt"), "mine")
        self.produce(["a.txt"], tag="v2", force=True)
        files = tree(self.out)
        self.assertEqual(sorted(f for f in files if not f.startswith(".nmaem")),
                         ["a.txt", "notes.txt"])
        self.assertEqual(files["a.txt"], "v2:a.txt")
        self.assertEqual(files["notes.txt"], "mine")
        self.assertFalse(os.path.exists(os.path.join(self.out, "sub")))
        self.assertEqual(list(self.manifest()["files"]), ["a.txt"])

    def test_file_in_the_way_refused_even_with_force(self):
        os.makedirs(os.path.join(self.out, "stacks"))
        mine = os.path.join(self.out, "stacks", "s1.mrcs")
        write(mine, "the user's own stack")
        for force in (False, True):
            with self.assertRaises(NmaemError) as cm:
                self.produce(["particles.star", "stacks/s1.mrcs"], force=force)
            msg = str(cm.exception)
            self.assertTrue(msg.startswith(mine + ": is in the way"), msg)
            self.assertEqual(read(mine), "the user's own stack")
            self.assertEqual(sorted(tree(self.out)), ["stacks/s1.mrcs"])

    def test_file_in_the_way_of_a_late_name_refused(self):
        os.makedirs(self.out)
        write(os.path.join(self.out, "late.txt"), "mine")
        with self.assertRaises(NmaemError):
            with self.outputs(["a.txt"]) as out:
                write(out.path("a.txt"), "a")
                out.path("late.txt")
        self.assertEqual(tree(self.out), {"late.txt": "mine"})    # a.txt rolled back

    def test_changed_file_of_ours_refused(self):
        self.produce(["a.txt", "b.txt"])
        write(os.path.join(self.out, "b.txt"), "edited by the user, longer")
        with self.assertRaises(NmaemError) as cm:
            self.produce(["a.txt"], force=True)
        self.assertIn("has changed since", str(cm.exception))
        self.assertEqual(read(os.path.join(self.out, "b.txt")), "edited by the user, longer")
        self.assertEqual(read(os.path.join(self.out, "a.txt")), "v1:a.txt")

    def test_dry_run_refuses_the_same_and_writes_nothing(self):
        os.makedirs(self.out)
        write(os.path.join(self.out, "a.txt"), "mine")
        with self.assertRaises(NmaemError):
            check_outputs(self.out, "demo", products=["a.txt"], force=True)
        self.assertEqual(tree(self.out), {"a.txt": "mine"})
        check_outputs(os.path.join(self.tmp, "new"), "demo", products=["a.txt"])
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "new")))


class FileOutputTest(PolicyCase):
    def file_outputs(self, force=False, inputs=()):
        return command_outputs(os.path.join(self.tmp, "latent.npz"), "infer", kind="file",
                               force=force, inputs=inputs, log=self.msgs.append)

    def test_named_file_replaced_only_with_force(self):
        target = os.path.join(self.tmp, "latent.npz")
        write(target, "the user's")
        with self.assertRaises(NmaemError) as cm:
            with self.file_outputs():
                pass
        self.assertIn("already exists", str(cm.exception))
        with self.file_outputs(force=True) as out:
            self.assertEqual(out.path(), target)
            write(out.path(), "new")
            write(out.path("latent_extra.png"), "beside it")
        self.assertEqual(read(target), "new")
        with open(manifest_path(self.tmp, "latent.npz")) as fh:
            m = json.load(fh)
        self.assertEqual(sorted(m["files"]), ["latent.npz", "latent_extra.png"])

    def test_failure_keeps_the_earlier_file(self):
        target = os.path.join(self.tmp, "latent.npz")
        write(target, "old")
        with self.assertRaises(RuntimeError):
            with self.file_outputs(force=True) as out:
                write(out.path(), "half")
                raise RuntimeError("the disk is full")
        self.assertEqual(sorted(os.listdir(self.tmp)), ["latent.npz"])
        self.assertEqual(read(target), "old")

    def test_onto_an_input_refused(self):
        target = os.path.join(self.tmp, "latent.npz")
        write(target, "input")
        link = os.path.join(self.tmp, "link.npz")
        os.symlink(target, link)
        with self.assertRaises(NmaemError) as cm:
            with self.file_outputs(force=True, inputs=[link]):
                pass
        self.assertIn("would replace the input", str(cm.exception))
        self.assertEqual(read(target), "input")

    def test_output_file_is_a_folder(self):
        os.makedirs(os.path.join(self.tmp, "latent.npz"))
        with self.assertRaises(NmaemError) as cm:
            with self.file_outputs(force=True):
                pass
        self.assertIn("is a folder", str(cm.exception))


class TransactionTest(PolicyCase):
    def test_error_removes_what_the_run_wrote(self):
        with self.assertRaises(RuntimeError):
            with self.outputs(["a.txt", "stacks/b.mrcs"]) as out:
                write(out.path("a.txt"), "a")
                raise RuntimeError("boom")
        self.assertFalse(os.path.exists(self.out))     # the new folder is gone too

    def test_error_under_force_puts_the_earlier_output_back(self):
        self.produce(["a.txt", "b.txt", "stacks/s.mrcs"])
        before = tree(self.out)
        with self.assertRaises(KeyboardInterrupt):
            with self.outputs(["a.txt", "c.txt"], force=True) as out:
                write(out.path("a.txt"), "v2")
                write(out.path("c.txt"), "v2")
                raise KeyboardInterrupt()
        self.assertEqual(tree(self.out), before)

    def test_killed_run_rolled_back_by_the_next(self):
        """SIGKILL in the middle of a --force run: the next command puts the earlier output
        back (with a message) before it runs."""
        self.produce(["a.txt", "b.txt"])
        before = tree(self.out)
        p = child("""
            import os, signal, sys
            from nmaem_plugin.core.io.outputs import command_outputs
            with command_outputs(sys.argv[1], "demo", products=["a.txt", "new.txt"],
                                 force=True) as out:
                open(out.path("new.txt"), "w").write("half")
                os.kill(os.getpid(), signal.SIGKILL)
            """, self.out)
        p.communicate(timeout=60)
        self.assertEqual(p.returncode, -signal.SIGKILL)
        self.assertFalse(self.manifest()["complete"])
        self.assertNotEqual(tree(self.out), before)
        with self.assertRaises(NmaemError):            # no --force: refused, rolled back
            self.produce(["a.txt"], tag="v3")
        self.assertEqual(len(self.msgs), 2, self.msgs)    # its lock, then its files
        self.assertIn("stale lock of process %d" % p.pid, self.msgs[0])
        self.assertIn("rolled back an interrupted nmaem demo (process %d)" % p.pid,
                      self.msgs[1])
        self.assertEqual(tree(self.out), before)

    def test_sigterm_in_a_child_leaves_nothing(self):
        p = child("""
            import os, signal, sys
            from nmaem_plugin.core.io.outputs import command_outputs
            def stop(*a):
                raise SystemExit(143)
            signal.signal(signal.SIGTERM, stop)
            with command_outputs(sys.argv[1], "demo", products=["a.txt", "b.txt"]) as out:
                open(out.path("a.txt"), "w").write("a")
                os.kill(os.getpid(), signal.SIGTERM)
            """, self.out)
        p.communicate(timeout=60)
        self.assertEqual(p.returncode, 143)
        self.assertFalse(os.path.exists(self.out))


class LockTest(PolicyCase):
    def test_second_writer_refused_while_the_first_runs(self):
        p = child("""
            import sys, time
            from nmaem_plugin.core.io.outputs import command_outputs
            with command_outputs(sys.argv[1], "demo", products=["a.txt"]) as out:
                open(out.path("a.txt"), "w").write("first")
                print("holding", flush=True)
                sys.stdin = None
                time.sleep(60)
            """, self.out)
        try:
            self.assertEqual(p.stdout.readline().strip(), "holding")
            with self.assertRaises(NmaemError) as cm:
                self.produce(["a.txt"], tag="second", force=True)
            self.assertIn("another nmaem demo (process %d on" % p.pid, str(cm.exception))
            self.assertEqual(read_lock(os.path.join(self.out, ".nmaem-demo.lock"))[0], p.pid)
            self.assertEqual(read(os.path.join(self.out, "a.txt")), "first")
        finally:
            p.kill()
            p.communicate()
        # the holder was killed: its lock is stale, its output rolled back; now we may
        self.produce(["a.txt"], tag="second")
        self.assertEqual(read(os.path.join(self.out, "a.txt")), "second:a.txt")
        self.assertTrue(any("stale lock of process %d" % p.pid in m for m in self.msgs),
                        self.msgs)

    def test_two_writers_started_together(self):
        """Two processes into one new output at once: one succeeds, the other is refused
        (by the lock, or, when it starts after the first ended, as an existing output)."""
        code = """
            import sys, time
            from nmaem_plugin.core.base.errors import NmaemError
            from nmaem_plugin.core.io.outputs import command_outputs
            try:
                with command_outputs(sys.argv[1], "demo", products=["a.txt"]) as out:
                    for k in range(20):
                        open(out.path("a.txt"), "a").write(sys.argv[2])
                        time.sleep(0.02)
            except NmaemError as exc:
                print("refused:", exc)
                sys.exit(2)
            """
        ps = [child(code, self.out, tag) for tag in "AB"]
        outs = [p.communicate(timeout=60) for p in ps]
        codes = sorted(p.returncode for p in ps)
        self.assertEqual(codes, [0, 2], outs)
        text = read(os.path.join(self.out, "a.txt"))
        self.assertIn(text, ("A" * 20, "B" * 20))       # one of them, never a mix


if __name__ == "__main__":
    unittest.main()
