"""The Fourier side of images: the rfft2 frequency grid of a box (``FourierGrid``), shifts
as phase ramps, Fourier cropping.

Images are arrays ``[..., y, x]`` whose centre is pixel (D//2, D//2); their Fourier transforms
use ``torch.fft.rfft2`` layout ``[..., ky, kx]`` with kx = 0..D//2. ``shift`` (Angstrom, (x, y))
is the displacement of the particle centre from the image centre (docs/conventions.md).
"""
import math
from typing import Optional, Union

import torch

from .ctf import ctf_params
from .rotations import ArrayOrTensor

__all__ = ["FourierGrid", "phase_shift", "fourier_crop"]


class FourierGrid:
    """The rfft2 frequency grid of a D x D box at pixel size apix (Angstrom).

    ``kx`` (1, K) and ``ky`` (D, 1) are integer frequencies (K = D//2 + 1; ky in fftfreq
    order); ``fx``, ``fy`` the same in 1/Angstrom; ``mask`` (D, K) is the band limit
    |k| < D/2 that defines every rendered image.
    """

    def __init__(self, box: int, apix: float, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32):
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

    def ctf(self, *args, **kwargs) -> torch.Tensor:
        """CTF (B, D, K) on this grid: a :class:`CTFParams`, or its fields as arguments."""
        return ctf_params(args, kwargs).image(self.fx, self.fy)


def phase_shift(ft: torch.Tensor, shift: ArrayOrTensor, apix: float) -> torch.Tensor:
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


def fourier_crop(images: torch.Tensor, new_box: int,
                 spectral_filter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Downsample images (B, D, D) to (B, d, d) by Fourier cropping.

    The new pixel size is apix * D / d; values keep their scale (samples of the same
    band-limited function). The new Nyquist row and column are set to zero (when d < D).
    ``spectral_filter`` (D, D//2+1), when given, multiplies the images' rfft2 first (one
    pair of FFTs for both: the encoder's whitening and crop, ``network.Encoder``).
    """
    D = images.shape[-1]
    d = int(new_box)
    if d > D:
        raise ValueError("cannot crop a %d px image to a larger box of %d px" % (D, d))
    if d == D and spectral_filter is None:
        return images
    if d % 2 and d != D:
        raise ValueError("the cropped box must be even, not %d" % d)
    ft = torch.fft.rfft2(images if spectral_filter is None else images.float())
    if spectral_filter is not None:
        ft = ft * spectral_filter
    if d == D:
        return torch.fft.irfft2(ft, s=(D, D))
    h = d // 2
    top = ft[..., :h, :h + 1]
    bottom = ft[..., D - h:, :h + 1]
    crop = torch.cat([top, bottom], dim=-2)
    crop[..., h, :] = 0          # ky = -d/2 (Nyquist)
    crop[..., :, h] = 0          # kx = d/2 (Nyquist)
    return torch.fft.irfft2(crop, s=(d, d)) * (d / D) ** 2
