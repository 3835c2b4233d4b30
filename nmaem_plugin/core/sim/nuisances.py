"""The nuisances of real particles, for realistic simulations (``nmaem simulate``).

Particles written by RELION or cryoSPARC differ from the renderer's clean images in ways
that the method must survive (DESIGN.md, "Real particles"). Each nuisance here is one
switch of :class:`Nuisances`, off by default, and each keeps its ground truth. Definitions
(docs/simulation.md, "Nuisances of real data"):

* ``noise_falloff`` R >= 1: coloured Gaussian noise whose power spectrum falls
  log-linearly with spatial frequency, P(s) proportional to R ** (-s / s_N) (s_N the
  Nyquist frequency), so the noise power at Nyquist is R times lower than at zero
  frequency (detector DQE, ice, motion). The total noise variance is still set by the SNR.
  R = 1 is white noise.
* ``contrast_sd``: per-particle contrast a_i, log-normal with mean 1 and this standard
  deviation (ice thickness); the clean image is multiplied by a_i before the noise is added.
* ``offset_sd``: per-particle grey offset b_i ~ N(0, (offset_sd * sigma)^2), in units of
  the noise standard deviation sigma.
* ``normalise``: RELION's normalisation of each image (``relion_preprocess --norm``):
  subtract the mean and divide by the standard deviation of the background, the pixels
  outside a circle of radius ``bg_radius`` (fraction of the box half-width, RELION's
  default 0.75).
* ``angle_error_sd`` (degrees): the pose written to the STAR is E A_true, E a random
  rotation whose rotation vector has independent N(0, sd^2 / 3) components, so the rms
  angle between written and true rotations is ``angle_error_sd``.
* ``consensus_poses``: the poses (and origins) written are those a consensus refinement
  would give: it aligns the reference on each particle by the molecule's largest rigid
  part, so a particle of frame f gets A_file = A_true R_f^T, where R_f superposes frame
  f's rigid core on the reference's (x_ref ~ R_f (x_f - c) + c + t_f about the rotation
  centre c, Kabsch over the core atoms), and its origin moves by the core's translation
  seen at that pose, origin_file = origin_true + (A_file t_f)_xy. The error depends on the
  conformation, not on chance. The rigid core (:func:`rigid_core`) is the largest set of
  atoms that the frame farthest from the reference superposes within 1 A, found by
  iterative trimming (cutoffs 8, 4, 2, 1 A). With ``angle_error_sd`` too, the random
  error is applied on top: A_file = E A_true R_f^T.
* ``origin_error_sd`` (Angstrom): the origins written are the true ones plus N(0, sd^2) per
  axis.
* ``defocus_error_sd`` (Angstrom): the written defocus U and V are the true ones plus one
  N(0, sd^2) offset per particle (astigmatism unchanged).
* ``bfactor`` (A^2): an envelope exp(-B s^2 / 4) on the images (radiation damage, motion,
  thermal disorder) that the STAR does not carry.
* ``atom_jitter`` (Angstrom): each frame's atoms are displaced by a fixed N(0, sd^2) per
  coordinate, so no state of the data lies exactly in the span of the reference's normal
  modes; ``frames.pdb`` holds the displaced frames (the truth), ``reference.pdb`` the
  undisplaced reference.

Each nuisance draws from its own generator, ``numpy.random.default_rng([seed, k])`` with a
fixed k per nuisance, so switching one on or off changes neither the base draws (frames,
poses, defocus, shifts, noise) nor the other nuisances: ablations compare like with like.
"""
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..base.errors import NmaemError
from ..io.poses import rotvec_to_matrix

__all__ = ["Nuisances", "REALISTIC", "noise_filter", "coloured_noise", "relion_normalise",
           "random_rotation_errors", "rigid_core", "consensus_errors", "stream"]

# the stream index of each nuisance's generator (never reorder: ablations rely on it)
_STREAMS = dict(contrast=1, offset=2, angle=3, origin=4, defocus=5, jitter=6)


@dataclass(frozen=True)
class Nuisances:
    """The nuisances of real data applied by :func:`simulate.simulate` (module docstring)."""
    noise_falloff: float = 1.0
    contrast_sd: float = 0.0
    offset_sd: float = 0.0
    normalise: bool = False
    bg_radius: float = 0.75
    angle_error_sd: float = 0.0
    consensus_poses: bool = False
    origin_error_sd: float = 0.0
    defocus_error_sd: float = 0.0
    bfactor: float = 0.0
    atom_jitter: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("normalise", "consensus_poses"):
                continue
            if not math.isfinite(float(v)):
                raise NmaemError("--%s must be a finite number (got %r)"
                                 % (f.name.replace("_", "-"), v))
        if self.noise_falloff < 1.0:
            raise NmaemError("--noise-falloff must be >= 1 (noise power at zero frequency / at "
                             "Nyquist; 1 = white), got %g" % self.noise_falloff)
        for name in ("contrast_sd", "offset_sd", "angle_error_sd", "origin_error_sd",
                     "defocus_error_sd", "bfactor", "atom_jitter"):
            if getattr(self, name) < 0:
                raise NmaemError("--%s must be >= 0 (got %g)"
                                 % (name.replace("_", "-"), getattr(self, name)))
        if not 0.0 < self.bg_radius < 1.0:
            raise NmaemError("--bg-radius must be between 0 and 1 (a fraction of the box "
                             "half-width), got %g" % self.bg_radius)

    @property
    def any(self) -> bool:
        return self != Nuisances()

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> "Nuisances":
        return replace(self, **changes)


# All nuisances on, at levels typical of a good single-particle dataset (docs/simulation.md).
REALISTIC = Nuisances(noise_falloff=10.0, contrast_sd=0.2, offset_sd=1.0, normalise=True,
                      angle_error_sd=2.0, origin_error_sd=0.5, defocus_error_sd=300.0,
                      bfactor=50.0, atom_jitter=0.5)


def stream(seed: int, name: str) -> np.random.Generator:
    """The generator of nuisance ``name`` for a dataset ``seed`` (independent streams)."""
    return np.random.default_rng([int(seed), _STREAMS[name]])


def noise_filter(box: int, falloff: float,
                 device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """sqrt of the noise power shape on the full (D, D) FFT grid, mean power 1.

    P(s) = falloff ** (-s / s_N) with s = |k| / (D / 2) the frequency in units of Nyquist
    (s > 1 in the corners). Normalised so that mean_k P = 1: white noise filtered by
    sqrt(P) keeps its variance.
    """
    k = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64, device=device)
    s = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2) / (box / 2.0)
    p = torch.exp(-math.log(float(falloff)) * s)
    p = p / p.mean()
    return torch.sqrt(p)


def coloured_noise(shape: Sequence[int], sigma: float, falloff: float,
                   generator: Optional[torch.Generator] = None,
                   device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Gaussian noise (B, D, D) of standard deviation ``sigma`` with the power shape of
    :func:`noise_filter` (white for ``falloff`` = 1, drawn exactly as before then)."""
    noise = torch.randn(shape, generator=generator, device=device)
    if falloff != 1.0:
        f = noise_filter(shape[-1], falloff, device=device)
        noise = torch.fft.ifft2(torch.fft.fft2(noise.double()) * f).real.float()
    return noise.mul_(sigma)


def background_mask(box: int, radius: float,
                    device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Boolean (D, D) mask of the pixels outside radius ``radius`` * D/2 from the centre."""
    c = box // 2
    y, x = torch.meshgrid(torch.arange(box, device=device), torch.arange(box, device=device),
                          indexing="ij")
    return ((x - c) ** 2 + (y - c) ** 2).double() > (radius * box / 2.0) ** 2


def relion_normalise(images: torch.Tensor, radius: float = 0.75) -> torch.Tensor:
    """RELION's per-image normalisation: background (outside ``radius`` of the box
    half-width) to mean 0 and standard deviation 1. In place; returns ``images``."""
    bg = background_mask(images.shape[-1], radius, device=images.device)
    vals = images[:, bg]
    mean = vals.mean(1)
    sd = vals.std(1, unbiased=False).clamp_min(1e-30)
    images.sub_(mean[:, None, None]).div_(sd[:, None, None])
    return images


def random_rotation_errors(n: int, sd_deg: float, rng: np.random.Generator) -> np.ndarray:
    """(N, 3, 3) error rotations whose rotation vectors have N(0, sd^2/3) components
    (degrees), so the rms rotation angle is ``sd_deg``."""
    v = rng.normal(0.0, math.radians(sd_deg) / math.sqrt(3.0), (n, 3))
    return rotvec_to_matrix(v)



CORE_CUTOFFS = (8.0, 4.0, 2.0, 1.0)    # Angstrom: the trimming schedule of rigid_core
CORE_MIN_ATOMS = 10


def rigid_core(reference: np.ndarray, frames: np.ndarray,
               cutoffs: Sequence[float] = CORE_CUTOFFS) -> np.ndarray:
    """Boolean (M,) mask of the largest rigid part of a molecule (module docstring).

    The frame of ``frames`` (F, M, 3) farthest from ``reference`` (M, 3) after superposition
    is superposed on it over the kept atoms, atoms farther than the cutoff are dropped, and
    this repeats until the set is stable, for each cutoff in turn. At least
    ``CORE_MIN_ATOMS`` atoms are kept (the closest ones) so that the superposition is
    defined. A rigid molecule (one frame) keeps every atom.
    """
    from ..physics.structure import kabsch
    ref = np.asarray(reference, dtype=np.float64)
    frames = np.asarray(frames, dtype=np.float64)
    m = len(ref)
    keep = np.ones(m, dtype=bool)
    if len(frames) == 0:
        return keep
    dev = []
    for f in frames:
        R, t = kabsch(f, ref)
        dev.append(np.sqrt(np.mean(np.sum((f @ R.T + t - ref) ** 2, axis=1))))
    far = frames[int(np.argmax(dev))]
    for cut in cutoffs:
        for _ in range(100):
            R, t = kabsch(far[keep], ref[keep])
            d = np.linalg.norm(far @ R.T + t - ref, axis=1)
            new = d <= cut
            if new.sum() < min(CORE_MIN_ATOMS, m):
                new = np.zeros(m, dtype=bool)
                new[np.argsort(d)[:min(CORE_MIN_ATOMS, m)]] = True
            if np.array_equal(new, keep):
                break
            keep = new
    return keep


def consensus_errors(reference: np.ndarray, frames: np.ndarray, core: np.ndarray,
                     centre: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(R (F, 3, 3), t (F, 3)) per frame: x_ref - c ~ R (x_f - c) + t over the ``core`` atoms
    (Kabsch), with c the rotation ``centre``. A particle of frame f and true matrix A is
    written with A R^T and its origin plus (A R^T t)_xy (module docstring)."""
    from ..physics.structure import kabsch
    ref = np.asarray(reference, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64).reshape(3)
    Rs, ts = [], []
    for f in np.asarray(frames, dtype=np.float64):
        R, t = kabsch(f[core], ref[core])
        Rs.append(R)
        ts.append(R @ c + t - c)
    return np.stack(Rs), np.stack(ts)
