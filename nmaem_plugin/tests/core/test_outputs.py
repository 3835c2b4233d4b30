"""The output policy of every command (core/outputs.py): never onto an input, never onto an
existing output without --force, a new training run only in a new or empty folder; and the
options that used to be accepted silently (--snr-db nan, --num-workers -1, --keep 0,
--kmeans 0). Every refusal: exit status 2, one line ``nmaem: error: <file>: <problem>``,
and the user's files unchanged (md5).

One tiny dataset (12 particles, 32 px), its modes, a 1-epoch run and its latent file are
made once through the command line (``python -m nmaem_plugin``).
"""
import os
import shutil
import tempfile
import unittest

from nmaem_plugin import DATA_DIR
from nmaem_plugin.tests.core.cli_fixture import md5, nmaem, tiny_chain

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")
F = {}


def setUpModule():
    F.update(tiny_chain(tempfile.mkdtemp(prefix="nmaem-outputs-"),
                        ("--epochs", "1", "--batch", "4", "--encoder", "small", "--loss", "l2",
                         "--no-check", "--device", "cpu")))


def tearDownModule():
    shutil.rmtree(F["tmp"], ignore_errors=True)


class OutputCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="case-", dir=F["tmp"])

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def copy(self, src, name):
        dst = self.path(name)
        shutil.copyfile(src, dst)
        return dst

    def refused(self, args, path, words, keep=()):
        """nmaem ``args`` exits 2 with one line naming ``path`` and ``words``; the files
        ``keep`` (and every file of the fixture) keep their md5."""
        watched = list(keep) + [F["star"], F["ref"], F["modes"], F["latent"],
                                os.path.join(F["run"], "config.json"),
                                os.path.join(F["run"], "modes.npz")]
        before = {f: md5(f) for f in watched}
        p = nmaem(*args)
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        self.assertTrue(lines, "no message")
        self.assertEqual(sum(ln.startswith("nmaem: error: ") for ln in lines), 1, p.stderr)
        last = lines[-1]
        self.assertTrue(last.startswith("nmaem: error: %s: " % path), last)
        for w in words:
            self.assertIn(w, last)
        for f, h in before.items():
            self.assertEqual(md5(f), h, "%s changed" % f)
        return last


class TestModes(OutputCase):
    def test_output_onto_the_reference(self):
        ref = self.copy(F["ref"], "X.pdb")
        self.refused(["modes", ref, "--n-modes", "2", "--device", "cpu", "-o", ref], ref,
                     ["would replace the input"], keep=[ref])

    def test_output_through_a_link_onto_the_reference(self):
        ref = self.copy(F["ref"], "X.pdb")
        link = self.path("link.npz")
        os.symlink(ref, link)
        self.refused(["modes", ref, "--n-modes", "2", "-o", link], link,
                     ["would replace the input"], keep=[ref])

    def test_existing_modes_file(self):
        out = self.copy(F["modes"], "mine.npz")
        self.refused(["modes", F["ref"], "--n-modes", "2", "--device", "cpu", "-o", out],
                     out, ["already exists", "--force"], keep=[out])

    def test_existing_modes_file_with_force(self):
        out = self.copy(F["modes"], "mine.npz")
        with open(out, "wb") as fh:
            fh.write(b"old")
        p = nmaem("modes", F["ref"], "--n-modes", "2", "--device", "cpu", "-o", out,
                  "--force")
        self.assertEqual(p.returncode, 0, p.stderr)
        with open(out, "rb") as fh:
            self.assertNotEqual(fh.read(3), b"old")

    def test_existing_export_files(self):
        exp = self.path("anim")
        os.makedirs(exp)
        mine = os.path.join(exp, "mode_01.pdb")
        shutil.copyfile(F["ref"], mine)
        self.refused(["modes", F["ref"], "--n-modes", "2", "--device", "cpu",
                      "-o", self.path("new.npz"), "--export", exp], mine,
                     ["is in the way"], keep=[mine])
        self.assertFalse(os.path.exists(self.path("new.npz")))


class TestSimulate(OutputCase):
    def test_existing_dataset(self):
        self.refused(["simulate", "--ref", OPEN, "--frames", "2", "--n", "2", "--box", "32",
                      "--apix", "3", "--no-noise", "--device", "cpu", "-o", F["sim"]],
                     F["sim"], ["already holds the output of an earlier nmaem simulate",
                                "--force"])

    def test_snr_db_nan(self):
        out = self.path("nan")
        p = nmaem("simulate", "--ref", OPEN, "--frames", "2", "--n", "2", "--box", "32",
                  "--apix", "3", "--snr-db", "nan", "--device", "cpu", "-o", out)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("nmaem: error: --snr-db must be a finite number", p.stderr)
        self.assertFalse(os.path.exists(out))

    def test_output_folder_is_a_file(self):
        mine = self.copy(F["ref"], "notes.txt")
        self.refused(["simulate", "--ref", OPEN, "--frames", "2", "--n", "2", "--box", "32",
                      "--apix", "3", "--no-noise", "--device", "cpu", "-o", mine], mine,
                     ["is a file"], keep=[mine])


class TestTrain(OutputCase):
    def common(self, out):
        return ["train", "--particles", F["star"], "--ref", F["ref"], "--modes", F["modes"],
                "-o", out, "--epochs", "1", "--batch", "4", "--encoder", "small",
                "--loss", "l2", "--no-check", "--device", "cpu"]

    def test_folder_of_the_users_files(self):
        """-o a folder that holds the user's own modes.npz: not a run, refused."""
        folder = self.path("work")
        os.makedirs(folder)
        mine = self.copy(F["modes"], os.path.join("work", "modes.npz"))
        with open(mine, "ab") as fh:
            fh.write(b"\0")                     # differs from what train would copy there
        self.refused(self.common(folder), folder, ["holds other files", "modes.npz"],
                     keep=[mine])
        self.assertEqual(sorted(os.listdir(folder)), ["modes.npz"])

    def test_keep_zero(self):
        out = self.path("k0")
        p = nmaem(*self.common(out) + ["--keep", "0"])
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertEqual(p.stderr.strip().splitlines()[-1],
                         "nmaem: error: --keep must be at least 1: last.pt is a copy of the "
                         "newest epoch checkpoint (got 0)")
        self.assertFalse(os.path.exists(out))

    def test_num_workers_negative(self):
        out = self.path("w")
        p = nmaem(*self.common(out) + ["--num-workers", "-1"])
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertEqual(p.stderr.strip().splitlines()[-1],
                         "nmaem: error: --num-workers must be 0 or more (got -1)")
        self.assertFalse(os.path.exists(out))

    def test_resume_keep_zero(self):
        p = nmaem("train", "-o", F["run"], "--resume", "--keep", "0")
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("nmaem: error: --keep must be at least 1", p.stderr)


class TestInfer(OutputCase):
    def common(self):
        return ["infer", "--particles", F["star"], "--model", F["run"], "--device", "cpu"]

    def test_output_onto_the_particles(self):
        self.refused(self.common() + ["-o", F["star"]], F["star"], ["would replace the input"])

    def test_star_onto_the_particles(self):
        self.refused(self.common() + ["-o", self.path("z.npz"), "--star", F["star"]],
                     F["star"], ["would replace the input"])
        self.assertFalse(os.path.exists(self.path("z.npz")))

    def test_output_onto_a_run_file(self):
        target = os.path.join(F["run"], "modes.npz")
        self.refused(self.common() + ["-o", target], target, ["would replace the input"])

    def test_existing_latent(self):
        out = self.copy(F["latent"], "latent.npz")
        self.refused(self.common() + ["-o", out], out, ["already exists", "--force"],
                     keep=[out])

    def test_existing_star(self):
        out = self.copy(F["star"], "out.star")
        self.refused(self.common() + ["-o", self.path("z.npz"), "--star", out], out,
                     ["already exists"], keep=[out])
        self.assertFalse(os.path.exists(self.path("z.npz")))

    def test_existing_latent_with_force(self):
        out = self.path("latent.npz")
        with open(out, "wb") as fh:
            fh.write(b"old")
        p = nmaem(*self.common() + ["-o", out, "--force"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(md5(out), md5(F["latent"]))

    def test_num_workers_negative(self):
        p = nmaem(*self.common() + ["-o", self.path("z.npz"), "--num-workers", "-1"])
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertEqual(p.stderr.strip().splitlines()[-1],
                         "nmaem: error: --num-workers must be 0 or more (got -1)")


class TestCheck(OutputCase):
    def test_json_onto_the_particles_or_an_existing_file(self):
        self.refused(["check", "--particles", F["star"], "--ref", F["ref"],
                      "--json", F["star"]], F["star"], ["would replace the input"])
        mine = self.path("mine.json")
        with open(mine, "w") as fh:
            fh.write("{}\n")
        self.refused(["check", "--particles", F["star"], "--ref", F["ref"], "--json", mine],
                     mine, ["--force"], keep=[mine])


class TestExportEvaluateReport(OutputCase):
    def export(self, out, *more):
        return ["export", "--latent", F["latent"], "--model", F["run"], "-o", out,
                "--no-refine", "--pcs", "1", "--steps", "2"] + list(more)

    def test_existing_models(self):
        out = self.path("models")
        p = nmaem(*self.export(out))
        self.assertEqual(p.returncode, 0, p.stderr)
        mine = os.path.join(out, "models.json")
        self.refused(self.export(out), out,
                     ["already holds the output of an earlier nmaem export", "--force"],
                     keep=[mine])
        self.assertEqual(nmaem(*self.export(out, "--force")).returncode, 0)
        self.assertEqual(nmaem(*self.export(out, "--overwrite")).returncode, 0)

    def test_kmeans_zero(self):
        out = self.path("km")
        p = nmaem(*self.export(out, "--kmeans", "0"))
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertEqual(p.stderr.strip().splitlines()[-1],
                         "nmaem: error: --kmeans must be at least 1 (got 0)")
        self.assertFalse(os.path.exists(out))

    def test_evaluate_per_particle_onto_the_latent(self):
        lat = self.copy(F["latent"], "latent.npz")
        self.refused(["evaluate", "--latent", lat, "--truth", F["sim"], "--model", F["run"],
                      "--per-particle", lat], lat, ["would replace the input"], keep=[lat])

    def test_evaluate_existing_per_particle(self):
        mine = self.copy(F["modes"], "pp.npz")
        self.refused(["evaluate", "--latent", F["latent"], "--truth", F["sim"],
                      "--model", F["run"], "--per-particle", mine], mine,
                     ["already exists"], keep=[mine])

    def test_report_existing_index(self):
        out = self.path("rep")
        os.makedirs(out)
        mine = os.path.join(out, "index.html")
        with open(mine, "w") as fh:
            fh.write("<html>mine</html>")
        for force in ([], ["--force"]):      # not ours: refused even with --force
            self.refused(["report", F["run"], "-o", out] + force, mine, ["is in the way"],
                         keep=[mine])

    def test_report_into_the_run(self):
        self.refused(["report", F["run"], "-o", F["run"]], F["run"],
                     ["is the input"])


if __name__ == "__main__":
    unittest.main()
