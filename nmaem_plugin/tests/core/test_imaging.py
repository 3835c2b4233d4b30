"""The renderer against a plain float64 evaluation of the band-limited definition.

The definition (docs/imaging.md): the image is the inverse DFT of the continuous
projection's Fourier transform F(q) = sum_j f_j(|q|) exp(-2 pi i q.x_j), sampled at the
DFT frequencies k / (D apix) inside the disc |k| < D/2:
    I[n] = (1/(D apix)^2) Re sum_k F(k) exp(2 pi i k.n / D).
The reference below evaluates exactly that, term by term, in float64, with the form
factors taken from gemmi here (not from the code under test).
"""
import os
import subprocess
import sys
import textwrap
import unittest

import gemmi
import numpy as np
import torch

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.physics.chunks import MAX_CHUNK_ATOMS, gemm_chunks, parse_memory_budget
from nmaem_plugin.core.physics.ctf import CTFParams, ctf_2d
from nmaem_plugin.core.physics.fourier import FourierGrid, fourier_crop, phase_shift
from nmaem_plugin.core.physics.nufft import nufft_available
from nmaem_plugin.core.physics.renderer import Renderer
from nmaem_plugin.core.physics.rotations import euler_to_matrix
from nmaem_plugin.core.physics.white_noise import add_noise, noise_sigma
from nmaem_plugin.core.physics.structure import read_model

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
    return euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])


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
            r = Renderer(m.elements, D, apix, centre=centre)
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
        r = Renderer(m.elements, D, apix, box0=100, apix0=0.9)
        np.testing.assert_allclose(r.centre.numpy(), [45.0, 45.0, 45.0])
        r = Renderer(m.elements, D, apix)
        np.testing.assert_allclose(r.centre.numpy(), [48.0, 48.0, 48.0])


class TestBandLimit(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(3)
        self.coords = rng.normal(0, 6, (40, 3)) + 24.0
        self.elements = np.array(["C", "N", "O", "S"] * 10)
        self.D, self.apix = 48, 1.0
        self.r = Renderer(self.elements, self.D, self.apix, dtype=torch.float64)
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
        shifted = torch.fft.irfft2(phase_shift(torch.fft.rfft2(img0), torch.tensor(np.array([d])),
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
        r = Renderer(np.array(["C"]), 32, 1.0, dtype=torch.float64)
        totals, peaks = [], []
        for t in np.linspace(0.0, 1.0, 11):
            img = r.render(torch.tensor([[16.0 + t, 16.0, 16.0]]), torch.eye(3)[None].double())
            totals.append(img.sum().item())
            ft = torch.fft.rfft2(img)
            # the peak of the band-limited function, found by sinc interpolation at the atom
            peaks.append(torch.fft.irfft2(phase_shift(ft, torch.tensor([[-t, 0.0]]), 1.0),
                                          s=(32, 32))[0, 16, 16].item())
        self.assertLess(np.ptp(totals) / np.mean(totals), 1e-9)
        self.assertLess(np.ptp(peaks) / np.mean(peaks), 1e-9)
        # the total is the integral of the potential: sum_g a_g (Angstrom^2 units over 1 A^2 px)
        self.assertAlmostEqual(totals[0], sum(gemmi.Element("C").c4322.a), places=6)

    def test_gradcheck(self):
        """torch.autograd.gradcheck in float64 for coordinates and shifts, with a CTF."""
        r = Renderer(np.array(["C", "N", "O", "C", "S"]), 12, 1.5, dtype=torch.float64)
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


def definition_images(X, A, shift, elements, D, apix, centre):
    """Differentiable float64 images of the definition (torch, for gradients): a direct
    sum over atoms and rfft frequencies inside the disc, form factors from gemmi here."""
    ky = torch.fft.fftfreq(D, d=1.0 / D, dtype=torch.float64)[:, None]
    kx = torch.arange(D // 2 + 1, dtype=torch.float64)[None, :]
    disc = (kx ** 2 + ky ** 2 < (D / 2.0) ** 2).double()
    qx, qy = kx / (D * apix), ky / (D * apix)
    p = torch.matmul(X - torch.as_tensor(centre), A[:, :2, :].transpose(-1, -2)) + shift[:, None]
    x = p[..., 0] + (D // 2) * apix                    # (B, M) Angstrom from the array origin
    y = p[..., 1] + (D // 2) * apix
    F = 0
    for e in np.unique(elements):
        c = gemmi.Element(str(e)).c4322
        f = sum(a * torch.exp(-b * (qx ** 2 + qy ** 2) / 4.0) for a, b in zip(c.a, c.b))
        idx = torch.as_tensor(np.where(elements == e)[0])
        phase = -2.0 * np.pi * (x[:, idx, None, None] * qx + y[:, idx, None, None] * qy)
        F = F + f * torch.complex(torch.cos(phase), torch.sin(phase)).sum(1)
    return torch.fft.irfft2(F * disc, s=(D, D)) / apix ** 2


class TestChunkedRenderer(unittest.TestCase):
    """The structure factor summed over chunks of atoms and images within a memory budget
    gives the images and gradients of the definition, whatever the chunking."""

    @classmethod
    def setUpClass(cls):
        m = read_model(AK_OPEN)
        cls.elements = m.elements
        cls.D, cls.apix = 32, 3.0
        cls.centre = m.coords.mean(0) + np.array([1.3, -0.7, 0.4])
        rng = np.random.default_rng(11)
        cls.A = torch.tensor(random_rotations(3, rng))
        cls.X = torch.tensor(m.coords + rng.normal(0, 0.5, (3, m.n_atoms, 3)))
        cls.shift = torch.tensor(rng.normal(0, 2, (3, 2)))
        cls.W = torch.tensor(rng.normal(0, 1, (3, cls.D, cls.D)))
        # the definition's images and the gradients of sum(W * image)
        X, s = cls.X.clone().requires_grad_(True), cls.shift.clone().requires_grad_(True)
        img = definition_images(X, cls.A, s, cls.elements, cls.D, cls.apix, cls.centre)
        (img * cls.W).sum().backward()
        cls.ref = (img.detach(), X.grad, s.grad)

    def evaluate(self, renderer, dtype):
        X = self.X.to(dtype).clone().requires_grad_(True)
        s = self.shift.to(dtype).clone().requires_grad_(True)
        img = renderer.render(X, self.A.to(dtype), s)
        (img * self.W.to(dtype)).sum().backward()
        return img.detach().double(), X.grad.double(), s.grad.double()

    def assert_close(self, out, bound, what):
        for name, a, b in zip(("images", "coordinate gradients", "shift gradients"),
                              out, self.ref):
            err = (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()
            self.assertLess(err, bound, "%s: %s relative error %.2e" % (what, name, err))

    def test_chunks_equal_definition(self):
        """Images and gradients for one chunk (tables kept), chunks of 300 atoms, and one
        image at a time with chunks of 5 atoms (tables recomputed in the backward pass):
        float64 within 1e-10 of the definition, float32 1e-4."""
        per_atom, per_image = 5 * self.D * 8, 3 * self.D ** 2 * 8
        M = len(self.elements)
        for budget, batch, atoms in ((None, 3, M), (3 * (per_image + 300 * per_atom), 3, 300),
                                     (per_image + 5 * per_atom, 1, 5)):
            r = Renderer(self.elements, self.D, self.apix, centre=self.centre,
                         dtype=torch.float64, memory_budget=budget, route="gemm")
            ch = r.chunks(3)
            self.assertEqual((ch.route, ch.batch, ch.atoms), ("gemm", batch, min(atoms, M)))
            self.assertEqual(ch.keep, budget is None)      # whole tables kept, or recomputed
            self.assert_close(self.evaluate(r, torch.float64), 1e-10, ch.describe())
            r32 = Renderer(self.elements, self.D, self.apix, centre=self.centre,
                           memory_budget=None if budget is None else budget // 2,
                           route="gemm")
            self.assertEqual(r32.chunks(3).atoms, min(atoms, M))
            self.assert_close(self.evaluate(r32, torch.float32), 1e-4, "float32 " + ch.describe())

    def test_gradcheck_chunked(self):
        """gradcheck (float64) of the chunked route: 1 image and 2 atoms per chunk."""
        el = np.array(["C", "N", "O", "C", "S"])
        budget = 3 * 12 * 12 * 8 + 2 * 5 * 12 * 8
        r = Renderer(el, 12, 1.5, dtype=torch.float64, memory_budget=budget, route="gemm")
        self.assertEqual((r.chunks(2).batch, r.chunks(2).atoms), (1, 2))
        rng = np.random.default_rng(2)
        X = torch.tensor(rng.normal(9, 2, (2, 5, 3)), requires_grad=True)
        A = torch.tensor(random_rotations(2, rng))
        sh = torch.tensor([[0.3, -0.2], [1.1, 0.4]], dtype=torch.float64, requires_grad=True)
        self.assertTrue(torch.autograd.gradcheck(lambda x, s: r.render(x, A, s), (X, sh)))

    @unittest.skipUnless(nufft_available(), "FINUFFT is not installed (optional)")
    def test_nufft_route_matches_definition(self):
        """The FINUFFT route (float32): images and gradients within 1e-4 of the definition."""
        r = Renderer(self.elements, self.D, self.apix, centre=self.centre, route="nufft")
        self.assertEqual(r.chunks(3).route, "nufft")
        self.assert_close(self.evaluate(r, torch.float32), 1e-4, "nufft")

    def test_gemm_chunk_sizes(self):
        """Chunk sizes by hand: 64 px float32, 5 x 64 x 4 bytes per atom-image and
        3 x 64^2 x 4 per image."""
        per_atom, per_image = 1280, 49152
        c = gemm_chunks(8, 10000, 64, 8 * per_image + 8 * 300 * per_atom)
        self.assertEqual((c.batch, c.atoms, c.work), (8, 300, 8 * per_image + 2400 * per_atom))
        # 8 images cannot have 256 atoms each within this budget: 4 images of 300 atoms
        c = gemm_chunks(8, 10000, 64, 4 * per_image + 4 * 300 * per_atom)
        self.assertEqual((c.batch, c.atoms), (4, 300))
        self.assertFalse(c.keep)
        # a small model fits whole, its tables kept: 8 x (49152 + 4 x 64 x 4 x 50) bytes
        c = gemm_chunks(8, 50, 64, 8 * (per_image + 1024 * 50))
        self.assertEqual((c.batch, c.atoms, c.keep), (8, 50, True))
        self.assertFalse(gemm_chunks(8, 50, 64, 8 * (per_image + 1024 * 50) - 1).keep)
        # chunks are capped at MAX_CHUNK_ATOMS atoms
        self.assertEqual(gemm_chunks(8, 10 ** 6, 64, 4 * 10 ** 9).atoms, MAX_CHUNK_ATOMS)
        self.assertEqual(parse_memory_budget("1.5"), int(1.5 * 1024 ** 3))
        self.assertIsNone(parse_memory_budget("auto"))
        with self.assertRaises(ValueError):
            parse_memory_budget("0")


class TestMemoryBudget(unittest.TestCase):
    def test_150k_atoms_256px_batch8_within_budget(self):
        """A 149,040-atom model (90 copies of adenylate kinase) rendered at 256 px, batch 8,
        forward and backward, in a fresh process: the resident memory grows by less than
        the renderer's budget (0.5 GiB; without chunks the cos/sin tables alone are 2.4 GB)."""
        code = textwrap.dedent("""
            import os, sys, numpy as np, torch
            from nmaem_plugin.core.physics.renderer import Renderer
            from nmaem_plugin.core.physics.rotations import euler_to_matrix
            from nmaem_plugin.core.physics.structure import read_model
            torch.set_num_threads(1)
            def kib(key):
                return int(open('/proc/self/status').read().split(key + ':')[1].split()[0])
            m = read_model(sys.argv[1])
            route, D, B, copies = sys.argv[2], 256, 8, 90
            c = m.coords - m.coords.mean(0)
            rng = np.random.default_rng(0)
            X = np.concatenate([c + rng.uniform(-60, 60, 3) for _ in range(copies)])
            el = np.tile(m.elements, copies)
            apix = 1.0
            r = Renderer(el, D, apix, centre=[0.0, 0.0, 0.0], memory_budget=2 ** 29,
                         route=route)
            ang = rng.uniform([-180, 0, -180], [180, 180, 180], (B, 3))
            A = torch.tensor(euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]), dtype=torch.float32)
            x = torch.tensor(X, dtype=torch.float32).expand(B, -1, -1).contiguous().requires_grad_(True)
            s = torch.zeros(B, 2, requires_grad=True)
            before = kib('VmRSS')
            img = r.render(x, A, s)
            img.square().sum().backward()
            assert torch.isfinite(x.grad).all()
            print(len(el), r.chunks(B).describe(), before, kib('VmHWM'))
        """)
        routes = ["gemm"] + (["nufft"] if nufft_available() else [])
        for route in routes:
            p = subprocess.run([sys.executable, "-c", code, AK_OPEN, route], capture_output=True,
                               text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            self.assertEqual(p.returncode, 0, p.stderr[-2000:])
            n, *desc, before, peak = p.stdout.split()
            self.assertEqual(int(n), 149040)
            grown = (int(peak) - int(before)) * 1024
            self.assertLess(grown, 2 ** 29, "%s: %s; RSS grew by %.2f GiB"
                            % (route, " ".join(desc), grown / 2 ** 30))


class TestCropAndNoise(unittest.TestCase):
    def test_fourier_crop_matches_render_at_coarser_pixel(self):
        """Cropping a 64 px render at 1 A to 32 px = rendering at 2 A (inside the new disc)."""
        rng = np.random.default_rng(5)
        coords = rng.normal(32, 5, (30, 3))
        el = np.array(["C", "N", "O"] * 10)
        A = torch.tensor(random_rotations(1, rng))
        big = Renderer(el, 64, 1.0, dtype=torch.float64).render(torch.tensor(coords), A)
        small = Renderer(el, 32, 2.0, centre=[32.0] * 3, dtype=torch.float64)
        ref = small.render(torch.tensor(coords), A)
        crop = fourier_crop(big, 32)
        # the cropped square keeps the corners outside the disc |k| < 16: mask them
        g = FourierGrid(32, 2.0, dtype=torch.float64)
        crop_disc = torch.fft.irfft2(torch.fft.rfft2(crop) * g.mask, s=(32, 32))
        err = (torch.linalg.norm(crop_disc - ref) / torch.linalg.norm(ref)).item()
        self.assertLess(err, 1e-10)
        self.assertEqual(tuple(crop.shape), (1, 32, 32))
        with self.assertRaises(ValueError):
            fourier_crop(big, 80)

    def test_noise_level(self):
        g = torch.Generator().manual_seed(0)
        clean = torch.randn(200, 32, 32, generator=g) * 3.0
        sigma = noise_sigma(clean, -20.0)
        self.assertAlmostEqual(sigma, 30.0, delta=1.0)   # var 9 / 10^-2 = 900
        noisy = add_noise(clean, sigma, generator=g)
        snr = 10 * np.log10(clean.var().item() / (noisy - clean).var().item())
        self.assertAlmostEqual(snr, -20.0, delta=0.1)

def relion_ctf_numpy(D, apix, U, V, angle, kv, cs_mm, q0, phase_deg, bfactor):
    """RELION's CTF (ctf.h) in float64 numpy on the rfft2 grid of a D x D box, (N, D, D//2+1):
    -sin(K1 deltaf u2 + K2 u2^2 - K5 - K3) exp(-B u2 / 4), deltaf = -(mean defocus +
    deviation cos(2 (azimuth - angle))), K1 = pi lambda, K2 = pi/2 Cs lambda^3,
    K3 = atan(Q0 / sqrt(1 - Q0^2)), K5 = phase shift (radians)."""
    fy = np.fft.fftfreq(D)[:, None] / apix                 # cycles per Angstrom
    fx = (np.arange(D // 2 + 1) / (D * apix))[None, :]
    u2, az = fx ** 2 + fy ** 2, np.arctan2(fy, fx)
    out = []
    for i in range(len(U)):
        volts = kv[i] * 1e3
        lam = 12.2643247 / np.sqrt(volts * (1.0 + volts * 0.978466e-6))
        deltaf = -(0.5 * (U[i] + V[i]) + 0.5 * (U[i] - V[i]) * np.cos(2.0 * (az - np.radians(angle[i]))))
        k1, k2 = np.pi * lam, 0.5 * np.pi * cs_mm[i] * 1e7 * lam ** 3
        k3, k5 = np.arctan(q0[i] / np.sqrt(1.0 - q0[i] ** 2)), np.radians(phase_deg[i])
        out.append(-np.sin(k1 * deltaf * u2 + k2 * u2 ** 2 - k5 - k3)
                   * np.exp(-bfactor[i] * u2 / 4.0))
    return np.array(out)


class TestCTFParams(unittest.TestCase):
    """``CTFParams`` (the CTF/optics of a batch) gives the images the keyword path gave."""
    D, APIX, N = 32, 1.3, 7

    def setUp(self):
        import pandas as pd
        from nmaem_plugin.core.io.table import ParticleTable
        rng = np.random.default_rng(3)
        n = self.N
        u = rng.uniform(5000.0, 25000.0, n)
        self.table = ParticleTable(
            path="ctf.star", n=n, image_names=None, stack_paths=None, stack_index=None,
            euler=rng.uniform(-180.0, 180.0, (n, 3)), origin=None,
            defocus_u=u, defocus_v=u - rng.uniform(0.0, 2000.0, n),
            defocus_angle=rng.uniform(-180.0, 180.0, n),
            phase_shift=rng.uniform(0.0, 90.0, n), ctf_bfactor=rng.uniform(0.0, 150.0, n),
            voltage=rng.choice([200.0, 300.0], n), cs=rng.choice([0.01, 2.7], n),
            amp_contrast=rng.choice([0.07, 0.1], n), apix=np.full(n, self.APIX),
            box=np.full(n, self.D, np.int64), optics_group=np.ones(n, np.int64),
            extra=pd.DataFrame(index=range(n)))
        self.renderer = Renderer(np.array(["C"]), self.D, self.APIX)

    def old_dict(self, cast):
        """The dict that ParticleMetadata and fitcheck built before CTFParams."""
        t = self.table
        return dict(defocus_u=cast(t.defocus_u), defocus_v=cast(t.defocus_v),
                    defocus_angle=cast(t.defocus_angle), voltage=cast(t.voltage),
                    cs=cast(t.cs), amp_contrast=cast(t.amp_contrast),
                    phase_shift=cast(t.phase_shift), bfactor=cast(t.ctf_bfactor))

    def test_particle_batch_equals_dict_path_bit_for_bit(self):
        from nmaem_plugin.core.learn.data import ParticleMetadata
        rows = torch.tensor([4, 0, 6, 2])
        _, _, params = ParticleMetadata(self.table, "cpu").batch(rows)
        self.assertIsInstance(params, CTFParams)
        old = {k: v[rows] for k, v in self.old_dict(
            lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))).items()}
        before = ctf_2d(self.renderer.grid.fx, self.renderer.grid.fy, **old)
        self.assertTrue(torch.equal(self.renderer.ctf(params), before))
        self.assertTrue(torch.equal(self.renderer.ctf(**old), before))
        positional = [old[k] for k in ("defocus_u", "defocus_v", "defocus_angle", "voltage",
                                       "cs", "amp_contrast", "phase_shift", "bfactor")]
        self.assertTrue(torch.equal(self.renderer.ctf(*positional), before))
        from nmaem_plugin.core.learn.network import Decoder
        dec = Decoder(["C"], np.zeros((1, 3)), np.zeros((0, 1, 3)), self.D, self.APIX,
                      centre=[0.0, 0.0, 0.0])
        self.assertTrue(torch.equal(dec.ctf(params), before))
        # fitcheck and simulate cast the float64 arrays with torch, from_table with numpy
        torch_cast = self.old_dict(lambda a: torch.as_tensor(
            np.asarray(a, dtype=np.float64), dtype=torch.float32))
        self.assertTrue(torch.equal(self.renderer.ctf(CTFParams.from_table(self.table)),
                                    self.renderer.ctf(**torch_cast)))

    def test_float64_matches_relion_formula(self):
        t = self.table
        grid = FourierGrid(self.D, self.APIX, dtype=torch.float64)
        got = grid.ctf(CTFParams.from_table(t, dtype=torch.float64)).numpy()
        ref = relion_ctf_numpy(self.D, self.APIX, t.defocus_u, t.defocus_v, t.defocus_angle,
                               t.voltage, t.cs, t.amp_contrast, t.phase_shift, t.ctf_bfactor)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)

    def test_select_and_move(self):
        p = CTFParams(defocus_u=np.array([1e4, 2e4, 3e4]), defocus_v=np.array([1e4, 2e4, 3e4]),
                      defocus_angle=0.0, voltage=300.0, cs=2.7, amp_contrast=0.1)
        q = p[np.array([2, 0])].to(dtype=torch.float32)
        self.assertEqual(q.defocus_u.tolist(), [3e4, 1e4])
        self.assertEqual(q.defocus_u.dtype, torch.float32)
        self.assertEqual((q.voltage, q.phase_shift, q.bfactor), (300.0, 0.0, 0.0))
        self.assertEqual(q.replace(cs=0.01).cs, 0.01)
        with self.assertRaises(Exception):
            q.cs = 1.0                                   # frozen


if __name__ == "__main__":
    unittest.main()
