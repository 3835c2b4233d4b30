"""The training likelihood of one all-atom model given a set of particles (a state).

For particles i = 1..n with images Y_i, RELION poses A_i (times the run's per-particle
pose correction where the latent file has one), origins o_i, the per-particle shifts t_i
of ``nmaem infer`` and CTFs C_i, a model X (M, 3) renders as

    R_i = C_i E_B F(X + U dz_i, A_i, t_i - o_i),

F the projection of ``physics.renderer.Renderer`` at the refinement box, E_B the envelope
exp(-B s^2 / 4) the images carry beyond the renderer (``inference.particle_fit
.envelope_bfactor``), and dz_i optional per-particle offsets in a mode basis U (each
particle's own z about the state's mean: the model is then the state's mean structure,
each particle rendered at its own conformation about it). The score is the whitened
chi-square of ``physics.likelihood`` at each image's best grey scale,

    chi2(X) = sum_i <Y_i - a_i R_i, Y_i - a_i R_i>_w,   -log L = chi2 / 2 + const,

with the run's noise spectrum, band and mask (``WhitenedLikelihood``). Its gradient with
respect to every atom comes by autograd through the renderer (the scale a_i detached: the
envelope theorem, ``likelihood.py``).

The images' transforms (after the band's mask and mean) are read once and kept in memory
while they fit in ``cache_bytes`` (default 2 GiB; n D (D/2+1) complex64 numbers, e.g.
2,000 particles at 192 px take 300 MB); beyond it each evaluation reads them again.
"""
import math
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

import numpy as np
import torch

from ..physics.likelihood import whitened_fit

if TYPE_CHECKING:
    from ..io.table import ParticleTable
    from ..physics.likelihood import WhitenedLikelihood
    from ..physics.renderer import Renderer

__all__ = ["StateLikelihood", "BATCH", "CACHE_BYTES", "BFACTOR_CALIBRATION"]

BATCH = 64                 # particles per rendered batch
CACHE_BYTES = 2 << 30      # image transforms kept in memory up to this size
BFACTOR_CALIBRATION = 512  # particles on which the envelope's B-factor is estimated


class StateLikelihood:
    """chi2 of models against the particles of ``table`` (module docstring).

    ``elements`` (M,) the model's; ``renderer`` at the refinement box; ``likelihood`` the
    run's at that box;
    ``rotations`` (n, 3, 3) the rotations rendered (corrections applied); ``shifts`` (n, 2)
    Angstrom, the particle centre's displacement (t - origin, plus the crop offset);
    ``dz`` (n, d) and ``modes`` (d, M, 3): per-particle offsets U dz_i, or None.
    """

    def __init__(self, table: "ParticleTable", elements: np.ndarray, renderer: "Renderer",
                 likelihood: "WhitenedLikelihood", rotations: np.ndarray, shifts: np.ndarray,
                 dz: Optional[np.ndarray] = None, modes: Optional[np.ndarray] = None,
                 bfactor: float = 0.0, batch: int = BATCH, cache_bytes: int = CACHE_BYTES
                 ) -> None:
        from ..physics.ctf import CTFParams
        self.table, self.renderer, self.likelihood = table, renderer, likelihood
        self.elements = np.asarray(elements).astype(str)
        self.n = table.n
        self.rotations = torch.as_tensor(np.asarray(rotations, np.float32))
        self.shifts = torch.as_tensor(np.asarray(shifts, np.float32))
        self.groups = torch.as_tensor(np.asarray(table.optics_group, dtype=np.int64))
        self.ctf_params = CTFParams.from_table(table, "cpu", torch.float32)
        self.dz = None if dz is None or modes is None or np.asarray(dz).shape[1] == 0 else \
            torch.as_tensor(np.asarray(dz, np.float32))
        self.modes = None if self.dz is None else torch.as_tensor(np.asarray(modes, np.float32))
        self.batch = max(1, int(batch))
        self.batches = [np.arange(i, min(self.n, i + self.batch))
                        for i in range(0, self.n, self.batch)]
        D = renderer.box
        self._cache = {} if self.n * D * (D // 2 + 1) * 8 <= cache_bytes else None
        grid = renderer.grid
        self._s2 = (grid.fx ** 2 + grid.fy ** 2).float()
        self.bfactor = float(bfactor)
        self._ctf = {}

    # ------------------------------------------------------------------ data
    def images_ft(self, k: int) -> torch.Tensor:
        """The band's transforms (b, D, K) of batch ``k``'s images (cached)."""
        if self._cache is not None and k in self._cache:
            return self._cache[k]
        from ..learn.data import ParticleImages
        _, images = ParticleImages(self.table, self.renderer.box)[self.batches[k]]
        Y = self.likelihood.band.images_ft(images.float())
        if self._cache is not None:
            self._cache[k] = Y
        return Y

    def images(self, rows: np.ndarray) -> torch.Tensor:
        """Images (b, D, D) of ``rows`` at the refinement box."""
        from ..learn.data import ParticleImages
        return ParticleImages(self.table, self.renderer.box)[np.asarray(rows)][1]

    def set_bfactor(self, bfactor: float) -> None:
        """The envelope's B-factor (A^2) of every rendering from now on."""
        self.bfactor = float(bfactor)
        self._ctf = {}

    def ctf(self, k: int) -> torch.Tensor:
        """CTF times envelope (b, D, K) of batch ``k``."""
        if k not in self._ctf:
            from ..physics.ctf import bfactor_envelope
            c = self.renderer.ctf(self.ctf_params[torch.as_tensor(self.batches[k])])
            if self.bfactor:
                c = c * bfactor_envelope(self._s2, self.bfactor)
            self._ctf[k] = c
        return self._ctf[k]

    def coords(self, X: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The rendered coordinates: X (M, 3), or X + U dz_i (b, M, 3) per particle."""
        if self.dz is None:
            return X
        return X + torch.einsum("bd,dmk->bmk", self.dz[torch.as_tensor(rows)], self.modes)

    # ------------------------------------------------------------------ scores
    def chi2(self, X: np.ndarray, grad: bool = False,
             subset: Optional[List[int]] = None) -> Tuple[float, np.ndarray, Optional[np.ndarray]]:
        """(total chi2, per-image chi2 (n,), gradient d chi2 / d X (M, 3) or None) of the
        model ``X`` (M, 3) Angstrom; ``subset``: batch numbers (default all; per-image
        values of the others are NaN)."""
        Xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
        if grad:
            Xt.requires_grad_(True)
        per = np.full(self.n, np.nan)
        total = 0.0
        band = self.likelihood.band
        for k in (range(len(self.batches)) if subset is None else subset):
            rows = self.batches[k]
            Y = self.images_ft(k)
            with torch.set_grad_enabled(grad):
                R = self.renderer.render_ft(self.coords(Xt, rows), self.rotations[rows],
                                            self.shifts[rows], self.ctf(k))
                R = band.rendered_ft(R)
                w = self.likelihood.weights(self.groups[rows])
                c = whitened_fit(Y, R, w)["chi2"]
                if grad:
                    c.sum().backward()
            per[rows] = c.detach().double().numpy()
            total += float(per[rows].sum())
        g = Xt.grad.double().numpy() if grad else None
        return total, per, g

    def fit_bfactor(self, X: np.ndarray, calibration: int = BFACTOR_CALIBRATION,
                    log: Optional[Callable[[str], object]] = None) -> float:
        """The envelope's maximum-likelihood B-factor (A^2) for model ``X`` on (up to)
        ``calibration`` of the particles (``particle_fit.envelope_bfactor``); it is set
        for every rendering from now on and returned."""
        from ..inference.particle_fit import envelope_bfactor
        from ..learn.network import Decoder
        rows = np.unique(np.linspace(0, self.n - 1, min(self.n, int(calibration))
                                     ).astype(np.int64))
        r = self.renderer
        d = 0 if self.dz is None else self.modes.shape[0]
        dec = Decoder(self.elements, np.asarray(X, np.float32),
                      np.zeros((0,) + np.asarray(X).shape, np.float32) if d == 0
                      else self.modes.numpy(), r.box, r.apix,
                      centre=r.centre.double().numpy(), memory_budget=r.memory_budget,
                      route=r.route)
        rt = torch.as_tensor(rows)
        z = torch.zeros(len(rows), 0) if d == 0 else self.dz[rt]
        b, chi_b, chi_0 = envelope_bfactor(
            dec, self.likelihood, self.images(rows), self.groups[rt], z,
            torch.zeros(len(rows), 2), self.rotations[rt], self.shifts[rt],
            r.ctf(self.ctf_params[rt]))
        if log:
            log("refine-states: envelope B = %.0f A^2 (%d particles; chi2 %.1f lower than "
                "without)" % (b, len(rows), chi_0 - chi_b))
        self.set_bfactor(b)
        return b


def significance(gain_per_image: np.ndarray) -> float:
    """The paired z-score of a per-image gain: its sum over sqrt(n) times its sd."""
    g = np.asarray(gain_per_image, dtype=np.float64)
    g = g[np.isfinite(g)]
    if len(g) < 2:
        return 0.0
    sd = g.std(ddof=1)
    return float(g.sum() / (math.sqrt(len(g)) * sd)) if sd > 0 else math.copysign(
        math.inf, g.sum()) if g.sum() else 0.0
