"""Comparing maps: Fourier shell correlation, its resolution at a threshold, and the
correlation of two maps up to a resolution (numpy only).

* **FSC** (:func:`fsc`): shells of the 3D DFT by the rounded radius, ``round(|k|)`` for
  k = 0..D//2, FSC_i = Re sum F1 conj(F2) / sqrt(sum |F1|^2 sum |F2|^2) over the
  frequencies of shell i in the half transform kx >= 0 (RELION's sums: its
  ``relion_image_handler --fsc`` gives the same curve, tested); the frequency of shell i is
  i / (D apix) (1/Angstrom). No mask.
* **Resolution** (:func:`fsc_resolution`): where the curve first falls below the threshold
  (from shell 1 on), linearly interpolated in frequency between the last shell above and the
  first below; 1/frequency in Angstrom. A curve that never falls below it gives the
  resolution of its last shell (Nyquist) with ``crossed`` False. The thresholds: 0.143
  between half-maps, 0.5 between a map and a model's map (Rosenthal & Henderson 2003: both
  mark the resolution where the full map's correlation with the truth is 0.5).
* **Correlation up to a resolution** (:func:`band_correlation`): the Pearson correlation of
  two maps low-passed to ``resolution`` (shells 1 .. D apix / resolution: the mean left
  out), computed in Fourier space over the whole transform (each frequency of the half
  transform with 0 < kx < D/2 counts for its Hermitian partner too, so the value is the
  real-space correlation of the low-passed maps); :func:`correlation_table` for every pair
  of two lists.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["FSCCurve", "shell_index", "fsc", "fsc_resolution", "band_correlation",
           "correlation_table", "lowpass"]


@dataclass
class FSCCurve:
    """``freq`` (S,) 1/Angstrom of shells 0..D//2, ``fsc`` (S,)."""
    freq: np.ndarray
    fsc: np.ndarray

    def resolution(self, threshold: float) -> Tuple[float, bool]:
        """(resolution in Angstrom, crossed): :func:`fsc_resolution` of this curve."""
        return fsc_resolution(self.freq, self.fsc, threshold)

    def as_dict(self) -> dict:
        return dict(frequency=[float(v) for v in self.freq],
                    resolution=[None if v == 0 else float(1.0 / v) for v in self.freq],
                    fsc=[float(v) for v in self.fsc])


def shell_index(box: int) -> np.ndarray:
    """(D, D, D//2+1) int: the shell round(|k|) of each frequency of the rfftn grid."""
    D = int(box)
    k = np.fft.fftfreq(D, d=1.0 / D)
    kh = np.arange(D // 2 + 1, dtype=np.float64)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kh[None, None, :] ** 2)
    return np.rint(r).astype(np.int64)


def _check_pair(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 3 or a.shape != b.shape or len(set(a.shape)) != 1:
        raise ValueError("maps of shapes %s and %s: two cubes of one size are needed"
                         % (a.shape, b.shape))
    return a, b


def _shell_sums(values, shells, n):
    return np.bincount(shells.ravel(), weights=values.ravel(), minlength=n)[:n]


def fsc(map1: np.ndarray, map2: np.ndarray, apix: float) -> FSCCurve:
    """The FSC of two maps (D, D, D) of voxel size ``apix`` (module docstring)."""
    a, b = _check_pair(map1, map2)
    D = a.shape[0]
    Fa, Fb = np.fft.rfftn(a), np.fft.rfftn(b)
    shells = shell_index(D)
    n = D // 2 + 1
    num = _shell_sums((Fa * np.conj(Fb)).real, shells, n)
    da = _shell_sums(np.abs(Fa) ** 2, shells, n)
    db = _shell_sums(np.abs(Fb) ** 2, shells, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where((da > 0) & (db > 0), num / np.sqrt(da * db), 0.0)
    return FSCCurve(np.arange(n) / (D * float(apix)), curve)


def fsc_resolution(freq: np.ndarray, curve: np.ndarray, threshold: float
                   ) -> Tuple[float, bool]:
    """(resolution in Angstrom, crossed) where ``curve`` first falls below ``threshold``
    (module docstring)."""
    freq = np.asarray(freq, dtype=np.float64)
    curve = np.asarray(curve, dtype=np.float64)
    below = np.flatnonzero(curve[1:] < threshold)
    if not len(below):
        return float(1.0 / freq[-1]), False
    i = int(below[0]) + 1
    c0, c1 = curve[i - 1], curve[i]
    t = (c0 - threshold) / (c0 - c1) if c0 != c1 else 0.0
    f = freq[i - 1] + t * (freq[i] - freq[i - 1])
    return (float(1.0 / f) if f > 0 else float("inf")), True


def band_correlation(map1: np.ndarray, map2: np.ndarray, apix: float,
                     resolution: Optional[float] = None) -> float:
    """Correlation of the two maps low-passed to ``resolution`` Angstrom (None: every
    shell to Nyquist), their means left out (module docstring)."""
    return float(correlation_table([map1], [map2], apix, resolution)[0, 0])


def correlation_table(maps: Sequence[np.ndarray], others: Sequence[np.ndarray], apix: float,
                      resolution: Optional[float] = None) -> np.ndarray:
    """(len(maps), len(others)): :func:`band_correlation` of every map with every other."""
    fts: List[List[np.ndarray]] = [[], []]
    D = None
    for side, group in enumerate((maps, others)):
        for m in group:
            m = np.asarray(m, dtype=np.float64)
            if D is None:
                D = m.shape[0]
            _check_pair(m, np.empty((D, D, D)))
            fts[side].append(np.fft.rfftn(m))
    if D is None:
        return np.zeros((len(maps), len(others)))
    shells = shell_index(D)
    top = D // 2 if resolution is None else min(D // 2, int(np.floor(D * apix / resolution)))
    keep = (shells >= 1) & (shells <= top)
    w = np.full(D // 2 + 1, 2.0)
    w[0] = 1.0
    if D % 2 == 0:
        w[-1] = 1.0
    w = np.broadcast_to(w, shells.shape)[keep]
    A = [f[keep] for f in fts[0]]
    B = [f[keep] for f in fts[1]]
    out = np.zeros((len(A), len(B)))
    for i, fa in enumerate(A):
        na = np.sqrt(np.sum(w * np.abs(fa) ** 2))
        for j, fb in enumerate(B):
            nb = np.sqrt(np.sum(w * np.abs(fb) ** 2))
            out[i, j] = np.sum(w * (fa * np.conj(fb)).real) / (na * nb) if na * nb > 0 else 0.0
    return out


def lowpass(volume: np.ndarray, apix: float, resolution: float, edge: float = 2.0
            ) -> np.ndarray:
    """``volume`` low-passed to ``resolution`` Angstrom: shells up to D apix / resolution
    kept, a raised-cosine edge ``edge`` shells wide beyond (for figures)."""
    v = np.asarray(volume, dtype=np.float64)
    D = v.shape[0]
    k = np.fft.fftfreq(D, d=1.0 / D)
    kh = np.arange(D // 2 + 1, dtype=np.float64)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kh[None, None, :] ** 2)
    kc = D * float(apix) / float(resolution)
    t = np.clip((r - kc) / max(edge, 1e-9), 0.0, 1.0)
    return np.fft.irfftn(np.fft.rfftn(v) * 0.5 * (1 + np.cos(np.pi * t)), s=v.shape)
