"""Model thumbnails: an atomic model's projections along its z, y and x axes, rendered by the
image-formation model (``physics.renderer.Renderer``) and saved as one PNG; the models of a
series (an export, the states of a run) share one frame, so that their thumbnails compare."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..base.figures import new_figure, save

__all__ = ["thumbnail_frame", "model_projections", "model_thumbnail", "series_thumbnails",
           "THUMBNAIL_BOX", "THUMBNAIL_PX", "THUMBNAIL_MARGIN", "THUMBNAIL_BLUR"]


THUMBNAIL_BOX = 96           # rendered projection, pixels across
THUMBNAIL_PX = 160           # pixels of one view in the PNG (height; width x number of views)
THUMBNAIL_MARGIN = 8.0       # Angstrom kept free around the model in the projection
THUMBNAIL_BLUR = 2.0         # Angstrom, Gaussian sigma of the thumbnails' low-pass filter


def thumbnail_frame(coords: np.ndarray, box: int = THUMBNAIL_BOX, margin: float = THUMBNAIL_MARGIN
                    ) -> Tuple[np.ndarray, float]:
    """(centre (3,), apix) that put every atom of ``coords`` (M, 3) inside a ``box`` px
    projection along any axis: the centroid, and a pixel size (at least 1 A) such that the
    largest distance from it plus ``margin`` fits in half the box. Models of one series
    (an export, the states of a run) share the frame of their reference, so that their
    thumbnails compare."""
    coords = np.asarray(coords, dtype=np.float64)
    centre = coords.mean(0)
    radius = float(np.sqrt(((coords - centre) ** 2).sum(-1).max())) if len(coords) else 0.0
    return centre, max(1.0, 2.0 * (radius + margin) / (int(box) - 2))


def model_projections(coords: np.ndarray, elements: Sequence[str], views: Sequence[str] = ("z",),
                      box: int = THUMBNAIL_BOX, apix: Optional[float] = None,
                      centre: Optional[np.ndarray] = None, blur: float = 0.0) -> np.ndarray:
    """(V, box, box) float64 projections of an atomic model, arrays [y, x], one per view of
    ``views`` (``poses.VIEW_AXES``: along the model's z, y or x axis), rendered by
    ``physics.renderer.Renderer`` (band-limited atoms with their form factors, no CTF, no shift).
    ``centre`` (3,) Angstrom lands on pixel (box//2, box//2); without ``centre``/``apix``,
    :func:`thumbnail_frame`. An atom at r projects onto pixel (x, y) =
    box//2 + (A (r - centre))[:2] / apix with A = ``poses.view_matrix(view)``. ``blur``
    > 0: a Gaussian low-pass of that sigma (Angstrom), exp(-2 pi^2 blur^2 |q|^2)."""
    import torch
    from ..physics.renderer import Renderer
    from ..io.poses import view_matrix
    coords = np.asarray(coords, dtype=np.float64)
    if centre is None or apix is None:
        c0, a0 = thumbnail_frame(coords, box)
        centre = c0 if centre is None else centre
        apix = a0 if apix is None else apix
    r = Renderer(np.asarray(elements), int(box), float(apix), centre=np.asarray(centre, float))
    rot = torch.as_tensor(np.stack([view_matrix(v) for v in views]), dtype=torch.float32)
    with torch.no_grad():
        ft = r.render_ft(torch.as_tensor(coords, dtype=torch.float32), rot)
    ft = ft.to(torch.complex128).numpy()
    if blur > 0:
        qy = np.fft.fftfreq(r.box, d=r.apix)[:, None]
        qx = np.fft.rfftfreq(r.box, d=r.apix)[None, :]
        ft = ft * np.exp(-2.0 * np.pi ** 2 * blur ** 2 * (qx ** 2 + qy ** 2))
    return np.fft.irfft2(ft, s=(r.box, r.box))


def model_thumbnail(coords: np.ndarray, elements: Sequence[str], path: str,
                    views: Sequence[str] = ("z", "y", "x"), box: int = THUMBNAIL_BOX,
                    apix: Optional[float] = None, centre: Optional[np.ndarray] = None,
                    px: int = THUMBNAIL_PX, blur: float = THUMBNAIL_BLUR) -> str:
    """Save a PNG of the model's projections side by side (:func:`model_projections`,
    low-passed by ``blur``, each view labelled with its axis), ``px`` pixels high and ``px``
    x len(views) wide, atomically (:func:`save`); returns ``path``. Image x to the right,
    image y up."""
    imgs = model_projections(coords, elements, views=views, box=box, apix=apix, centre=centre,
                             blur=blur)
    dpi = 100
    fig = new_figure(px * len(views) / dpi, px / dpi, dpi=dpi)
    fig.set_layout_engine(None)
    for k, (view, img) in enumerate(zip(views, imgs)):
        ax = fig.add_axes([k / len(views), 0.0, 1.0 / len(views), 1.0])
        ax.imshow(img, cmap="gray", origin="lower", interpolation="bilinear",
                  vmin=0.0, vmax=float(img.max()) or 1.0)
        ax.set_axis_off()
        ax.text(0.04, 0.96, "along %s" % view, color="yellow", fontsize=7, va="top",
                transform=ax.transAxes)
    return save(fig, path, dpi=dpi)


def series_thumbnails(coords: Sequence[np.ndarray], elements: Sequence[str],
                      paths: Sequence[str]) -> List[str]:
    """:func:`model_thumbnail` of each model of a series (``coords`` (M, 3) each) to its
    path, all in the frame of the whole series (:func:`thumbnail_frame`), so that they
    compare."""
    centre, apix = thumbnail_frame(np.concatenate([np.asarray(c) for c in coords]))
    return [model_thumbnail(xyz, elements, path, centre=centre, apix=apix)
            for xyz, path in zip(coords, paths)]
