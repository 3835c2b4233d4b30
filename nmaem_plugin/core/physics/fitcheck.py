"""Does the reference explain the particles at their poses? (``nmaem check``; docs/likelihood.md)

The reference is rendered at each particle's pose, shift and CTF and scored with the
whitened correlation rho (core/physics/likelihood.py) under a noise model estimated from the
particles' background (core/physics/noise.py). The null is the same images scored against the
renderings of *other* particles' poses and shifts (each image keeps its own CTF). The check
passes when the real poses beat the shuffled ones by a paired z-score >= Z_PASS and no
alternative geometry (below) explains the images clearly better.

When something is wrong, it names the likely cause from measurements:

* ``contrast``: rho is significantly negative (inverted images);
* ``origin``: the model translated by +-(D//2) apix on all three axes fits clearly better
  (a map-origin convention: the model docked in a map whose origin is at its centre);
* ``offset``: a 3D translation of the model fits clearly better (not docked in the
  consensus map); it is estimated from per-particle 2D whitened cross-correlation peaks,
  solved by robust least squares for one 3D vector over the particles' different poses;
* ``pixel_size``: rendering with the pixel size apix / s (s in [0.8, 1.25]; rotation
  centre, CTF and origins follow) fits clearly better;
* ``hand``: the mirrored model (z -> 2c - z about the map centre) fits clearly better;
* ``no_fit``: none of these, and the real poses do not beat shuffled ones.

"Clearly better": paired z of the per-particle gain in rho >= Z_ALT and a mean gain of at
least MIN_GAIN of the alternative's mean rho.
"""
import math
from typing import TYPE_CHECKING, Callable, Optional, Union

import numpy as np

from ..base.errors import NmaemError, fail
from . import noise as noise_model

if TYPE_CHECKING:
    from ..io.table import ParticleTable
    from .structure import AtomicModel

# torch (and the likelihood module) are imported inside the functions: importing this
# module stays light. The ``nmaem check`` command is in cli.py.

__all__ = ["Z_PASS", "Z_ALT", "MIN_GAIN", "fit_check", "format_report", "CAUSES"]

Z_PASS = 5.0
Z_ALT = 5.0
MIN_GAIN = 0.10
SCALES = tuple(np.exp(np.linspace(math.log(0.8), math.log(1.25), 9)).tolist())
CAUSES = ("contrast", "origin", "offset", "pixel_size", "hand", "no_fit")


def _paired_z(x):
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(ddof=1) if len(x) > 1 else 0.0
    if sd == 0:
        return float("inf") * np.sign(x.mean()) if x.mean() != 0 else 0.0
    return float(x.mean() / (sd / math.sqrt(len(x))))


class _Scorer:
    """Renders a model at the particles' poses and scores the images (whitened rho)."""

    def __init__(self, model, table, images, noise_model, band, device, batch):
        import torch
        from .ctf import CTFParams
        from .renderer import Renderer
        self.device, self.batch = torch.device(device), int(batch)
        D, apix = int(table.box[0]), float(table.apix[0])
        self.D, self.apix = D, apix
        self.renderer = Renderer(model.elements, D, apix, centre=[(D // 2) * apix] * 3,
                                 device=self.device)
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32,
                                      device=self.device)
        self.A = t(table.rotation_matrices())
        self.shift = t(-table.origin_or_zero())
        self.ctf = self.renderer.ctf(CTFParams.from_table(table, self.device, torch.float32))
        x = torch.as_tensor(images, dtype=torch.float32, device=self.device)
        self.Y = band.images_ft(x)
        w0, _ = band.tensors(self.device)
        inv = np.stack([1.0 / noise_model.grid(g, box=D) for g in table.optics_group])
        self.W = w0 * torch.as_tensor(inv, dtype=torch.float32, device=self.device)
        self.band = band

    def project(self, coords):
        """Projections (no CTF) of ``coords`` (M, 3) at every particle's pose and shift."""
        import torch
        X = torch.as_tensor(np.asarray(coords), dtype=torch.float32, device=self.device)
        out = []
        with torch.no_grad():
            for s in range(0, len(self.A), self.batch):
                out.append(self.renderer.projection_ft(X, self.A[s:s + self.batch],
                                                       self.shift[s:s + self.batch]))
        return torch.cat(out)

    def fit(self, proj, perm=None, sign=1.0):
        import torch
        from .likelihood import whitened_fit
        P = proj if perm is None else proj[torch.as_tensor(perm, device=self.device)]
        R = self.band.rendered_ft(P * self.ctf)
        f = whitened_fit(sign * self.Y, R, self.W)
        return {k: v.cpu().numpy().astype(np.float64) for k, v in f.items()}

    def rho(self, coords, sign=1.0):
        return self.fit(self.project(coords), sign=sign)["rho"]

    def peak_shifts(self, proj, sign=1.0, max_px=None):
        """Per-particle shift (A, (x, y)) of the image content relative to the rendering.

        Peak of the whitened cross-correlation irfft2(W Y conj(R)) within ``max_px`` (default
        D/4) of zero, refined by a parabola through the peak and its neighbours on each axis.
        """
        import torch
        D = self.D
        max_px = D // 4 if max_px is None else int(max_px)
        R = self.band.rendered_ft(proj * self.ctf)
        cc = torch.fft.irfft2(self.W * sign * self.Y * R.conj(), s=(D, D)).cpu().numpy()
        idx = np.fft.fftfreq(D, 1.0 / D).astype(int)
        near = (np.abs(idx)[:, None] <= max_px) & (np.abs(idx)[None, :] <= max_px)
        out = np.zeros((len(cc), 2))
        for i, c in enumerate(cc):
            c = np.where(near, c, -np.inf)
            iy, ix = np.unravel_index(np.argmax(c), c.shape)

            def sub(f0, fm, fp):
                den = fm - 2 * f0 + fp
                return 0.0 if not np.isfinite(den) or den >= 0 else 0.5 * (fm - fp) / den
            dx = sub(c[iy, ix], c[iy, (ix - 1) % D], c[iy, (ix + 1) % D])
            dy = sub(c[iy, ix], c[(iy - 1) % D, ix], c[(iy + 1) % D, ix])
            out[i] = [idx[ix] + np.clip(dx, -0.5, 0.5), idx[iy] + np.clip(dy, -0.5, 0.5)]
        return out * self.apix


def solve_offset(shifts: np.ndarray, rotations: np.ndarray, delta: Optional[float] = None,
                 iterations: int = 20) -> np.ndarray:
    """3D model offset o (A) from per-particle 2D shifts: shifts_i = -A_i[:2] o, robustly.

    A model displaced by o from where the particles' map has it renders displaced by
    A_i[:2] o in image i, so the image content sits at -A_i[:2] o relative to the
    rendering. Least squares over all particles with Huber weights (``delta`` A, default
    the median absolute residual of a first plain solution times 1.5).
    """
    P = np.asarray(rotations, dtype=np.float64)[:, :2, :]          # (n, 2, 3)
    s = np.asarray(shifts, dtype=np.float64)                       # (n, 2)
    w = np.ones(len(s))
    o = np.zeros(3)
    for it in range(iterations):
        M = np.einsum("n,nij,nik->jk", w, P, P)
        b = -np.einsum("n,nij,ni->j", w, P, s)
        o = np.linalg.solve(M, b)
        r = np.linalg.norm(s + np.einsum("nij,j->ni", P, o), axis=1)
        if delta is None and it == 0:
            d = 1.5 * max(np.median(r), 1e-6)
        elif delta is not None:
            d = float(delta)
        w = np.where(r <= d, 1.0, d / np.maximum(r, 1e-12))
    return o


def _alternative(name, rho_alt, rho0, **estimates):
    gain = np.asarray(rho_alt) - rho0
    m_alt = float(np.mean(rho_alt))
    z = _paired_z(gain)
    accepted = bool(z >= Z_ALT and gain.mean() >= MIN_GAIN * abs(m_alt) and gain.mean() > 0)
    return dict(name=name, rho=m_alt, gain=float(gain.mean()), z=z, accepted=accepted,
                **estimates)


def fit_check(particles: Union[str, "ParticleTable"], ref: Union[str, "AtomicModel"],
              n: int = 300, seed: int = 0, device: Optional[str] = None, batch: int = 64,
              resolution_high: Optional[float] = None, shuffles: int = 4,
              mask_radius: Optional[float] = None,
              log: Optional[Callable[[str], object]] = None) -> dict:
    """Run the fit check; returns a dict (see module docstring and docs/likelihood.md).

    The images are Fourier-cropped to the smallest even box whose Nyquist is no finer than
    ``resolution_high`` (default max(Nyquist, 6 A)): the score uses nothing beyond it,
    and rendering cost grows with the box squared.

    Keys: ``verdict`` ("pass"/"fail"), ``cause`` (None or one of CAUSES), ``message`` (one
    line, naming the file), ``scores`` (rho, rho_null, z, effect_size, scale_median,
    n), ``estimates`` (offset_A, scale, pixel_size, ...), ``alternatives`` (list of dicts),
    ``noise`` (how sigma2 was estimated). ``particles`` is a path or a ParticleTable,
    ``ref`` a path or an AtomicModel.
    """
    import torch
    from .likelihood import Band
    from ..io.particles import read_particles
    from ..io.stacks import ImageStack
    from .structure import read_model
    log = log or (lambda *a, **k: None)
    table = read_particles(particles) if isinstance(particles, str) else particles
    path = table.path
    table.require(poses=True, ctf=True, images=True)
    model = read_model(ref) if isinstance(ref, str) else ref
    ref_path = ref if isinstance(ref, str) else (model.source or "reference")
    if table.n < 10:
        fail(path, "%d particle(s); the fit check needs at least 10" % table.n)
    if len(np.unique(table.box)) != 1 or len(np.unique(table.apix)) != 1:
        fail(path, "particles of several box or pixel sizes; split the file by optics group")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(table.n, size=min(int(n), table.n), replace=False))
    sub = table.subset(rows)
    with ImageStack(sub) as stack:
        images = stack.read(np.arange(sub.n))
    finite = np.isfinite(images).all(axis=(1, 2))
    if not finite.all():
        fail(path, "%d of the checked images have non-finite pixels" % int((~finite).sum()))
    D, apix = int(sub.box[0]), float(sub.apix[0])
    hi = resolution_high if resolution_high is not None else max(2.0 * apix, 6.0)
    if hi < 2.0 * apix * (1 - 1e-9):
        fail(path, "resolution_high %.3g A is beyond Nyquist (%.3g A at %.3g A/px)"
             % (hi, 2.0 * apix, apix))
    d = min(D, 2 * int(math.ceil(D * apix / hi - 1e-9)))
    if d < D and D % 2 == 0:
        from dataclasses import replace as _replace
        from .fourier import fourier_crop
        images = fourier_crop(torch.as_tensor(images), d).numpy()
        # even D and d: the centre pixel d//2 stays at (D//2) apix = (d//2) apix D / d
        apix = apix * D / d
        D = d
        sub = _replace(sub, box=np.full(sub.n, d), apix=np.full(sub.n, apix))

    # noise model from the background (the particles themselves), else whole images
    radius = noise_model.default_mask_radius(model.coords, D, apix) if mask_radius is None \
        else float(mask_radius)
    try:
        nm = noise_model.estimate_background([(images, sub.optics_group)], D, apix, radius,
                                        path=path)
        noise_how = "background outside %.0f A" % radius
    except NmaemError as exc:
        if "too few background pixels" not in str(exc):
            raise
        est = noise_model.ResidualNoise(D, apix)
        est.add(images, np.zeros((sub.n, D, D // 2 + 1), dtype=complex), sub.optics_group)
        nm = est.result(path)
        noise_how = "whole images (box too small for a background mask)"
    band = Band(D, apix, resolution_high=hi, path=path)
    sc = _Scorer(model, sub, images, nm, band, device, batch)
    X0 = np.asarray(model.coords, dtype=np.float64)
    c = (D // 2) * apix

    proj0 = sc.project(X0)
    f0 = sc.fit(proj0)
    rho = f0["rho"]
    nulls = []
    for k in range(shuffles):
        perm = rng.permutation(sub.n)
        nulls.append(sc.fit(proj0, perm=perm)["rho"])
    rho_null = np.mean(nulls, axis=0)
    d = rho - rho_null
    z = _paired_z(d)
    sd_null = float(np.std(np.concatenate(nulls), ddof=1))
    scores = dict(n=int(sub.n), rho=float(rho.mean()), rho_null=float(rho_null.mean()),
                  z=z, effect_size=float(d.mean() / sd_null) if sd_null > 0 else 0.0,
                  scale_median=float(np.median(f0["scale"])), resolution_high=hi)
    log("check: %d particles, %d px, %.3f A/px; mean whitened rho %.4f (shuffled poses "
        "%.4f), z = %.1f" % (sub.n, D, apix, scores["rho"], scores["rho_null"], z))

    estimates = dict(contrast=1.0)
    sign = 1.0
    z_neg = _paired_z(-rho)
    if z_neg >= Z_PASS:
        sign = -1.0
        estimates["contrast"] = -1.0
        rho = -rho
    alts = []
    # (b) map origin: +-(D//2) apix on every axis
    for sgn in (1.0, -1.0):
        o = np.full(3, sgn * c)
        alts.append(_alternative("origin", sc.rho(X0 + o, sign), rho, translation_A=o.tolist()))
    # (d) hand
    Xm = X0.copy()
    Xm[:, 2] = 2 * c - Xm[:, 2]
    alts.append(_alternative("hand", sc.rho(Xm, sign), rho))
    # (c) pixel size: the particles' true pixel size is apix / s. Render the model (as
    # docked, in Angstrom) with that pixel size: the rotation centre (D//2) apix / s, the
    # CTF on that frequency grid, the file's origins (written with the wrong pixel size,
    # right in pixels) divided by s, the same band in frequency pixels.
    from dataclasses import replace as _replace

    def rho_at_scale(s):
        if abs(s - 1.0) < 1e-9:
            return rho
        sub_s = _replace(sub, apix=sub.apix / s,
                         origin=None if sub.origin is None else sub.origin / s)
        band_s = Band(D, apix / s, resolution_high=hi / s, path=path)
        nm_s = noise_model.NoiseModel(D, apix / s, nm.groups, nm.sigma2, nm.counts, nm.method)
        return _Scorer(model, sub_s, images, nm_s, band_s, device, batch).rho(X0, sign)

    means = [float(np.mean(rho_at_scale(s))) for s in SCALES]
    i = int(np.argmax(means))
    s_best = SCALES[i]
    if 0 < i < len(SCALES) - 1:          # parabola in log s through the best three
        y0, y1, y2 = means[i - 1], means[i], means[i + 1]
        den = y0 - 2 * y1 + y2
        if den < 0:
            step = math.log(SCALES[i + 1] / SCALES[i])
            s_best = SCALES[i] * math.exp(step * 0.5 * (y0 - y2) / den)
    # one finer parabola (a third of the grid step) about the coarse optimum
    step = math.log(SCALES[1] / SCALES[0]) / 3.0
    trio = [s_best * math.exp(-step), s_best, s_best * math.exp(step)]
    rhos = [rho_at_scale(t) for t in trio]
    y0, y1, y2 = [float(np.mean(r)) for r in rhos]
    den = y0 - 2 * y1 + y2
    r_best = rhos[1]
    if den < 0:
        s_fine = s_best * math.exp(step * float(np.clip(0.5 * (y0 - y2) / den, -1.0, 1.0)))
        r_fine = rho_at_scale(s_fine)
        if np.mean(r_fine) >= y1:
            s_best, r_best = s_fine, r_fine
    alts.append(_alternative("pixel_size", r_best, rho, scale=float(s_best),
                             pixel_size=apix / s_best,
                             scan=dict(scales=list(SCALES), rho=means)))
    # (a) docking offset: 2D peaks -> 3D least squares, twice
    A = sub.rotation_matrices()
    o = np.zeros(3)
    for it in range(2):
        proj = proj0 if it == 0 else sc.project(X0 - o)
        o = o + solve_offset(sc.peak_shifts(proj, sign), A)
    alts.append(_alternative("offset", sc.rho(X0 - o, sign), rho, translation_A=(-o).tolist()))
    estimates["translation_A"] = (-o).tolist()
    estimates["scale"] = float(s_best)
    estimates["pixel_size"] = apix / float(s_best)
    estimates["hand_gain"] = alts[2]["gain"]

    accepted = [a for a in alts if a["accepted"]]
    cause, message = None, None
    if sign < 0:
        cause = "contrast"
        message = ("%s: inverted contrast: the reference correlates negatively with the "
                   "images at their poses (mean whitened rho %.3f, z = %.1f); protein must "
                   "be white (invert the images)" % (path, -scores["rho"], z_neg))
    elif accepted:
        top = max(accepted, key=lambda a: a["gain"])
        cause = top["name"]
        if cause == "offset" and np.all(np.abs(np.abs(top["translation_A"]) - c) <= 2 * apix):
            cause = "origin"
            top = dict(top, name="origin")
        if cause == "origin":
            o = np.asarray(top["translation_A"])
            message = ("%s: map origin convention: the model fits the particles of %s when "
                       "translated by (%+.1f, %+.1f, %+.1f) A = %s(D//2)*apix on every axis "
                       "(mean rho %.4f against %.4f as given, z = %.1f); place the model in "
                       "the consensus map's frame (origin at the corner of the box)"
                       % (ref_path, path, o[0], o[1], o[2], "+" if o[0] > 0 else "-",
                          top["rho"], scores["rho"], top["z"]))
        elif cause == "offset":
            o = np.asarray(top["translation_A"])
            message = ("%s: not docked in the consensus map of %s: the particles fit the model "
                       "best translated by (%+.1f, %+.1f, %+.1f) A (|t| = %.1f A; mean rho "
                       "%.4f against %.4f as given, z = %.1f)"
                       % (ref_path, path, o[0], o[1], o[2], np.linalg.norm(o),
                          top["rho"], scores["rho"], top["z"]))
        elif cause == "pixel_size":
            message = ("%s: wrong pixel size: the particles fit the model best at %.4g A/px, "
                       "not %.4g (x 1/%.3f; mean rho %.4f against %.4f, z = %.1f)"
                       % (path, top["pixel_size"], apix, top["scale"], top["rho"],
                                      scores["rho"], top["z"]))
        elif cause == "hand":
            message = ("%s: wrong hand: the mirrored model fits the particles of %s better "
                       "(mean rho %.4f against %.4f, z = %.1f); flip the hand of the model or "
                       "of the consensus map" % (ref_path, path, top["rho"], scores["rho"],
                                                  top["z"]))
    elif z < Z_PASS:
        cause = "no_fit"
        message = ("%s: the reference %s does not explain the particles at their poses "
                   "(mean whitened rho %.4f against %.4f with shuffled poses, z = %.1f < %g); "
                   "no docking offset, origin, pixel size, hand or contrast fault found"
                   % (path, ref_path, scores["rho"], scores["rho_null"], z, Z_PASS))
    verdict = "pass" if cause is None else "fail"
    if verdict == "pass":
        message = ("%s: the reference explains the particles at their poses: mean whitened "
                   "rho %.4f against %.4f with shuffled poses (z = %.1f >= %g)"
                   % (path, scores["rho"], scores["rho_null"], z, Z_PASS))
    return dict(verdict=verdict, cause=cause, message=message, scores=scores,
                estimates=estimates, alternatives=alts, noise=noise_how,
                particles=path, reference=ref_path, box=D, apix=apix)


def format_report(res: dict) -> str:
    """A few lines with the numbers measured."""
    s = res["scores"]
    lines = ["fit check of %s against %s: %s" % (res["reference"], res["particles"],
                                                 res["verdict"].upper()),
             "  %d particles, %d px, %.4g A/px, band to %.3g A, noise from %s"
             % (s["n"], res["box"], res["apix"], s["resolution_high"], res["noise"]),
             "  whitened rho %.4f at the file's poses, %.4f with shuffled poses: z = %.1f "
             "(pass >= %g), effect size %.2f, median scale %.4g"
             % (s["rho"], s["rho_null"], s["z"], Z_PASS, s["effect_size"], s["scale_median"])]
    for a in res["alternatives"]:
        extra = ""
        if "translation_A" in a:
            extra = " model moved by (%+.1f, %+.1f, %+.1f) A" % tuple(a["translation_A"])
        if "scale" in a:
            extra = " scale %.3f (%.4g A/px)" % (a["scale"], a["pixel_size"])
        lines.append("  %-10s rho %.4f gain %+.4f z %6.1f%s%s"
                     % (a["name"], a["rho"], a["gain"], a["z"], extra,
                        "  <- fits better" if a["accepted"] else ""))
    return "\n".join(lines)
