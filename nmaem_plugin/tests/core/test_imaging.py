"""The renderer against a plain float64 evaluation of the band-limited definition.

The definition (docs/imaging.md): the image is the inverse DFT of the continuous
projection's Fourier transform F(q) = sum_j f_j(|q|) exp(-2 pi i q.x_j), sampled at the
DFT frequencies k / (D apix) inside the disc |k| < D/2:
    I[n] = (1/(D apix)^2) Re sum_k F(k) exp(2 pi i k.n / D).
The reference below evaluates exactly that, term by term, in float64, with the form
factors taken from gemmi here (not from the code under test).
"""
import os
import unittest

import gemmi
import numpy as np
import torch

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core import imaging as im
from nmaem_plugin.core.structure import read_model

AK_OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")


def reference_image(coords, elements, A, D, apix, centre, shift=(0.0, 0.0)):
    """float64 direct evaluation of the definition: a sum over atoms and frequencies."""
    ky, kx = np.meshgrid(np.arange(-D // 2, D // 2), np.arange(-D // 2, D // 2), indexing="ij")
    disc = kx ** 2 + ky ** 2 < (D / 2.0) ** 2
    kxs, kys = kx[disc].astype(float), ky[disc].astype(float)
    qx, qy = kxs / (D * apix), kys / (D * apix)
    q2 = qx ** 2 + qy ** 2
    p = (np.asarray(coords, float) - centre) @ np.asarray(A, float).T
    x = p[:, 0] + shift[0] + (D // 2) * apix          # Angstrom from the array origin
    y = p[:, 1] + shift[1] + (D // 2) * apix
    F = np.zeros(len(kxs), complex)
    for e in np.unique(elements):
        c = gemmi.Element(str(e)).c4322
        f = sum(a * np.exp(-b * q2 / 4.0) for a, b in zip(c.a, c.b))
        idx = np.where(elements == e)[0]
        for chunk in np.array_split(idx, max(1, len(idx) // 64)):
            F += f * np.exp(-2j * np.pi * (np.outer(x[chunk], qx) + np.outer(y[chunk], qy))).sum(0)
    n = np.arange(D)
    Ex = np.exp(2j * np.pi * np.outer(kxs, n) / D)    # (K, D): k -> column n_x
    Ey = np.exp(2j * np.pi * np.outer(kys, n) / D)    # (K, D): k -> row n_y
    return ((Ey * F[:, None]).T @ Ex).real / (D * apix) ** 2


def random_rotations(n, rng):
    ang = rng.uniform([-180, 0, -180], [180, 180, 180], (n, 3))
    return im.euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])


class TestRendererAccuracy(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = read_model(AK_OPEN)

    def test_matches_float64_reference(self):
        """float32 renderer = float64 direct sum to a relative L2 error of 1e-4 (64/128/192 px)."""
        rng = np.random.default_rng(7)
        m = self.model
        for D, apix in ((64, 1.3), (128, 1.0), (192, 0.8)):
            A = random_rotations(2, rng)
            centre = m.coords.mean(0) + rng.normal(0, 2, 3)   # off-centre: not symmetric
            shift = rng.normal(0, 3, (2, 2))
            r = im.Renderer(m.elements, D, apix, centre=centre)
            out = r.render(torch.tensor(m.coords, dtype=torch.float32),
                           torch.tensor(A, dtype=torch.float32),
                           torch.tensor(shift, dtype=torch.float32)).numpy()
            self.assertEqual(out.dtype, np.float32)
            for b in range(2):
                ref = reference_image(m.coords, m.elements, A[b], D, apix, centre, shift[b])
                err = np.linalg.norm(out[b] - ref) / np.linalg.norm(ref)
                self.assertLess(err, 1e-4, "D=%d image %d: relative L2 error %.2e" % (D, b, err))

    def test_default_centre_is_box_centre(self):
        """Without a centre the rotation centre is (box0//2)*apix0 in x, y and z."""
        m = self.model
        D, apix = 64, 1.5
        r = im.Renderer(m.elements, D, apix, box0=100, apix0=0.9)
        np.testing.assert_allclose(r.centre.numpy(), [45.0, 45.0, 45.0])
        r = im.Renderer(m.elements, D, apix)
        np.testing.assert_allclose(r.centre.numpy(), [48.0, 48.0, 48.0])


class TestBandLimit(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(3)
        self.coords = rng.normal(0, 6, (40, 3)) + 24.0
        self.elements = np.array(["C", "N", "O", "S"] * 10)
        self.D, self.apix = 48, 1.0
        self.r = im.Renderer(self.elements, self.D, self.apix, dtype=torch.float64)
        self.A = torch.tensor(random_rotations(1, rng))

    def render(self, coords):
        return self.r.render(torch.tensor(coords), self.A)

    def test_shift_equivariance(self):
        """Moving every atom by (0.3, 0.7) px in the image plane = Fourier phase shift, to 1e-4."""
        d = np.array([0.3, 0.7]) * self.apix
        A = self.A[0].numpy()
        moved = self.coords + A.T @ np.array([d[0], d[1], 0.0])   # A moved = A x + (d, 0)
        img0 = self.render(self.coords)
        img1 = self.render(moved)
        shifted = torch.fft.irfft2(im.phase_shift(torch.fft.rfft2(img0), torch.tensor(np.array([d])),
                                                  self.apix), s=(self.D, self.D))
        err = (torch.linalg.norm(img1 - shifted) / torch.linalg.norm(img1)).item()
        self.assertLess(err, 1e-4)
        # and the image did move: not the trivial case
        self.assertGreater((torch.linalg.norm(img1 - img0) / torch.linalg.norm(img1)).item(), 0.05)
        # the renderer's own shift argument is the same translation
        img2 = self.r.render(torch.tensor(self.coords), self.A, torch.tensor(np.array([d])))
        self.assertLess((torch.linalg.norm(img2 - img1) / torch.linalg.norm(img1)).item(), 1e-10)

    def test_no_jump_across_pixels(self):
        """A single carbon swept across a pixel: the total and the peak value stay constant."""
        r = im.Renderer(np.array(["C"]), 32, 1.0, dtype=torch.float64)
        totals, peaks = [], []
        for t in np.linspace(0.0, 1.0, 11):
            img = r.render(torch.tensor([[16.0 + t, 16.0, 16.0]]), torch.eye(3)[None].double())
            totals.append(img.sum().item())
            ft = torch.fft.rfft2(img)
            # the peak of the band-limited function, found by sinc interpolation at the atom
            peaks.append(torch.fft.irfft2(im.phase_shift(ft, torch.tensor([[-t, 0.0]]), 1.0),
                                          s=(32, 32))[0, 16, 16].item())
        self.assertLess(np.ptp(totals) / np.mean(totals), 1e-9)
        self.assertLess(np.ptp(peaks) / np.mean(peaks), 1e-9)
        # the total is the integral of the potential: sum_g a_g (Angstrom^2 units over 1 A^2 px)
        self.assertAlmostEqual(totals[0], sum(gemmi.Element("C").c4322.a), places=6)

    def test_gradcheck(self):
        """torch.autograd.gradcheck in float64 for coordinates and shifts, with a CTF."""
        r = im.Renderer(np.array(["C", "N", "O", "C", "S"]), 12, 1.5, dtype=torch.float64)
        rng = np.random.default_rng(0)
        X = torch.tensor(rng.normal(9, 2, (2, 5, 3)), requires_grad=True)
        A = torch.tensor(random_rotations(2, rng))
        sh = torch.tensor([[0.3, -0.2], [1.1, 0.4]], dtype=torch.float64, requires_grad=True)
        ctf = r.ctf(defocus_u=torch.tensor([5000.0, 8000.0]), defocus_v=torch.tensor([4000.0, 7000.0]),
                    defocus_angle=torch.tensor([30.0, -10.0]), voltage=300.0, cs=2.7,
                    amp_contrast=0.1)
        self.assertTrue(torch.autograd.gradcheck(lambda x, s: r.render(x, A, s, ctf), (X, sh)))
        # shared coordinates (M, 3) broadcast over the batch
        X1 = torch.tensor(rng.normal(9, 2, (5, 3)), requires_grad=True)
        self.assertTrue(torch.autograd.gradcheck(lambda x: r.render(x, A, sh.detach()), (X1,)))


class TestCropAndNoise(unittest.TestCase):
    def test_fourier_crop_matches_render_at_coarser_pixel(self):
        """Cropping a 64 px render at 1 A to 32 px = rendering at 2 A (inside the new disc)."""
        rng = np.random.default_rng(5)
        coords = rng.normal(32, 5, (30, 3))
        el = np.array(["C", "N", "O"] * 10)
        A = torch.tensor(random_rotations(1, rng))
        big = im.Renderer(el, 64, 1.0, dtype=torch.float64).render(torch.tensor(coords), A)
        small = im.Renderer(el, 32, 2.0, centre=[32.0] * 3, dtype=torch.float64)
        ref = small.render(torch.tensor(coords), A)
        crop = im.fourier_crop(big, 32)
        # the cropped square keeps the corners outside the disc |k| < 16: mask them
        g = im.FourierGrid(32, 2.0, dtype=torch.float64)
        crop_disc = torch.fft.irfft2(torch.fft.rfft2(crop) * g.mask, s=(32, 32))
        err = (torch.linalg.norm(crop_disc - ref) / torch.linalg.norm(ref)).item()
        self.assertLess(err, 1e-10)
        self.assertEqual(tuple(crop.shape), (1, 32, 32))
        with self.assertRaises(ValueError):
            im.fourier_crop(big, 80)

    def test_noise_level(self):
        g = torch.Generator().manual_seed(0)
        clean = torch.randn(200, 32, 32, generator=g) * 3.0
        sigma = im.noise_sigma(clean, -20.0)
        self.assertAlmostEqual(sigma, 30.0, delta=1.0)   # var 9 / 10^-2 = 900
        noisy = im.add_noise(clean, sigma, generator=g)
        snr = 10 * np.log10(clean.var().item() / (noisy - clean).var().item())
        self.assertAlmostEqual(snr, -20.0, delta=0.1)


if __name__ == "__main__":
    unittest.main()
