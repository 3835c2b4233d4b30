"""Whitened likelihood and noise model (core/likelihood.py, core/noise.py).

The loss is checked against an independent float64 evaluation over the full DFT plane
(numpy fft2, explicit sum over every frequency, scale by scipy's scalar minimiser); the
noise estimators against images of coloured noise with a known spectrum.
"""
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

from nmaem_plugin.core.physics import noise
from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.physics.likelihood import (Band, WhitenedLikelihood, whitened_fit,
                                                  whitened_nll)


def power_law(k):
    """The test's noise power per pixel of frequency (arbitrary units), smooth and falling."""
    return 1.0 / (1.0 + (k / 3.0) ** 2) ** 0.75 + 0.05


def coloured_noise(n, D, rng, spectrum=power_law):
    """Real images whose DFT power is D^2 spectrum(|k|): white noise filtered in Fourier space."""
    filt = np.sqrt(spectrum(noise.radius_grid(D)))
    return np.fft.irfft2(np.fft.rfft2(rng.standard_normal((n, D, D))) * filt, s=(D, D))


def true_shells(D, spectrum=power_law):
    """Shell averages (full plane) of the DFT power D^2 spectrum(|k|): what sigma2 means."""
    return noise.shell_sums(D * D * spectrum(noise.radius_grid(D)), D) / noise.shell_counts(D)


def reference_nll(y, r, sigma2_of_k, apix, low=None, high=None):
    """Independent float64 NLL: full-plane fft2, every k in the band, scale by minimisation.

    Returns (min over a of 0.5 sum |Y - a R|^2 / sigma2, the zero model's 0.5 sum |Y|^2 /
    sigma2, argmin a). Band: 0.5 <= |k| < D/2 and the resolution limits.
    """
    from scipy.optimize import minimize_scalar
    D = y.shape[-1]
    Y, R = np.fft.fft2(y), np.fft.fft2(r)
    terms = []
    for iy in range(D):
        for ix in range(D):
            ky = iy if iy < D / 2 else iy - D
            kx = ix if ix < D / 2 else ix - D
            k = np.hypot(kx, ky)
            f = k / (D * apix)
            if k < 0.5 or k >= D / 2:
                continue
            if high is not None and f > 1.0 / high:
                continue
            if low is not None and f < 1.0 / low:
                continue
            terms.append((Y[iy, ix], R[iy, ix], sigma2_of_k(k)))
    Yk = np.array([t[0] for t in terms])
    Rk = np.array([t[1] for t in terms])
    Sk = np.array([t[2] for t in terms])

    def nll(a):
        return 0.5 * np.sum(np.abs(Yk - a * Rk) ** 2 / Sk)

    res = minimize_scalar(nll, bracket=(-10.0, 10.0), tol=1e-12)
    return res.fun, nll(0.0), res.x


class TestReference(unittest.TestCase):
    def setUp(self):
        self.rng = np.random.default_rng(3)
        self.D, self.apix = 16, 1.5
        D = self.D
        self.shell_sigma = 50.0 + 400.0 / (1.0 + np.arange(noise.n_shells(D)))
        self.sig_grid = self.shell_sigma[noise.shell_index(D)]
        r = coloured_noise(3, D, self.rng) * 2.0
        self.render = r
        self.images = 0.7 * r + coloured_noise(3, D, self.rng) + 1.0

    def sigma_of_k(self, k):
        return self.shell_sigma[int(np.rint(k))]

    def check(self, low, high):
        band = Band(self.D, self.apix, resolution_low=low, resolution_high=high)
        Y = torch.fft.rfft2(torch.as_tensor(self.images))
        R = torch.fft.rfft2(torch.as_tensor(self.render))
        plain = whitened_nll(Y, R, self.sig_grid, band, normalise=False).numpy()
        norm = whitened_nll(Y, R, self.sig_grid, band).numpy()
        fit = whitened_fit(Y, R, torch.as_tensor(band.weights / self.sig_grid))
        for i in range(len(self.images)):
            ref, ref0, a = reference_nll(self.images[i], self.render[i], self.sigma_of_k,
                                         self.apix, low, high)
            self.assertAlmostEqual(plain[i] / ref, 1.0, delta=1e-9)
            self.assertAlmostEqual(norm[i], ref / ref0, delta=1e-9)
            self.assertAlmostEqual(float(fit["scale"][i]), a, delta=1e-6)
        # float32 agrees to float32 precision
        n32 = whitened_nll(Y.to(torch.complex64), R.to(torch.complex64), self.sig_grid,
                           band).numpy()
        np.testing.assert_allclose(n32, norm, rtol=1e-5)

    def test_full_band(self):
        self.check(None, None)

    def test_resolution_band(self):
        self.check(15.0, 4.0)

    def test_dof(self):
        # the band's weights count every full-plane frequency in 0.5 <= |k| < D/2 once
        D = self.D
        k = np.hypot(*np.meshgrid(np.fft.fftfreq(D, 1 / D), np.fft.fftfreq(D, 1 / D)))
        self.assertEqual(Band(D, 1.0).dof, float(((k >= 0.5) & (k < D / 2)).sum()))


class TestInvariance(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(5)
        D = self.D = 32
        self.clean = torch.as_tensor(coloured_noise(4, D, rng), dtype=torch.float32)
        self.images = torch.as_tensor(0.5 * coloured_noise(4, D, rng), dtype=torch.float32) \
            + 0.3 * self.clean
        self.model = noise.NoiseModel(D, 2.0, [1], true_shells(D)[None], [100], "test")

    def loss_and_grad(self, images, mask_radius=None, detach=True):
        lik = WhitenedLikelihood(self.model, self.D, 2.0, mask_radius=mask_radius)
        r = self.clean.clone().requires_grad_(True)
        if detach:
            loss = lik(images, torch.fft.rfft2(r), torch.ones(len(images)))
        else:
            Y = lik.band.images_ft(images)
            loss = whitened_nll(Y, torch.fft.rfft2(r), self.model.grid(1), lik.band,
                                detach_scale=False).mean()
        loss.backward()
        return float(loss.detach()), r.grad.clone()

    def test_scale_offset(self):
        for mask in (None, 20.0):
            l1, g1 = self.loss_and_grad(self.images, mask)
            l2, g2 = self.loss_and_grad(self.images * 3.7 + 5.0, mask)
            self.assertGreater(l1, 0.0)
            self.assertLess(l1, 1.0)
            self.assertAlmostEqual(l1, l2, delta=1e-6 * l1)
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6 * float(g1.abs().max()))
            self.assertGreater(float(g1.abs().max()), 0.0)
            # and of the rendering (the scale is profiled)
            l3, _ = self.loss_and_grad(self.images, mask)
            self.assertAlmostEqual(l1, l3, delta=1e-7)

    def test_rendering_scale(self):
        lik = WhitenedLikelihood(self.model, self.D, 2.0)
        R = torch.fft.rfft2(self.clean)
        a = lik(self.images, R)
        b = lik(self.images, 0.01 * R)
        self.assertAlmostEqual(float(a), float(b), delta=1e-6)

    def test_detached_scale_same_gradient(self):
        # envelope theorem: d chi2_min / dR is the same with a fixed at its optimum
        _, g1 = self.loss_and_grad(self.images, detach=True)
        _, g2 = self.loss_and_grad(self.images, detach=False)
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6 * float(g1.abs().max()))

    def test_true_model_scores_better(self):
        lik = WhitenedLikelihood(self.model, self.D, 2.0)
        good = lik.per_image(self.images, torch.fft.rfft2(self.clean))
        bad = lik.per_image(self.images, torch.fft.rfft2(self.clean.flip(0)))
        self.assertTrue(bool((good < bad).all()))

    def test_groups(self):
        D = self.D
        sig = np.stack([true_shells(D), true_shells(D) * np.linspace(1, 5, noise.n_shells(D))])
        m = noise.NoiseModel(D, 2.0, [1, 4], sig, [10, 10], "test")
        lik = WhitenedLikelihood(m, D, 2.0)
        R = torch.fft.rfft2(self.clean)
        groups = torch.tensor([1, 4, 4, 1])
        got = lik.per_image(self.images, R, groups)
        Y = torch.fft.rfft2(self.images)
        for i, g in enumerate(groups.tolist()):
            want = whitened_nll(Y[i:i + 1], R[i:i + 1], m.grid(g), lik.band)
            self.assertAlmostEqual(float(got[i]), float(want[0]), delta=1e-6)
        with self.assertRaises(NmaemError):
            lik.per_image(self.images, R, torch.tensor([1, 2, 4, 1]))

    def test_cropped_grid(self):
        # sigma2 of a Fourier-cropped box: same shells, scaled by (d/D)^4 (physics.fourier.fourier_crop)
        from nmaem_plugin.core.physics.fourier import fourier_crop
        rng = np.random.default_rng(0)
        D, d = 32, 16
        x = torch.as_tensor(coloured_noise(3000, D, rng))
        y = fourier_crop(x, d).numpy()
        p = np.mean(np.abs(np.fft.rfft2(y)) ** 2, axis=0)
        want = self.model.grid(1, box=d)
        inner = (noise.radius_grid(d) >= 1) & (noise.radius_grid(d) < d / 2 - 1)
        ok = noise.shell_sums(inner.astype(float), d) > 0
        ratio = noise.shell_sums(p * inner, d)[ok] / noise.shell_sums(want * inner, d)[ok]
        np.testing.assert_allclose(ratio, 1.0, atol=0.06)


class TestPipeline(unittest.TestCase):
    """Noise estimated from the images, loss through the renderer: the training path."""

    def test_renderer_gradient_and_invariance(self):
        from nmaem_plugin.core.physics.renderer import Renderer
        from nmaem_plugin.core.physics.rotations import euler_to_matrix
        rng = np.random.default_rng(4)
        D, apix, B = 32, 2.0, 64
        elements = np.array(["C"] * 12 + ["N"] * 4)
        coords = (D // 2) * apix + rng.normal(0.0, 6.0, (len(elements), 3))
        r = Renderer(elements, D, apix)
        A = torch.as_tensor(euler_to_matrix(*(rng.uniform(0, 180, (3, B)))), dtype=torch.float32)
        X = torch.as_tensor(coords, dtype=torch.float32)
        ctf = r.ctf(defocus_u=torch.full((B,), 8000.0), defocus_v=torch.full((B,), 8000.0),
                    defocus_angle=torch.zeros(B), voltage=torch.full((B,), 300.0),
                    cs=torch.full((B,), 2.7), amp_contrast=torch.full((B,), 0.1))
        with torch.no_grad():
            clean = r.render(X, A, None, ctf)
        images = (clean * torch.as_tensor(rng.uniform(0.5, 1.5, (B, 1, 1)), dtype=torch.float32)
                  + torch.as_tensor(coloured_noise(B, D, rng), dtype=torch.float32)
                  * float(clean.std()))

        def loss_grad(imgs):
            nm = noise.estimate_background([(imgs.numpy(), np.ones(B))], D, apix, radius=20.0)
            lik = WhitenedLikelihood(nm, D, apix)
            x = (X + 0.5).requires_grad_(True)        # a model off by 0.5 A
            loss = lik(imgs, r.render_ft(x, A, None, ctf), torch.ones(B, dtype=torch.long))
            loss.backward()
            return float(loss.detach()), x.grad.clone()

        l1, g1 = loss_grad(images)
        l2, g2 = loss_grad(images * 0.02 - 3.0)
        self.assertAlmostEqual(l1, l2, delta=1e-5)
        torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-3 * float(g1.abs().max()))
        # moving further along the 0.5 A offset raises the loss: descent goes back
        self.assertGreater(float((g1 * 0.5).sum()), 0.0)


class TestBadInput(unittest.TestCase):
    def test_band(self):
        with self.assertRaisesRegex(NmaemError, "beyond Nyquist"):
            Band(32, 2.0, resolution_high=3.0)
        with self.assertRaisesRegex(NmaemError, "must be larger"):
            Band(32, 2.0, resolution_low=5.0, resolution_high=6.0)
        with self.assertRaisesRegex(NmaemError, "even"):
            Band(33, 2.0)
        with self.assertRaisesRegex(NmaemError, "no frequency"):
            Band(32, 2.0, resolution_low=1000.0, resolution_high=900.0)
        Band(32, 2.0, resolution_high=4.0)          # exactly Nyquist is fine
        with self.assertRaisesRegex(NmaemError, "particles.star: resolution_high"):
            Band(32, 2.0, resolution_high=1.0, path="particles.star")

    def test_constant_and_nan_images(self):
        D = 16
        m = noise.NoiseModel(D, 1.0, [1], np.ones((1, noise.n_shells(D))), [1], "test")
        lik = WhitenedLikelihood(m, D, 1.0, source="p.star")
        R = torch.fft.rfft2(torch.randn(2, D, D))
        with self.assertRaisesRegex(NmaemError, r"^p\.star: 1 image\(s\) with no finite power"):
            lik(torch.stack([torch.randn(D, D), torch.full((D, D), 3.0)]), R)
        with self.assertRaisesRegex(NmaemError, "no finite power"):
            lik(torch.full((2, D, D), float("nan")), R)
        # a low-pass band that sees nothing of a purely high-frequency image
        hf = torch.ones(D, D)
        hf[::2] = -1.0                                    # only ky = D/2 (Nyquist)
        with self.assertRaisesRegex(NmaemError, "no finite power"):
            lik(torch.stack([hf, hf]), R)

    def test_mask_too_large(self):
        with self.assertRaisesRegex(NmaemError, "^stack.mrcs: too few background pixels"):
            noise.estimate_background([(np.zeros((2, 32, 32)), [1, 1])], 32, 2.0,
                                      radius=40.0, path="stack.mrcs")

    def test_noise_from_constant_images(self):
        with self.assertRaisesRegex(NmaemError, "no noise power"):
            noise.estimate_background([(np.full((4, 32, 32), 2.0), np.ones(4))], 32, 2.0,
                                      radius=20.0, path="s.mrcs")
        with self.assertRaisesRegex(NmaemError, "non-finite"):
            noise.estimate_background([(np.full((4, 32, 32), np.nan), np.ones(4))], 32, 2.0,
                                      radius=20.0, path="s.mrcs")

    def test_bad_noise_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "x.npz")
            np.savez(p, a=np.zeros(3))
            with self.assertRaisesRegex(NmaemError, "not a noise model"):
                noise.load_noise_model(p)
            with self.assertRaisesRegex(NmaemError, "no such noise model file"):
                noise.load_noise_model(os.path.join(tmp, "none.npz"))


class TestNoiseEstimate(unittest.TestCase):
    """Pure coloured noise with a known spectrum; estimate within 5 % per shell.

    Tolerance: shell 1 holds 8 full-plane frequencies (4 independent complex values) per
    image; with 4000 images and about half of each image in the background the relative
    standard error of the innermost shells is ~1/sqrt(4000 * 4 * 0.5) = 1.1 %, a little
    more after the mask deconvolution, and smaller further out (more frequencies per
    shell). 5 % is therefore > 3 standard errors in the worst shell; a biased estimator
    (e.g. the mask's area correction alone, without the deconvolution) misses by more
    (checked below). Shells 1 .. D/2 - 1 are the loss band's; DC is never used.
    """

    @classmethod
    def setUpClass(cls):
        rng = np.random.default_rng(11)
        cls.D, cls.N = 32, 4000
        cls.images = coloured_noise(cls.N, cls.D, rng) * 4.0 + 7.0
        cls.truth = true_shells(cls.D) * 16.0
        cls.groups = np.where(np.arange(cls.N) % 2, 3, 1)

    def test_background(self):
        D = self.D
        batches = [(self.images[i:i + 500], self.groups[i:i + 500]) for i in range(0, self.N, 500)]
        m = noise.estimate_background(batches, D, 2.0, radius=20.0)
        self.assertEqual(m.groups.tolist(), [1, 3])
        self.assertEqual(m.counts.tolist(), [2000, 2000])
        both = noise.estimate_background([(self.images, np.ones(self.N))], D, 2.0, radius=20.0)
        rel = both.sigma2[0, 1:D // 2] / self.truth[1:D // 2] - 1.0
        self.assertLess(np.abs(rel).max(), 0.05, rel)
        for r in range(2):                         # each group from its 2000 images
            rel = m.sigma2[r, 1:D // 2] / self.truth[1:D // 2] - 1.0
            self.assertLess(np.abs(rel).max(), 0.08, rel)
        # the naive area correction is biased at low frequency: the deconvolution matters
        bg = 1.0 - noise.soft_disc(D, 10.0, 2.0)
        a = self.images - self.images.mean(axis=(1, 2), keepdims=True)
        p = noise.shell_sums(np.mean(np.abs(np.fft.rfft2(a * bg)) ** 2, axis=0), D)
        naive = p / noise.shell_counts(D) / np.mean(bg ** 2)
        self.assertGreater(np.abs(naive[1:4] / self.truth[1:4] - 1).max(), 0.05)

    def test_residual(self):
        D = self.D
        rng = np.random.default_rng(2)
        clean = coloured_noise(self.N, D, rng, lambda k: np.exp(-k / 4.0))
        # images = 0.8 * clean + noise; the rendering is the clean image
        est = noise.ResidualNoise(D, 2.0)
        est.add(self.images + 0.8 * clean, np.fft.rfft2(clean), self.groups)
        m = est.result()
        for r in range(2):
            rel = m.sigma2[r, 1:D // 2] / self.truth[1:D // 2] - 1.0
            self.assertLess(np.abs(rel).max(), 0.08, rel)
        self.assertAlmostEqual(np.mean(est.scales), 0.8, delta=0.02)

    def test_save_load_without_torch(self):
        m = noise.NoiseModel(32, 2.0, [1, 2], np.ones((2, noise.n_shells(32))), [5, 6],
                             "background", mask_radius=20.0, info=dict(edge=4.0))
        with tempfile.TemporaryDirectory() as tmp:
            p = m.save(os.path.join(tmp, "noise.npz"))
            code = ("import sys; sys.modules['torch'] = None\n"
                    "from nmaem_plugin.core.physics.noise import load_noise_model\n"
                    "m = load_noise_model(%r)\n"
                    "print(m.box, m.apix, m.groups.tolist(), m.counts.tolist(), m.method, "
                    "m.mask_radius, m.info['edge'], m.sigma2.shape)" % p)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env=dict(os.environ))
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(out.stdout.split(), ["32", "2.0", "[1,", "2]", "[5,", "6]",
                                                  "background", "20.0", "4.0",
                                                  "(2,", "%d)" % noise.n_shells(32)])


if __name__ == "__main__":
    unittest.main()


class TestInputWhitening(unittest.TestCase):
    """The encoder's input filter (noise.whitening_filter, network.Encoder): images of
    coloured noise of a known spectrum come out with a flat one, and the encoder filters
    as an independent float64 numpy filter does."""

    def test_whitened_noise_is_white(self):
        D, N = 32, 3000
        rng = np.random.default_rng(5)
        images = coloured_noise(N, D, rng) * 3.0 + 2.0
        m = noise.estimate_background([(images, np.ones(N))], D, 2.0, radius=20.0)
        f = noise.whitening_filter(m, D)
        self.assertEqual(f.shape, (D, D // 2 + 1))
        self.assertEqual(f[0, 0], 0.0)
        self.assertAlmostEqual(float(np.mean(f ** 2)), 1.0, places=9)
        # independent check: the known spectrum times the filter squared is constant
        flat = power_law(noise.radius_grid(D)) * f ** 2
        shells = noise.shell_sums(flat, D) / noise.shell_counts(D)
        rel = shells[1:D // 2] / np.mean(shells[1:D // 2]) - 1.0
        self.assertLess(np.abs(rel).max(), 0.06, rel)
        # and on fresh images: their filtered power per shell is flat (a 10x fall before)
        fresh = coloured_noise(N, D, np.random.default_rng(6))
        p = np.mean(np.abs(np.fft.rfft2(fresh) * f) ** 2, axis=0)
        ps = noise.shell_sums(p, D) / noise.shell_counts(D)
        rel = ps[1:D // 2] / np.mean(ps[1:D // 2]) - 1.0
        self.assertLess(np.abs(rel).max(), 0.1, rel)
        raw = noise.shell_sums(np.mean(np.abs(np.fft.rfft2(fresh)) ** 2, axis=0), D) \
            / noise.shell_counts(D)
        self.assertGreater(raw[1] / raw[D // 2 - 1], 5.0)     # the test has teeth

    def test_groups_weighted_and_cropped(self):
        D = 16
        s = noise.n_shells(D)
        rising = 1.0 + np.arange(s, dtype=float)      # group 2's power grows with the shell
        m = noise.NoiseModel(D, 1.0, [1, 2], np.stack([np.full(s, 1.0), rising]),
                             [3000, 1000], "background")
        f = noise.whitening_filter(m, 8)              # a Fourier crop to 8 px
        self.assertEqual(f.shape, (8, 5))
        # the count-weighted mean power on the 8 px grid (the crop's (8/16)^4 factor is
        # common to both groups and goes with the normalisation)
        shell = noise.shell_index(8)
        expect = 1.0 / np.sqrt((3000 * 1.0 + 1000 * rising[shell]) / 4000.0)
        expect[0, 0] = 0.0
        expect /= np.sqrt(np.mean(expect ** 2))
        np.testing.assert_allclose(f, expect, rtol=1e-12)
        bad = noise.NoiseModel(D, 1.0, [1], np.zeros((1, s)), [10], "background")
        with self.assertRaises(NmaemError):
            noise.whitening_filter(bad, D)

    def test_encoder_filters_like_numpy(self):
        from nmaem_plugin.core.learn.network import Encoder
        D = 16
        rng = np.random.default_rng(3)
        filt = rng.uniform(0.2, 2.0, (D, D // 2 + 1))
        torch.manual_seed(0)
        enc = Encoder(D, 2, filters=(4, 8), hidden=(8,), input_filter=filt).double().eval()
        imgs = rng.standard_normal((3, D, D))
        ref = np.fft.irfft2(np.fft.rfft2(imgs) * filt, s=(D, D))      # float64 numpy
        plain = Encoder(D, 2, filters=(4, 8), hidden=(8,))
        plain.load_state_dict({k: v for k, v in enc.state_dict().items()
                               if k != "input_filter"})
        plain = plain.double().eval()
        with torch.no_grad():
            a = enc.features(torch.from_numpy(imgs))
            b = plain.features(torch.from_numpy(ref))
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
        self.assertIn("input_filter", enc.state_dict())        # travels with checkpoints
        self.assertNotIn("input_filter", plain.state_dict())   # earlier runs load as before
        with self.assertRaises(ValueError):
            Encoder(D, 2, filters=(4, 8), hidden=(8,), input_filter=np.ones((D, D)))
