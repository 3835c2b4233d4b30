"""Refinement of states against their own particles (core/analysis/refine_state.py,
state_likelihood.py, restraints.py, refine_states.py; ``nmaem refine-states``).

* The geometry restraints: zero at the reference and under rigid motions, a bond
  stretched by hand costs what its Gaussian prior says, atoms pushed together repel.
* The state likelihood: its gradient against central differences; zero chi2 for
  noise-free images of the model itself.
* Recovery: a state whose structure lies outside the reference's 16-mode span (a third of
  the closed crystal's difference from the open one, made chemically valid by OpenMM;
  its component orthogonal to the modes is 0.7 A RMSD), simulated into 240 noisy images
  (0 dB, 48 px of 2 A) by ``nmaem simulate``'s engine;
  the refinement, from the exported model of the state's best 16-mode amplitudes, removes
  most of the orthogonal error, on the images only.
* The held-out stop: pure-noise images (the same metadata) refine to nothing the held-out
  half prefers, so the start is returned; a refinement whose chemistry cannot be restored
  (the OpenMM step ends far from a minimum) keeps the start, reported.
* The command end to end on a small trained chain: outputs, names, frame, refine.json;
  too few particles to split; bad inputs as one-line errors.
"""
import json
import os
import shutil
import tempfile
import unittest

import numpy as np
import torch

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.analysis.refine import refine_coords
from nmaem_plugin.core.analysis.refine_state import refine_state
from nmaem_plugin.core.analysis.restraints import BOND_SD, GeometryRestraints
from nmaem_plugin.core.analysis.state_likelihood import StateLikelihood
from nmaem_plugin.core.analysis.validation import reference_geometry
from nmaem_plugin.core.io.particles import read_particles
from nmaem_plugin.core.io.stacks import write_stack
from nmaem_plugin.core.io.star import write_star
from nmaem_plugin.core.modes.compute import compute_modes
from nmaem_plugin.core.physics import noise as noise_model
from nmaem_plugin.core.physics.likelihood import WhitenedLikelihood
from nmaem_plugin.core.physics.renderer import Renderer
from nmaem_plugin.core.physics.structure import read_model, read_trajectory, superpose
from nmaem_plugin.core.sim.simulate import SimulationSettings, simulate

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")
BOX, APIX = 48, 2.0


def quiet(*a, **k):
    pass


def rmsd(a, b):
    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum(1).mean()))


def polish(model):
    def run(X):
        r = refine_coords(model, X)
        return r.coords, r.ok, r.info
    return run


class TestRestraints(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = read_model(OPEN)
        cls.geo = GeometryRestraints(cls.model)

    def energy(self, X):
        return {k: float(v) for k, v in self.geo.terms(torch.as_tensor(X)).items()}

    def test_zero_at_the_reference_and_under_rigid_motions(self):
        X = self.model.coords.astype(np.float64)
        c, s = np.cos(0.7), np.sin(0.7)
        R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
        for Y in (X, X @ R.T + np.array([5.0, -3.0, 11.0])):
            e = self.energy(Y)
            for k in ("bond", "angle", "plane", "contact"):
                self.assertAlmostEqual(e[k], 0.0, delta=1e-12 if k == "contact" else 1e-8)

    def test_a_stretched_bond_costs_its_prior(self):
        """The carbonyl O of the last residue (bonded to C only) moved by 0.1 A along the
        C=O bond: the bond term is 0.1^2 / (2 sd^2); the 1-3 distance CA..O changes by
        what the geometry gives (computed here from the coordinates)."""
        m = self.model
        last = np.flatnonzero(m.resnum == m.resnum.max())
        names = list(m.atom_name[last])
        o, c = last[names.index("O")], last[names.index("C")]
        X = m.coords.astype(np.float64).copy()
        u = (X[o] - X[c]) / np.linalg.norm(X[o] - X[c])
        Y = X.copy()
        Y[o] += 0.1 * u
        e = self.energy(Y)
        self.assertAlmostEqual(e["bond"], 0.1 ** 2 / (2 * BOND_SD ** 2), delta=1e-6)
        self.assertGreater(e["angle"], 0.0)

    def test_atoms_pushed_together_repel(self):
        """An atom of residue 150 put 2.0 A outside the most exposed atom of residue 10,
        away from the centroid, where no other atom is within 2.8 A: one contact, costing
        (2.8 - 2.0)^2 / (2 * 0.1^2)."""
        m = self.model
        X = m.coords.astype(np.float64).copy()
        ten = np.flatnonzero(m.resnum == 10)
        c = X.mean(0)
        a = int(ten[np.argmax(np.linalg.norm(X[ten] - c, axis=1))])
        u = (X[a] - c) / np.linalg.norm(X[a] - c)
        p = X[a] + 2.0 * u
        near = np.flatnonzero(np.linalg.norm(X - p, axis=1) < 2.8)
        self.assertEqual(list(near), [a])                 # the set-up is what it says
        b = int(np.flatnonzero((m.resnum == 150) & (m.atom_name == "CA"))[0])
        X[b] = p
        e = self.energy(X)
        self.assertAlmostEqual(e["contact"], 0.5 * (0.8 / 0.1) ** 2, delta=1e-6)


def _target(model, fraction):
    """X0 plus ``fraction`` of the closed crystal's difference (superposed on the open
    one)."""
    X0 = model.coords.astype(np.float64)
    closed = read_model(CLOSED)
    return X0 + fraction * (superpose(closed.coords, X0) - X0)


class TestRecovery(unittest.TestCase):
    """A state off the 16-mode span, simulated into images; refined from its exported
    model; the pure-noise twin of the same particles."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="nmaem-refine-states-")
        ref = read_model(OPEN)
        T = _target(ref, 1.0 / 3.0)
        # a chemically valid structure there: the linear morph's own side chains clash
        # (bonds 0.16 A rms off, 22 contacts), so the truth is that morph refined by OpenMM
        T = refine_coords(ref, T).coords
        data = os.path.join(cls.tmp, "data")
        simulate(data, ref, T[None], SimulationSettings(n=240, box=BOX, apix=APIX,
                                                        snr_db=0.0, seed=3),
                 device="cpu", log=quiet)
        cls.table = read_particles(os.path.join(data, "particles.star"))
        # the dataset's frame: the simulation recentred the model by a translation
        _, frames = read_trajectory(os.path.join(data, "frames.pdb"))
        shift = (frames[0] - T).mean(0)
        cls.model = ref.with_coords(ref.coords + shift)
        cls.truth = frames[0]
        nm = compute_modes(cls.model, n_modes=16, device="cpu")
        cls.U = nm.modes.astype(np.float64).reshape(16, -1)
        X0 = cls.model.coords.astype(np.float64)
        z = cls.U @ (cls.truth - X0).ravel()
        plain = X0 + (cls.U.T @ z).reshape(-1, 3)
        cls.start = refine_coords(cls.model, plain).coords
        cls.noise = noise_model.estimate_from_particles(
            cls.table, noise_model.default_mask_radius(X0, BOX, APIX))
        # the pure-noise twin: the same metadata, images of white noise
        noisy = os.path.join(cls.tmp, "noise")
        os.makedirs(noisy)
        rng = np.random.default_rng(7)
        stack = os.path.join(noisy, "noise.mrcs")
        write_stack(stack, rng.standard_normal((cls.table.n, BOX, BOX)).astype(np.float32),
                    APIX)
        from dataclasses import replace
        write_star(os.path.join(noisy, "particles.star"),
                   replace(cls.table, stack_paths=np.array([stack] * cls.table.n),
                           stack_index=np.arange(cls.table.n)))
        cls.noise_table = read_particles(os.path.join(noisy, "particles.star"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def halves(self, table):
        lik = WhitenedLikelihood(self.noise, BOX, APIX)
        ren = Renderer(self.model.elements, BOX, APIX)
        perm = np.random.default_rng(0).permutation(table.n)
        out = []
        for h in (np.sort(perm[:table.n // 2]), np.sort(perm[table.n // 2:])):
            t = table.subset(h)
            out.append(StateLikelihood(t, self.model.elements, ren, lik, t.rotation_matrices(),
                                       -t.origin_or_zero()))
        return out

    def orthogonal_error(self, X):
        """RMS over atoms of (X - truth) with the 16 modes' span projected out."""
        d = (np.asarray(X) - self.truth).ravel()
        d = d - self.U.T @ (self.U @ d)
        return float(np.sqrt((d ** 2).sum() / len(self.truth)))

    def test_gradient_matches_central_differences(self):
        A, _ = self.halves(self.table)
        X = self.start
        _, _, g = A.chi2(X, grad=True, subset=[0])
        d = np.random.default_rng(1).standard_normal(X.shape)
        d /= np.linalg.norm(d)
        h = 0.5         # A along a unit direction of 3M coordinates: ~0.007 A per coordinate,
                        # a change of chi2 far above its float32 rounding (h = 0.01 was not)
        up = A.chi2(X + h * d, subset=[0])[0]
        down = A.chi2(X - h * d, subset=[0])[0]
        self.assertAlmostEqual(float((g * d).sum()), (up - down) / (2 * h),
                               delta=0.02 * abs((up - down) / (2 * h)) + 1e-3)

    def test_recovers_most_of_the_orthogonal_component(self):
        A, B = self.halves(self.table)
        res = refine_state(self.model, self.start, A, B, GeometryRestraints(self.model),
                           reference_geometry(self.model), polish(self.model),
                           iterations=100, rounds=1, log=quiet)
        e0, e1 = self.orthogonal_error(self.start), self.orthogonal_error(res["coords"])
        recovered = 1.0 - e1 / e0
        print("\nrecovery: orthogonal error %.3f -> %.3f A (%.0f %% recovered), RMSD to the "
              "truth %.3f -> %.3f A, held-out gain %.1f (%.1f standard errors), %d iterations (%s)"
              % (e0, e1, 100 * recovered, rmsd(self.start, self.truth),
                 rmsd(res["coords"], self.truth), res["heldout_gain"],
                 res["heldout_significance"], res["iterations"], res["message"]))
        self.assertTrue(res["refined"])
        self.assertGreater(res["heldout_gain"], 0)
        self.assertGreaterEqual(recovered, 0.5)
        self.assertLess(res["validation"]["bond_rmsd"], 0.02)

    def test_pure_noise_returns_the_start(self):
        A, B = self.halves(self.noise_table)
        res = refine_state(self.model, self.start, A, B, GeometryRestraints(self.model),
                           reference_geometry(self.model), polish(self.model),
                           iterations=20, rounds=1, log=quiet)
        self.assertFalse(res["refined"])
        self.assertLessEqual(res["heldout_gain"], 0.0)
        np.testing.assert_array_equal(res["coords"], self.start)

    def test_a_chemistry_that_cannot_be_restored_keeps_the_start(self):
        """The OpenMM step stopped after one iteration ends far from a minimum (its own
        failure, ``refine_coords``): the round is refused, the start kept and the reason
        reported."""
        def failing(X):
            r = refine_coords(self.model, X, max_iterations=1, tolerance=1e-6)
            return r.coords, r.ok, r.info
        A, B = self.halves(self.table)
        res = refine_state(self.model, self.start, A, B, GeometryRestraints(self.model),
                           reference_geometry(self.model), failing, iterations=5,
                           rounds=1, log=quiet)
        self.assertFalse(res["refined"])
        self.assertEqual(res["status"], "chemistry")
        self.assertIn("OpenMM", res["message"])
        np.testing.assert_array_equal(res["coords"], self.start)


if __name__ == "__main__":
    unittest.main()


class TestCommand(unittest.TestCase):
    """``nmaem refine-states`` on a small trained chain (48 particles of 32 px, 2 modes, a
    one-epoch run): one state too small to split, one refined."""

    @classmethod
    def setUpClass(cls):
        from nmaem_plugin.tests.core.cli_fixture import run_steps
        cls.tmp = tempfile.mkdtemp(prefix="nmaem-refine-cmd-")
        t = cls.tmp
        cls.sim, cls.run_dir = os.path.join(t, "sim"), os.path.join(t, "run")
        cls.star = os.path.join(cls.sim, "particles.star")
        cls.latent, cls.states = os.path.join(t, "latent.npz"), os.path.join(t, "states")
        run_steps([("simulate", "--ref", OPEN, "--target", CLOSED, "--frames", "3", "--n", "48",
                    "--box", "32", "--apix", "3", "--snr-db", "0", "--device", "cpu",
                    "-o", cls.sim),
                   ("modes", os.path.join(cls.sim, "reference.pdb"), "--n-modes", "2",
                    "--device", "cpu", "-o", os.path.join(t, "modes.npz")),
                   ("train", "--particles", cls.star, "--ref",
                    os.path.join(cls.sim, "reference.pdb"), "--modes",
                    os.path.join(t, "modes.npz"), "-o", cls.run_dir, "--epochs", "1",
                    "--batch", "16", "--device", "cpu"),
                   ("infer", "--particles", cls.star, "--model", cls.run_dir, "-o", cls.latent,
                    "--device", "cpu")])
        # state 1: the 6 particles lowest on PC1 (too few to split); state 2: the others
        from nmaem_plugin.core.analysis.landscape import pca
        from nmaem_plugin.core.io.latent import read_latent
        z = read_latent(cls.latent).z
        pc1 = np.sort(pca(z).transform(z)[:, 0])
        cut = 0.5 * (pc1[5] + pc1[6])
        run_steps([("states", "--latent", cls.latent, "-o", cls.states, "--particles",
                    cls.star, "--range", "1:%.6f:%.6f" % (pc1[0] - 1, cut),
                    "--range", "1:%.6f:%.6f" % (cut, pc1[-1] + 1))])
        cls.out = os.path.join(t, "refined")
        cls.proc = nmaem_cli("refine-states", "--states", cls.states, "--model", cls.run_dir,
                             "--particles", cls.star, "-o", cls.out, "--iterations", "5",
                             "--rounds", "1")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_outputs(self):
        self.assertEqual(self.proc.returncode, 0, self.proc.stderr[-2000:])
        with open(os.path.join(self.out, "refine.json")) as fh:
            listing = json.load(fh)
        rows = listing["states"]
        self.assertEqual([r["name"] for r in rows], ["state_01", "state_02"])
        self.assertEqual([r["n_particles"] for r in rows], [6, 42])
        # too few to split: reported, the start kept
        self.assertEqual(rows[0]["status"], "too few particles")
        self.assertFalse(rows[0]["refined"])
        self.assertEqual(rows[0]["rmsd_to_start"], 0.0)
        # the other was refined or refused by its held-out half, never made worse there
        self.assertIn(rows[1]["status"], ("refined", "no held-out gain"))
        self.assertGreaterEqual(rows[1]["heldout_gain"], 0.0)
        self.assertEqual(rows[1]["n_refine"] + rows[1]["n_heldout"], 42)
        for key in ("iterations", "rounds", "bfactor", "heldout_significance", "checks"):
            self.assertIn(key, rows[1])
        self.assertEqual(listing["bond_rms"], max(r["validation"]["bond_rmsd"] for r in rows))
        self.assertLess(listing["bond_rms"], 0.02)
        # heavy atoms, the reference's names and order, in the dataset's frame
        ref = read_model(os.path.join(self.run_dir, "reference.pdb"))
        for r in rows:
            for f in ("refined.pdb", "start.pdb"):
                m = read_model(os.path.join(self.out, r["name"], f))
                np.testing.assert_array_equal(m.atom_ids, ref.atom_ids)
            m = read_model(os.path.join(self.out, r["name"], "refined.pdb"))
            s = read_model(os.path.join(self.out, r["name"], "start.pdb"))
            self.assertAlmostEqual(rmsd(m.coords, s.coords), r["rmsd_to_start"], delta=2e-3)
            self.assertLess(rmsd(m.coords, ref.coords), 10.0)

    def test_existing_output_is_refused(self):
        p = nmaem_cli("refine-states", "--states", self.states, "--model", self.run_dir,
                      "--particles", self.star, "-o", self.out)
        self.assertOneLineError(p, self.out)     # the output folder (docs/reliability.md)

    def assertOneLineError(self, p, name):
        self.assertEqual(p.returncode, 2, p.stderr[-2000:])
        lines = [l for l in p.stderr.splitlines() if l.startswith("nmaem: error:")]
        self.assertEqual(len(lines), 1, p.stderr)
        self.assertIn(name, lines[0])

    def test_bad_inputs(self):
        o = os.path.join(self.tmp, "bad")
        base = ["refine-states", "--model", self.run_dir, "-o", o]
        p = nmaem_cli(*(base + ["--states", os.path.join(self.tmp, "nothing"),
                                "--particles", self.star]))
        self.assertOneLineError(p, os.path.join(self.tmp, "nothing"))
        p = nmaem_cli(*(base + ["--states", self.states, "--particles", self.star,
                                "--box", "31"]))
        self.assertOneLineError(p, "--box")
        # particles at another pixel size than the run's
        other = os.path.join(self.sim, "other_apix.star")
        with open(self.star) as fh:
            text = fh.read()
        changed = text.replace("opticsGroup1 3.0 32 ", "opticsGroup1 3.5 32 ", 1)
        self.assertNotEqual(changed, text)                 # the optics row as written
        with open(other, "w") as fh:
            fh.write(changed)
        p = nmaem_cli(*(base + ["--states", self.states, "--particles", other]))
        self.assertOneLineError(p, other)
        # a latent file of other particles than the states'
        from nmaem_plugin.core.io.latent import write_latent
        wrong = os.path.join(self.tmp, "wrong_latent.npz")
        write_latent(wrong, np.zeros((10, 2)))
        p = nmaem_cli(*(base + ["--states", self.states, "--particles", self.star,
                                "--latent", wrong]))
        self.assertOneLineError(p, wrong)
        self.assertFalse(os.path.exists(os.path.join(o, "refine.json")))


def nmaem_cli(*args):
    from nmaem_plugin.tests.core.cli_fixture import nmaem
    return nmaem(*args, timeout=1800)
