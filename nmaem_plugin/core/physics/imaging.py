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
import importlib
import math
import os
import threading
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..io import poses
from ..base.choices import RENDER_ROUTES

if TYPE_CHECKING:
    from ..io.particles import ParticleTable

TensorOrFloat = Union[torch.Tensor, float]   # a per-image (B,) tensor or one value for all
Device = Union[str, torch.device]
from ..base.errors import NmaemError

__all__ = ["euler_to_matrix", "matrix_to_euler", "rotvec_to_matrix", "correct_rotations",
           "electron_wavelength", "ctf_2d", "CTFParams", "FourierGrid",
           "phase_shift", "fourier_crop", "noise_sigma", "add_noise", "Renderer", "Chunks",
           "gemm_chunks", "jvp_chunks", "default_memory_budget", "parse_memory_budget",
           "nufft_available", "choose_route"]


ArrayOrTensor = Union[np.ndarray, torch.Tensor]   # numpy in, numpy out; tensors likewise


# ----------------------------------------------------------------------------- poses
# The conventions live in poses.py (numpy); these wrappers add tensors (autograd, devices).

def _as_tensor(x, dtype=None, device=None):
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype or x.dtype, device=device or x.device)
    return torch.as_tensor(np.asarray(x), dtype=dtype or torch.float64, device=device)


def euler_to_matrix(rot: ArrayOrTensor, tilt: ArrayOrTensor, psi: ArrayOrTensor,
                    degrees: bool = True) -> ArrayOrTensor:
    """RELION's rotation matrix A for Euler angles (rot, tilt, psi); batched, (..., 3, 3).

    Accepts numpy arrays or tensors; returns the same kind (numpy float64 for numpy input).
    The formulas are :func:`poses.euler_to_matrix`'s.
    """
    if not isinstance(rot, torch.Tensor):
        return poses.euler_to_matrix(rot, tilt, psi, degrees=degrees)
    r, t, p = torch.broadcast_tensors(*(_as_tensor(v) for v in (rot, tilt, psi)))
    return poses.euler_to_matrix(r, t, p, degrees=degrees, xp=torch)


def matrix_to_euler(A: ArrayOrTensor, degrees: bool = True
                    ) -> Tuple[ArrayOrTensor, ArrayOrTensor, ArrayOrTensor]:
    """Inverse of :func:`euler_to_matrix`: (rot, tilt, psi) with tilt in [0, 180].

    For tilt = 0 or 180 only rot + psi (or rot - psi) is defined; rot is then set to 0.
    Input (..., 3, 3), numpy or tensor; returns a tuple of three arrays of shape (...).
    """
    if not isinstance(A, torch.Tensor):
        return poses.matrix_to_euler(A, degrees=degrees)
    return poses.matrix_to_euler(A, degrees=degrees, xp=torch)


ROTVEC_TAYLOR = 1e-6     # |v|^2 (rad^2) below which the Rodrigues coefficients use Taylor series


def rotvec_to_matrix(v: ArrayOrTensor) -> torch.Tensor:
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


def correct_rotations(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A R(v): RELION matrices A (..., 3, 3) corrected by rotation vectors v (..., 3)
    radians on the right, the side documented in ``poses`` (tensors, differentiable)."""
    return A @ rotvec_to_matrix(v.to(A.dtype))


# ----------------------------------------------------------------------------- optics

def electron_wavelength(voltage_kv: Union[float, np.ndarray, torch.Tensor]
                        ) -> Union[float, np.ndarray, torch.Tensor]:
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV.

    lambda = h / sqrt(2 m0 e V (1 + e V / (2 m0 c^2))) = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))
    with V in volts (the same constants as RELION's CTF).
    """
    v = voltage_kv * 1e3
    if isinstance(v, torch.Tensor):
        return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


def ctf_2d(freq_x: torch.Tensor, freq_y: torch.Tensor, defocus_u: TensorOrFloat,
           defocus_v: TensorOrFloat, defocus_angle: TensorOrFloat, voltage: TensorOrFloat,
           cs: TensorOrFloat, amp_contrast: TensorOrFloat, phase_shift: TensorOrFloat = 0.0,
           bfactor: TensorOrFloat = 0.0) -> torch.Tensor:
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
        out = out * bfactor_envelope(s2, b)
    return out


def bfactor_envelope(s2: torch.Tensor, bfactor: TensorOrFloat) -> torch.Tensor:
    """exp(-B s^2 / 4): the B-factor envelope of :func:`ctf_2d` at squared spatial
    frequencies ``s2`` (1/A^2), B in A^2."""
    return torch.exp(-bfactor * s2 / 4.0)


def _numpy_dtype(dtype):
    return torch.empty(0, dtype=dtype).numpy().dtype


@dataclass(frozen=True)
class CTFParams:
    """The CTF and optics of a batch of particles: the arguments of :func:`ctf_2d`.

    Each field is a tensor or array of shape (B,) or a scalar, in :func:`ctf_2d`'s units:
    defocus U/V in Angstrom (positive = underfocus), defocus angle in degrees, voltage in
    kV, Cs in mm, amplitude contrast as a fraction, phase shift in degrees, B-factor in A^2.
    The field order is ``ctf_2d``'s, so ``CTFParams(*args, **kwargs)`` takes the arguments
    that ``Renderer.ctf`` always took. ``params[rows]`` selects particles (scalars are
    kept), ``params.to(device, dtype)`` makes every array a tensor, ``from_table`` reads a
    particle table (``particles.ParticleTable``).
    """
    defocus_u: Any
    defocus_v: Any
    defocus_angle: Any
    voltage: Any
    cs: Any
    amp_contrast: Any
    phase_shift: Any = 0.0
    bfactor: Any = 0.0

    @classmethod
    def from_table(cls, table: "ParticleTable", device: Union[str, torch.device, None] = None,
                   dtype: torch.dtype = torch.float32) -> "CTFParams":
        """The CTF of every particle of ``table`` (its ``ctf_bfactor`` is ``bfactor``) as
        tensors of ``dtype`` on ``device`` (the table's float64 arrays cast by numpy)."""
        return cls(defocus_u=table.defocus_u, defocus_v=table.defocus_v,
                   defocus_angle=table.defocus_angle, voltage=table.voltage, cs=table.cs,
                   amp_contrast=table.amp_contrast, phase_shift=table.phase_shift,
                   bfactor=table.ctf_bfactor).to(device, dtype)

    def as_dict(self) -> dict:
        """The fields by name (the keyword arguments of :func:`ctf_2d`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes) -> "CTFParams":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def to(self, device: Union[str, torch.device, None] = None,
           dtype: Optional[torch.dtype] = None) -> "CTFParams":
        """Tensors on ``device`` (None: where they are; numpy arrays: the CPU) of ``dtype``
        (None: unchanged). Numpy arrays are cast by numpy, then wrapped; scalars are kept."""
        def conv(v):
            if isinstance(v, torch.Tensor):
                return v.to(device=device, dtype=dtype)
            if isinstance(v, np.ndarray):
                a = v if dtype is None else np.asarray(v, dtype=_numpy_dtype(dtype))
                return torch.as_tensor(a, device=device)
            return v
        return CTFParams(**{k: conv(v) for k, v in self.as_dict().items()})

    def __getitem__(self, rows) -> "CTFParams":
        """The particles ``rows`` (an index, slice, mask or index tensor/array); scalar
        fields, shared by every particle, are kept."""
        def pick(v):
            if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim > 0:
                return v[rows]
            return v
        return CTFParams(**{k: pick(v) for k, v in self.as_dict().items()})

    def image(self, freq_x: torch.Tensor, freq_y: torch.Tensor) -> torch.Tensor:
        """:func:`ctf_2d` of these parameters on the frequencies ``freq_x``, ``freq_y``."""
        return ctf_2d(freq_x, freq_y, **self.as_dict())


def _ctf_params(args, kwargs):
    """A :class:`CTFParams` given alone, or built from ``ctf_2d``'s arguments."""
    if len(args) == 1 and not kwargs and isinstance(args[0], CTFParams):
        return args[0]
    return CTFParams(*args, **kwargs)


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
        return _ctf_params(args, kwargs).image(self.fx, self.fy)


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


def noise_sigma(clean: torch.Tensor, snr_db: float) -> float:
    """White-noise standard deviation for an SNR in dB over a batch of clean images.

    SNR = 10 log10(mean_i var(clean_i) / sigma^2), var over the pixels of each image.
    """
    var = torch.as_tensor(clean).reshape(len(clean), -1).var(dim=1, unbiased=False).mean()
    return float(torch.sqrt(var / 10.0 ** (snr_db / 10.0)))


def add_noise(images: torch.Tensor, sigma: float,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``images`` plus white Gaussian noise of standard deviation ``sigma``."""
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype,
                        device=images.device)
    return images + sigma * noise



GIB = 1024 ** 3
MIN_BUDGET = 64 * 1024 ** 2          # below this the renderer would crawl
MAX_CHUNK_ATOMS = 16384              # more atoms per chunk buys no speed (measured)


def available_memory(device: Device) -> int:
    """Bytes free now on ``device``: MemAvailable of /proc/meminfo on the CPU (the total
    when unreadable), the free memory of a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 * GIB


def default_memory_budget(device: Device) -> int:
    """The renderer's working-memory budget when none is given: a quarter of the available
    RAM on the CPU, half of the free memory of a GPU (the rest is for the encoder, the
    images and the other processes), never less than ``MIN_BUDGET``."""
    device = torch.device(device)
    share = 0.5 if device.type == "cuda" else 0.25
    return max(MIN_BUDGET, int(share * available_memory(device)))


def parse_memory_budget(value: Union[float, str, None]) -> Optional[int]:
    """``--memory-budget`` in GiB (a number; None or "auto": the device's default) -> bytes."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    gib = float(value)
    if not gib > 0:
        raise ValueError("the memory budget must be a positive number of GiB, not %r" % value)
    return max(1, int(gib * GIB))


@dataclass(frozen=True)
class Chunks:
    """How one batch is rendered within a memory budget: images ``batch`` at a time, atoms
    ``atoms`` at a time (per element), ``work`` bytes of working memory at most; ``keep``:
    the whole batch's cos/sin tables are kept for the backward pass (they fit the budget)
    instead of being recomputed chunk by chunk."""
    route: str
    batch: int
    atoms: int
    work: int
    keep: bool = False

    def describe(self) -> str:
        return ("%s route, %d image%s x %d atoms per chunk%s, working memory <= %.2f GiB"
                % (self.route, self.batch, "" if self.batch == 1 else "s", self.atoms,
                   " (tables kept for the backward pass)" if self.keep else "",
                   self.work / GIB))


def gemm_chunks(n_images: int, n_atoms: int, box: int, budget: int, itemsize: int = 4) -> Chunks:
    """Chunk sizes of the matrix-product route for ``n_images`` images of ``box`` px.

    Per atom and image the route holds two cos/sin tables of ``box`` values each (forward)
    and, in the backward pass, the two recomputed tables, their gradient and two half-size
    temporaries: 5 box values in all. Per image it holds the quarter-plane products, their
    gradient and one more product of the same size: 3 box^2 values. When the tables of the
    whole batch fit with room for one more pair (4 box values per atom and image), they are
    computed once and kept (``keep``: no recomputation). Otherwise chunks are the largest
    that fit ``budget`` bytes (at most ``MAX_CHUNK_ATOMS`` atoms; fewer images per chunk when
    each image would get fewer than 256 atoms).
    """
    per_atom = 5 * box * itemsize
    per_image = 3 * box * box * itemsize
    B, M = max(1, int(n_images)), max(1, int(n_atoms))
    whole = B * (per_image + 4 * box * itemsize * M)
    if whole <= budget:
        return Chunks("gemm", B, M, int(whole), keep=True)
    b, m = _chunk_sizes(B, M, per_image, per_atom, budget, MAX_CHUNK_ATOMS)
    return Chunks("gemm", b, m, int(b * (per_image + m * per_atom)))


def _chunk_sizes(B, M, per_image, per_atom, budget, max_atoms):
    """(images, atoms) per chunk: the most atoms (up to ``max_atoms``) that fit ``budget``
    bytes next to ``per_image`` bytes per image, the images halved while each would get
    fewer than 256 atoms; at least one of each."""
    b = B
    while b > 1 and budget - b * per_image < b * per_atom * min(M, 256):
        b = (b + 1) // 2
    m = max(1, min(M, max_atoms, (budget - b * per_image) // (b * per_atom)))
    return int(b), int(m)


JVP_GROUP = 8           # weighted sums per matrix product of Renderer.render_ft_jvp
MAX_JVP_ATOMS = 16384   # atoms per chunk of Renderer.render_ft_jvp
JVP_WORK = 4 * 1024 ** 2    # bytes of one weighted table on a CPU (a larger one is slower)
JVP_WORK_GPU = 256 * 1024 ** 2     # on a GPU: few large products (launches cost, not caches)


def jvp_chunks(n_images: int, n_atoms: int, n_tangents: int, box: int, budget: int,
               itemsize: int = 4, work: int = JVP_WORK) -> Chunks:
    """Chunk sizes of :meth:`Renderer.render_ft_jvp` for ``n_images`` images of ``box`` px
    and ``n_tangents`` (T) tangents, within ``budget`` bytes.

    Per atom and image it holds the two cos/sin tables (2 box values) and the 2T tangent
    weights with their einsum's temporary (4T values). Per image it holds the quarter-plane
    sums of the structure factor and of its 2T weighted versions, one group's product
    (``JVP_GROUP`` = g weights) and the assembly's temporaries (at most 6 box^2):
    (7 + 2T + g) box^2 values. The right table weighted by one group takes at most
    ``work`` bytes more (or one image's). The outputs (F and J, complex) are not
    counted. The largest chunks that fit, as :func:`gemm_chunks` (at most
    ``MAX_JVP_ATOMS`` atoms); the tables are never kept (there is no backward pass).
    """
    T = max(0, int(n_tangents))
    g = min(JVP_GROUP, 2 * T)
    per_atom = (2 * box + 4 * T) * itemsize
    per_image = (7 + 2 * T + g) * box * box * itemsize
    B, M = max(1, int(n_images)), max(1, int(n_atoms))
    b, m = _chunk_sizes(B, M, per_image, per_atom, max(1, budget - work), MAX_JVP_ATOMS)
    return Chunks("gemm", b, m, int(b * (per_image + m * per_atom) + work))


def _phase_tables(x, w, h):
    """cos and sin of x[..., None] * w side by side, (..., 2h)."""
    t = x[..., None] * w
    out = x.new_empty(*x.shape, 2 * h)
    torch.cos(t, out=out[..., :h])
    torch.sin(t, out=out[..., h:])
    return out


def _atom_chunks(slices, size):
    """(element index, atom slice) pairs covering every element's slice in pieces of ``size``."""
    for e, sl in enumerate(slices):
        for s in range(sl.start, sl.stop, size):
            yield e, slice(s, min(sl.stop, s + size))


class _QuarterStructureFactor(torch.autograd.Function):
    """P[b] = sum_e ff_e * (L_e^T @ R_e), L = [cos ty | sin ty], R = [cos tx | sin tx].

    tx = -2 pi k u / D, ty = -2 pi k v / D for k = 0..h-1 (h = D/2), atoms sorted by
    element so that element e is the row slice ``slices[e]``. The sum runs over chunks of
    ``chunks.batch`` images and ``chunks.atoms`` atoms. With ``chunks.keep`` the tables of
    the whole batch are made once and kept for the backward pass; otherwise only the
    positions are kept and the backward pass recomputes each chunk's tables, so that the
    tables of one chunk only are in memory at any time. Either way the backward pass turns
    the gradient of P into position gradients with two more matrix products per chunk
    (exact: the same sums, in pieces).
    """

    @staticmethod
    def forward(ctx, u, v, k, ff_tiled, slices, chunks):
        h = k.shape[0]
        w = (-2.0 * math.pi / (2 * h)) * k
        B = u.shape[0]
        P = u.new_zeros(B, 2 * h, 2 * h)
        tables = (_phase_tables(u, w, h), _phase_tables(v, w, h)) if chunks.keep else None
        for bs, e, sl, right, left in _chunk_tables(u, v, w, h, slices, chunks, tables):
            term = torch.matmul(left.transpose(-1, -2), right)
            del left, right
            P[bs].addcmul_(term, ff_tiled[e])
            del term
        if chunks.keep:
            ctx.save_for_backward(u, v, w, ff_tiled, *tables)
        else:
            ctx.save_for_backward(u, v, w, ff_tiled)
        ctx.slices, ctx.chunks = slices, chunks
        return P

    @staticmethod
    def backward(ctx, gP):
        u, v, w, ff_tiled, *tables = ctx.saved_tensors
        h = w.shape[0]
        gu = torch.empty_like(u)
        gv = torch.empty_like(v)
        G = None
        for bs, e, sl, ri, le in _chunk_tables(u, v, w, h, ctx.slices, ctx.chunks,
                                               tables or None):
            if G is None or (bs, e) != G[:2]:
                G = (bs, e, gP[bs] * ff_tiled[e])
            # d cos(w u)/du = -w sin(w u), d sin(w u)/du = w cos(w u)
            g = torch.matmul(le, G[2])                                   # dL/dright
            t = g[..., h:] * ri[..., :h]
            t.addcmul_(g[..., :h], ri[..., h:], value=-1.0)
            gu[bs, sl] = torch.matmul(t, w)
            del g, t
            g = torch.matmul(ri, G[2].transpose(-1, -2))                 # dL/dleft
            t = g[..., h:] * le[..., :h]
            t.addcmul_(g[..., :h], le[..., h:], value=-1.0)
            gv[bs, sl] = torch.matmul(t, w)
            del g, t, le, ri
        return gu, gv, None, None, None, None


def _chunk_tables(u, v, w, h, slices, chunks, tables=None):
    """(image slice, element, atom slice, right table, left table) for every chunk, the
    tables sliced from ``tables`` (the whole batch's) or made for the chunk."""
    B = u.shape[0]
    for b0 in range(0, B, chunks.batch):
        bs = slice(b0, min(B, b0 + chunks.batch))
        for e, sl in _atom_chunks(slices, chunks.atoms):
            if tables is not None:
                yield bs, e, sl, tables[0][bs, sl], tables[1][bs, sl]
            else:
                yield bs, e, sl, _phase_tables(u[bs, sl], w, h), _phase_tables(v[bs, sl], w, h)


def _assemble_quarters(P, h):
    """The rfft2 grid (..., 2h, h + 1) complex from the quarter-plane sums P (..., 2h, 2h)
    = [[CC, CS], [SC, SS]] (``Renderer.projection_ft``): F(kx, +ky) = (CC - SS) + i (CS + SC),
    F(kx, -ky) = (CC + SS) + i (CS - SC); the row ky = -h and the column kx = h are zero."""
    CC, CS = P[..., :h, :h], P[..., :h, h:]
    SC, SS = P[..., h:, :h], P[..., h:, h:]
    re_pos, im_pos = CC - SS, CS + SC                    # ky = 0 .. h-1
    re_neg, im_neg = CC + SS, CS - SC                    # ky = 0 .. -(h-1)
    zero_row = P.new_zeros(*P.shape[:-2], 1, h)
    re = torch.cat([re_pos, zero_row, torch.flip(re_neg[..., 1:, :], dims=(-2,))], dim=-2)
    im = torch.cat([im_pos, zero_row, torch.flip(im_neg[..., 1:, :], dims=(-2,))], dim=-2)
    ft = torch.complex(re, im)                           # (..., D, h); kx = h is zero
    return torch.nn.functional.pad(ft, (0, 1))


def nufft_available() -> bool:
    """Whether the optional FINUFFT package (``pip install finufft``, CPU) can be imported."""
    try:
        importlib.import_module("finufft")
    except ImportError:
        return False
    return True


NUFFT_CROSSOVER = 2e8                # M D^2 from which the NUFFT is faster (bench/render.py)
NUFFT_UPSAMPLING = 1.25           # FINUFFT's fine grid (1.25 D): faster than 2 D here
NUFFT_EPS = 3e-5                     # FINUFFT tolerance: images within ~1e-5, gradients ~2e-5


class _NufftPlans:
    """FINUFFT type-1 plans of one renderer (2D, FFT order, sign -1): D x D modes for the
    forward pass, (D + 2) x (D + 2) for the adjoint of the backward pass (both gradients
    in one transform, ``_NufftStructureFactor``).

    Each plan is single-threaded; the images of a batch go to ``torch.get_num_threads()``
    worker threads, each with its own plans (FINUFFT's calls release the GIL). Measured on
    the shared 2-core machine: FINUFFT's own OpenMP threads next to torch's were 3.6x
    *slower* than one thread (docs/benchmarks.md), images in parallel threads are not.
    """

    def __init__(self, box, dtype):
        cdt = "complex128" if dtype == torch.float64 else "complex64"
        self.real = np.float64 if dtype == torch.float64 else np.float32
        self.complex = np.dtype(cdt)
        self._kw = dict(eps=NUFFT_EPS, isign=-1, dtype=cdt, modeord=1,
                        upsampfac=NUFFT_UPSAMPLING, nthreads=1, debug=0, spread_debug=0)
        self.box = int(box)
        self._local = threading.local()
        self._pool, self._workers = None, 0
        self._grids = {}

    def plans(self):
        """This thread's (one-transform, two-transform) plans, made on first use."""
        p = getattr(self._local, "plans", None)
        if p is None:
            import finufft
            n = self.box + 2            # the adjoint's grid: frequencies -D/2-1 .. D/2
            p = self._local.plans = (finufft.Plan(1, (self.box, self.box), n_trans=1, **self._kw),
                                     finufft.Plan(1, (n, n), n_trans=1, **self._kw))
        return p

    def adjoint_grid(self, h: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where the half plane's entries (D, h) and their mirrors -k go on the adjoint's
        (D + 2)^2 grid (flat indices, each set unique), and (kx + i ky) / 2i at the
        frequencies the forward transform used (column D/2 is -D/2). Made once."""
        key = ("adjoint", int(h))
        if key not in self._grids:
            D, N = self.box, self.box + 2
            fy = np.rint(np.fft.fftfreq(D, 1.0 / D)).astype(np.int64)[:, None] \
                * np.ones(h, np.int64)
            fx = np.where(np.arange(h) < D // 2, np.arange(h), np.arange(h) - D)[None, :] \
                * np.ones((D, 1), np.int64)
            at = ((fy % N) * N + fx % N).ravel()
            mirror = (((-fy) % N) * N + (-fx) % N).ravel()
            self._grids[key] = (at, mirror, (fx + 1j * fy).astype(self.complex) / 2j)
        return self._grids[key]

    def each_image(self, fn, n):
        """fn(b) for b = 0..n-1, in up to torch.get_num_threads() threads."""
        workers = min(int(n), max(1, torch.get_num_threads()))
        if workers <= 1:
            for b in range(n):
                fn(b)
            return
        if self._workers != workers:
            if self._pool is not None:
                self._pool.shutdown()
            from concurrent.futures import ThreadPoolExecutor
            self._pool, self._workers = ThreadPoolExecutor(workers), workers
        for f in [self._pool.submit(fn, b) for b in range(n)]:
            f.result()


def _wrapped_angles(x, D, real):
    """2 pi x / D wrapped into [0, 2 pi), as a contiguous numpy array (FINUFFT's points)."""
    a = torch.remainder(x.detach().double() * (2.0 * math.pi / D), 2.0 * math.pi)
    return np.ascontiguousarray(a.cpu().numpy().astype(real))


class _NufftStructureFactor(torch.autograd.Function):
    """F[b, ky, kx] = sum_e ff_e(k) sum_{j in e} exp(-2 pi i (kx u_j + ky v_j) / D) on the
    half plane kx = 0..h-1 (all ky, FFT order), as (B, D, h, 2) real/imaginary parts.

    A type-1 non-uniform FFT per image and element (FINUFFT, tolerance ``NUFFT_EPS``); the
    column kx = D/2 of the half plane is the transform's frequency -D/2 (FFT order). The
    backward pass is the adjoint: with G the gradient of F (real + i imaginary part) and
    c_k = ff_e(k) G_k, dL/du_j = -(2 pi / D) Im sum_k kx c_k exp(+2 pi i k.(u_j, v_j) / D),
    and the same with ky for v (k over the entries of the half plane, at the frequencies
    the forward pass used). Im sum_k a_k e^{ik.x} = sum over the full plane of d e^{ik.x}
    with d_k = a_k / 2i and d_-k = conj(a_k / 2i) (a Hermitian array: a real sum), so
    both gradients are the real and imaginary parts of ONE adjoint (type-2) transform of
    T = d^u + i d^v on a (D + 2)^2 grid, which holds every mirrored frequency (+-D/2).
    """

    @staticmethod
    def forward(ctx, u, v, ff_half, slices, plans):
        B = u.shape[0]
        E, D, h = ff_half.shape
        x = _wrapped_angles(u, D, plans.real)
        y = _wrapped_angles(v, D, plans.real)
        ff = ff_half.detach().cpu().numpy()
        out = np.zeros((B, D, h), dtype=plans.complex)

        def image(b):
            one, _ = plans.plans()
            for e, sl in enumerate(slices):
                if sl.stop == sl.start:
                    continue
                one.setpts(y[b, sl], x[b, sl])           # first axis: ky (rows)
                S = one.execute(np.ones(sl.stop - sl.start, dtype=plans.complex))
                out[b] += ff[e] * S[:, :h]

        plans.each_image(image, B)
        ctx.save_for_backward(u, v, ff_half)
        ctx.slices, ctx.plans, ctx.points = slices, plans, (x, y)
        return torch.view_as_real(torch.from_numpy(out)).to(device=u.device, dtype=u.dtype)

    @staticmethod
    def backward(ctx, gF):
        u, v, ff_half = ctx.saved_tensors
        plans = ctx.plans
        B = u.shape[0]
        E, D, h = ff_half.shape
        x, y = ctx.points                       # the forward pass's points
        ff = ff_half.detach().cpu().numpy()
        G = gF.detach().cpu().numpy().astype(plans.real)
        G = G[..., 0] + 1j * G[..., 1]                              # (B, D, h)
        at, mirror, kxy = plans.adjoint_grid(h)
        N = D + 2
        gu = np.zeros(u.shape, dtype=np.float64)
        gv = np.zeros(v.shape, dtype=np.float64)
        def image(b):
            _, adj = plans.plans()
            T = np.zeros(N * N, dtype=plans.complex)
            for e, sl in enumerate(ctx.slices):
                if sl.stop == sl.start:
                    continue
                fG = (ff[e] * G[b]).astype(plans.complex)
                T[:] = 0
                T[at] = (kxy * fG).ravel()                           # d^u + i d^v at k
                T[mirror] -= (kxy * np.conj(fG)).ravel()   # at -k: conj(fG / 2i) (kx + i ky)
                adj.setpts(y[b, sl], x[b, sl])
                H = adj.execute_adjoint(T.reshape(N, N))             # (M_e,)
                gu[b, sl] = H.real
                gv[b, sl] = H.imag

        plans.each_image(image, B)
        s = -2.0 * math.pi / D
        t = lambda a: torch.from_numpy(a * s).to(device=u.device, dtype=u.dtype)
        return t(gu), t(gv), None, None, None


def choose_route(n_atoms: int, box: int, device: Device, dtype: torch.dtype = torch.float32
                 ) -> str:
    """The faster structure-factor route for ``n_atoms`` atoms at ``box`` px on ``device``.

    The type-1 NUFFT (FINUFFT: CPU, float32, when installed) once the matrix products'
    cost, which grows as M D^2, exceeds ``NUFFT_CROSSOVER`` (measured with bench/render.py,
    docs/benchmarks.md; the NUFFT's cost grows as M + D^2 log D); the exact matrix products
    otherwise, and always in float64 (the reference precision).
    """
    if (torch.device(device).type != "cpu" or dtype != torch.float32
            or not nufft_available()):
        return "gemm"
    return "nufft" if int(n_atoms) * int(box) ** 2 >= NUFFT_CROSSOVER else "gemm"


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

    def __init__(self, elements: Sequence[str], box: int, apix: float,
                 centre: Optional[Sequence[float]] = None, box0: Optional[int] = None,
                 apix0: Optional[float] = None, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, memory_budget: Optional[int] = None,
                 route: str = "auto"):
        from .structure import form_factor_table
        if route not in RENDER_ROUTES:
            raise ValueError("unknown renderer route %r (choose from %s)"
                             % (route, ", ".join(RENDER_ROUTES)))
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
        quarter = quarter / self.apix ** 2
        self._ff_tiled = quarter.to(dtype).repeat(1, 2, 2).contiguous()
        self._k_half = k.to(dtype)
        self.n_atoms = len(order)
        self.memory_budget = (default_memory_budget(self.device) if memory_budget is None
                              else max(1, int(memory_budget)))
        self.route = route
        self._ff_half = None        # the NUFFT route's form factors, made when first used
        self._plans = None

    def chunks(self, n_images: int) -> Chunks:
        """The route and chunk sizes used for a batch of ``n_images`` (see :func:`gemm_chunks`)."""
        route = self.route
        if route == "auto":
            route = choose_route(self.n_atoms, self.box, self.device, self.dtype)
        if route == "nufft":
            if not nufft_available():
                raise NmaemError("--renderer nufft needs the optional FINUFFT package (pip "
                                 "install finufft); use --renderer auto or gemm")
            if self.device.type != "cpu":
                raise NmaemError("--renderer nufft runs on the CPU only, not on %s; use "
                                 "--renderer auto or gemm" % self.device)
            # per image: the result, its gradient and FINUFFT's upsampled grid (2D x 2D)
            itemsize = torch.finfo(self.dtype).bits // 8
            work = n_images * 4 * self.box * self.box * itemsize + 24 * self.box ** 2 * itemsize
            return Chunks("nufft", max(1, int(n_images)), self.n_atoms, int(work))
        itemsize = torch.finfo(self.dtype).bits // 8
        return gemm_chunks(n_images, self.n_atoms, self.box, self.memory_budget, itemsize)

    def _nufft_form_factors(self):
        """(E, D, h) form factors on the half plane kx = 0..h-1, ky in FFT order."""
        if self._ff_half is None:
            h = self.box // 2
            quarter = self._ff_tiled[:, :h, :h]
            ky = torch.fft.fftfreq(self.box, d=1.0 / self.box).abs().long().clamp(max=h - 1)
            ff = quarter[:, ky, :].clone()
            ff[:, h, :] = 0                 # ky = -D/2: outside the disc
            self._ff_half = ff.contiguous()
            self._plans = _NufftPlans(self.box, self.dtype)
        return self._ff_half

    def positions(self, coords: torch.Tensor, rotations: torch.Tensor,
                  shifts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image-plane positions in pixels from the array origin, (B, M, 2) (u = x, v = y).

        ``coords`` (M, 3) or (B, M, 3) Angstrom in the model frame, ``rotations`` (B, 3, 3)
        RELION matrices, ``shifts`` (B, 2) Angstrom displacement of the particle centre.
        """
        r = coords - self.centre
        p = torch.matmul(r, rotations[:, :2, :].transpose(-1, -2))      # (B, M, 2)
        if shifts is not None:
            p = p + shifts[:, None, :]
        return p / self.apix + float(self.box // 2)

    def projection_ft(self, coords: torch.Tensor, rotations: torch.Tensor,
                      shifts: Optional[torch.Tensor] = None) -> torch.Tensor:
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
        chunks = self.chunks(uv.shape[0])
        if chunks.route == "nufft":
            F = _NufftStructureFactor.apply(uv[..., 0], uv[..., 1], self._nufft_form_factors(),
                                            self.slices, self._plans)
            return torch.nn.functional.pad(torch.complex(F[..., 0], F[..., 1]), (0, 1))
        P = _QuarterStructureFactor.apply(uv[..., 0], uv[..., 1], self._k_half,
                                          self._ff_tiled, self.slices, chunks)
        return _assemble_quarters(P, h)

    def ctf(self, *args, **kwargs) -> torch.Tensor:
        """CTF (B, D, K) on this renderer's grid: ``ctf(params)`` with a :class:`CTFParams`,
        or ``ctf(defocus_u, defocus_v, defocus_angle, voltage, cs, amp_contrast,
        phase_shift=0.0, bfactor=0.0)`` (see :func:`ctf_2d` for the units)."""
        return self.grid.ctf(_ctf_params(args, kwargs))

    def render_ft(self, coords: torch.Tensor, rotations: torch.Tensor,
                  shifts: Optional[torch.Tensor] = None,
                  ctf: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rfft2 of the rendered images: projection, times the CTF (B, D, K) when given."""
        ft = self.projection_ft(coords, rotations, shifts)
        if ctf is not None:
            ft = ft * ctf
        return ft

    def jvp_chunks(self, n_images: int, n_tangents: int) -> Chunks:
        """The chunks of :meth:`render_ft_jvp` for a batch of ``n_images`` and
        ``n_tangents`` tangents (see :func:`jvp_chunks`)."""
        itemsize = torch.finfo(self.dtype).bits // 8
        return jvp_chunks(n_images, self.n_atoms, n_tangents, self.box, self.memory_budget,
                          itemsize, self._jvp_work())

    def _jvp_work(self) -> int:
        """Bytes of one weighted table of :meth:`render_ft_jvp`: ``JVP_WORK`` on a CPU,
        up to ``JVP_WORK_GPU`` (a quarter of the budget at most) on a GPU."""
        if self.device.type == "cpu":
            return JVP_WORK
        return max(JVP_WORK, min(JVP_WORK_GPU, self.memory_budget // 4))

    def render_ft_jvp(self, coords: torch.Tensor, rotations: torch.Tensor,
                      shifts: Optional[torch.Tensor] = None,
                      ctf: Optional[torch.Tensor] = None,
                      tangents: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(F, J): :meth:`render_ft` (B, D, K) complex and its exact derivatives
        (T + 2, B, D, K): along each of the T ``tangents`` of the atoms, then with respect
        to the shift's x and y (per Angstrom). No gradients (autograd is not used).

        ``coords``, ``rotations``, ``shifts``, ``ctf`` as in :meth:`render_ft`; ``tangents``
        (T, M, 3), or (T, B, M, 3) per image, are displacements of the atoms in the model
        frame, Angstrom per unit of each parameter (e.g. the normal modes, for derivatives
        per Angstrom of amplitude), in the order of ``coords``; None: T = 0.

        Always the matrix-product route, whatever ``route`` (exact; on a NUFFT renderer F
        differs from :meth:`render_ft` by the NUFFT's error). A tangent moves atom j in the
        image plane by (du_j, dv_j) = A[:2] U_j / apix pixels, and with
        e_j(k) = exp(-2 pi i (kx u_j + ky v_j) / D) the derivative of F is
        -2 pi i / D (kx G_u + ky G_v) times the CTF, where G_u = sum_j f_j du_j e_j and
        G_v likewise are the structure factor with the atoms weighted by du and dv: the same
        cos/sin tables as F, each weighted sum one more matrix product (2T in all, grouped
        ``JVP_GROUP`` at a time). A shift moves every atom by 1/apix pixels: its derivative
        is -2 pi i kx / (D apix) F (and ky for y). Chunks of images and atoms within the
        memory budget (:func:`jvp_chunks`); the sums are the same, in pieces.
        """
        D, h = self.box, self.box // 2
        with torch.no_grad():
            coords = coords.to(dtype=self.dtype)
            A = rotations.to(self.dtype)
            uv = self.positions(coords[..., self.order, :], A,
                                None if shifts is None else shifts.to(self.dtype))
            B = uv.shape[0]
            if tangents is None:
                tangents = coords.new_zeros(0, self.n_atoms, 3)
            U = tangents.to(dtype=self.dtype)[..., self.order, :]
            T = U.shape[0]
            per_image = U.dim() == 4
            A2 = A[:, :2, :] / self.apix                              # (B, 2, 3)
            w = (-2.0 * math.pi / D) * self._k_half
            kx, ky = self.grid.kx, self.grid.ky
            cdtype = torch.complex128 if self.dtype == torch.float64 else torch.complex64
            F = torch.zeros(B, D, h + 1, dtype=cdtype, device=self.device)
            J = torch.zeros(T + 2, B, D, h + 1, dtype=cdtype, device=self.device)
            chunks, work = self.jvp_chunks(B, T), self._jvp_work()
            group = max(1, min(JVP_GROUP, 2 * T))
            for b0 in range(0, B, chunks.batch):
                bs = slice(b0, min(B, b0 + chunks.batch))
                b = bs.stop - bs.start
                P = uv.new_zeros(b, D, D)
                # the weighted sums, side by side: weight s < T is du of tangent s, s >= T
                # is dv of tangent s - T
                Q = uv.new_zeros(b, D, 2 * T, D)
                for e, sl in _atom_chunks(self.slices, chunks.atoms):
                    right = _phase_tables(uv[bs, sl, 0], w, h)       # (b, m, D)
                    left = _phase_tables(uv[bs, sl, 1], w, h).transpose(-1, -2)
                    ff = self._ff_tiled[e]
                    P.addcmul_(torch.matmul(left, right), ff)
                    if not T:
                        continue
                    m = sl.stop - sl.start
                    if per_image:
                        W = torch.einsum("tbmc,bac->bmat", U[:, bs, sl], A2[bs])
                    else:
                        W = torch.einsum("tmc,bac->bmat", U[:, sl], A2[bs])
                    W = W.reshape(b, m, 2 * T)                        # pixels per unit
                    # images n at a time, so that the weighted table stays in the cache
                    n = max(1, min(b, work // (m * group * D * uv.element_size())))
                    for i0 in range(0, b, n):
                        rows = slice(i0, min(b, i0 + n))
                        for g0 in range(0, 2 * T, group):
                            g1 = min(2 * T, g0 + group)
                            wr = W[rows, :, g0:g1, None] * right[rows, :, None, :]
                            term = torch.matmul(left[rows], wr.view(-1, m, (g1 - g0) * D))
                            Q[rows, :, g0:g1].addcmul_(term.view(-1, D, g1 - g0, D),
                                                     ff[:, None, :])
                            del wr, term
                Fb = _assemble_quarters(P, h)
                del P
                cb = None                                   # the chunk's CTF
                if ctf is not None:
                    cb = ctf[bs] if ctf.dim() == 3 and ctf.shape[0] == B else ctf
                    Fb = Fb * cb
                F[bs] = Fb
                c = -2j * math.pi / (D * self.apix)
                J[T, bs] = (c * kx) * Fb
                J[T + 1, bs] = (c * ky) * Fb
                for t in range(T):
                    dF = (kx * _assemble_quarters(Q[:, :, t], h)
                          + ky * _assemble_quarters(Q[:, :, T + t], h)) * (-2j * math.pi / D)
                    if cb is not None:
                        dF = dF * cb
                    J[t, bs] = dF
                del Q
        return F, J

    def render(self, coords: torch.Tensor, rotations: torch.Tensor,
               shifts: Optional[torch.Tensor] = None,
               ctf: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rendered images (B, D, D), arrays [y, x]."""
        return torch.fft.irfft2(self.render_ft(coords, rotations, shifts, ctf),
                                s=(self.box, self.box))
