"""Image formation: poses, projected Coulomb potential, CTF, shifts, cropping, noise.

Every convention of the project about poses and images lives here (docs/conventions.md
derives and cites each one):

* Poses follow RELION (``poses.py``, numpy; wrapped here for tensors).
  ``euler_to_matrix(rot, tilt, psi)`` is RELION's
  ``Euler_angles2matrix``: A = Rz(psi) Ry(tilt) Rz(rot) with the *passive* elementary
  rotations Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]], Ry(b) = [[c, 0, -s], [0, 1, 0],
  [s, 0, c]]. A model point r (relative to the rotation centre) goes to A r, and the image
  is the projection of A r along z.
* The rotation centre is the centre of the consensus-map box, (D//2)*apix in x, y and z,
  for the particles' original box size D and pixel size apix.
* ``rlnOriginX/YAngst`` is the translation RELION applies to the particle image to centre
  it, so the particle centre sits at (image centre - origin): a rendered projection is
  translated by ``shift = -origin``. In this module ``shift`` (Angstrom, (x, y)) always
  means the displacement of the particle centre from the image centre.
* Images are arrays ``[..., y, x]`` whose centre is pixel (D//2, D//2); their Fourier
  transforms use ``torch.fft.rfft2`` layout ``[..., ky, kx]`` with kx = 0..D//2.
* The image is band-limited by definition: the Fourier transform of the continuous
  projection, F(q) = sum_j f_j(|q|) exp(-2 pi i q.r_j), sampled at the box's DFT
  frequencies q = k / (D apix) with |k| < D/2 (a disc strictly inside Nyquist), then
  inverse-transformed: I[n] = (1/(D apix)^2) sum_k F(q_k) exp(2 pi i k.n / D). f_j is the
  electron form factor of atom j, sum_g a_g exp(-b_g |q|^2 / 4) (the 2D Fourier transform
  of 4 pi sum_g a_g/b_g exp(-4 pi^2 r^2 / b_g)), so I approximates the projected potential
  (Angstrom units of gemmi's c4322 table) without point-sampling aliasing.
* The CTF is RELION's: -sin(gamma), positive (= amplitude contrast) at zero frequency, so
  protein density is white in the images.
"""
import math

import numpy as np
import torch

from . import poses

__all__ = ["euler_to_matrix", "matrix_to_euler", "rotvec_to_matrix", "correct_rotations",
           "electron_wavelength", "ctf_2d", "FourierGrid",
           "phase_shift", "fourier_crop", "noise_sigma", "add_noise", "Renderer"]


# ----------------------------------------------------------------------------- poses
# The conventions live in poses.py (numpy); these wrappers add tensors (autograd, devices).

def _as_tensor(x, dtype=None, device=None):
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype or x.dtype, device=device or x.device)
    return torch.as_tensor(np.asarray(x), dtype=dtype or torch.float64, device=device)


def euler_to_matrix(rot, tilt, psi, degrees=True):
    """RELION's rotation matrix A for Euler angles (rot, tilt, psi); batched, (..., 3, 3).

    Accepts numpy arrays or tensors; returns the same kind (numpy float64 for numpy input).
    The formulas are :func:`poses.euler_to_matrix`'s.
    """
    if not isinstance(rot, torch.Tensor):
        return poses.euler_to_matrix(rot, tilt, psi, degrees=degrees)
    r, t, p = torch.broadcast_tensors(*(_as_tensor(v) for v in (rot, tilt, psi)))
    return poses.euler_to_matrix(r, t, p, degrees=degrees, xp=torch)


def matrix_to_euler(A, degrees=True):
    """Inverse of :func:`euler_to_matrix`: (rot, tilt, psi) with tilt in [0, 180].

    For tilt = 0 or 180 only rot + psi (or rot - psi) is defined; rot is then set to 0.
    Input (..., 3, 3), numpy or tensor; returns a tuple of three arrays of shape (...).
    """
    if not isinstance(A, torch.Tensor):
        return poses.matrix_to_euler(A, degrees=degrees)
    return poses.matrix_to_euler(A, degrees=degrees, xp=torch)


ROTVEC_TAYLOR = 1e-6     # |v|^2 (rad^2) below which the Rodrigues coefficients use Taylor series


def rotvec_to_matrix(v):
    """Rodrigues matrices R(v) = exp([v]_x) of rotation vectors v (..., 3) radians, tensors.

    The tensor counterpart of :func:`poses.rotvec_to_matrix`:
    R = I + a [v]_x + b [v]_x^2 with a = sin(t)/t, b = (1 - cos t)/t^2 = 2 sin^2(t/2)/t^2,
    t = |v|, and their Taylor series near t = 0, so that R(0) is exactly I and the
    gradient is finite there (the pose head of the encoder starts at v = 0).
    """
    v = _as_tensor(v)
    t2 = (v * v).sum(-1)
    small = t2 < ROTVEC_TAYLOR
    t2s = torch.where(small, torch.ones_like(t2), t2)
    t = torch.sqrt(t2s)
    a = torch.where(small, 1.0 - t2 / 6.0, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24.0, 2.0 * torch.sin(0.5 * t) ** 2 / t2s)
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    K = torch.stack([torch.stack([o, -z, y], -1),
                     torch.stack([z, o, -x], -1),
                     torch.stack([-y, x, o], -1)], -2)
    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


def correct_rotations(A, v):
    """R(v) A: RELION matrices A (..., 3, 3) corrected by rotation vectors v (..., 3)
    radians on the left, the side documented in ``poses`` (tensors, differentiable)."""
    return rotvec_to_matrix(v.to(A.dtype)) @ A


# ----------------------------------------------------------------------------- optics

def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV.

    lambda = h / sqrt(2 m0 e V (1 + e V / (2 m0 c^2))) = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))
    with V in volts (the same constants as RELION's CTF).
    """
    v = voltage_kv * 1e3
    if isinstance(v, torch.Tensor):
        return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


def ctf_2d(freq_x, freq_y, defocus_u, defocus_v, defocus_angle, voltage, cs, amp_contrast,
           phase_shift=0.0, bfactor=0.0):
    """RELION's CTF on a frequency grid.

    ``freq_x``, ``freq_y``: spatial frequencies in 1/Angstrom, broadcastable to the grid
    (e.g. (D, 1) and (1, K)). Per-image parameters are tensors of shape (B,) (or scalars):
    defocus U/V in Angstrom (positive = underfocus), defocus angle in degrees (the angle of
    the U axis from the x axis), voltage in kV, Cs in mm, amplitude contrast as a fraction,
    phase shift in degrees, B-factor in A^2. Returns (B, *grid):

        gamma = pi lambda dz(alpha) s^2 - pi/2 Cs lambda^3 s^4 + phase_shift + atan(Q0/sqrt(1-Q0^2))
        dz(alpha) = (U + V)/2 + (U - V)/2 cos(2 (alpha - angle)),  alpha = atan2(freq_y, freq_x)
        CTF = sin(gamma) * exp(-B s^2 / 4)

    which is RELION's ``-sin(K1 deltaf u2 + K2 u2^2 - K5 - K3)`` with deltaf = -dz: equal to
    the amplitude contrast Q0 at zero frequency.
    """
    def col(v):
        v = torch.as_tensor(v, dtype=freq_x.dtype, device=freq_x.device)
        return v.reshape(-1, *([1] * freq_x.dim())) if v.dim() > 0 else v

    u, v, ang = col(defocus_u), col(defocus_v), torch.deg2rad(col(defocus_angle))
    lam = electron_wavelength(col(voltage))
    cs_a = col(cs) * 1e7
    q0 = col(amp_contrast)
    s2 = freq_x ** 2 + freq_y ** 2
    alpha = torch.atan2(freq_y, freq_x)
    dz = 0.5 * (u + v) + 0.5 * (u - v) * torch.cos(2.0 * (alpha - ang))
    gamma = (math.pi * lam * dz * s2 - 0.5 * math.pi * cs_a * lam ** 3 * s2 ** 2
             + torch.deg2rad(col(phase_shift)) + torch.atan(q0 / torch.sqrt(1.0 - q0 ** 2)))
    out = torch.sin(gamma)
    b = col(bfactor)
    if torch.any(torch.as_tensor(b) != 0):
        out = out * torch.exp(-b * s2 / 4.0)
    return out


class FourierGrid:
    """The rfft2 frequency grid of a D x D box at pixel size apix (Angstrom).

    ``kx`` (1, K) and ``ky`` (D, 1) are integer frequencies (K = D//2 + 1; ky in fftfreq
    order); ``fx``, ``fy`` the same in 1/Angstrom; ``mask`` (D, K) is the band limit
    |k| < D/2 that defines every rendered image.
    """

    def __init__(self, box, apix, device="cpu", dtype=torch.float32):
        self.box, self.apix = int(box), float(apix)
        D = self.box
        self.device, self.dtype = torch.device(device), dtype
        ky = torch.fft.fftfreq(D, d=1.0 / D, dtype=torch.float64)
        kx = torch.arange(D // 2 + 1, dtype=torch.float64)
        self.ky = ky.reshape(D, 1).to(device=device, dtype=dtype)
        self.kx = kx.reshape(1, -1).to(device=device, dtype=dtype)
        self.fx = self.kx / (D * self.apix)
        self.fy = self.ky / (D * self.apix)
        self.mask = ((self.kx ** 2 + self.ky ** 2) < (D / 2.0) ** 2).to(dtype)

    def ctf(self, **params):
        return ctf_2d(self.fx, self.fy, **params)


def phase_shift(ft, shift, apix):
    """Translate images given by their rfft2 ``ft`` (B, D, K) by ``shift`` (B, 2) Angstrom (x, y).

    Multiplies by exp(-2 pi i (kx sx + ky sy) / (D apix)): the image content moves by +shift.
    """
    D = ft.shape[-2]
    real = torch.float64 if ft.dtype == torch.complex128 else torch.float32
    ky = torch.fft.fftfreq(D, d=1.0 / D, dtype=real, device=ft.device).reshape(D, 1)
    kx = torch.arange(ft.shape[-1], dtype=real, device=ft.device).reshape(1, -1)
    s = torch.as_tensor(shift, dtype=real, device=ft.device) / apix
    theta = (-2.0 * math.pi / D) * (kx * s[:, 0, None, None] + ky * s[:, 1, None, None])
    return ft * torch.polar(torch.ones_like(theta), theta)


def fourier_crop(images, new_box):
    """Downsample images (B, D, D) to (B, d, d) by Fourier cropping.

    The new pixel size is apix * D / d; values keep their scale (samples of the same
    band-limited function). The new Nyquist row and column are set to zero.
    """
    D = images.shape[-1]
    d = int(new_box)
    if d > D:
        raise ValueError("cannot crop a %d px image to a larger box of %d px" % (D, d))
    if d == D:
        return images
    if d % 2:
        raise ValueError("the cropped box must be even, not %d" % d)
    ft = torch.fft.rfft2(images)
    h = d // 2
    top = ft[..., :h, :h + 1]
    bottom = ft[..., D - h:, :h + 1]
    crop = torch.cat([top, bottom], dim=-2)
    crop[..., h, :] = 0          # ky = -d/2 (Nyquist)
    crop[..., :, h] = 0          # kx = d/2 (Nyquist)
    return torch.fft.irfft2(crop, s=(d, d)) * (d / D) ** 2


def noise_sigma(clean, snr_db):
    """White-noise standard deviation for an SNR in dB over a batch of clean images.

    SNR = 10 log10(mean_i var(clean_i) / sigma^2), var over the pixels of each image.
    """
    var = torch.as_tensor(clean).reshape(len(clean), -1).var(dim=1, unbiased=False).mean()
    return float(torch.sqrt(var / 10.0 ** (snr_db / 10.0)))


def add_noise(images, sigma, generator=None):
    """``images`` plus white Gaussian noise of standard deviation ``sigma``."""
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype,
                        device=images.device)
    return images + sigma * noise


class _QuarterStructureFactor(torch.autograd.Function):
    """P[b] = sum_e ff_e * (L_e^T @ R_e), L = [cos ty | sin ty], R = [cos tx | sin tx].

    tx = -2 pi k u / D, ty = -2 pi k v / D for k = 0..h-1 (h = D/2), atoms sorted by
    element so that element e is the row slice ``slices[e]``. The backward pass is written
    out (the cos/sin tables are kept from the forward pass, and no per-slice zero-filled
    gradient buffers are made, which autograd would do for every element).
    """

    @staticmethod
    def forward(ctx, u, v, k, ff_tiled, slices):
        h = k.shape[0]
        D = 2 * h
        w = (-2.0 * math.pi / D) * k
        B, M = u.shape
        right = u.new_empty(B, M, 2 * h)
        left = u.new_empty(B, M, 2 * h)
        tx = u[..., None] * w
        torch.cos(tx, out=right[..., :h])
        torch.sin(tx, out=right[..., h:])
        del tx
        ty = v[..., None] * w
        torch.cos(ty, out=left[..., :h])
        torch.sin(ty, out=left[..., h:])
        del ty
        P = None
        for e, sl in enumerate(slices):
            term = torch.matmul(left[:, sl, :].transpose(-1, -2), right[:, sl, :])
            term.mul_(ff_tiled[e])
            P = term if P is None else P.add_(term)
        ctx.save_for_backward(left, right, w, ff_tiled)
        ctx.slices = slices
        return P

    @staticmethod
    def backward(ctx, gP):
        left, right, w, ff_tiled = ctx.saved_tensors
        h = w.shape[0]
        gu = gP.new_empty(right.shape[:2])
        gv = gP.new_empty(left.shape[:2])
        for e, sl in enumerate(ctx.slices):
            G = gP * ff_tiled[e]
            le, ri = left[:, sl, :], right[:, sl, :]
            # d cos(w u)/du = -w sin(w u), d sin(w u)/du = w cos(w u)
            g = torch.matmul(le, G)                                  # dL/dright
            t = g[..., h:] * ri[..., :h]
            t.sub_(g[..., :h] * ri[..., h:])
            gu[:, sl] = torch.matmul(t, w)
            g = torch.matmul(ri, G.transpose(-1, -2))               # dL/dleft
            t = g[..., h:] * le[..., :h]
            t.sub_(g[..., :h] * le[..., h:])
            gv[:, sl] = torch.matmul(t, w)
        return gu, gv, None, None, None


class Renderer:
    """Batched, differentiable projection of atoms with CTF and shift (CPU or CUDA).

    ``elements`` (M,) names the atoms' elements (their rows in the form-factor table);
    ``box``/``apix`` give the rendered image; ``centre`` (3,) Angstrom is the rotation
    centre in the model frame, by default (box0//2)*apix0 for the box and pixel size of the
    consensus map (``box0``/``apix0``, default the rendered ones).

    The Fourier transform of the projection is computed exactly on the DFT grid: per
    element e, S_e[ky, kx] = sum_j exp(-2 pi i ky v_j / D) exp(-2 pi i kx u_j / D) is a
    (D x M_e) @ (M_e x K) complex matrix product (the phase factor is separable in x and
    y), and F = sum_e f_e(|q|) S_e. The cost is independent of the atoms' widths and there
    is no aliasing; see docs/imaging.md.
    """

    def __init__(self, elements, box, apix, centre=None, box0=None, apix0=None,
                 device="cpu", dtype=torch.float32):
        from .structure import form_factor_table
        self.grid = FourierGrid(box, apix, device=device, dtype=dtype)
        self.box, self.apix = self.grid.box, self.grid.apix
        self.device, self.dtype = self.grid.device, dtype
        names, a, b, index = form_factor_table(elements)
        self.element_names = names
        order = np.argsort(index, kind="stable")
        self.order = torch.as_tensor(order, device=self.device)
        counts = np.bincount(index, minlength=len(names))
        self.slices = []
        start = 0
        for c in counts:
            self.slices.append(slice(start, start + int(c)))
            start += int(c)
        if centre is None:
            b0 = self.box if box0 is None else int(box0)
            a0 = self.apix if apix0 is None else float(apix0)
            centre = [(b0 // 2) * a0] * 3
        self.centre = torch.as_tensor(np.asarray(centre, dtype=np.float64), dtype=dtype,
                                      device=self.device)
        # Form factor of each element, f_e(q) = sum_g a_g exp(-b_g q^2 / 4), on the quarter
        # grid ky, kx = 0..h-1 (all that projection_ft uses: f is radial, the other
        # quadrants follow by symmetry), zero outside the disc |k| < D/2, divided by apix^2
        # (I[n] = (1/(D apix)^2) sum_k F e^{2 pi i k.n/D} = irfft2(F) / apix^2) and tiled
        # 2 x 2 for the cos/sin blocks.
        h = self.box // 2
        k = torch.arange(h, device=self.device, dtype=torch.float64)
        k2 = k[:, None] ** 2 + k[None, :] ** 2
        q2 = k2 / (self.box * self.apix) ** 2
        at = torch.as_tensor(a, device=self.device)[:, :, None, None]
        bt = torch.as_tensor(b, device=self.device)[:, :, None, None]
        quarter = (at * torch.exp(-bt * q2 / 4.0)).sum(1) * (k2 < (self.box / 2.0) ** 2)
        self._ff_tiled = (quarter / self.apix ** 2).to(dtype).repeat(1, 2, 2).contiguous()
        self._k_half = k.to(dtype)

    def positions(self, coords, rotations, shifts=None):
        """Image-plane positions in pixels from the array origin, (B, M, 2) (u = x, v = y).

        ``coords`` (M, 3) or (B, M, 3) Angstrom in the model frame, ``rotations`` (B, 3, 3)
        RELION matrices, ``shifts`` (B, 2) Angstrom displacement of the particle centre.
        """
        r = coords - self.centre
        p = torch.matmul(r, rotations[:, :2, :].transpose(-1, -2))      # (B, M, 2)
        if shifts is not None:
            p = p + shifts[:, None, :]
        return p / self.apix + float(self.box // 2)

    def projection_ft(self, coords, rotations, shifts=None):
        """rfft2 of the band-limited projection, (B, D, D//2+1) complex (CTF not applied).

        With tx = -2 pi kx u / D and ty = -2 pi ky v / D, exp(i(tx + ty)) splits into
        cos/sin products. Because cos is even and sin odd in ky, the four real sums
        CC = sum cos(ty) cos(tx), CS = sum cos(ty) sin(tx), SC = sum sin(ty) cos(tx),
        SS = sum sin(ty) sin(tx) over ky >= 0 give both half planes:
        F(kx, +ky) = (CC - SS) + i (CS + SC) and F(kx, -ky) = (CC + SS) + i (CS - SC).
        One real matrix product per element yields all four: half the arithmetic of a
        complex product over the whole rfft grid. Frequencies outside the disc |k| < D/2
        (the Nyquist row and column included) are zero.
        """
        coords = coords.to(dtype=self.dtype)
        uv = self.positions(coords[..., self.order, :], rotations.to(self.dtype),
                            None if shifts is None else shifts.to(self.dtype))
        h = self.box // 2
        P = _QuarterStructureFactor.apply(uv[..., 0], uv[..., 1], self._k_half,
                                          self._ff_tiled, self.slices)
        CC, CS = P[:, :h, :h], P[:, :h, h:]
        SC, SS = P[:, h:, :h], P[:, h:, h:]
        re_pos, im_pos = CC - SS, CS + SC                    # ky = 0 .. h-1
        re_neg, im_neg = CC + SS, CS - SC                    # ky = 0 .. -(h-1)
        B = P.shape[0]
        zero_row = P.new_zeros(B, 1, h)
        re = torch.cat([re_pos, zero_row, torch.flip(re_neg[:, 1:], dims=(1,))], dim=1)
        im = torch.cat([im_pos, zero_row, torch.flip(im_neg[:, 1:], dims=(1,))], dim=1)
        ft = torch.complex(re, im)                           # (B, D, h); kx = h is zero
        return torch.nn.functional.pad(ft, (0, 1))

    def ctf(self, defocus_u, defocus_v, defocus_angle, voltage, cs, amp_contrast,
            phase_shift=0.0, bfactor=0.0):
        """CTF (B, D, K) on this renderer's grid (see :func:`ctf_2d` for the units)."""
        return self.grid.ctf(defocus_u=defocus_u, defocus_v=defocus_v,
                             defocus_angle=defocus_angle, voltage=voltage, cs=cs,
                             amp_contrast=amp_contrast, phase_shift=phase_shift,
                             bfactor=bfactor)

    def render_ft(self, coords, rotations, shifts=None, ctf=None):
        """rfft2 of the rendered images: projection, times the CTF (B, D, K) when given."""
        ft = self.projection_ft(coords, rotations, shifts)
        if ctf is not None:
            ft = ft * ctf
        return ft

    def render(self, coords, rotations, shifts=None, ctf=None):
        """Rendered images (B, D, D), arrays [y, x]."""
        return torch.fft.irfft2(self.render_ft(coords, rotations, shifts, ctf),
                                s=(self.box, self.box))
