"""The noise model: a radial noise power spectrum per optics group, estimated from particles.

numpy only (no torch), so that training, inference, the fit check and viewers share one
reader. See docs/likelihood.md.

Units. ``sigma2[g, s]`` is the expected squared modulus E|N_k|^2 of the *unnormalised*
2D DFT (``numpy.fft.rfft2`` / ``torch.fft.rfft2`` with the default ``norm="backward"``) of
the noise in the particle images as stored, for the frequencies k of shell s (integer
shells: s = round(|k|), |k| in pixels of frequency, k = 0 .. D/2 along an axis, up to the
corner D/sqrt(2)). For white noise of pixel variance v, sigma2 = D^2 v in every shell.

Two estimators:

* :func:`estimate_background` (the default): the spectrum of the pixels *outside* a soft
  circular mask around the particle, corrected exactly (in expectation) for the mask. It
  needs no reference and no poses, so it cannot absorb the model's errors into the noise;
  it assumes the box is larger than the particle.
* :class:`ResidualNoise` (RELION's sigma2_noise way): the spectrum of the residuals
  Y - a C F to the reference rendered at the file's poses, with the per-particle scale a
  fitted. It uses every pixel, but whatever the reference does not explain (heterogeneity,
  pose errors, a bad docking) counts as noise.
"""
import json
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import numpy as np

from ..base.errors import NmaemError, fail
from ..io.npz import read_npz

if TYPE_CHECKING:
    from ..io.table import ParticleTable

__all__ = ["NOISE_FORMAT", "radius_grid", "shell_index", "hermitian_weights", "soft_disc",
           "shell_sums", "NoiseModel", "load_noise_model", "estimate_background",
           "background_kernel", "ResidualNoise", "whitening_filter"]

NOISE_FORMAT = 1
# fewest background pixels (weight of the background mask) per image for an estimate
MIN_BACKGROUND_PIXELS = 64


# ----------------------------------------------------------------------------- grids

def radius_grid(box: int) -> np.ndarray:
    """|k| (in frequency pixels) on the rfft2 grid of a box x box image, (D, D//2+1) float64."""
    D = int(box)
    ky = np.fft.fftfreq(D, d=1.0 / D).reshape(D, 1)
    kx = np.arange(D // 2 + 1, dtype=np.float64).reshape(1, -1)
    return np.sqrt(kx ** 2 + ky ** 2)


def n_shells(box: int) -> int:
    """Number of integer shells on the grid, up to the corner: round(D/sqrt(2)) + 1."""
    return int(np.rint(radius_grid(box).max())) + 1


def shell_index(box: int) -> np.ndarray:
    """Integer shell s = round(|k|) of each rfft2 frequency, (D, D//2+1) int64."""
    return np.rint(radius_grid(box)).astype(np.int64)


def hermitian_weights(box: int) -> np.ndarray:
    """How often each rfft2 coefficient occurs in the full D x D plane, (D, D//2+1).

    Column kx = 0 and (even D) kx = D/2 are their own Hermitian mirrors' columns and
    count once; every other column stands for itself and its conjugate at -k, twice.
    So sum over the full plane of g(|X_k|^2) = sum over rfft2 of w * g(|X_k|^2).
    """
    D = int(box)
    w = np.full((D, D // 2 + 1), 2.0)
    w[:, 0] = 1.0
    if D % 2 == 0:
        w[:, -1] = 1.0
    return w


def soft_disc(box: int, radius_px: float, edge_px: float) -> np.ndarray:
    """Real-space soft circular mask (D, D) about pixel (D//2, D//2), arrays [y, x].

    1 for r <= radius, 0 for r >= radius + edge, a raised cosine in between
    (0.5 (1 + cos(pi (r - radius) / edge))).
    """
    D = int(box)
    y, x = np.mgrid[0:D, 0:D].astype(np.float64) - D // 2
    r = np.sqrt(x ** 2 + y ** 2)
    edge = max(float(edge_px), 1e-9)
    t = np.clip((r - float(radius_px)) / edge, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def shell_sums(values: np.ndarray, box: int,
               weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Sum of ``values`` (..., D, K) over each integer shell, with Hermitian weights: (..., S)."""
    D = int(box)
    s = shell_index(D).ravel()
    w = hermitian_weights(D).ravel() if weights is None else np.asarray(weights).ravel()
    v = np.asarray(values).reshape(-1, s.size) * w
    S = n_shells(D)
    out = np.zeros((v.shape[0], S))
    for i in range(v.shape[0]):
        out[i] = np.bincount(s, weights=v[i], minlength=S)
    return out.reshape(np.asarray(values).shape[:-2] + (S,))


def shell_counts(box: int) -> np.ndarray:
    """Number of full-plane frequencies in each shell, (S,)."""
    return shell_sums(np.ones((int(box), int(box) // 2 + 1)), box)


# ----------------------------------------------------------------------------- model

class NoiseModel:
    """sigma2 (G, S) per optics group and shell (module docstring for the units).

    ``groups`` (G,) are the optics-group numbers of the particle file, ``counts`` (G,) the
    images each row was estimated from, ``method`` "background" or "residual",
    ``mask_radius`` the background mask radius (Angstrom; NaN for residuals).
    """

    def __init__(self, box: int, apix: float, groups: Sequence[int], sigma2: np.ndarray,
                 counts: Sequence, method: str, mask_radius: float = float("nan"),
                 info: Optional[dict] = None) -> None:
        self.box, self.apix = int(box), float(apix)
        self.groups = np.asarray(groups, dtype=np.int64).reshape(-1)
        self.sigma2 = np.asarray(sigma2, dtype=np.float64).reshape(len(self.groups), -1)
        self.counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        self.method = str(method)
        self.mask_radius = float(mask_radius)
        self.info = dict(info or {})
        if self.sigma2.shape[1] != n_shells(self.box):
            raise ValueError("sigma2 has %d shells, a %d px box has %d"
                             % (self.sigma2.shape[1], self.box, n_shells(self.box)))

    def row(self, group: int) -> int:
        """Index of optics group ``group`` in ``groups``."""
        hit = np.flatnonzero(self.groups == int(group))
        if hit.size == 0:
            raise NmaemError("optics group %d has no noise estimate (groups %s)"
                             % (int(group), ", ".join(map(str, self.groups.tolist()))))
        return int(hit[0])

    def grid(self, group: Optional[int] = None, box: Optional[int] = None) -> np.ndarray:
        """sigma2 on the rfft2 grid (D, D//2+1) of ``box`` (default the model's own box).

        A smaller box is a Fourier crop to pixel size apix * box0 / box: frequency index k
        is the same physical frequency, and cropped DFT coefficients are (box/box0)^2 times
        the original ones (``physics.fourier.fourier_crop``), so the power scales by (box/box0)^4.
        """
        g = self.row(self.groups[0] if group is None else group)
        d = self.box if box is None else int(box)
        if d > self.box:
            raise NmaemError("noise model of a %d px box used for %d px images"
                             % (self.box, d))
        s = shell_index(d)
        return self.sigma2[g][s] * (d / self.box) ** 4

    def save(self, path: str) -> str:
        from ..base.atomic import atomic_savez
        atomic_savez(path, format=np.int64(NOISE_FORMAT), box=np.int64(self.box),
                     apix=np.float64(self.apix), groups=self.groups, sigma2=self.sigma2,
                     counts=self.counts, method=np.array(self.method),
                     mask_radius=np.float64(self.mask_radius),
                     info=np.array(json.dumps(self.info)))
        return path


def whitening_filter(noise: "NoiseModel", box: int) -> np.ndarray:
    """The encoder's input filter (``network.Encoder``) on the rfft2 grid of ``box``, (D,
    D//2+1) float64: 1 / sqrt(sigma2(k)) of the noise model, the optics groups' spectra
    averaged with their image counts as weights, scaled to mean square 1 over the grid, and
    0 at the zero frequency (the images' mean carries no information: offsets, RELION's
    normalisation). Images filtered by it have white noise."""
    d = int(box)
    w = np.maximum(noise.counts.astype(np.float64), 1.0)
    sigma2 = sum(wg * noise.grid(g, box=d) for wg, g in zip(w, noise.groups)) / w.sum()
    if not np.all(np.isfinite(sigma2)) or np.any(sigma2 <= 0):
        raise NmaemError("the noise model has non-positive or non-finite power: it cannot "
                         "whiten the images")
    f = 1.0 / np.sqrt(sigma2)
    f[0, 0] = 0.0
    return f / np.sqrt(np.mean(f ** 2))


def load_noise_model(path: str) -> "NoiseModel":
    """Read a noise-model .npz written by :meth:`NoiseModel.save` (numpy only)."""
    d = read_npz(path, "noise model")
    need = ("format", "box", "apix", "groups", "sigma2", "counts", "method")
    missing = [k for k in need if k not in d]
    if missing:
        fail(path, "not a noise model (missing %s)" % ", ".join(missing))
    if int(d["format"]) > NOISE_FORMAT:
        fail(path, "noise model format %d is newer than this nmaem (%d)"
             % (int(d["format"]), NOISE_FORMAT))
    try:
        return NoiseModel(int(d["box"]), float(d["apix"]), d["groups"], d["sigma2"],
                          d["counts"], str(d["method"]),
                          float(d.get("mask_radius", np.nan)),
                          json.loads(str(d["info"])) if "info" in d else None)
    except ValueError as exc:
        fail(path, "inconsistent noise model: %s" % exc)


# ----------------------------------------------------------------------------- background

def background_kernel(mask: np.ndarray) -> np.ndarray:
    """K (S, S): E[shell sums of |rfft2(mask * n)|^2] = K @ P for stationary noise n.

    n has zero mean (its k = 0 coefficient is removed) and the DFT power P_i in shell i
    (constant within a shell). With M the DFT of the mask, the DFT of mask * n is the
    circular convolution (M * N) / D^2, so E|X_k|^2 = sum_q |M_{k-q}|^2 P(q) / D^4:
    column i is the full-plane convolution of |M|^2 with the indicator of shell i,
    summed over each shell j. Column 0 is zero (no DC power after the mean is removed).
    """
    D = mask.shape[-1]
    M2 = np.abs(np.fft.fft2(mask)) ** 2
    fM2 = np.fft.fft2(M2)
    ky = np.fft.fftfreq(D, d=1.0 / D)
    r = np.sqrt(ky[:, None] ** 2 + ky[None, :] ** 2)
    s_full = np.rint(r).astype(np.int64)
    S = n_shells(D)
    K = np.zeros((S, S))
    for i in range(1, S):
        ind = (s_full == i).astype(np.float64)
        if not ind.any():
            continue
        conv = np.real(np.fft.ifft2(fM2 * np.fft.fft2(ind))) / D ** 4
        K[:, i] = np.bincount(s_full.ravel(), weights=conv.ravel(), minlength=S)[:S]
    return K


class _GroupSums:
    def __init__(self, S):
        self.S = S
        self.sums, self.counts = {}, {}

    def add(self, group, shell_power):
        g = int(group)
        if g not in self.sums:
            self.sums[g] = np.zeros(self.S)
            self.counts[g] = 0
        self.sums[g] += shell_power
        self.counts[g] += 1


def _images_array(images, path):
    a = np.asarray(images, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        fail(path, "images must be square (n, D, D), got shape %s" % (a.shape,))
    return a


def estimate_background(batches: Iterable, box: int, apix: float, radius: float,
                        edge: Optional[float] = None, path: Optional[str] = None,
                        min_images: int = 2) -> "NoiseModel":
    """Noise model from the background of particle images (pixels outside a soft disc).

    ``batches`` yields (images (n, D, D), optics groups (n,)) pairs (numpy); ``radius`` is
    the mask radius in Angstrom (the particle's radius plus a margin), ``edge`` its cosine
    edge (default the wider of 2 px and 5 % of the radius).

    Each image minus its mean (which removes the noise's k = 0 term exactly and makes the
    estimate independent of an offset) is multiplied by 1 - disc; the shell sums of
    |rfft2|^2, averaged over the images of a group, equal K @ P in expectation
    (:func:`background_kernel`), and P is the least-squares solution over shells >= 1.
    Shell 0 (DC) is not estimable this way and is set to shell 1's value; it is outside
    every loss band anyway. Cost: one FFT per image plus S FFTs of D x D once.
    """
    D, apix = int(box), float(apix)
    rpx = float(radius) / apix
    epx = max(2.0, 0.05 * rpx) if edge is None else float(edge) / apix
    bg = 1.0 - soft_disc(D, rpx, epx)
    if bg.sum() < MIN_BACKGROUND_PIXELS:
        fail(path, "too few background pixels for a noise estimate: a mask of radius "
                   "%.1f A (+ %.1f A edge) leaves %.0f of %d pixels of the %d px box "
                   "(%.1f A wide); use a smaller radius"
             % (radius, epx * apix, bg.sum(), D * D, D, D * apix))
    S = n_shells(D)
    acc = _GroupSums(S)
    w = hermitian_weights(D)
    s = shell_index(D).ravel()
    for images, groups in batches:
        a = _images_array(images, path)
        if a.shape[1] != D:
            fail(path, "images of %d px for a %d px noise model" % (a.shape[1], D))
        finite = np.isfinite(a).all(axis=(1, 2))
        if not finite.all():
            fail(path, "%d image(s) with non-finite pixels" % int((~finite).sum()))
        a = a - a.mean(axis=(1, 2), keepdims=True)
        p = np.abs(np.fft.rfft2(a * bg)) ** 2 * w
        groups = np.broadcast_to(np.asarray(groups).reshape(-1), (len(a),))
        for img, g in zip(p.reshape(len(a), -1), groups):
            acc.add(g, np.bincount(s, weights=img, minlength=S))
    if not acc.sums:
        fail(path, "no images for a noise estimate")
    K = background_kernel(bg)
    gs = sorted(acc.sums)
    sig = np.zeros((len(gs), S))
    for r, g in enumerate(gs):
        if acc.counts[g] < min_images:
            fail(path, "optics group %d has %d image(s); a noise estimate needs at least %d"
                 % (g, acc.counts[g], min_images))
        m = acc.sums[g] / acc.counts[g]
        sol = np.linalg.lstsq(K[1:, 1:], m[1:], rcond=None)[0]
        sig[r, 1:] = sol
        sig[r, 0] = sol[0]
    _check_positive(sig, gs, path)
    return NoiseModel(D, apix, gs, sig, [acc.counts[g] for g in gs], "background",
                      mask_radius=float(radius), info=dict(edge=epx * apix))


def _check_positive(sig, groups, path):
    for r, g in enumerate(groups):
        row = sig[r, :]
        if not np.all(np.isfinite(row)) or np.all(row <= 0):
            fail(path, "optics group %d: no noise power (constant images?)" % g)
        # deconvolution noise may make a poorly sampled corner shell <= 0: floor it
        floor = 1e-3 * np.median(row[row > 0])
        sig[r, :] = np.maximum(row, floor)


# ----------------------------------------------------------------------------- residuals

class ResidualNoise:
    """Accumulates the residual spectrum Y - a R per optics group (RELION's sigma2_noise).

    ``add(images, rendered_ft, groups)``: images (n, D, D) real, ``rendered_ft`` (n, D, K)
    the rfft2 of the reference rendered at the file's pose, shift and CTF. The scale a
    of each image is the whitened least-squares one under ``prior`` (a NoiseModel, e.g.
    the background estimate; white when None), over 1 <= |k| < D/2; DC is excluded (the
    offset is a nuisance), so the residual's shell 0 is not estimated and copies shell 1.
    The fitted scale removes one of the ~pi D^2/4 degrees of freedom per image: the bias
    is negligible.
    """

    def __init__(self, box: int, apix: float, prior: Optional["NoiseModel"] = None) -> None:
        self.box, self.apix = int(box), float(apix)
        self.prior = prior
        self.S = n_shells(self.box)
        self._acc = _GroupSums(self.S)
        r = radius_grid(self.box)
        self._band = ((r >= 0.5) & (r < self.box / 2.0)) * hermitian_weights(self.box)
        self._s = shell_index(self.box).ravel()
        self.scales = []

    def add(self, images: np.ndarray, rendered_ft: np.ndarray, groups: Sequence[int],
            path: Optional[str] = None) -> None:
        Y = np.fft.rfft2(_images_array(images, path))
        R = np.asarray(rendered_ft)
        groups = np.broadcast_to(np.asarray(groups).reshape(-1), (len(Y),))
        w = hermitian_weights(self.box)
        for y, rr, g in zip(Y, R, groups):
            wt = self._band if self.prior is None else self._band / self.prior.grid(g)
            den = float(np.sum(wt * np.abs(rr) ** 2))
            a = float(np.sum(wt * np.real(y * np.conj(rr)))) / den if den > 0 else 0.0
            self.scales.append(a)
            res = y - a * rr
            res[0, 0] = 0.0
            p = (np.abs(res) ** 2 * w).ravel()
            self._acc.add(g, np.bincount(self._s, weights=p, minlength=self.S))

    def result(self, path: Optional[str] = None) -> "NoiseModel":
        if not self._acc.sums:
            fail(path, "no images for a noise estimate")
        counts = shell_counts(self.box)
        gs = sorted(self._acc.sums)
        sig = np.zeros((len(gs), self.S))
        for r, g in enumerate(gs):
            m = self._acc.sums[g] / self._acc.counts[g]
            sig[r, 1:] = m[1:] / counts[1:]
            sig[r, 0] = sig[r, 1]
        _check_positive(sig, gs, path)
        return NoiseModel(self.box, self.apix, gs, sig, [self._acc.counts[g] for g in gs],
                          "residual")


def estimate_from_particles(table: "ParticleTable", radius: float, n_per_group: int = 2000, seed: int = 0,
                            batch: int = 256,
                            log: Optional[Callable[[str], object]] = None) -> "NoiseModel":
    """Background noise model of a particle file (what ``prepare_run`` should call).

    ``table`` a ParticleTable with images (one box and pixel size), ``radius`` the mask
    radius in Angstrom (:func:`default_mask_radius` of the reference). Reads at most
    ``n_per_group`` random images of each optics group, ``batch`` at a time, through the
    stacks (``ImageStack``). Cost: one D x D FFT per image read (2000 images of 256 px: a few
    seconds of numpy) plus the reads.
    """
    from ..io.stacks import ImageStack
    table.require(poses=False, ctf=False, images=True)
    if len(np.unique(table.box)) != 1 or len(np.unique(table.apix)) != 1:
        fail(table.path, "particles of several box or pixel sizes; split the file by "
                         "optics group first")
    rng = np.random.default_rng(seed)
    rows = []
    for g in np.unique(table.optics_group):
        idx = np.flatnonzero(table.optics_group == g)
        rows.append(np.sort(rng.choice(idx, size=min(len(idx), int(n_per_group)),
                                       replace=False)))
    rows = np.concatenate(rows)
    D, apix = int(table.box[0]), float(table.apix[0])

    def batches():
        with ImageStack(table) as stack:
            for s in range(0, len(rows), int(batch)):
                r = rows[s:s + int(batch)]
                if log:
                    log("noise: %d/%d images" % (s + len(r), len(rows)))
                yield stack.read(r), table.optics_group[r]

    return estimate_background(batches(), D, apix, radius, path=table.path)


def default_mask_radius(coords: np.ndarray, box: int, apix: float,
                        margin: float = 10.0) -> float:
    """Background-mask radius (A): the model's radius about its centroid plus ``margin``.

    The particle sits at the image centre whatever the docking, so the model's own extent
    (not its distance from the box centre) sizes it. Never more than 0.45 of the box
    width; the caller may still get the 'too few background pixels' error.
    """
    x = np.asarray(coords, dtype=np.float64)
    r = float(np.sqrt(((x - x.mean(0)) ** 2).sum(1)).max()) + float(margin)
    return min(r, 0.45 * int(box) * float(apix))
