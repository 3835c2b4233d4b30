"""The contrast transfer function: RELION's CTF on a frequency grid, its B-factor envelope,
the electron wavelength, and ``CTFParams`` (the CTF and optics of a batch of particles).

The CTF is RELION's: -sin(gamma), positive (= amplitude contrast) at zero frequency, so protein
density is white in the images (docs/conventions.md).
"""
import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from ..io.table import ParticleTable

__all__ = ["electron_wavelength", "ctf_2d", "bfactor_envelope", "CTFParams", "ctf_params",
           "TensorOrFloat"]

TensorOrFloat = Union[torch.Tensor, float]   # a per-image (B,) tensor or one value for all


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


def ctf_params(args: tuple, kwargs: dict) -> "CTFParams":
    """A :class:`CTFParams` given alone, or built from ``ctf_2d``'s arguments."""
    if len(args) == 1 and not kwargs and isinstance(args[0], CTFParams):
        return args[0]
    return CTFParams(*args, **kwargs)
