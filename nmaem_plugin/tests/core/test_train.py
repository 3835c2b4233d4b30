"""Training and inference: loss, resume, DDP, inference consistency, d = 0, bad input.

One small synthetic dataset (160 AK images of 40 px, SNR 0 dB, random 2 A shifts) is made
once; the training runs use a small encoder on images Fourier-cropped to 32 px.
"""
import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from dataclasses import replace
from unittest import mock

import numpy as np
import torch

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.cli import main as cli
from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.physics.renderer import Renderer
from nmaem_plugin.core.physics.fourier import fourier_crop
from nmaem_plugin.core.io.particles import read_particles
from nmaem_plugin.core.io.stacks import ImageStack
from nmaem_plugin.core.io.star import write_star
from nmaem_plugin.core.modes.compute import compute_modes
from nmaem_plugin.core.modes.modesfile import save_modes
from nmaem_plugin.core.sim.simulate import SimulationSettings, load_frames, simulate
from nmaem_plugin.core.physics.structure import read_model, read_trajectory

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")
BOX0, APIX0, BOX = 40, 3.0, 32
SMALL = dict(encoder="small", box=BOX, batch=16, lr=1e-3, seed=0)


def quiet(*a, **k):
    pass


def sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def read_log(run):
    with open(os.path.join(run, "log.csv")) as fh:
        return list(csv.DictReader(fh))


def load_ck(run, name="last.pt"):
    return torch.load(os.path.join(run, "checkpoints", name), weights_only=True)


def flat_tensors(obj, prefix=""):
    """Every tensor inside nested dicts/lists, keyed by its path."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, "%s/%s" % (prefix, k)))
    elif isinstance(obj, (list, tuple)):
        for k, v in enumerate(obj):
            out.update(flat_tensors(v, "%s/%d" % (prefix, k)))
    return out


_FIXTURE = {}


def _fixture():
    """The dataset, its modes and an uninterrupted 2-epoch run, made once per process
    (shared by the test classes; removed at exit)."""
    if not _FIXTURE:
        import atexit
        from nmaem_plugin.core.learn.train import train
        tmp = tempfile.mkdtemp(prefix="nmaem-train-")
        atexit.register(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "data")
        model, frames = load_frames(ref=OPEN, target=CLOSED, n_frames=10)
        simulate(data, model, frames, SimulationSettings(n=160, box=BOX0, apix=APIX0,
                                                         snr_db=0.0, shift_std=2.0, seed=0),
                 device="cpu", log=quiet)
        f = dict(tmp=tmp, data=data, star=os.path.join(data, "particles.star"),
                 ref=os.path.join(data, "reference.pdb"), modes=os.path.join(data, "modes.npz"),
                 run_a=os.path.join(tmp, "run_a"))
        save_modes(f["modes"], compute_modes(read_model(f["ref"]), n_modes=3, device="cpu"))
        # the paper's l2 loss: test_training_lowers_the_loss compares with l2 references
        f["history_a"] = train(f["run_a"], f["star"], f["ref"], f["modes"], epochs=2,
                               loss="l2", log=quiet, **SMALL)
        _FIXTURE.update(f)
    return _FIXTURE


class TrainTestCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        for k, v in _fixture().items():
            setattr(cls, k, v)
        cls.tmp = tempfile.mkdtemp(prefix="nmaem-train-case-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    # ------------------------------------------------------------------ helpers
    def cropped_images(self, rows=None):
        table = read_particles(self.star)
        rows = np.arange(table.n) if rows is None else rows
        with ImageStack(table) as st:
            return fourier_crop(torch.from_numpy(st.read(rows)), BOX)

    def render_per_particle(self, coords_per_particle):
        """Independent rendering: dataset geometry (map centre (BOX0//2)*APIX0, pixel size
        APIX0*BOX0/BOX), poses, -origin shifts and CTFs of the STAR file."""
        table = read_particles(self.star)
        apix = APIX0 * BOX0 / BOX
        model = read_model(self.ref)
        r = Renderer(model.elements, BOX, apix, centre=[(BOX0 // 2) * APIX0] * 3)

        def f(a):
            return torch.as_tensor(np.asarray(a, dtype=np.float32))
        ctf = r.ctf(defocus_u=f(table.defocus_u), defocus_v=f(table.defocus_v),
                    defocus_angle=f(table.defocus_angle), voltage=f(table.voltage),
                    cs=f(table.cs), amp_contrast=f(table.amp_contrast))
        return r.render(f(coords_per_particle), f(table.rotation_matrices()),
                        f(-table.origin_or_zero()), ctf)


class TestTraining(TrainTestCase):
    def test_run_layout(self):
        """RUN holds config.json, the reference and modes copies, the split, checkpoints
        readable with weights_only=True, and log.csv."""
        run = self.run_a
        with open(os.path.join(run, "config.json")) as fh:
            cfg = json.load(fh)
        self.assertEqual(cfg["reference"], "reference.pdb")
        self.assertEqual(cfg["modes"], "modes.npz")
        self.assertEqual((cfg["n_modes"], cfg["box"], cfg["box0"]), (3, BOX, BOX0))
        self.assertAlmostEqual(cfg["apix"], APIX0 * BOX0 / BOX)
        self.assertAlmostEqual(cfg["apix0"], APIX0)
        self.assertEqual(cfg["centre"], [(BOX0 // 2) * APIX0] * 3)
        self.assertEqual(cfg["particles"], os.path.abspath(self.star))
        self.assertEqual(sha(os.path.join(run, "reference.pdb")), sha(self.ref))
        self.assertEqual(sha(os.path.join(run, "modes.npz")), sha(self.modes))
        with np.load(os.path.join(run, "split.npz")) as sp:
            trn, val = sp["train"], sp["val"]
        self.assertEqual(len(val), 16)
        self.assertEqual(sorted(np.concatenate([trn, val]).tolist()), list(range(160)))
        self.assertEqual(sorted(os.listdir(os.path.join(run, "checkpoints"))),
                         ["best.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt"])
        ck = load_ck(run)
        self.assertEqual(ck["epoch"], 2)
        # best.pt: the epoch of lowest validation loss in log.csv, weights of that epoch
        vals = [float(r["val_loss"]) for r in read_log(run)]
        best = load_ck(run, "best.pt")
        self.assertEqual(best["epoch"], 1 + int(np.argmin(vals)))
        same = load_ck(run, "epoch_%04d.pt" % best["epoch"])
        for k, v in flat_tensors(best["model"]).items():
            self.assertTrue(torch.equal(v, flat_tensors(same["model"])[k]), k)
        self.assertTrue(torch.equal(ck["split"]["val"], torch.as_tensor(val)))
        for key in ("model", "optimizer", "rng", "history"):
            self.assertIn(key, ck)
        rows = read_log(run)
        self.assertEqual([r["epoch"] for r in rows], ["1", "2"])
        self.assertEqual(list(rows[0]), ["epoch", "train_loss", "val_loss", "images_per_s",
                                         "seconds"])
        self.assertGreater(float(rows[1]["images_per_s"]), 0)

    def test_untrained_network_starts_at_reference(self):
        """An untrained network gives z and shift near 0, and the decoder's rendering of its
        output equals an independent rendering of X0 at the file's poses and origins."""
        from nmaem_plugin.core.io.runfolder import read_config
        from nmaem_plugin.core.learn.checkpoints import build_autoencoder
        ae = build_autoencoder(read_config(self.run_a), self.run_a).eval()
        images = self.cropped_images(np.arange(24))
        with torch.no_grad():
            shift, z = ae.encoder(images)
        n_atoms = ae.decoder.coords.shape[0]
        self.assertLess(float(z.norm(dim=1).max()) / np.sqrt(n_atoms), 0.02)   # RMSD, A
        self.assertLess(float(shift.abs().max()), 0.02)
        table = read_particles(self.star).subset(np.arange(24))
        R = torch.as_tensor(table.rotation_matrices(), dtype=torch.float32)
        base = torch.as_tensor(-table.origin_or_zero(), dtype=torch.float32)
        f = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        ctf = ae.decoder.ctf(defocus_u=f(table.defocus_u), defocus_v=f(table.defocus_v),
                             defocus_angle=f(table.defocus_angle), voltage=f(table.voltage),
                             cs=f(table.cs), amp_contrast=f(table.amp_contrast))
        with torch.no_grad():
            rendered, _, _ = ae(images, R, base, ctf)
        x0 = read_model(self.ref).coords
        expected = self.render_per_particle(np.repeat(x0[None], 160, 0))[:24]
        scale = float(expected.abs().max())
        self.assertLess(float((rendered - expected).abs().max()), 2e-3 * scale)

    def test_whitened_training_lowers_the_loss(self):
        """The default (whitened) loss: two epochs bring the validation loss from that of the
        reference model a good part of the way towards that of the true frames, both
        evaluated here with the run's noise model on renderings made independently."""
        from nmaem_plugin.core.physics.likelihood import WhitenedLikelihood
        from nmaem_plugin.core.physics.noise import load_noise_model
        from nmaem_plugin.core.learn.train import train
        run = self.path("run_whitened")
        train(run, self.star, self.ref, self.modes, epochs=2, log=quiet, **SMALL)
        from nmaem_plugin.core.io.runfolder import read_config
        cfg = read_config(run)
        self.assertEqual(cfg["loss"], "whitened")
        images = self.cropped_images()
        gt = np.load(os.path.join(self.data, "ground_truth.npz"))
        _, frames = read_trajectory(os.path.join(self.data, "frames.pdb"))
        x0 = read_model(self.ref).coords
        with np.load(os.path.join(run, "split.npz")) as sp:
            val = sp["val"]
        lik = WhitenedLikelihood(load_noise_model(os.path.join(run, "noise.npz")), BOX,
                                 APIX0 * BOX0 / BOX)

        def loss(rendered):
            return float(lik.per_image(images[val], torch.fft.rfft2(rendered[val])).mean())
        base = loss(self.render_per_particle(np.repeat(x0[None], 160, 0)))
        truth = loss(self.render_per_particle(frames[gt["frame"]]))
        self.assertLess(truth, base)                      # something to learn
        val_loss = [float(r["val_loss"]) for r in read_log(run)]
        self.assertLess(val_loss[-1], base - 0.1 * (base - truth), (base, truth, val_loss))
        self.assertGreater(val_loss[-1], truth - 0.05 * (base - truth))

    def test_training_lowers_the_loss(self):
        """Two epochs bring the validation loss from that of the reference model (where an
        untrained network starts) a good part of the way towards that of the true frames."""
        images = self.cropped_images()
        gt = np.load(os.path.join(self.data, "ground_truth.npz"))
        _, frames = read_trajectory(os.path.join(self.data, "frames.pdb"))
        x0 = read_model(self.ref).coords
        with np.load(os.path.join(self.run_a, "split.npz")) as sp:
            val = sp["val"]
        def mse(rendered):
            return float(((images - rendered) ** 2).mean(dim=(1, 2))[val].mean())
        base = mse(self.render_per_particle(np.repeat(x0[None], 160, 0)))
        truth = mse(self.render_per_particle(frames[gt["frame"]]))
        # the truth loss is the cropped noise: sigma^2 times the kept band (32/40)^2
        sigma = json.loads(str(gt["params"]))["noise_sigma"]
        self.assertAlmostEqual(truth / (sigma ** 2 * (BOX / BOX0) ** 2), 1.0, delta=0.15)
        self.assertGreater(base - truth, 0.2 * truth)      # something to learn
        rows = read_log(self.run_a)
        self.assertEqual(len(rows), 2)
        val_loss = [float(r["val_loss"]) for r in rows]
        train_loss = [float(r["train_loss"]) for r in rows]
        self.assertLess(val_loss[-1], base - 0.1 * (base - truth), (base, truth, val_loss))
        self.assertGreater(val_loss[-1], 0.95 * truth)
        self.assertLess(train_loss[1], train_loss[0])
        self.assertEqual([h["val_loss"] for h in self.history_a],
                         [h["val_loss"] for h in load_ck(self.run_a)["history"]])

    def test_resume_is_bit_identical(self):
        """A run stopped after epoch 1 of 2 and resumed ends with exactly the weights,
        optimiser state and log of the uninterrupted run."""
        from nmaem_plugin.core.learn.train import train
        run = self.path("run_b")
        train(run, self.star, self.ref, self.modes, epochs=2, stop_after=1, log=quiet,
              loss="l2", **SMALL)                 # run_a's settings
        self.assertEqual(load_ck(run)["epoch"], 1)
        self.assertEqual(len(read_log(run)), 1)
        a1, b1 = load_ck(self.run_a, "epoch_0001.pt"), load_ck(run)
        for k, v in flat_tensors(a1["model"]).items():
            self.assertTrue(torch.equal(v, flat_tensors(b1["model"])[k]), k)
        # restart as after a kill: a new call that finds last.pt
        train(run, resume=True, log=quiet)
        a, b = load_ck(self.run_a), load_ck(run)
        self.assertEqual(b["epoch"], 2)
        for part in ("model", "optimizer"):
            ta, tb = flat_tensors(a[part]), flat_tensors(b[part])
            self.assertEqual(sorted(ta), sorted(tb))
            self.assertGreater(len(ta), 10)
            for k in ta:
                self.assertEqual(ta[k].dtype, tb[k].dtype, k)
                self.assertTrue(torch.equal(ta[k], tb[k]), "%s/%s differs" % (part, k))
        # and training did change the weights
        self.assertFalse(all(torch.equal(v, flat_tensors(a1["model"])[k])
                             for k, v in flat_tensors(a["model"]).items()))
        la, lb = read_log(self.run_a), read_log(run)
        self.assertEqual([r["val_loss"] for r in la], [r["val_loss"] for r in lb])
        self.assertEqual([r["train_loss"] for r in la], [r["train_loss"] for r in lb])

    def test_resume_within_an_epoch_is_bit_identical(self):
        """--checkpoint-minutes: last.pt also within an epoch. A run stopped in the middle
        of epoch 2 (after writing such a checkpoint; a tiny interval writes one after every
        batch) and resumed ends with exactly the weights, optimiser state and log of
        run_a, which never stopped."""
        from nmaem_plugin.core.learn.train import train
        run = self.path("run_mid")
        train(run, self.star, self.ref, self.modes, epochs=2, stop_after=1.5, log=quiet,
              loss="l2", checkpoint_minutes=1e-9, **SMALL)    # run_a's settings
        mid = load_ck(run)
        self.assertEqual(mid["epoch"], 1)
        n_batches = -(-144 // SMALL["batch"])             # 144 training images
        self.assertEqual(mid["partial"]["batch"], -(-n_batches // 2))
        self.assertEqual(len(read_log(run)), 1)
        # that epoch cannot be resumed with another batch size (its batches would differ)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["train", "-o", run, "--resume", "--batch", "8"])
        self.assertNotEqual(rc, 0)
        self.assertIn("saved within an epoch with --batch 16", err.getvalue())
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1, err.getvalue())
        self.assertEqual(json.load(open(os.path.join(run, "config.json")))["batch"], 16)
        # mid-epoch weights differ from those of the end of epoch 1
        e1 = flat_tensors(load_ck(self.run_a, "epoch_0001.pt")["model"])
        self.assertFalse(all(torch.equal(v, e1[k]) for k, v in flat_tensors(mid["model"]).items()))
        train(run, resume=True, log=quiet)
        a, b = load_ck(self.run_a), load_ck(run)
        self.assertEqual(b["epoch"], 2)
        self.assertNotIn("partial", b)
        for part in ("model", "optimizer"):
            ta, tb = flat_tensors(a[part]), flat_tensors(b[part])
            self.assertEqual(sorted(ta), sorted(tb))
            for k in ta:
                self.assertTrue(torch.equal(ta[k], tb[k]), "%s/%s differs" % (part, k))
        la, lb = read_log(self.run_a), read_log(run)
        self.assertEqual([r["train_loss"] for r in la], [r["train_loss"] for r in lb])
        self.assertEqual([r["val_loss"] for r in la], [r["val_loss"] for r in lb])

    def test_resume_is_bit_identical_whitened(self):
        """The same with the default (whitened) loss: noise model, precise batch-norm
        statistics and all."""
        from nmaem_plugin.core.learn.train import train
        full, part = self.path("run_w_full"), self.path("run_w_part")
        train(full, self.star, self.ref, self.modes, epochs=2, log=quiet, **SMALL)
        train(part, self.star, self.ref, self.modes, epochs=2, stop_after=1, log=quiet,
              **SMALL)
        train(part, resume=True, log=quiet)
        a, b = load_ck(full), load_ck(part)
        self.assertEqual(b["epoch"], 2)
        ta, tb = flat_tensors(a["model"]), flat_tensors(b["model"])
        self.assertEqual(sorted(ta), sorted(tb))
        for k in ta:
            self.assertTrue(torch.equal(ta[k], tb[k]), k)
        self.assertEqual([r["val_loss"] for r in read_log(full)],
                         [r["val_loss"] for r in read_log(part)])

    def test_cosine_learning_rate(self):
        """--lr-schedule cosine: lr (1 + cos(pi e / E)) / 2 in 0-based epoch e, so with
        E = 2 the second epoch runs at lr / 2 (hand values), and the optimiser state saved
        after it holds that rate; a constant schedule keeps lr."""
        from nmaem_plugin.core.learn.train import epoch_lr, train
        cfg = dict(lr=1e-3, epochs=4, lr_schedule="cosine")
        self.assertEqual([round(epoch_lr(cfg, e) / 1e-3, 12) for e in range(4)],
                         [1.0, round((1 + 0.5 ** 0.5) / 2, 12), 0.5,
                          round((1 - 0.5 ** 0.5) / 2, 12)])
        self.assertEqual(epoch_lr(dict(cfg, lr_schedule="constant"), 3), 1e-3)
        self.assertEqual(epoch_lr(dict(lr=1e-3, epochs=4), 3), 1e-3)   # older runs
        run = self.path("run_cosine")
        train(run, self.star, self.ref, self.modes, epochs=2, log=quiet,
              lr_schedule="cosine", **SMALL)
        ck = load_ck(run)
        self.assertAlmostEqual(ck["optimizer"]["param_groups"][0]["lr"], 0.5e-3, places=12)
        with open(os.path.join(run, "config.json")) as fh:
            self.assertEqual(json.load(fh)["lr_schedule"], "cosine")
        self.assertEqual(load_ck(self.run_a)["optimizer"]["param_groups"][0]["lr"], 1e-3)

    def test_ddp_two_processes(self):
        """``nmaem train --nproc 2 --device cpu`` trains with two gloo processes."""
        run = self.path("run_ddp")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run(
            [sys.executable, "-m", "nmaem_plugin", "train", "--particles", self.star,
             "--ref", self.ref, "--modes", self.modes, "-o", run, "--epochs", "1",
             "--batch", "32", "--box", str(BOX), "--encoder", "small", "--nproc", "2",
             "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        self.assertIn("x 2 processes", p.stdout)
        self.assertEqual(sorted(os.listdir(os.path.join(run, "checkpoints"))),
                         ["best.pt", "epoch_0001.pt", "last.pt"])
        ck = load_ck(run)
        self.assertEqual(ck["epoch"], 1)
        rows = read_log(run)
        self.assertEqual(len(rows), 1)
        self.assertTrue(np.isfinite(float(rows[0]["val_loss"])))
        # each process did half of the 144 training images: all were counted
        with open(os.path.join(run, "config.json")) as fh:
            self.assertEqual(json.load(fh)["n_train"], 144)
        a1 = load_ck(self.run_a, "epoch_0001.pt")
        self.assertFalse(torch.equal(ck["model"]["shift_head.0.weight"],
                                     a1["model"]["shift_head.0.weight"]))
        for v in flat_tensors(ck["model"]).values():
            if v.is_floating_point():
                self.assertTrue(torch.isfinite(v).all())

    def test_shift_only(self):
        """d = 0: the encoder predicts shifts only; inference writes z of shape (N, 0)."""
        from nmaem_plugin.core.inference.infer import infer
        from nmaem_plugin.core.learn.train import train
        run = self.path("run_d0")
        # with bf16 autocast of the encoder on the CPU as well (the decoder stays float32)
        h = train(run, self.star, self.ref, self.modes, epochs=1, n_modes=0, bf16=True,
                  log=quiet, **SMALL)
        self.assertTrue(np.isfinite(h[0]["val_loss"]))
        with open(os.path.join(run, "config.json")) as fh:
            cfg = json.load(fh)
        self.assertEqual((cfg["n_modes"], cfg["bf16"]), (0, True))
        out = infer(self.star, run, self.path("latent_d0.npz"), batch=64, log=quiet)
        with np.load(self.path("latent_d0.npz")) as lat:
            self.assertEqual(lat["z"].shape, (160, 0))
            self.assertEqual(lat["shift"].shape, (160, 2))
            self.assertTrue(np.all(np.isfinite(lat["shift"])))
        self.assertEqual(out["z"].shape, (160, 0))


class TestBestCheckpoint(unittest.TestCase):
    def test_best_follows_the_validation_loss(self):
        """best.pt is rewritten only when an epoch's validation loss is the lowest so far
        (NaN never is); last.pt is always the latest epoch."""
        from nmaem_plugin.core.learn.checkpoints import save_checkpoint
        run = tempfile.mkdtemp(prefix="nmaem-best-")
        self.addCleanup(shutil.rmtree, run, ignore_errors=True)
        history = []
        for epoch, (val, best) in enumerate([(1.0, 1), (0.5, 2), (0.7, 2), (float("nan"), 2),
                                             (0.5, 5), (0.2, 6)], start=1):
            history.append(dict(epoch=epoch, val_loss=val))
            ck = dict(epoch=epoch, model={"w": torch.full((2,), float(epoch))},
                      history=[dict(h) for h in history])
            save_checkpoint(run, ck, keep=2)
            self.assertEqual(load_ck(run, "best.pt")["epoch"], best, epoch)
            self.assertEqual(load_ck(run, "last.pt")["epoch"], epoch)
            self.assertTrue(torch.equal(load_ck(run, "best.pt")["model"]["w"],
                                        torch.full((2,), float(best))))
        self.assertEqual(sorted(os.listdir(os.path.join(run, "checkpoints"))),
                         ["best.pt", "epoch_0005.pt", "epoch_0006.pt", "last.pt"])


class TestNetwork(unittest.TestCase):
    def test_normalisation_and_losses(self):
        from nmaem_plugin.core.learn.network import image_loss, normalise_images
        g = torch.Generator().manual_seed(1)
        x = torch.randn(3, 16, 16, generator=g) * 5 + 2
        n = normalise_images(x)
        np.testing.assert_allclose(n.mean(dim=(1, 2)).numpy(), 0, atol=1e-5)
        np.testing.assert_allclose(n.std(dim=(1, 2), unbiased=False).numpy(), 1, atol=1e-4)
        y = torch.randn(3, 16, 16, generator=g)
        self.assertAlmostEqual(float(image_loss(x, y, "l2")),
                               float(((x - y) ** 2).sum() / (3 * 256)), places=4)
        # correlation loss: blind to scale and offset, 2 for a negated image
        self.assertAlmostEqual(float(image_loss(x, 3 * x + 7, "corr")), 0.0, places=5)
        self.assertAlmostEqual(float(image_loss(x, -x, "corr")), 2.0, places=5)
        with self.assertRaises(ValueError):
            image_loss(x, y, "l1")

    def test_paper_encoder_shapes(self):
        from nmaem_plugin.core.learn.network import ENCODER_PRESETS, Encoder
        enc = Encoder(48, 5, z_scale=40.0, shift_scale=2.0, **ENCODER_PRESETS["paper"])
        convs = [m for m in enc.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
        self.assertEqual([c.out_channels for c in convs],
                         [32, 32, 64, 64, 128, 128, 256, 256, 512, 512])
        self.assertEqual(enc.n_features, 512)                      # 48 >> 5 = 1
        self.assertEqual([m.out_features for m in enc.z_head if isinstance(m, torch.nn.Linear)],
                         [512, 256, 5])
        shift, z = enc.eval()(torch.randn(2, 48, 48))
        self.assertEqual((tuple(shift.shape), tuple(z.shape)), ((2, 2), (2, 5)))
        with self.assertRaises(ValueError):
            Encoder(16, 1, **ENCODER_PRESETS["paper"])             # 16 >> 5 = 0


    def test_channels_last_encoder_is_the_same_function(self):
        """On a GPU the encoder runs in channels-last layout (distributed.use_fast_kernels):
        the same outputs and gradients as the NCHW encoder, and its checkpoint loads into a
        plain one. Here on the CPU, whose channels-last kernels are other code (oneDNN)."""
        from nmaem_plugin.core.learn.distributed import use_fast_kernels
        from nmaem_plugin.core.learn.network import Encoder
        torch.manual_seed(0)
        plain = Encoder(32, 3, (8, 16), (32,), pose_max=0.05)
        last = Encoder(32, 3, (8, 16), (32,), pose_max=0.05)
        last.load_state_dict(plain.state_dict())
        last.to(memory_format=torch.channels_last)
        conv = last.trunk[0][3].weight                 # 8 -> 8 channels
        self.assertTrue(conv.is_contiguous(memory_format=torch.channels_last))
        self.assertFalse(conv.is_contiguous())
        x = torch.randn(6, 32, 32, generator=torch.Generator().manual_seed(2))
        outs = []
        for enc in (plain, last):
            enc.train()
            out = enc(x)
            sum((o * (i + 1)).sum() for i, o in enumerate(out)).backward()
            outs.append((out, [p.grad.clone() for p in enc.parameters()]))
        for a, b in zip(outs[0][0], outs[1][0]):
            np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-4,
                                       atol=1e-6)
        # gradients, each parameter's to 1e-4 of the largest (a convolution bias before batch
        # norm has a zero gradient: only rounding there)
        scale = max(float(g.abs().max()) for g in outs[0][1])
        for a, b in zip(outs[0][1], outs[1][1]):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-4 * scale)
        # the checkpoint of a channels-last encoder (train.py saves detached CPU tensors)
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in last.state_dict().items()}, buf)
        buf.seek(0)
        again = Encoder(32, 3, (8, 16), (32,), pose_max=0.05)
        again.load_state_dict(torch.load(buf, weights_only=True))
        again.eval()
        plain.eval()
        for a, b in zip(plain(x), again(x)):
            np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-5,
                                       atol=1e-7)
        # on the CPU use_fast_kernels changes nothing
        bench = torch.backends.cudnn.benchmark
        use_fast_kernels(torch.device("cpu"), plain)
        self.assertTrue(plain.trunk[0][3].weight.is_contiguous())
        self.assertEqual(torch.backends.cudnn.benchmark, bench)

class TestEncoderBox(TrainTestCase):
    def test_encoder_sees_the_fourier_cropped_image(self):
        """An encoder of box 32 that sees 16 px equals, with the same weights, an encoder
        of box 16 given the image cropped by an independent numpy Fourier crop (frequencies
        |k| < 8 of the 32 px grid, values kept: the inverse FFT times (16/32)^2)."""
        from nmaem_plugin.core.learn.network import Encoder
        from nmaem_plugin.core.io.trainconfig import encoder_box_for
        torch.manual_seed(0)
        big = Encoder(32, 3, filters=(4, 8), hidden=(16,), encoder_box=16).eval()
        small = Encoder(16, 3, filters=(4, 8), hidden=(16,)).eval()
        small.load_state_dict(big.state_dict())
        with torch.no_grad():            # heads that give more than ~0 from the features
            for m in list(big.modules()) + list(small.modules()):
                if isinstance(m, torch.nn.Linear):
                    m.weight.normal_(0, 0.3)
        small.load_state_dict(big.state_dict())
        x = np.random.default_rng(1).standard_normal((3, 32, 32))
        ft = np.fft.fft2(x)
        keep = np.r_[0:8, 32 - 7:32]                   # |k| < 8; Nyquist (-8) zero
        crop = np.zeros((3, 16, 16), complex)
        idx = np.r_[0:8, 16 - 7:16]
        crop[:, idx[:, None], idx[None, :]] = ft[:, keep[:, None], keep[None, :]]
        x16 = np.fft.ifft2(crop).real * (16 / 32) ** 2
        with torch.no_grad():
            a = big(torch.tensor(x, dtype=torch.float32))
            b = small(torch.tensor(x16, dtype=torch.float32))
        for u, v in zip(a, b):
            np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-4, atol=1e-5)
        self.assertGreater(float(a[1].abs().max()), 1e-3)
        self.assertEqual(big.n_features, small.n_features)
        # the default: the training box up to 128 px, 128 px above
        self.assertEqual([encoder_box_for(b) for b in (32, 96, 128, 130, 256, 400)],
                         [32, 96, 128, 128, 128, 128])
        self.assertEqual(encoder_box_for(256, 64), 64)

    def test_training_and_inference_with_an_encoder_box(self):
        """--encoder-box 16 with a 32 px training box: recorded in config.json, the encoder
        built with it, and nmaem infer runs on the run; bad values are one-line errors."""
        from nmaem_plugin.core.learn.checkpoints import load_trained
        run = self.path("run_encoder_box")
        base = ["train", "--particles", self.star, "--ref", self.ref, "--modes", self.modes,
                "-o", run, "--epochs", "1", "--box", str(BOX), "--encoder", "small",
                "--batch", "16", "--no-check"]
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = cli.main(base + ["--encoder-box", "16"])
        self.assertEqual(rc, 0, err.getvalue())
        self.assertIn("the encoder sees 16 px", out.getvalue() + err.getvalue())
        ae, cfg = load_trained(run, "cpu")
        self.assertEqual((cfg["box"], cfg["encoder_box"]), (BOX, 16))
        self.assertEqual((ae.encoder.box, ae.encoder.encoder_box), (BOX, 16))
        lat = self.path("latent_encoder_box.npz")
        with contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["infer", "--particles", self.star, "--model", run, "-o", lat,
                           "--device", "cpu", "--fit-iterations", "0"])   # the encoder's
        self.assertEqual(rc, 0)
        with np.load(lat) as f, torch.no_grad():
            shift, z = ae.encoder(self.cropped_images())
            np.testing.assert_allclose(f["z"], z.numpy(), rtol=1e-4, atol=1e-4)
        for bad, words in (("15", "even"), ("64", "up to the training box (32 px)"),
                           ("4", "too small")):
            other = self.path("run_encoder_box_" + bad)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = cli.main([a if a != run else other for a in base]
                              + ["--encoder-box", bad])
            self.assertNotEqual(rc, 0)
            self.assertIn(words, err.getvalue())
            self.assertEqual(len(err.getvalue().strip().splitlines()), 1, err.getvalue())
            self.assertFalse(os.path.exists(other))


class TestInference(TrainTestCase):
    def test_infer_matches_direct_call(self):
        """``nmaem infer`` reproduces the eval-mode encoder on the cropped images, row by
        row, and writes a STAR with the amplitudes and the refined origins."""
        from nmaem_plugin.core.learn.checkpoints import load_trained
        lat_path, star_out = self.path("latent.npz"), self.path("out.star")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["infer", "--particles", self.star, "--model", self.run_a,
                           "-o", lat_path, "--batch", "48", "--star", star_out,
                           "--device", "cpu"])
        self.assertEqual(rc, 0, err.getvalue())
        ae, cfg = load_trained(self.run_a, "cpu")
        self.assertFalse(ae.training)
        self.assertEqual(cfg["epoch"], 2)
        images = self.cropped_images()
        with torch.no_grad():
            shift, z = ae.encoder(images)
        with np.load(lat_path) as lat:
            self.assertEqual(lat["z"].dtype, np.float32)
            self.assertEqual(lat["shift"].dtype, np.float32)
            np.testing.assert_array_equal(lat["index"], np.arange(160))
            np.testing.assert_allclose(lat["z"], z.numpy(), rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(lat["shift"], shift.numpy(), rtol=1e-5, atol=1e-5)
            zl, sl = lat["z"], lat["shift"]
        self.assertGreater(float(np.abs(zl).max()), 1e-3)        # not all zero
        out = read_particles(star_out)
        src = read_particles(self.star)
        np.testing.assert_allclose(out.origin, src.origin - sl.astype(np.float64), atol=1e-9)
        for l, name in enumerate(["nmaemZ01", "nmaemZ02", "nmaemZ03"]):
            np.testing.assert_allclose(out.extra[name].to_numpy(float), zl[:, l], rtol=1e-6)
        np.testing.assert_array_equal(out.euler, src.euler)

    def test_infer_checkpoint_choice(self):
        """--checkpoint FILE uses those weights (epoch 1 here, not the last epoch 2);
        --checkpoint best on a run without best.pt is a one-line error."""
        from nmaem_plugin.core.learn.checkpoints import load_trained
        ep1 = os.path.join(self.run_a, "checkpoints", "epoch_0001.pt")
        lat_path = self.path("latent_ep1.npz")
        with contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["infer", "--particles", self.star, "--model", self.run_a,
                           "-o", lat_path, "--checkpoint", ep1, "--device", "cpu"])
        self.assertEqual(rc, 0)
        ae1, cfg1 = load_trained(self.run_a, "cpu", checkpoint=ep1)
        ae2, _ = load_trained(self.run_a, "cpu")
        self.assertEqual(cfg1["epoch"], 1)
        with torch.no_grad():
            z1 = ae1.encoder(self.cropped_images())[1].numpy()
            z2 = ae2.encoder(self.cropped_images())[1].numpy()
        with np.load(lat_path) as lat:
            np.testing.assert_allclose(lat["z"], z1, rtol=1e-5, atol=1e-4)
            self.assertGreater(np.abs(lat["z"] - z2).max(), 1e-3)
        old = self.path("run_old")
        shutil.copytree(self.run_a, old)
        os.unlink(os.path.join(old, "checkpoints", "best.pt"))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["infer", "--particles", self.star, "--model", old, "-o",
                           self.path("latent_old.npz"), "--checkpoint", "best"])
        self.assertEqual(rc, 2)
        self.assertIn("best.pt missing", err.getvalue().strip().splitlines()[-1])
        self.assertFalse(os.path.exists(self.path("latent_old.npz")))


class TestBadInput(TrainTestCase):
    def run_cli(self, *argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(list(argv))
        return rc, err.getvalue()

    def base_args(self, run, star=None, ref=None, modes=None):
        return ["train", "--particles", star or self.star, "--ref", ref or self.ref,
                "--modes", modes or self.modes, "-o", run, "--epochs", "1", "--box", str(BOX),
                "--encoder", "small", "--batch", "16"]

    def assert_one_line(self, rc, err, *words):
        self.assertEqual(rc, 2, err)
        lines = [ln for ln in err.strip().splitlines() if "error" in ln.lower()]
        self.assertEqual(len(lines), 1, err)           # progress lines aside
        self.assertTrue(lines[0].startswith("nmaem: error: "), err)
        self.assertEqual(lines[0], err.strip().splitlines()[-1])
        for w in words:
            self.assertIn(w, lines[0])

    def test_missing_poses_and_ctf(self):
        table = read_particles(self.star)
        no_pose = self.path("no_pose.star")
        write_star(no_pose, replace(table, euler=None))
        no_ctf = self.path("no_ctf.star")
        write_star(no_ctf, replace(table, defocus_u=None, defocus_v=None))
        run = self.path("run_bad_pose")
        rc, err = self.run_cli(*self.base_args(run, star=no_pose))
        self.assert_one_line(rc, err, "rlnAngleRot", "no_pose.star")
        self.assertFalse(os.path.exists(run))
        rc, err = self.run_cli(*self.base_args(run, star=no_ctf))
        self.assert_one_line(rc, err, "rlnDefocusU", "rlnDefocusV")
        self.assertFalse(os.path.exists(run))

    def test_modes_of_another_model(self):
        run = self.path("run_bad_modes")
        # the original 4AKE file: same atoms, other frame (the dataset's model is recentred)
        rc, err = self.run_cli(*self.base_args(run, ref=OPEN))
        self.assert_one_line(rc, err, "different model")
        rc, err = self.run_cli(*self.base_args(run, ref=CLOSED))
        self.assert_one_line(rc, err, "different model")
        self.assertFalse(os.path.exists(run))

    def test_box_larger_than_images(self):
        run = self.path("run_bad_box")
        args = self.base_args(run)
        args[args.index("--box") + 1] = "64"
        rc, err = self.run_cli(*args)
        self.assert_one_line(rc, err, "larger than the particle images", "40 px")
        self.assertFalse(os.path.exists(run))

    def test_existing_run_and_resume_without_checkpoint(self):
        before = {f: sha(os.path.join(self.run_a, f)) for f in ("config.json", "log.csv")}
        ck_before = sha(os.path.join(self.run_a, "checkpoints", "last.pt"))
        rc, err = self.run_cli(*self.base_args(self.run_a))
        self.assert_one_line(rc, err, "already holds a training run", "--resume")
        self.assertEqual(before, {f: sha(os.path.join(self.run_a, f)) for f in before})
        self.assertEqual(ck_before, sha(os.path.join(self.run_a, "checkpoints", "last.pt")))
        empty = self.path("run_empty")
        os.makedirs(empty)
        rc, err = self.run_cli("train", "-o", empty, "--resume")
        self.assert_one_line(rc, err, "nothing to resume", "no checkpoint")
        # a run stopped before its first checkpoint can be resumed (from the beginning)
        # rather than being neither resumable nor restartable
        from nmaem_plugin.core.learn.prepare import prepare_run
        started = self.path("run_started")
        prepare_run(started, self.star, self.ref, self.modes, log=quiet, epochs=1, **SMALL)
        with self.assertRaises(NmaemError):
            prepare_run(started, self.star, self.ref, self.modes, log=quiet, **SMALL)
        cfg = prepare_run(started, resume=True, log=quiet, epochs=3)
        self.assertEqual(cfg["epochs"], 3)
        with self.assertRaisesRegex(NmaemError, "cannot change"):
            prepare_run(started, resume=True, log=quiet, box=24)

    def test_nan_loss_keeps_last_good_checkpoint(self):
        """A NaN image met in epoch 2 stops training with a message; the epoch-1 checkpoint
        stays as it was."""
        from nmaem_plugin.core.learn.train import train
        import mrcfile
        data = self.path("data_nan")
        shutil.copytree(self.data, data)
        star = os.path.join(data, "particles.star")
        run = self.path("run_nan")
        train(run, star, self.ref, self.modes, epochs=1, log=quiet, **SMALL)
        ck = sha(os.path.join(run, "checkpoints", "last.pt"))
        with np.load(os.path.join(run, "split.npz")) as sp:
            row = int(sp["train"][0])
        table = read_particles(star)
        with mrcfile.open(table.stack_paths[row], mode="r+") as m:
            m.data[table.stack_index[row]] = np.nan
        rc, err = self.run_cli("train", "-o", run, "--resume", "--epochs", "2")
        self.assert_one_line(rc, err, "epoch 2", "last good checkpoint (epoch 1)")
        # the default loss names the bad image; the loop's own guard (l2) the NaN loss
        self.assertTrue("no finite power" in err or "non-finite" in err, err)
        self.assertEqual(ck, sha(os.path.join(run, "checkpoints", "last.pt")))
        self.assertEqual(len(read_log(run)), 1)

    def test_out_of_memory_names_a_batch_size(self):
        from nmaem_plugin.core.learn import network
        run = self.path("run_oom")

        def oom(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        from nmaem_plugin.core.physics import likelihood
        with mock.patch.object(network, "image_loss", oom), \
                mock.patch.object(likelihood.WhitenedLikelihood, "per_image", oom):
            rc, err = self.run_cli(*self.base_args(run))
        self.assert_one_line(rc, err, "out of memory", "--batch 8")
        self.assertFalse(os.path.exists(os.path.join(run, "checkpoints", "last.pt")))


if __name__ == "__main__":
    unittest.main()
