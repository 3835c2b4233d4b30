"""Nothing lost, nothing silently wrong, part two (docs/reliability.md, "The classes of
issue 29"): every command against output folders that hold the user's files, inputs that
do not belong together, two commands at once, environment faults, interruptions, and
messages that must point the right way. Each class of the issue is one TestCase.

The fault-injection harness: ``NMAEM_FAULT`` (``base/faults.py``: SIGTERM, SIGKILL, a full
disk, EFBIG, a read-only file system at a named file write), a real read-only folder (a
read-only tmpfs as root, else a folder without write permission), a real file-size limit
(``RLIMIT_FSIZE`` in a child process) and two child processes started together.

One tiny dataset (12 particles, 32 px), its modes (2), a 1-epoch run and its latent are
made once, in this process (``cli_fixture.run_main``); most commands run in this process
too (fast); those that need a process of their own (a kill, a limit, concurrency) run as
``python -m nmaem_plugin``.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import unittest

import numpy as np

from nmaem_plugin import DATA_DIR
from nmaem_plugin.tests.core.cli_fixture import NMAEM, error_line, md5, run_main

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")
F = {}
TINY = ("--box", "32", "--apix", "3", "--no-noise", "--device", "cpu")


def nmaem_ok(*args):
    rc, out, err = run_main(*args)
    if rc != 0:
        raise RuntimeError("nmaem %s failed: %s" % (args[0], err))
    return out


def setUpModule():
    tmp = tempfile.mkdtemp(prefix="nmaem-reliability-")
    F.update(tmp=tmp, sim=os.path.join(tmp, "sim"), modes=os.path.join(tmp, "modes.npz"),
             run=os.path.join(tmp, "run"), latent=os.path.join(tmp, "latent.npz"),
             other=os.path.join(tmp, "other"))
    F["star"] = os.path.join(F["sim"], "particles.star")
    F["ref"] = os.path.join(F["sim"], "reference.pdb")
    nmaem_ok("simulate", "--ref", OPEN, "--target", CLOSED, "--frames", "3", "--n", "12",
             "-o", F["sim"], *TINY)
    # the same count of particles, other poses and images: "another file of the same size"
    nmaem_ok("simulate", "--ref", OPEN, "--target", CLOSED, "--frames", "3", "--n", "12",
             "--seed", "7", "-o", F["other"], *TINY)
    nmaem_ok("modes", F["ref"], "--n-modes", "2", "--device", "cpu", "-o", F["modes"])
    nmaem_ok("train", "--particles", F["star"], "--ref", F["ref"], "--modes", F["modes"],
             "-o", F["run"], "--epochs", "1", "--batch", "4", "--encoder", "small",
             "--loss", "l2", "--no-check", "--device", "cpu")
    nmaem_ok("infer", "--particles", F["star"], "--model", F["run"], "-o", F["latent"],
             "--device", "cpu")


def tearDownModule():
    shutil.rmtree(F["tmp"], ignore_errors=True)


def child(*args, env=None, preexec_fn=None):
    """``python -m nmaem_plugin ARGS`` in a process of its own (CompletedProcess)."""
    return subprocess.run(NMAEM + [str(a) for a in args], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, **(env or {})),
                          preexec_fn=preexec_fn)


def visible(folder):
    """The files under ``folder`` (relative paths), the hidden ones (manifest) left out."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [os.path.relpath(os.path.join(root, f), folder) for f in files
                if not f.startswith(".")]
    return sorted(out)


def everything(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder)
                  for r, _, fs in os.walk(folder) for f in fs)


class Case(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="case-", dir=F["tmp"])
        self.watched = {f: md5(f) for f in [F["star"], F["ref"], F["modes"], F["latent"]]
                        + glob.glob(os.path.join(F["run"], "*.*"))
                        + glob.glob(os.path.join(F["run"], "checkpoints", "*"))}

    def tearDown(self):
        for f, h in self.watched.items():
            self.assertEqual(md5(f), h, "the fixture's %s changed" % f)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, *names):
        return os.path.join(self.tmp, *names)

    def one_error(self, rc, err, starts, *words):
        """Exit status 2, one error line starting ``nmaem: error: <starts>`` with
        ``words``, no traceback; returns the line."""
        self.assertEqual(rc, 2, err)
        lines = error_line(err)
        self.assertEqual(len(lines), 1, err)
        self.assertNotIn("Traceback", err)
        self.assertTrue(lines[0].startswith("nmaem: error: " + starts), lines[0])
        for w in words:
            self.assertIn(w, lines[0])
        return lines[0]

    def run_copy(self):
        run = self.path("run")
        shutil.copytree(F["run"], run)
        return run

    def export_args(self, out, *more):
        return ["export", "--latent", F["latent"], "--model", F["run"], "-o", out,
                "--no-refine", "--no-thumbnails"] + list(more)


class Class1OutputFolders(Case):
    """An output folder that already holds the user's files: we write only files we own,
    refuse any other in the way, and --force removes what our earlier run wrote, nothing
    more."""

    def test_simulate_into_a_folder_of_the_users_stacks(self):
        out = self.path("data")
        os.makedirs(os.path.join(out, "stacks"))
        mine = os.path.join(out, "stacks", "particles_00000.mrcs")
        with open(mine, "wb") as fh:
            fh.write(b"the user's own stack")
        for force in ([], ["--force"]):
            rc, _, err = run_main("simulate", "--ref", OPEN, "--n", "2", "-o", out,
                                  *TINY, *force)
            self.one_error(rc, err, mine + ": is in the way")
            self.assertEqual(everything(out), ["stacks/particles_00000.mrcs"])
        with open(mine, "rb") as fh:
            self.assertEqual(fh.read(), b"the user's own stack")

    def test_report_keeps_a_training_png_that_is_not_ours(self):
        out = self.path("rep")
        os.makedirs(out)
        mine = os.path.join(out, "training.png")
        with open(mine, "wb") as fh:
            fh.write(b"my figure")
        for force in ([], ["--force"]):
            rc, _, err = run_main("report", F["run"], "-o", out, *force)
            self.one_error(rc, err, mine + ": is in the way")
        self.assertEqual(everything(out), ["training.png"])

    def test_force_onto_a_larger_earlier_export(self):
        out = self.path("models")
        nmaem_ok(*self.export_args(out, "--steps", "4"))
        self.assertIn("pc1_04.pdb", visible(out))
        mine = os.path.join(out, "notes.txt")
        with open(mine, "w") as fh:
            fh.write("mine")
        nmaem_ok(*self.export_args(out, "--steps", "2", "--force"))
        self.assertEqual(visible(out), ["models.csv", "models.json", "notes.txt",
                                        "pc1_01.pdb", "pc1_02.pdb"])
        with open(os.path.join(out, "models.json")) as fh:
            self.assertEqual([m["file"] for m in json.load(fh)["models"]],
                             ["pc1_01.pdb", "pc1_02.pdb"])
        with open(os.path.join(out, ".nmaem-export.json")) as fh:
            m = json.load(fh)
        self.assertTrue(m["complete"])
        self.assertEqual(sorted(m["files"]), ["models.csv", "models.json", "pc1_01.pdb",
                                              "pc1_02.pdb"])

    def test_force_onto_more_earlier_states(self):
        out = self.path("states")
        nmaem_ok("states", "--latent", F["latent"], "--kmeans", "3", "-o", out,
                 "--particles", F["star"])
        self.assertIn("state_03.star", visible(out))
        nmaem_ok("states", "--latent", F["latent"], "--kmeans", "2", "-o", out,
                 "--particles", F["star"], "--force")
        self.assertEqual(visible(out), ["state_01.star", "state_02.star", "states.json",
                                        "states.npz"])

    def test_without_force_an_earlier_output_is_refused_whole(self):
        out = self.path("models")
        nmaem_ok(*self.export_args(out, "--steps", "2"))
        before = {f: md5(os.path.join(out, f)) for f in everything(out)}
        rc, _, err = run_main(*self.export_args(out, "--steps", "3"))
        self.one_error(rc, err, out + ": already holds the output of an earlier nmaem "
                       "export", "--force")
        self.assertEqual({f: md5(os.path.join(out, f)) for f in everything(out)}, before)

    def test_a_folder_output_may_not_be_an_input(self):
        rc, _, err = run_main("report", F["run"], "-o", F["run"])
        self.one_error(rc, err, F["run"], "is the input")


class Class2Belonging(Case):
    """Files of earlier steps read together are checked to belong together (fingerprints,
    keys); a resumed run continues exactly what it started."""

    def test_states_particles_of_another_file_of_the_same_size(self):
        other = os.path.join(F["other"], "particles.star")
        rc, _, err = run_main("states", "--latent", F["latent"], "--kmeans", "2",
                              "-o", self.path("st"), "--particles", other)
        self.one_error(rc, err, other + ": is not the particle file that " + F["latent"])
        self.assertFalse(os.path.exists(self.path("st")))

    def test_resume_with_config_naming_other_particles(self):
        run = self.run_copy()
        cfg_file = os.path.join(run, "config.json")
        with open(cfg_file) as fh:
            cfg = json.load(fh)
        cfg["particles"] = os.path.join(F["other"], "particles.star")
        with open(cfg_file, "w") as fh:
            json.dump(cfg, fh)
        last = os.path.join(run, "checkpoints", "last.pt")
        before = md5(last)
        rc, _, err = run_main("train", "-o", run, "--resume", "--epochs", "2")
        self.one_error(rc, err, cfg["particles"] + ": is not the particle file that "
                       + cfg_file + " was started on")
        self.assertEqual(md5(last), before)

    def test_resume_with_an_edited_config(self):
        """Loss, box, modes: an edit of config.json that the checkpoints contradict."""
        for key, value in (("loss", "whitened"), ("box", 16), ("n_modes", 1),
                           ("z_scale", 2.0)):
            run = self.run_copy()
            cfg_file = os.path.join(run, "config.json")
            with open(cfg_file) as fh:
                cfg = json.load(fh)
            cfg[key] = value
            with open(cfg_file, "w") as fh:
                json.dump(cfg, fh)
            rc, _, err = run_main("train", "-o", run, "--resume", "--epochs", "2")
            self.one_error(rc, err, cfg_file + ": says %s = " % key, "the file was edited")
            shutil.rmtree(run)

    def test_resume_with_other_reference_modes_or_files(self):
        run = self.run_copy()
        rc, _, err = run_main("train", "-o", run, "--resume", "--epochs", "2", "--ref", CLOSED)
        self.one_error(rc, err, CLOSED + ": is not the reference this run was trained with")
        other_modes = self.path("m3.npz")
        nmaem_ok("modes", OPEN, "--n-modes", "2", "--device", "cpu", "-o", other_modes,
                 "--cutoff", "10")
        rc, _, err = run_main("train", "-o", run, "--resume", "--epochs", "2",
                              "--modes", other_modes)
        self.one_error(rc, err, other_modes + ": are not the modes this run was trained with")
        shutil.copyfile(other_modes, os.path.join(run, "modes.npz"))      # the run's own copy
        rc, _, err = run_main("train", "-o", run, "--resume", "--epochs", "2")
        self.one_error(rc, err, run + ": its reference", "changed since the run started")

    def test_resume_with_the_particle_file_rewritten_in_place(self):
        run = self.run_copy()
        data = self.path("data")
        shutil.copytree(F["sim"], data)
        cfg_file = os.path.join(run, "config.json")
        with open(cfg_file) as fh:
            cfg = json.load(fh)
        cfg["particles"] = os.path.join(data, "particles.star")    # moved: still accepted
        with open(cfg_file, "w") as fh:
            json.dump(cfg, fh)
        for name in os.listdir(os.path.join(F["other"], "stacks")):   # other images there
            shutil.copyfile(os.path.join(F["other"], "stacks", name),
                            os.path.join(data, "stacks", name))
        rc, _, err = run_main("train", "-o", run, "--resume", "--epochs", "2")
        self.one_error(rc, err, cfg["particles"] + ": is not the particle file",
                       "their images differ")

    def test_config_missing_a_key(self):
        run = self.run_copy()
        cfg_file = os.path.join(run, "config.json")
        with open(cfg_file) as fh:
            cfg = json.load(fh)
        del cfg["box"]
        with open(cfg_file, "w") as fh:
            json.dump(cfg, fh)
        for args in (["infer", "--particles", F["star"], "--model", run, "-o",
                      self.path("l.npz")], ["train", "-o", run, "--resume"]):
            rc, _, err = run_main(*args)
            self.one_error(rc, err, cfg_file + ": missing the key 'box'")
        self.assertFalse(os.path.exists(self.path("l.npz")))

    def test_export_with_a_latent_of_another_run(self):
        from nmaem_plugin.core.io.latent import read_latent, write_latent
        lat = read_latent(F["latent"])
        mine = self.path("foreign.npz")
        write_latent(mine, lat.z, lat.shift, lat.index, particles=lat.particles,
                     model="0" * 64)       # another reference or modes, the same d
        rc, _, err = run_main("export", "--latent", mine, "--model", F["run"],
                              "-o", self.path("e"), "--no-refine")
        self.one_error(rc, err, mine + ": was made by another run")
        self.assertFalse(os.path.exists(self.path("e")))


class Class3TwoAtOnce(Case):
    """Two commands into one new output started together: one succeeds, the other is
    refused in one line; the output is the winner's, whole."""

    def together(self, *args):
        procs = [subprocess.Popen(NMAEM + [str(a) for a in args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        return [(p.wait(timeout=600), p.communicate()[1]) for p in procs]

    def check_one_wins(self, results, target, command):
        codes = sorted(rc for rc, _ in results)
        self.assertEqual(codes, [0, 2], results)
        err = [e for rc, e in results if rc == 2][0]
        line = self.one_error(2, err, target)
        self.assertTrue("another nmaem %s (process" % command in line
                        or "already" in line, line)

    def test_two_infers_into_one_latent(self):
        out = self.path("latent.npz")
        results = self.together("infer", "--particles", F["star"], "--model", F["run"],
                                "-o", out, "--device", "cpu")
        self.check_one_wins(results, out, "infer")
        from nmaem_plugin.core.io.latent import read_latent
        np.testing.assert_allclose(read_latent(out).z, read_latent(F["latent"]).z,
                                   rtol=1e-5, atol=1e-5)
        self.assertEqual(everything(self.tmp), [".nmaem-latent.npz.json", "latent.npz"])

    def test_two_exports_into_one_folder(self):
        out = self.path("models")
        results = self.together(*self.export_args(out, "--steps", "3"))
        self.check_one_wins(results, out, "export")
        self.assertEqual(visible(out), ["models.csv", "models.json", "pc1_01.pdb",
                                        "pc1_02.pdb", "pc1_03.pdb"])


def _read_only_folder(test):
    """A folder no file can be created in: a read-only tmpfs as root, else a folder
    without write permission."""
    folder = tempfile.mkdtemp(prefix="ro-", dir=test.tmp)
    if os.geteuid() == 0:
        if shutil.which("mount") is None or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", folder],
                capture_output=True).returncode != 0:
            test.skipTest("cannot mount a read-only tmpfs here")
        test.addCleanup(lambda: subprocess.run(["umount", folder], capture_output=True))
    else:
        os.chmod(folder, 0o555)
        test.addCleanup(lambda: os.chmod(folder, 0o755))
    return folder


class Class4Faults(Case):
    """Environment faults and bad values end in one line naming the file, never in a
    traceback; nothing is left half-written."""

    def test_read_only_output_refused_before_the_work(self):
        ro = _read_only_folder(self)
        out = os.path.join(ro, "latent.npz")
        rc, stdout, err = run_main("infer", "--particles", F["star"], "--model", F["run"],
                                   "-o", out, "--device", "cpu")
        self.one_error(rc, err, ro + ": cannot write into this folder")
        self.assertNotIn("infer:", stdout)            # refused before any image was read
        rc, _, err = run_main("export", "--model", F["run"], "-o", os.path.join(ro, "m"),
                              "--z", "0,0", "--no-refine")
        self.one_error(rc, err, os.path.join(ro, "m") + ": cannot create the output folder")

    def test_file_size_limit_like_a_full_disk(self):
        """A real RLIMIT_FSIZE: the write fails with EFBIG (SIGXFSZ is ignored)."""
        import resource
        out = self.path("sim")
        p = child("simulate", "--ref", OPEN, "--n", "8", "--chunk", "8", "-o", out, *TINY,
                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                        (16384, 16384)))
        line = self.one_error(p.returncode, p.stderr, "file too large for this process's "
                              "file-size limit (ulimit -f) writing ")
        self.assertIn(out, line)
        self.assertFalse(os.path.exists(out))      # all or nothing: the new folder is gone

    def test_injected_write_faults(self):
        for fault, words in (("efbig", "file too large"), ("nospace", "no space left"),
                             ("erofs", "Read-only file system")):
            out = self.path("l_%s.npz" % fault)
            rc, _, err = run_main("infer", "--particles", F["star"], "--model", F["run"],
                                  "-o", out, "--device", "cpu",
                                  env=dict(NMAEM_FAULT="%s@l_%s.npz" % (fault, fault)))
            line = self.one_error(rc, err, "", words)
            self.assertIn(out, line)
            self.assertFalse(os.path.exists(out))
        self.assertEqual(everything(self.tmp), [])

    def test_empty_last_checkpoint(self):
        run = self.run_copy()
        last = os.path.join(run, "checkpoints", "last.pt")
        open(last, "wb").close()
        for args in (["train", "-o", run, "--resume", "--epochs", "2"],
                     ["infer", "--particles", F["star"], "--model", run, "-o",
                      self.path("l.npz")]):
            rc, _, err = run_main(*args)
            self.one_error(rc, err, last + ": unreadable checkpoint (an empty file",
                           "epoch_0001.pt")

    def test_bad_values(self):
        cases = [
            (["check", "--particles", F["star"], "--ref", F["ref"], "--n", "0"],
             "--n must be at least 1"),
            (["export", "--latent", F["latent"], "--model", F["run"], "-o",
              self.path("e1"), "--restraint", "nan"], "--restraint must be a positive number"),
            (["simulate", "--ref", OPEN, "--n", "2", "-o", self.path("s"), "--chunk", "0"]
             + list(TINY), "--chunk must be at least 1"),
            (["simulate", "--ref", OPEN, "--n", "2", "-o", self.path("s"), "--box", "32",
              "--apix", "nan", "--device", "cpu"], "--apix must be a positive number"),
            (["infer", "--particles", F["star"], "--model", F["run"], "-o",
              self.path("l.npz"), "--num-workers", "100000"], "--num-workers 100000 is more"),
            (self.export_args(self.path("e2"), "--steps", "0"), "--steps must be at least 1"),
            (self.export_args(self.path("e3"), "--low", "90", "--high", "10"),
             "--low 90.0 must be below --high 10.0"),
        ]
        for args, words in cases:
            rc, _, err = run_main(*args)
            self.one_error(rc, err, words)
        self.assertEqual(everything(self.tmp), [])


class Class5Interrupted(Case):
    """An interrupted command leaves nothing a re-run refuses or mixes: SIGTERM and full
    disks clean up in the process; after SIGKILL the next command rolls back first."""

    def test_sigterm_in_simulate_before_the_star(self):
        out = self.path("sim")
        args = ["simulate", "--ref", OPEN, "--n", "8", "--chunk", "4", "-o", out] + list(TINY)
        rc, _, err = run_main(*args, env=dict(NMAEM_FAULT="sigterm@particles.star"))
        self.assertEqual(rc, 143, err)
        self.assertIn("interrupted by SIGTERM", err)
        self.assertFalse(os.path.exists(out))
        nmaem_ok(*args)                            # the re-run finishes it, no --force
        self.assertEqual(visible(out), ["frames.pdb", "ground_truth.npz", "particles.star",
                                        "reference.pdb", "stacks/particles_00000.mrcs",
                                        "stacks/particles_00001.mrcs"])

    def test_sigterm_in_export_after_two_models(self):
        out = self.path("models")
        args = self.export_args(out, "--steps", "5")
        rc, _, err = run_main(*args, env=dict(NMAEM_FAULT="sigterm@pc1_03.pdb"))
        self.assertEqual(rc, 143, err)
        self.assertFalse(os.path.exists(out))
        nmaem_ok(*args)
        self.assertEqual(len(visible(out)), 7)

    def test_sigterm_under_force_keeps_the_earlier_output(self):
        out = self.path("models")
        nmaem_ok(*self.export_args(out, "--steps", "2"))
        before = {f: md5(os.path.join(out, f)) for f in everything(out)}
        rc, _, err = run_main(*self.export_args(out, "--steps", "4", "--force"),
                              env=dict(NMAEM_FAULT="sigterm@models.json"))
        self.assertEqual(rc, 143, err)
        self.assertEqual({f: md5(os.path.join(out, f)) for f in everything(out)}, before)

    def test_sigkill_rolled_back_by_the_next_command(self):
        out = self.path("sim")
        args = ["simulate", "--ref", OPEN, "--n", "4", "-o", out] + list(TINY)
        nmaem_ok(*args)
        before = {f: md5(os.path.join(out, f)) for f in everything(out)}
        p = child(*args, "--seed", "3", "--force", env=dict(NMAEM_FAULT="sigkill@frames.pdb"))
        self.assertEqual(p.returncode, -signal.SIGKILL, p.stderr)
        self.assertNotEqual(everything(out), sorted(before))      # half a new dataset
        rc, _, err = run_main(*args)                               # no --force
        self.assertIn("rolled back an interrupted nmaem simulate", err)
        self.one_error(rc, err, out + ": already holds the output of an earlier nmaem "
                       "simulate")
        self.assertEqual({f: md5(os.path.join(out, f)) for f in everything(out)}, before)

    def test_full_disk_at_the_second_file_of_infer(self):
        lat, star = self.path("latent.npz"), self.path("out.star")
        rc, _, err = run_main("infer", "--particles", F["star"], "--model", F["run"],
                              "-o", lat, "--star", star, "--device", "cpu",
                              env=dict(NMAEM_FAULT="nospace@out.star"))
        self.one_error(rc, err, "no space left on device writing " + star)
        self.assertEqual(everything(self.tmp), [])     # not the latent either


class Class6Messages(Case):
    """Messages point the right way: the file and the image, the value, the kind of path;
    absurd requests refused before the work; options that do nothing warned about."""

    def test_nan_pixels_name_the_file_and_the_image(self):
        import mrcfile
        data = self.path("data")
        shutil.copytree(F["sim"], data)
        stack = os.path.join(data, "stacks", "particles_00000.mrcs")
        with mrcfile.open(stack, "r+") as m:
            m.data[4, 10, 10] = np.nan
        from nmaem_plugin.core.io.star import read_star, write_star
        table = read_star(os.path.join(F["sim"], "particles.star"))
        table.stack_paths = np.array([stack] * table.n)
        star = os.path.join(data, "particles.star")
        write_star(star, table)
        rc, _, err = run_main("infer", "--particles", star, "--model", F["run"],
                              "-o", self.path("l.npz"), "--device", "cpu")
        self.one_error(rc, err, star + ": image of particle 5 (5@%s) holds non-finite "
                       "pixels" % stack)

    def test_z_values(self):
        for z, words in (("nan,0", "--z nan,0: amplitudes must be finite numbers (nan is "
                                   "not)"),
                         ("1,2,3", "--z 1,2,3 has 3 value(s) but the model has d = 2 modes")):
            rc, _, err = run_main("export", "--model", F["run"], "-o", self.path("e"),
                                  "--z", z, "--no-refine")
            self.one_error(rc, err, words)

    def test_absurd_export_refused_before_refinement(self):
        rc, out, err = run_main("export", "--model", F["run"], "-o", self.path("e"),
                                "--latent", F["latent"], "--z", "1e6,0")
        line = self.one_error(rc, err, "--z 1e+06,0: X0 + U z is", "stretches its bonds",
                              "the particles' z reach")
        self.assertNotIn("refine", out)
        self.assertFalse(os.path.exists(self.path("e")))
        self.assertIn("A RMSD from the reference", line)

    def test_a_folder_given_as_a_file_and_back(self):
        for args, words in (
                (["infer", "--particles", F["sim"], "--model", F["run"], "-o",
                  self.path("l.npz")], F["sim"] + ": is a folder, not a particle file"),
                (["infer", "--particles", F["star"], "--model", F["run"], "-o",
                  self.path("l.npz"), "--checkpoint", F["run"]],
                 F["run"] + ": is a folder, not a checkpoint file"),
                (["states", "--latent", F["sim"], "--kmeans", "2", "-o", self.path("s")],
                 F["sim"] + ": is a folder, not a latent file"),
                (["evaluate", "--latent", F["latent"], "--truth", F["star"], "--model",
                  F["run"]], F["star"] + ": is a file, not a simulated dataset folder"),
                (["report", F["star"], "-o", self.path("r")],
                 F["star"] + ": is a file, not a training run folder")):
            rc, _, err = run_main(*args)
            self.one_error(rc, err, words)

    def test_options_that_do_nothing_are_warned_about(self):
        out = self.path("e")
        rc, _, err = run_main(*self.export_args(out, "--seed", "3", "--restraint", "10",
                                                "--bandwidth", "2"))
        self.assertEqual(rc, 0, err)
        warnings = [ln for ln in err.splitlines() if ln.startswith("nmaem: warning: ")]
        self.assertEqual(warnings, [
            "nmaem: warning: --restraint does nothing with --no-refine",
            "nmaem: warning: --seed does nothing without --kmeans",
            "nmaem: warning: --bandwidth does nothing without --maxima"])
        rc, _, err = run_main("infer", "--particles", F["star"], "--model", F["run"],
                              "-o", self.path("l.npz"), "--device", "cpu",
                              "--fit-iterations", "0", "--fit-bfactor", "20")
        self.assertEqual(rc, 0, err)
        self.assertIn("nmaem: warning: --fit-bfactor 20 does nothing: the per-particle fit "
                      "does not run (--fit-iterations 0)", err)
        rc, _, err = run_main("train", "--particles", F["star"], "--ref", F["ref"],
                              "--modes", F["modes"], "-o", self.path("run2"), "--epochs", "1",
                              "--batch", "4", "--encoder", "small", "--loss", "l2",
                              "--no-check", "--device", "cpu", "--mask-radius", "30")
        self.assertEqual(rc, 0, err)
        self.assertIn("nmaem: warning: --mask-radius does nothing with --loss l2", err)
        rc, _, err = run_main("states", "--latent", F["latent"], "--kmeans", "2", "-o",
                              self.path("s"), "--half-seed", "3", "--no-refine")
        self.assertEqual(rc, 0, err)
        warnings = [ln for ln in err.splitlines() if ln.startswith("nmaem: warning: ")]
        self.assertEqual(warnings, [
            "nmaem: warning: --no-refine does nothing without --reconstruct",
            "nmaem: warning: --half-seed does nothing without --reconstruct"])


class Class7Interface(Case):
    """What the user sees around the commands (the Scipion side is tested in
    tests/scipion: the GUI under ``python -O``, the protocol tree, "Analyze results"): the
    report stays inside its folder, figures name the run, help texts point to pages an
    installed package can reach."""

    def test_report_links_stay_inside_its_folder(self):
        import re
        models, states, rep = self.path("models"), self.path("states"), self.path("rep")
        nmaem_ok("export", "--latent", F["latent"], "--model", F["run"], "-o", models,
                 "--no-refine", "--steps", "2")
        nmaem_ok("states", "--latent", F["latent"], "--kmeans", "2", "-o", states,
                 "--model", F["run"])
        nmaem_ok("report", F["run"], "-o", rep, "--models", models, "--states", states)
        with open(os.path.join(rep, "index.html")) as fh:
            html = fh.read()
        links = re.findall(r'(?:src|href)="([^"]+)"', html)
        self.assertGreaterEqual(len([ln for ln in links if ln.endswith(".png")]), 4 + 1)
        for link in links:
            self.assertFalse(os.path.isabs(link), link)
            self.assertFalse(os.path.normpath(link).startswith(".."), link)
            self.assertTrue(os.path.isfile(os.path.join(rep, link)), link)
        for name in ("pc1_01.png", "pc1_02.png"):       # copies, byte for byte
            self.assertEqual(md5(os.path.join(rep, "models", name)),
                             md5(os.path.join(models, name)))
        shutil.rmtree(models)                           # the report still shows them
        for link in links:
            self.assertTrue(os.path.isfile(os.path.join(rep, link)), link)

    def test_figures_name_the_run(self):
        from nmaem_plugin.core.report.report import run_label
        self.assertEqual(run_label(os.path.join("x", "ak", "run")), os.path.join("ak", "run"))
        self.assertEqual(run_label(os.path.join("x", "ak_16modes")), "ak_16modes")

    def test_help_points_to_pages_an_installed_package_reaches(self):
        """No help text of the command line names a docs/*.md file (not installed with the
        package); they give the documentation's address."""
        import re
        from nmaem_plugin.core.cli.main import build_parser
        parser = build_parser()
        sub = parser._subparsers._group_actions[0]
        texts = [parser.description or ""]
        for name, p in sub.choices.items():
            texts.append(p.description or "")
            texts += [a.help or "" for a in p._actions]
        bare = [t for t in texts if re.search(r"(?<!main/)docs/\w+\.md", t)]
        self.assertEqual(bare, [])
        self.assertTrue(any("https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/"
                            in t for t in texts))


if __name__ == "__main__":
    unittest.main()
