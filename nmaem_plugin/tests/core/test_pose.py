"""Pose refinement (``nmaem train --refine-pose``): rotation vectors, the composition side,
the untrained pose head, recovery of a known pose error, outputs of ``nmaem infer``.

The recovery test makes 40 clean AK images of 32 px (3 A/px) at one conformation, writes a
STAR whose poses are all off by 3 degrees about one axis of the model (A_file = A_true E,
a consensus refinement's kind of error), trains a small encoder with the pose head and checks that the
refined angles of ``nmaem infer`` are within 0.5 degree of the true ones.
"""
import atexit
import math
import os
import shutil
import tempfile
import unittest
from dataclasses import replace

import numpy as np
import torch

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.io import poses
from nmaem_plugin.core.physics.rotations import correct_rotations, rotvec_to_matrix

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")


def quiet(*a, **k):
    pass


def rodrigues_reference(v):
    """exp([v]_x) by its power series in float64 (an independent construction)."""
    v = np.asarray(v, dtype=np.float64)
    K = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    out, term = np.eye(3), np.eye(3)
    for k in range(1, 30):
        term = term @ K / k
        out = out + term
    return out


class TestRotationVectors(unittest.TestCase):
    def test_torch_matches_series_and_numpy(self):
        rng = np.random.default_rng(0)
        vs = np.concatenate([rng.normal(0, 1, (20, 3)),
                             rng.normal(0, 1e-4, (5, 3)),          # Taylor branch
                             [[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])
        ref = np.stack([rodrigues_reference(v) for v in vs])
        got = rotvec_to_matrix(torch.as_tensor(vs, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-12)
        np.testing.assert_allclose(poses.rotvec_to_matrix(vs), ref, atol=1e-12)
        # and back (angles below 180 degrees)
        np.testing.assert_allclose(poses.matrix_to_rotvec(ref), vs, atol=1e-9)

    def test_zero_is_identity_with_finite_gradient(self):
        v = torch.zeros(4, 3, requires_grad=True)
        R = rotvec_to_matrix(v)
        self.assertTrue(torch.equal(R, torch.eye(3).expand(4, 3, 3)))
        # d(R(v) x)/dv at v = 0 is -[x]_x: the generator, finite
        x = torch.tensor([1.0, 2.0, 3.0])
        (R @ x)[:, 0].sum().backward()
        np.testing.assert_allclose(v.grad.numpy(), np.tile([0.0, 3.0, -2.0], (4, 1)),
                                   atol=1e-6)

    def test_composition_side_undoes_a_consensus_error(self):
        """A consensus refinement's error is a rotation of the model: A_file = A_true E
        (nmaem simulate --consensus-poses writes A R_c^T). The correction v = rotvec(E^T),
        the same for every view, gives back A_true through correct_rotations (numpy and
        torch); on the other side (the image's frame) it would not."""
        rng = np.random.default_rng(1)
        A = poses.euler_to_matrix(*rng.uniform([-180, 5, -180], [180, 175, 180], (6, 3)).T)
        E = poses.rotvec_to_matrix(rng.normal(0, 0.05, 3))      # one error, six views
        v = np.tile(poses.matrix_to_rotvec(E.T), (6, 1))
        np.testing.assert_allclose(poses.correct_rotations(A @ E, v), A, atol=1e-12)
        t = correct_rotations(torch.as_tensor(A @ E), torch.as_tensor(v)).numpy()
        np.testing.assert_allclose(t, A, atol=1e-12)
        wrong = poses.rotvec_to_matrix(v) @ (A @ E)
        self.assertGreater(np.abs(wrong - A).max(), 1e-2)
        self.assertLess(np.abs(poses.rotation_angle_deg(t, A)).max(), 1e-5)


class TestUntrainedPoseHead(unittest.TestCase):
    def test_starts_at_the_file_rotation(self):
        """An untrained pose head outputs exactly 0, the rendering equals the one without a
        correction bit for bit, and the loss gradient reaches the head."""
        from nmaem_plugin.core.learn.network import Decoder, Encoder, split_outputs
        from nmaem_plugin.core.physics.structure import read_model
        torch.manual_seed(0)
        model = read_model(OPEN)
        enc = Encoder(32, 2, filters=(8, 16, 32), hidden=(64, 32), z_scale=1.0,
                      pose_max=math.radians(5.0))
        plain = Encoder(32, 2, filters=(8, 16, 32), hidden=(64, 32))
        self.assertEqual(len(plain(torch.randn(2, 32, 32))), 2)     # no head: two outputs
        self.assertNotIn("pose_max", plain.state_dict())
        images = torch.randn(5, 32, 32)
        shift, z, v = split_outputs(enc(images))
        self.assertTrue(torch.equal(v, torch.zeros(5, 3)))
        centre = model.coords.mean(0)
        modes = np.random.default_rng(0).normal(0, 0.01, (2,) + model.coords.shape)
        dec = Decoder(model.elements, model.coords, modes, 32, 3.0, centre=centre)
        rng = np.random.default_rng(2)
        A = torch.as_tensor(poses.euler_to_matrix(*rng.uniform(-90, 90, (5, 3)).T),
                            dtype=torch.float32)
        base = torch.zeros(5, 2)
        a = dec(z, A, base + shift, rotvec=v)
        b = dec(z, A, base + shift)
        self.assertTrue(torch.equal(a, b))
        ((a - images) ** 2).mean().backward()
        last = enc.pose_head[-1]
        self.assertGreater(float(last.weight.grad.abs().max()), 0.0)
        self.assertGreater(float(last.bias.grad.abs().max()), 0.0)

    def test_from_z_starts_at_the_file_rotation(self):
        """--pose-input z: the head reads the z head's output (d inputs), starts at exactly
        0, and the loss gradient reaches it; a wrong choice is a clear error."""
        from nmaem_plugin.core.learn.network import Encoder, split_outputs
        torch.manual_seed(0)
        enc = Encoder(32, 2, filters=(8, 16, 32), hidden=(64, 32),
                      pose_max=math.radians(5.0), pose_input="z")
        self.assertEqual(enc.pose_head[0].in_features, 2)
        shift, z, v = split_outputs(enc(torch.randn(5, 32, 32)))
        self.assertTrue(torch.equal(v, torch.zeros(5, 3)))
        v.sum().backward()
        self.assertGreater(float(enc.pose_head[-1].weight.grad.abs().max()), 0.0)
        with self.assertRaises(ValueError):
            Encoder(32, 2, filters=(8,), pose_max=0.1, pose_input="features")
        with self.assertRaises(ValueError):
            Encoder(32, 0, filters=(8,), pose_max=0.1, pose_input="z")

    def test_bound(self):
        """The correction angle never exceeds the maximum, whatever the head outputs."""
        from nmaem_plugin.core.learn.network import Encoder, split_outputs
        enc = Encoder(16, 0, filters=(8,), hidden=(8,), pose_max=math.radians(5.0),
                      pose_input="image")
        with torch.no_grad():
            enc.pose_head[-1].bias.copy_(torch.tensor([1e3, -2e3, 5e2]))
        v = split_outputs(enc(torch.randn(3, 16, 16)))[2]
        ang = np.degrees(v.norm(dim=1).detach().numpy())
        self.assertTrue(np.all(ang <= 5.0 + 1e-5) and np.all(ang > 4.99), ang)


_DATA = {}


def _dataset():
    """Clean images of one conformation, a STAR with the true poses and one with every pose
    off by 3 degrees about a fixed axis of the model's frame (A_file = A_true E, the error
    of a consensus refinement: poses.py); modes of the reference."""
    if not _DATA:
        from nmaem_plugin.core.modes.compute import compute_modes
        from nmaem_plugin.core.modes.modesfile import save_modes
        from nmaem_plugin.core.io.particles import read_particles
        from nmaem_plugin.core.sim.simulate import SimulationSettings, load_frames, simulate
        from nmaem_plugin.core.io.star import write_star
        from nmaem_plugin.core.physics.structure import read_model
        tmp = tempfile.mkdtemp(prefix="nmaem-pose-")
        atexit.register(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "data")
        model, frames = load_frames(ref=OPEN)
        simulate(data, model, frames,
                 SimulationSettings(n=40, box=32, apix=3.0, snr_db=None, seed=0),
                 device="cpu", log=quiet)
        modes = os.path.join(data, "modes.npz")
        save_modes(modes, compute_modes(read_model(os.path.join(data, "reference.pdb")),
                                        n_modes=2, device="cpu"))
        star = os.path.join(data, "particles.star")
        table = read_particles(star)
        axis = np.array([1.0, 2.0, 2.0]) / 3.0
        E = rodrigues_reference(math.radians(3.0) * axis)
        euler = np.stack(poses.matrix_to_euler(table.rotation_matrices() @ E), 1)
        wrong = os.path.join(data, "wrong.star")
        write_star(wrong, replace(table, euler=euler))
        _DATA.update(tmp=tmp, data=data, star=star, wrong=wrong, modes=modes,
                     ref=os.path.join(data, "reference.pdb"), error=E)
    return _DATA


class TestModesCarryNoRigidMotion(unittest.TestCase):
    def test_modes_orthogonal_to_rigid_body_generators(self):
        """Each normal mode of modes.npz is orthogonal to the six rigid-body motions of the
        reference (3 translations, 3 rotations about the rotation centre of the renderer,
        built here from cross products), so a pose correction and z do not compete; a
        rotation of the reference, by contrast, lies almost entirely in that space."""
        from nmaem_plugin.core.modes.modesfile import load_modes
        nm = load_modes(_dataset()["modes"])
        X = nm.coords.astype(np.float64)
        c = np.full(3, 16 * 3.0)              # the simulated map centre, not the centroid
        gens = []
        for k in range(3):
            e = np.zeros(3)
            e[k] = 1.0
            gens.append(np.tile(e, (len(X), 1)))            # translation
            gens.append(np.cross(e, X - c))                  # infinitesimal rotation
        G = np.stack([g.ravel() for g in gens], 1)
        Q, _ = np.linalg.qr(G)
        U = nm.modes.reshape(nm.n_modes, -1).astype(np.float64)
        frac = np.linalg.norm(U @ Q, axis=1) / np.linalg.norm(U, axis=1)
        self.assertTrue(np.all(frac < 1e-4), frac)
        small = (X - c) @ rodrigues_reference([0.0, 0.01, 0.0]).T + c - X
        d = small.ravel()
        self.assertGreater(np.linalg.norm(Q.T @ d) / np.linalg.norm(d), 0.99)


class TestRecovery(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from nmaem_plugin.core.inference.infer import infer
        from nmaem_plugin.core.learn.train import train
        d = _dataset()
        cls.d = d
        cls.run_dir = os.path.join(d["tmp"], "run_pose")
        cls.history = train(cls.run_dir, d["wrong"], d["ref"], d["modes"], epochs=20, loss="l2",
                            encoder="small", batch=8, lr=3e-3, seed=0, refine_pose=True,
                            check=False, log=quiet)
        cls.latent = os.path.join(d["tmp"], "latent.npz")
        cls.out_star = os.path.join(d["tmp"], "refined.star")
        cls.infer_log = []
        cls.result = infer(d["wrong"], cls.run_dir, cls.latent, star=cls.out_star,
                           log=cls.infer_log.append)

    def test_known_error_is_recovered(self):
        """3 degrees about a fixed axis: every particle's refined rotation is within 0.5
        degree of the true one (the file's are all 3 degrees off)."""
        from nmaem_plugin.core.io.particles import read_particles
        from nmaem_plugin.core.learn.checkpoints import load_trained
        # the default head reads the conformation: the run's 2 modes
        self.assertEqual(load_trained(self.run_dir)[0].encoder.pose_head[0].in_features, 2)
        true = read_particles(self.d["star"]).rotation_matrices()
        given = read_particles(self.d["wrong"]).rotation_matrices()
        np.testing.assert_allclose(poses.rotation_angle_deg(given, true), 3.0, atol=1e-6)
        refined = poses.euler_to_matrix(*self.result["euler"].T)
        err = poses.rotation_angle_deg(refined, true)
        self.assertLess(err.max(), 0.5, np.sort(err))

    def test_outputs_read_back(self):
        """latent.npz holds the corrections and refined angles; the STAR written by infer
        reads back (our reader) to the same matrices, with the corrections in degrees."""
        from nmaem_plugin.core.inference.infer import POSE_COLUMNS
        from nmaem_plugin.core.io.latent import read_latent
        from nmaem_plugin.core.io.particles import read_particles
        lat = read_latent(self.latent)
        self.assertEqual(lat.pose_correction.shape, (40, 3))
        given = read_particles(self.d["wrong"])
        expected = poses.correct_rotations(given.rotation_matrices(), lat.pose_correction)
        np.testing.assert_allclose(poses.euler_to_matrix(*lat.euler.T), expected, atol=1e-6)
        out = read_particles(self.out_star)
        np.testing.assert_allclose(out.rotation_matrices(), expected, atol=1e-6)
        corr = out.extra[list(POSE_COLUMNS)].to_numpy(dtype=np.float64)
        np.testing.assert_allclose(corr, np.degrees(lat.pose_correction), atol=1e-5)

    def test_correction_size_is_logged(self):
        """log.csv has the median correction of each epoch, near the known 3 degrees at the
        end, and near what infer (eval mode) gives; infer reports the median it wrote."""
        import csv
        from nmaem_plugin.core.io.latent import read_latent
        with open(os.path.join(self.run_dir, "log.csv")) as fh:
            rows = list(csv.DictReader(fh))
        self.assertEqual(len(rows), 20)
        logged = [float(r["pose_correction_deg"]) for r in rows]
        self.assertTrue(np.all(np.isfinite(logged)))
        self.assertAlmostEqual(logged[-1], 3.0, delta=0.5)
        inferred = np.degrees(np.linalg.norm(read_latent(self.latent).pose_correction, axis=1))
        self.assertAlmostEqual(logged[-1], float(np.median(inferred)), delta=0.3)
        line = [m for m in self.infer_log if "pose corrections" in m]
        self.assertEqual(len(line), 1, self.infer_log)
        self.assertIn("median %.2f deg" % np.median(inferred), line[0])

    def test_from_image_recovers_the_known_error(self):
        """--pose-input image (the head on the image features; the class's run uses the
        default, z): the same 3 degree error is recovered within 0.5 degree."""
        from nmaem_plugin.core.inference.infer import infer
        from nmaem_plugin.core.io.particles import read_particles
        from nmaem_plugin.core.learn.checkpoints import load_trained
        from nmaem_plugin.core.learn.train import train
        d = self.d
        run = os.path.join(d["tmp"], "run_pose_image")
        train(run, d["wrong"], d["ref"], d["modes"], epochs=20, loss="l2", encoder="small",
              batch=8, lr=3e-3, seed=0, refine_pose=True, pose_input="image", check=False,
              log=quiet)
        enc = load_trained(run)[0].encoder
        self.assertEqual(enc.pose_head[0].in_features, enc.n_features)
        res = infer(d["wrong"], run, os.path.join(d["tmp"], "latent_image.npz"), log=quiet)
        true = read_particles(self.d["star"]).rotation_matrices()
        err = poses.rotation_angle_deg(poses.euler_to_matrix(*res["euler"].T), true)
        self.assertLess(err.max(), 0.5, np.sort(err))

    def test_no_modes_needs_the_image_input(self):
        """--n-modes 0 leaves no conformation to compute the default correction from: a
        one-line error that names the way out, before anything is written."""
        from nmaem_plugin.core.base.errors import NmaemError
        from nmaem_plugin.core.learn.train import train
        d = self.d
        run = os.path.join(d["tmp"], "run_no_modes")
        with self.assertRaises(NmaemError) as cm:
            train(run, d["wrong"], d["ref"], d["modes"], n_modes=0, epochs=1, loss="l2",
                  encoder="small", batch=8, refine_pose=True, check=False, log=quiet)
        self.assertIn("--pose-input image", str(cm.exception))
        self.assertFalse(os.path.exists(os.path.join(run, "config.json")))

    def test_resume_and_old_runs(self):
        """A pose run stopped after epoch 1 and resumed ends with the weights of an
        uninterrupted one (the pose head included); a run whose config predates the option
        (no refine_pose) loads without a pose head and infers without pose outputs."""
        import json
        from nmaem_plugin.core.inference.infer import infer
        from nmaem_plugin.core.io.latent import read_latent
        from nmaem_plugin.core.io.runfolder import config_path
        from nmaem_plugin.core.learn.checkpoints import load_trained
        from nmaem_plugin.core.learn.train import train
        d, tmp = self.d, self.d["tmp"]
        opts = dict(loss="l2", encoder="small", batch=8, lr=3e-3, seed=1, check=False,
                    log=quiet)
        full, part = os.path.join(tmp, "run_full"), os.path.join(tmp, "run_part")
        train(full, d["wrong"], d["ref"], d["modes"], epochs=2, refine_pose=True, **opts)
        train(part, d["wrong"], d["ref"], d["modes"], epochs=2, refine_pose=True,
              stop_after=1, **opts)
        train(part, resume=True, log=quiet)
        a, b = load_trained(full)[0].encoder, load_trained(part)[0].encoder
        self.assertGreater(float(a.pose_head[-1].weight.detach().abs().max()), 0.0)
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            self.assertTrue(torch.equal(x, y), k)

        old = os.path.join(tmp, "run_old")
        train(old, d["wrong"], d["ref"], d["modes"], epochs=1, **opts)
        with open(config_path(old)) as fh:
            c = json.load(fh)
        self.assertFalse(c["refine_pose"])
        with open(os.path.join(old, "log.csv")) as fh:
            self.assertNotIn("pose_correction_deg", fh.readline())
        for k in ("refine_pose", "max_pose_correction", "pose_prior_sd"):
            c.pop(k)
        with open(config_path(old), "w") as fh:
            json.dump(c, fh)
        ae, _ = load_trained(old)
        self.assertIsNone(ae.encoder.pose_head)
        lat = os.path.join(tmp, "latent_old.npz")
        infer(d["wrong"], old, lat, log=quiet)
        self.assertIsNone(read_latent(lat).pose_correction)


class TestEvaluatePoseError(unittest.TestCase):
    def test_median_angles(self):
        """Hand case: true angles 0, written ones rot = 10 or 20 degrees (tilt 0: a rotation
        about z by that angle), refined ones 3 or 1 degrees off."""
        from nmaem_plugin.core.analysis.evaluate import pose_error
        from nmaem_plugin.core.io.latent import Latent
        gt = dict(euler=np.zeros((3, 3)),
                  euler_file=np.array([[10.0, 0, 0], [20.0, 0, 0], [0, 0, 10.0]]))
        lat = Latent(np.zeros((3, 1)), np.zeros((3, 2)), np.arange(3),
                     pose_correction=np.zeros((3, 3)),
                     euler=np.array([[3.0, 0, 0], [0, 0, -1.0], [0, 0, 3.0]]))
        out = pose_error(gt, 3, lat)
        self.assertAlmostEqual(out["median_input_deg"], 10.0, places=6)
        self.assertAlmostEqual(out["median_refined_deg"], 3.0, places=6)
        lat.euler = None
        self.assertIsNone(pose_error(gt, 3, lat)["median_refined_deg"])
        self.assertIsNone(pose_error(dict(euler=np.zeros((3, 3))), 3, lat))
