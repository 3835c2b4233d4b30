"""Whitened Gaussian likelihood of particle images given rendered images (docs/likelihood.md).

Model, per image i and rfft2 frequency k (full plane through the Hermitian weights):

    Y_k = a_i R_k + b_i delta(k = 0) + N_k,    N_k ~ N(0, sigma2(|k|)) per optics group

R = C F is the rendering (``Renderer.render_ft``, CTF included). The offset b only touches
k = 0, which is left out; the scale a is solved in closed form (whitened least squares),

    a = Re<Y, R>_w / <R, R>_w,    <X, Z>_w = sum_k w_k X_k conj(Z_k) / sigma2_k

with w_k the Hermitian multiplicity times the band indicator, and the negative
log-likelihood, up to a constant, is chi2 / 2 with chi2 = <Y - a R, Y - a R>_w. The loss
per image is the normalised NLL chi2_min / chi2_0 (chi2_0 = <Y, Y>_w, the zero model's):
the fraction of the image's whitened power that the model leaves unexplained, 1 - rho^2
for the whitened correlation rho. It is exactly invariant to Y -> c Y + d (c != 0).

Gradients: by the envelope theorem d chi2_min / dR is the partial derivative at fixed a,
so detaching a gives the same gradient as differentiating through it (tested); we detach.
"""
import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..base.errors import NmaemError, fail
from . import noise as noise_model

__all__ = ["Band", "whitened_fit", "whitened_nll", "WhitenedLikelihood"]


class Band:
    """Frequencies and real-space mask of the whitened metric for a (box, apix).

    ``resolution_low`` (Angstrom, default None: every frequency but DC) and
    ``resolution_high`` (default None: the renderer's band |k| < D/2, i.e. just short of
    Nyquist 2 apix) bound the band; ``mask_radius`` (Angstrom, default None: no mask) is a
    soft circular mask with a raised-cosine edge ``mask_edge`` (default 0.1 of the box
    width) applied to images and renderings (after removing their mean) before the FFT.

    ``weights`` (D, K) float64: Hermitian multiplicity (1 or 2) inside the band, 0 outside.
    ``dof``: their sum, the number of real degrees of freedom in the band.
    """

    def __init__(self, box: int, apix: float, resolution_low: Optional[float] = None,
                 resolution_high: Optional[float] = None, mask_radius: Optional[float] = None,
                 mask_edge: Optional[float] = None, path: Optional[str] = None) -> None:
        self.box, self.apix = int(box), float(apix)
        D, apix = self.box, self.apix
        if D < 8 or D % 2:
            fail(path, "box must be even and at least 8 px (got %d)" % D)
        if apix <= 0 or not math.isfinite(apix):
            fail(path, "pixel size must be positive (got %g)" % apix)
        nyq = 2.0 * apix
        hi, lo = resolution_high, resolution_low
        if hi is not None and (not math.isfinite(hi) or hi < nyq * (1 - 1e-9)):
            fail(path, "resolution_high %.3g A is beyond Nyquist (%.3g A at %.3g A/px)"
                 % (hi, nyq, apix))
        if lo is not None and (not lo > 0):
            fail(path, "resolution_low must be positive (got %g)" % lo)
        if lo is not None and lo <= (nyq if hi is None else hi):
            fail(path, "resolution_low %.3g A must be larger (coarser) than resolution_high "
                       "%.3g A" % (lo, nyq if hi is None else hi))
        self.resolution_low, self.resolution_high = lo, hi
        r = noise_model.radius_grid(D)
        inband = (r >= 0.5) & (r < D / 2.0)
        f = r / (D * apix)
        if hi is not None:
            inband &= f <= 1.0 / hi
        if lo is not None:
            inband &= f >= 1.0 / lo
        self.weights = noise_model.hermitian_weights(D) * inband
        self.dof = float(self.weights.sum())
        if self.dof == 0:
            fail(path, "no frequency of the %d px box (%.3g A/px) lies between %s and %s A"
                 % (D, apix, lo, hi))
        self.mask = None
        if mask_radius is not None:
            edge = 0.1 * D * apix if mask_edge is None else float(mask_edge)
            if mask_radius <= 0:
                fail(path, "mask radius must be positive (got %g)" % mask_radius)
            self.mask = noise_model.soft_disc(D, mask_radius / apix, edge / apix)
        self._cache = {}

    def tensors(self, device: Union[str, torch.device], dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        key = (str(device), dtype)
        if key not in self._cache:
            w = torch.as_tensor(self.weights, dtype=dtype, device=device)
            m = None if self.mask is None else torch.as_tensor(self.mask, dtype=dtype,
                                                                device=device)
            self._cache[key] = (w, m)
        return self._cache[key]

    def images_ft(self, images: torch.Tensor) -> torch.Tensor:
        """rfft2 of images (B, D, D) minus their mean, masked when a mask is set."""
        _, m = self.tensors(images.device, images.dtype)
        x = images - images.mean(dim=(-2, -1), keepdim=True)
        if m is not None:
            x = x * m
        return torch.fft.rfft2(x)

    def rendered_ft(self, rendered_ft: torch.Tensor) -> torch.Tensor:
        """The renderings' rfft2 as :meth:`images_ft` treats the images (mask, mean)."""
        if self.mask is None:
            return rendered_ft
        real = torch.fft.irfft2(rendered_ft, s=(self.box, self.box))
        return self.images_ft(real)


def whitened_fit(images_ft: torch.Tensor, rendered_ft: torch.Tensor, weights: torch.Tensor,
                 detach_scale: bool = True) -> dict:
    """Per-image closed-form scale and whitened sums; ``weights`` (…, D, K) = band / sigma2.

    Returns a dict of (B,) tensors: ``scale`` a, ``chi2`` <Y - aR, Y - aR>_w (computed
    from the residual, not by cancellation), ``power`` <Y, Y>_w, ``model`` <R, R>_w,
    ``rho`` the whitened correlation Re<Y, R>_w / sqrt(<Y,Y>_w <R,R>_w).
    """
    Y, R, w = images_ft, rendered_ft, weights
    yr = (w * (Y * R.conj()).real).sum(dim=(-2, -1))
    rr = (w * (R.real ** 2 + R.imag ** 2)).sum(dim=(-2, -1))
    yy = (w * (Y.real ** 2 + Y.imag ** 2)).sum(dim=(-2, -1))
    tiny = torch.finfo(rr.dtype).tiny
    a = yr / rr.clamp_min(tiny)
    a_used = a.detach() if detach_scale else a
    res = Y - a_used[:, None, None] * R
    chi2 = (w * (res.real ** 2 + res.imag ** 2)).sum(dim=(-2, -1))
    rho = yr / torch.sqrt((yy * rr).clamp_min(tiny))
    return dict(scale=a, chi2=chi2, power=yy, model=rr, rho=rho)


def whitened_nll(images_ft: torch.Tensor, rendered_ft: torch.Tensor, sigma2: torch.Tensor,
                 band: "Band", normalise: bool = True,
                 detach_scale: bool = True) -> torch.Tensor:
    """Per-image whitened Gaussian NLL at the best scale, (B,).

    ``images_ft``, ``rendered_ft`` (B, D, K) rfft2 (already through ``band.images_ft`` /
    ``band.rendered_ft`` when a mask is used); ``sigma2`` (D, K) or (B, D, K) the noise
    power on the rfft2 grid (:meth:`NoiseModel.grid`); ``band`` a :class:`Band`.
    ``normalise``: chi2_min / chi2_0 (scale and offset invariant, in [0, 1]); otherwise
    chi2_min / 2, the NLL of the Gaussian model up to its constant.
    Raises NmaemError for images without power in the band (constant or NaN).
    """
    w0, _ = band.tensors(images_ft.device, images_ft.real.dtype)
    s2 = torch.as_tensor(sigma2, dtype=w0.dtype, device=w0.device)
    fit = whitened_fit(images_ft, rendered_ft, w0 / s2, detach_scale=detach_scale)
    bad = ~(fit["power"] > 0) | ~torch.isfinite(fit["power"])
    if bool(bad.any()):
        raise NmaemError("%d image(s) with no finite power in the loss band (constant or "
                         "NaN images)" % int(bad.sum()))
    if normalise:
        return fit["chi2"] / fit["power"]
    return 0.5 * fit["chi2"]


class WhitenedLikelihood:
    """The training loss: ``loss = lik(images, rendered_ft, groups)`` (mean over the batch).

    ``noise`` a :class:`noise.NoiseModel` (of the particles' box0; a Fourier-cropped
    training box uses the same shells, see :meth:`NoiseModel.grid`); ``box``, ``apix`` the
    training images'; band and mask options as in :class:`Band`. ``images`` (B, D, D) real
    as fed to the renderer's comparison (cropped, raw grey values), ``rendered_ft``
    (B, D, K) from ``Renderer.render_ft``, ``groups`` (B,) optics-group numbers (or None:
    the first group). ``source`` names the particle file in error messages.
    """

    def __init__(self, noise: noise_model.NoiseModel, box: int, apix: float,
                 resolution_low: Optional[float] = None,
                 resolution_high: Optional[float] = None, mask_radius: Optional[float] = None,
                 mask_edge: Optional[float] = None, device: Union[str, torch.device] = "cpu",
                 source: Optional[str] = None) -> None:
        self.band = Band(box, apix, resolution_low, resolution_high, mask_radius, mask_edge,
                         path=source)
        self._args = dict(noise=noise, box=box, apix=apix, resolution_low=resolution_low,
                          resolution_high=resolution_high, mask_radius=mask_radius,
                          mask_edge=mask_edge, device=device, source=source)
        self.source = source
        self.noise = noise
        self.groups = np.asarray(noise.groups)
        lut = np.full(int(self.groups.max()) + 1, -1, dtype=np.int64)
        lut[self.groups] = np.arange(len(self.groups))
        self._lut = torch.as_tensor(lut, device=device)
        inv = np.stack([1.0 / noise.grid(g, box=box) for g in self.groups])
        w = torch.as_tensor(self.band.weights[None] * inv, dtype=torch.float32,
                            device=device)
        self._w = w

    @classmethod
    def for_run(cls, run_dir: str, cfg: dict, device: Union[str, torch.device] = "cpu",
                source: Optional[str] = None) -> "WhitenedLikelihood":
        """The likelihood a run was trained with: its noise model, box, pixel size, band
        and mask (``config.json`` as ``cfg``); ``source`` names the particle file in
        errors (default the run's)."""
        from ..io.runfolder import noise_path
        return cls(noise_model.load_noise_model(noise_path(run_dir, cfg)), cfg["box"],
                   cfg["apix"], cfg.get("resolution_low"), cfg.get("resolution_high"),
                   cfg.get("mask_radius"), device=device,
                   source=cfg.get("particles") if source is None else source)

    def limited(self, resolution_high: Optional[float]) -> "WhitenedLikelihood":
        """The same likelihood with its band cut at ``resolution_high`` (Angstrom) as well
        (the coarser of the two limits; None: this likelihood itself)."""
        if resolution_high is None:
            return self
        own = self._args["resolution_high"]
        args = dict(self._args, resolution_high=(float(resolution_high) if own is None
                                                 else max(float(resolution_high), own)))
        return WhitenedLikelihood(**args)

    def weights(self, groups: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Band / sigma2 on the rfft2 grid: (D, K) for the first optics group (``groups``
        None), else (B, D, K), each image its group's."""
        if groups is None:
            return self._w[0]
        g = torch.as_tensor(groups, device=self._lut.device).long()
        if bool(((g < 0) | (g >= len(self._lut))).any()) or bool((self._lut[g] < 0).any()):
            fail(self.source, "particles of an optics group without a noise estimate")
        return self._w[self._lut[g]]

    def per_image(self, images: torch.Tensor, rendered_ft: torch.Tensor,
                  groups: Optional[Sequence[int]] = None,
                  penalty: Optional[torch.Tensor] = None) -> torch.Tensor:
        """chi2_min / chi2_0 per image (B,); ``penalty`` (B,), a prior's -2 log density
        (e.g. ``network.pose_penalty``), is added to chi2_min: the loss stays
        2 (NLL + prior) / chi2_0, the likelihood's normalisation."""
        Y = self.band.images_ft(images.float())
        R = self.band.rendered_ft(rendered_ft)
        fit = whitened_fit(Y, R, self.weights(groups))
        bad = ~(fit["power"] > 0) | ~torch.isfinite(fit["power"])
        if bool(bad.any()):
            fail(self.source, "%d image(s) with no finite power in the loss band (constant "
                              "or NaN images)" % int(bad.sum()))
        chi2 = fit["chi2"] if penalty is None else fit["chi2"] + penalty
        return chi2 / fit["power"]

    def __call__(self, images, rendered_ft, groups=None, penalty=None):
        return self.per_image(images, rendered_ft, groups, penalty).mean()
