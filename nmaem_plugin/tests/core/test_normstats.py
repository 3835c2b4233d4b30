"""Batch-norm statistics of the final weights (precise BN) and ``--batch auto``
(core/normstats.py, docs/training.md "Batch-norm statistics and batch size").

The main test trains the small encoder briefly on a small simulated dataset and checks that on
held-out particles the eval-mode loss (running statistics, what ``nmaem infer`` uses) is within
1 % of the train-mode loss (batch statistics) of the same weights. Without the recomputation
(momentum-0.1 running averages after 24 optimisation steps) the gap is several percent.
"""
import copy
import os
import shutil
import tempfile
import unittest

import numpy as np
import torch

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.learn import normstats
from nmaem_plugin.core.base.errors import NmaemError

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")


def quiet(*a, **k):
    pass


class TestAutoBatch(unittest.TestCase):
    def test_auto_batch(self):
        self.assertEqual(normstats.auto_batch(100), 16)
        self.assertEqual(normstats.auto_batch(3600), 56)
        self.assertEqual(normstats.auto_batch(16384), 256)
        self.assertEqual(normstats.auto_batch(900000), 256)
        for n in (200, 3600, 10000):         # at least 64 steps per epoch below 256
            b = normstats.auto_batch(n)
            self.assertTrue(b == 16 or n // b >= 64, (n, b))
        self.assertEqual(normstats.resolve_batch("auto", 3600), 56)
        self.assertEqual(normstats.resolve_batch(None, 3600), 56)
        self.assertEqual(normstats.resolve_batch(256, 3600), 256)   # explicit stays
        self.assertEqual(normstats.resolve_batch("64", 3600), 64)
        with self.assertRaises(NmaemError):
            normstats.resolve_batch("big", 3600)

    def test_cli_batch(self):
        from nmaem_plugin.core.cli import main as cli
        parser = cli.build_parser()
        args = parser.parse_args(["train", "-o", "RUN", "--batch", "auto"])
        self.assertEqual(args.batch, "auto")
        args = parser.parse_args(["train", "-o", "RUN", "--batch", "256"])
        self.assertEqual(args.batch, 256)


class TestRecompute(unittest.TestCase):
    def test_sample_is_deterministic(self):
        rows = np.arange(10000) * 3
        a = normstats.bn_sample(rows, 0, 5, 100)
        self.assertEqual(len(a), 100)
        self.assertEqual(len(np.unique(a)), 100)
        np.testing.assert_array_equal(a, normstats.bn_sample(rows, 0, 5, 100))
        self.assertFalse(np.array_equal(a, normstats.bn_sample(rows, 0, 6, 100)))
        self.assertEqual(sorted(normstats.bn_sample(rows[:50], 0, 5, 100)), list(rows[:50]))
        state = torch.get_rng_state()
        normstats.bn_sample(rows, 1, 2)
        self.assertTrue(torch.equal(state, torch.get_rng_state()))   # global RNG untouched

    def test_statistics_are_batch_averages(self):
        """Running mean/var = the average over the pass of each batch's mean and unbiased
        variance (what momentum=None gives), whatever the statistics were before; weights
        and the training step count unchanged; eval mode restored."""
        torch.manual_seed(0)

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bn = torch.nn.BatchNorm2d(3)

            def features(self, x):
                return self.bn(x)

        net = Net()
        net.bn.running_mean.fill_(5.0)
        net.bn.num_batches_tracked.fill_(123)
        net.eval()
        w = net.bn.weight.detach().clone()
        batches = [torch.randn(4, 3, 5, 5) * (1 + k) + k for k in range(3)]
        n = normstats.recompute_bn_stats(net, iter(batches + [torch.randn(1, 3, 5, 5)]))
        self.assertEqual(n, 12)                      # the 1-image batch is skipped
        mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
        var = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True)
                           for b in batches]).mean(0)
        torch.testing.assert_close(net.bn.running_mean, mean)
        torch.testing.assert_close(net.bn.running_var, var)
        self.assertEqual(int(net.bn.num_batches_tracked), 123)
        self.assertEqual(net.bn.momentum, 0.1)
        self.assertFalse(net.training)
        self.assertTrue(torch.equal(w, net.bn.weight))


class TestPreciseBN(unittest.TestCase):
    """Eval-mode loss of the trained weights matches their batch-statistics loss."""

    @classmethod
    def setUpClass(cls):
        from nmaem_plugin.core.modes.compute import compute_modes
        from nmaem_plugin.core.modes.modesfile import save_modes
        from nmaem_plugin.core.sim.simulate import SimulationSettings, load_frames, simulate
        from nmaem_plugin.core.physics.structure import read_model
        cls.tmp = tempfile.mkdtemp(prefix="nmaem-normstats-")
        cls.data = os.path.join(cls.tmp, "data")
        model, frames = load_frames(ref=OPEN, target=CLOSED, n_frames=10)
        simulate(cls.data, model, frames,
                 SimulationSettings(n=400, box=32, apix=3.75, snr_db=-5.0, seed=1),
                 device="cpu", log=quiet)
        cls.star = os.path.join(cls.data, "particles.star")
        cls.ref = os.path.join(cls.data, "reference.pdb")
        cls.modes = os.path.join(cls.data, "modes.npz")
        save_modes(cls.modes, compute_modes(read_model(cls.ref), n_modes=3, device="cpu"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def losses(self, run, checkpoint="last"):
        """(eval-mode, train-mode) mean loss on the validation particles, batches of 40."""
        from nmaem_plugin.core.learn.network import image_loss
        from nmaem_plugin.core.learn.data import ParticleImages, ParticleMetadata, make_loader
        from nmaem_plugin.core.io.particles import read_particles
        from nmaem_plugin.core.learn.checkpoints import load_trained
        ae, cfg = load_trained(run, "cpu", checkpoint)
        self.assertFalse(ae.encoder.training)
        table = read_particles(cfg["particles"])
        with np.load(os.path.join(run, "split.npz")) as sp:
            val = sp["val"]
        meta = ParticleMetadata(table, "cpu")
        batch_enc = copy.deepcopy(ae.encoder).train()
        sums = [0.0, 0.0]
        with torch.no_grad():
            for rows, images in make_loader(ParticleImages(table, cfg["box"]), [val], 0,
                                            False):
                rot, base, ctf_params = meta.batch(rows)
                ctf = ae.decoder.ctf(ctf_params)
                for k, enc in enumerate((ae.encoder, batch_enc)):
                    shift, z = enc(images)
                    sums[k] += float(image_loss(images, ae.decoder(z, rot, base + shift, ctf),
                                                cfg["loss"])) * len(rows)
        return sums[0] / len(val), sums[1] / len(val)

    def test_prepare_auto_batch(self):
        """--batch defaults to auto (resolved and stored as an integer); an explicit batch,
        also on resume, is kept as given."""
        from nmaem_plugin.core.learn.prepare import prepare_run
        run = os.path.join(self.tmp, "prep")
        cfg = prepare_run(run, self.star, self.ref, self.modes, encoder="small", log=quiet)
        self.assertEqual((cfg["n_train"], cfg["batch"], cfg["batch_auto"]), (360, 16, True))
        cfg = prepare_run(run, resume=True, batch=256, log=quiet)
        self.assertEqual((cfg["batch"], cfg["batch_auto"]), (256, False))
        cfg = prepare_run(run, resume=True, batch="auto", log=quiet)
        self.assertEqual((cfg["batch"], cfg["batch_auto"]), (16, True))

    def test_eval_matches_batch_statistics(self):
        from nmaem_plugin.core.learn.train import read_config, train
        torch.set_num_threads(1)
        run = os.path.join(self.tmp, "run")
        # the regime of the bug: few optimisation steps (360 images, batch 64: 12 steps)
        train(run, self.star, self.ref, self.modes, epochs=2, batch=64, encoder="small",
              loss="l2", lr=2e-3, seed=0, device="cpu", log=quiet)
        cfg = read_config(run)
        self.assertEqual(cfg["batch"], 64)
        self.assertFalse(cfg["batch_auto"])
        l_eval, l_batch = self.losses(run)
        rel = abs(l_eval - l_batch) / l_batch
        self.assertLess(rel, 0.01, "eval loss %.5g, batch-statistics loss %.5g (%.2f %%)"
                        % (l_eval, l_batch, 100 * rel))
        # best.pt carries the statistics of its own weights too
        l_eval, l_batch = self.losses(run, "best")
        self.assertLess(abs(l_eval - l_batch) / l_batch, 0.01)


if __name__ == "__main__":
    unittest.main()
