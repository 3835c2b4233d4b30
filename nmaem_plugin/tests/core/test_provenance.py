"""Results that belong together (core/provenance.py): a latent file, a training run and a
simulation's truth are checked to describe the same particles and the same model; a
checkpoint given to ``infer --checkpoint`` is checked to be of the run's network.

Tiny data (12 particles, 32 px) made once through the command line: simulations A and B
(other seeds), C and D (``--like`` A, other seeds: the same poses and CTFs, other images),
modes, a run on A, a run with fewer modes and a run with other modes of the same shape.
"""
import os
import shutil
import tempfile
import unittest

import numpy as np

from nmaem_plugin import DATA_DIR
from nmaem_plugin.tests.core.cli_fixture import nmaem, run_steps

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")
F = {}
SIM = ("--frames", "3", "--n", "12", "--box", "32", "--apix", "3", "--device", "cpu")
TRAIN = ("--epochs", "1", "--batch", "4", "--encoder", "small", "--loss", "l2", "--no-check",
         "--device", "cpu")


def setUpModule():
    tmp = tempfile.mkdtemp(prefix="nmaem-provenance-")
    j = lambda *p: os.path.join(tmp, *p)   # noqa: E731
    F.update(tmp=tmp, A=j("A"), B=j("B"), C=j("C"), D=j("D"), modes=j("modes.npz"),
             modes2=j("modes2.npz"), run=j("run"), run_d1=j("run_d1"), run_m2=j("run_m2"),
             latent=j("latent.npz"), latent_m2=j("latent_m2.npz"))
    star = lambda s: os.path.join(F[s], "particles.star")   # noqa: E731
    F["ref"] = os.path.join(F["A"], "reference.pdb")
    steps = [("simulate", "--ref", OPEN, "--target", CLOSED, "--seed", "0", "-o", F["A"]) + SIM,
             ("simulate", "--ref", OPEN, "--target", CLOSED, "--seed", "1", "-o", F["B"]) + SIM,
             ("simulate", "--like", star("A"), "--ref", OPEN, "--target", CLOSED, "--seed", "5",
              "-o", F["C"]) + SIM[:2] + SIM[-2:],
             ("simulate", "--like", star("A"), "--ref", OPEN, "--target", CLOSED, "--seed", "6",
              "-o", F["D"]) + SIM[:2] + SIM[-2:],
             ("modes", F["ref"], "--n-modes", "2", "--device", "cpu", "-o", F["modes"]),
             ("modes", F["ref"], "--n-modes", "2", "--cutoff", "10", "--device", "cpu", "-o",
              F["modes2"]),
             ("train", "--particles", star("A"), "--ref", F["ref"], "--modes", F["modes"],
              "-o", F["run"]) + TRAIN,
             ("train", "--particles", star("A"), "--ref", F["ref"], "--modes", F["modes"],
              "--n-modes", "1", "-o", F["run_d1"]) + TRAIN,
             ("train", "--particles", star("A"), "--ref", F["ref"], "--modes", F["modes2"],
              "-o", F["run_m2"]) + TRAIN,
             ("infer", "--particles", star("A"), "--model", F["run"], "-o", F["latent"],
              "--device", "cpu"),
             ("infer", "--particles", star("A"), "--model", F["run_m2"], "-o", F["latent_m2"],
              "--device", "cpu")]
    run_steps(steps)


def tearDownModule():
    shutil.rmtree(F["tmp"], ignore_errors=True)


class ProvenanceTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="case-", dir=F["tmp"])

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def error(self, p, path, words):
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        self.assertNotIn("Traceback", p.stderr)
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("nmaem: error: ")]
        self.assertEqual(len(errors), 1, p.stderr)
        self.assertTrue(errors[0].startswith("nmaem: error: %s: " % path), errors[0])
        for w in words:
            self.assertIn(w, errors[0])

    # ------------------------------------------------------------ latent and truth
    def test_matching_truth_ok(self):
        p = nmaem("evaluate", "--latent", F["latent"], "--truth", F["A"], "--model", F["run"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("warning", p.stderr)

    def test_truth_of_another_seed(self):
        p = nmaem("evaluate", "--latent", F["latent"], "--truth", F["B"], "--model", F["run"])
        self.error(p, F["latent"], ["other particles than the simulation",
                                    os.path.join(F["B"], "ground_truth.npz")])

    def test_report_truth_of_another_seed(self):
        out = os.path.join(self.tmp, "report")
        p = nmaem("report", F["run"], "-o", out, "--latent", F["latent"], "--truth", F["B"])
        self.error(p, F["latent"], ["other particles than the simulation"])
        self.assertFalse(os.path.exists(os.path.join(out, "index.html")))

    def test_report_matching_truth_ok(self):
        p = nmaem("report", F["run"], "-o", os.path.join(self.tmp, "report"), "--latent",
                  F["latent"], "--truth", F["A"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("warning", p.stderr)

    def test_same_poses_other_images(self):
        """C and D share A's poses and CTFs (--like) but not their images: told apart."""
        from nmaem_plugin.core.io.particles import read_particles
        from nmaem_plugin.core.io.provenance import loads, particle_fingerprint, same_particles
        fp_c = particle_fingerprint(read_particles(os.path.join(F["C"], "particles.star")))
        with np.load(os.path.join(F["D"], "ground_truth.npz")) as f:
            fp_d = loads(f["particles_fingerprint"])
        with np.load(os.path.join(F["C"], "ground_truth.npz")) as f:
            fp_c_truth = loads(f["particles_fingerprint"])
        self.assertEqual(same_particles(fp_c, fp_c_truth), (True, None))
        self.assertEqual(fp_c["ids"], fp_d["ids"])             # the same image names
        self.assertEqual(same_particles(fp_c, fp_d), (False, "their images differ"))

    def test_round_trip_keeps_the_fingerprint(self):
        """Another folder, other (equivalent) Euler triplets, six written digits: the same
        particles."""
        from nmaem_plugin.core.io.particles import read_particles
        from nmaem_plugin.core.io.poses import euler_to_matrix
        from nmaem_plugin.core.io.provenance import particle_fingerprint, same_particles
        from nmaem_plugin.core.io.star import write_star
        a = read_particles(os.path.join(F["A"], "particles.star"))
        moved = os.path.join(self.tmp, "moved")
        shutil.copytree(F["A"], moved)
        b = read_particles(os.path.join(moved, "particles.star"))
        rot, tilt, psi = b.euler.T
        b.euler = np.stack([rot + 180.0, -tilt, psi + 180.0], 1)      # the same rotation
        np.testing.assert_allclose(euler_to_matrix(*b.euler.T), euler_to_matrix(*a.euler.T),
                                   atol=1e-12)
        out = os.path.join(moved, "rewritten.star")
        write_star(out, b)
        self.assertEqual(same_particles(particle_fingerprint(a),
                                        particle_fingerprint(read_particles(out))),
                         (True, None))
        c = read_particles(out)
        c.defocus_u = c.defocus_u + 50.0
        self.assertEqual(same_particles(particle_fingerprint(a), particle_fingerprint(c)),
                         (False, "their defocus values differ"))
        self.assertEqual(same_particles(particle_fingerprint(a),
                                        particle_fingerprint(c.subset(np.arange(11)))),
                         (False, "12 particles against 11"))

    # ------------------------------------------------------------ latent and run
    def test_latent_of_another_run(self):
        p = nmaem("evaluate", "--latent", F["latent_m2"], "--truth", F["A"], "--model",
                  F["run"])
        self.error(p, F["latent_m2"], ["was made by another run than %s" % F["run"]])

    def test_latent_without_fingerprint_warns(self):
        from nmaem_plugin.core.io.latent import read_latent, write_latent
        lat = read_latent(F["latent"])
        old = os.path.join(self.tmp, "old.npz")
        write_latent(old, lat.z, lat.shift, lat.index)
        p = nmaem("evaluate", "--latent", old, "--truth", F["A"], "--model", F["run"])
        self.assertEqual(p.returncode, 0, p.stderr)
        warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("nmaem: warning: ")]
        self.assertEqual(len(warnings), 1, p.stderr)
        self.assertIn("no fingerprint", warnings[0])

    def test_truth_without_fingerprint_warns(self):
        sim = os.path.join(self.tmp, "A_old")
        shutil.copytree(F["A"], sim)
        gt = os.path.join(sim, "ground_truth.npz")
        with np.load(gt) as f:
            arrays = {k: f[k] for k in f.files if k != "particles_fingerprint"}
        np.savez(gt, **arrays)
        p = nmaem("evaluate", "--latent", F["latent"], "--truth", sim, "--model", F["run"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("nmaem: warning: %s: no fingerprint" % gt, p.stderr)

    # ------------------------------------------------------------ checkpoints
    def test_checkpoint_of_another_network(self):
        ck = os.path.join(F["run_d1"], "checkpoints", "last.pt")
        p = nmaem("infer", "--particles", os.path.join(F["A"], "particles.star"), "--model",
                  F["run"], "-o", os.path.join(self.tmp, "l.npz"), "--device", "cpu",
                  "--checkpoint", ck)
        self.error(p, ck, ["another network"])
        self.assertEqual(os.listdir(self.tmp), [])

    def test_checkpoint_of_another_run_same_shapes(self):
        ck = os.path.join(F["run_m2"], "checkpoints", "last.pt")
        p = nmaem("infer", "--particles", os.path.join(F["A"], "particles.star"), "--model",
                  F["run"], "-o", os.path.join(self.tmp, "l.npz"), "--device", "cpu",
                  "--checkpoint", ck)
        self.error(p, ck, ["belongs to another run", "normal modes"])
        self.assertEqual(os.listdir(self.tmp), [])

    def test_own_checkpoint_file_ok(self):
        ck = os.path.join(F["run"], "checkpoints", "epoch_0001.pt")
        out = os.path.join(self.tmp, "l.npz")
        p = nmaem("infer", "--particles", os.path.join(F["A"], "particles.star"), "--model",
                  F["run"], "-o", out, "--device", "cpu", "--checkpoint", ck)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertTrue(os.path.isfile(out))

    def test_run_config_records_fingerprints(self):
        import json
        from nmaem_plugin.core.io.latent import read_latent
        with open(os.path.join(F["run"], "config.json")) as fh:
            cfg = json.load(fh)
        lat = read_latent(F["latent"])
        self.assertEqual(cfg["particles_fingerprint"], lat.particles)
        self.assertEqual(cfg["model_fingerprint"], lat.model)
        with open(os.path.join(F["run_m2"], "config.json")) as fh:
            self.assertNotEqual(json.load(fh)["model_fingerprint"], lat.model)


if __name__ == "__main__":
    unittest.main()
