"""``nmaem export``: deformed all-atom models at chosen latent points (PC traversals,
k-means centres, density maxima of PC1, given amplitudes), with models.json / models.csv,
and the particles each exported model represents (:func:`particle_counts`, written as
``n_particles`` in models.json whenever a latent file is given)."""
import csv
import os
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence

import numpy as np

from .landscape import (DEFAULTS, check_latent_d, deformed_coords, format_json,
                        kmeans, load_run, need_z, pca, traversal_points)
from ..base.atomic import atomic_open
from ..base.errors import NmaemError, fail
from ..io.latent import read_latent
from ..io.outputs import OVERWRITE_HINT, command_outputs, run_files

if TYPE_CHECKING:
    from ..io.latent import Latent
    from ..modes.modesfile import NormalModes
    from ..physics.structure import AtomicModel

__all__ = ["export", "particle_counts", "check_deformations", "MAX_BOND_RMS"]


def _parse_pcs(pcs):
    if isinstance(pcs, str):
        try:
            return [int(s) for s in pcs.replace(" ", "").split(",") if s]
        except ValueError:
            raise NmaemError("--pcs takes PC numbers separated by commas, e.g. 1 or 1,2 "
                             "(got %r)" % pcs)
    return [int(k) for k in pcs]


def _parse_z(text, d):
    try:
        z = np.array([float(s) for s in str(text).replace(" ", "").split(",") if s])
    except ValueError:
        raise NmaemError("--z takes d numbers separated by commas (got %r)" % text)
    if not np.all(np.isfinite(z)):
        raise NmaemError("--z %s: amplitudes must be finite numbers (%s is not)"
                         % (text, [v for v in str(text).split(",")
                                   if not np.isfinite(float(v))][0].strip()))
    if len(z) != d:
        raise NmaemError("--z %s has %d value(s) but the model has d = %d modes"
                         % (text, len(z), d))
    return z


# the largest rms change of the reference's bond lengths (A) a model X0 + U z may have: normal
# modes are linear, and beyond this the model is no molecule (refinement cannot mend it)
MAX_BOND_RMS = 1.0


def check_deformations(model: "AtomicModel", nm: "NormalModes", entries: Sequence,
                       latent: Optional["Latent"] = None) -> None:
    """Refuse (one line) an export whose models X0 + U z stretch the reference's bonds by
    more than ``MAX_BOND_RMS`` A rms (``entries``: (name, info, z)), before any refinement:
    amplitudes far beyond the particles' (``latent``) or typed by mistake."""
    from .validation import reference_geometry
    if not entries:
        return
    b = reference_geometry(model).bonds
    if len(b) == 0:
        return
    L0 = np.linalg.norm(model.coords[b[:, 0]] - model.coords[b[:, 1]], axis=1)
    M = model.n_atoms
    for name, info, zj in entries:
        X = deformed_coords(model, nm, zj)
        rms = float(np.sqrt(np.mean((np.linalg.norm(X[b[:, 0]] - X[b[:, 1]], axis=1)
                                     - L0) ** 2)))
        if not rms <= MAX_BOND_RMS:
            seen = ("" if latent is None or latent.d == 0 else
                    "; the particles' z reach %.3g A RMSD" % float(
                        np.max(np.linalg.norm(latent.z, axis=1)) / np.sqrt(M)))
            what = ("--z %s" % ",".join("%g" % v for v in zj) if info.get("kind") == "z"
                    else "the model %s" % name)
            raise NmaemError("%s: X0 + U z is %.3g A RMSD from the reference and stretches "
                             "its bonds by %.3g A rms (more than %g A): normal modes are "
                             "linear and describe no deformation this large%s; give smaller "
                             "amplitudes" % (what, float(np.linalg.norm(zj) / np.sqrt(M)),
                                             rms, MAX_BOND_RMS, seen))


def _check_options(steps, low, high, refine_options):
    """One-line errors for options out of their range, before any work."""
    if int(steps) < 1:
        raise NmaemError("--steps must be at least 1 (got %d)" % int(steps))
    for name, v in (("--low", low), ("--high", high)):
        if not (np.isfinite(float(v)) and 0 <= float(v) <= 100):
            raise NmaemError("%s must be a percentile from 0 to 100 (got %s)" % (name, v))
    if not float(low) < float(high):
        raise NmaemError("--low %s must be below --high %s" % (low, high))
    k = (refine_options or {}).get("restraint")
    if k is not None and not (np.isfinite(float(k)) and float(k) > 0):
        raise NmaemError("--restraint must be a positive number of kcal/mol/A^2 (got %s)" % k)


def _width(n):
    return max(2, len(str(n)))


def numbered_name(prefix: str, j: int, n: int) -> str:
    """The file stem of the (j+1)-th of ``n`` models of a kind: ``maximum_01``, ...
    (two digits at least; the landscape figure labels its maxima with these names)."""
    return "%s_%0*d" % (prefix, _width(n), j + 1)


def export(latent_path: str, run_dir: str, out_dir: str, pcs: Optional[Sequence[int]] = None,
           steps: int = DEFAULTS["steps"],
           low: float = DEFAULTS["low_percentile"], high: float = DEFAULTS["high_percentile"],
           kmeans_k: Optional[int] = None, maxima: bool = False,
           z_list: Sequence[Sequence[float]] = (), fmt: str = "pdb", seed: int = 0,
           overwrite: bool = False, bandwidth: Optional[float] = None,
           min_height: float = DEFAULTS["min_height"],
           min_prominence: float = DEFAULTS["min_prominence"],
           min_significance: float = DEFAULTS["min_significance"], log: Callable[[str], None] = print,
           refine: bool = False, hydrogens: bool = False,
           refine_options: Optional[dict] = None, thumbnails: bool = True) -> dict:
    """Write deformed all-atom models at latent points; returns the listing (a dict).

    ``refine``: geometry refinement of each model (``core.refine.refine_models``; the
    command line does it unless ``--no-refine``), ``hydrogens`` to write the hydrogens it
    adds, ``refine_options`` keywords for ``refine_coords``; each row of models.json then
    has ``refinement`` and ``validation`` (``core.validation.validate``).

    Any combination of: ``pcs`` (list of 1-based PCs, or "1,2") with ``steps`` points from
    the ``low`` to the ``high`` percentile (``traversal_points``); ``kmeans_k`` cluster
    centres (``kmeans``, ``seed``); ``maxima`` (the density maxima along PC1 and the model
    at each, ``landscape.maxima``: deconvolved for a latent with ``z_cov``;
    ``bandwidth``, ``min_height`` and ``min_prominence`` as there); ``z_list`` explicit amplitude vectors
    (strings "1.5,-0.3,..." or arrays). With none of them, PC1 in ``steps`` points.
    Files: ``pc1_01.pdb``..., ``cluster_01``..., ``maximum_01``..., ``z_01``... (``.cif``
    with ``fmt='cif'``), ``models.json`` and ``models.csv``; with ``thumbnails`` a PNG of
    each model's projections along z, y and x beside it (``pc1_01.png``...,
    ``thumbnails.model_thumbnail``, all in the frame of the whole series; ``thumbnail`` in
    models.json). Existing files are refused
    unless ``overwrite``. ``latent_path`` may be None when only ``z_list`` is given.
    """
    if fmt not in ("pdb", "cif"):
        raise NmaemError("--format must be pdb or cif (got %r)" % fmt)
    if hydrogens and not refine:
        raise NmaemError("--hydrogens writes the hydrogens added by refinement: drop "
                         "--no-refine or --hydrogens")
    if kmeans_k is not None and int(kmeans_k) < 1:
        raise NmaemError("--kmeans must be at least 1 (got %d)" % int(kmeans_k))
    _check_options(steps, low, high, refine_options)
    if not (pcs or kmeans_k or maxima or z_list):
        pcs = [1]
    pcs = _parse_pcs(pcs) if pcs else []
    model, nm, cfg = load_run(run_dir, need_modes=False)
    latent = None
    if pcs or kmeans_k or maxima:
        if latent_path is None:
            raise NmaemError("--latent is needed for --pcs, --kmeans and --maxima")
        latent = read_latent(latent_path)
        check_latent_d(latent, nm, run_dir, cfg)
        need_z(latent, "export")
    elif latent_path is not None:
        latent = read_latent(latent_path)
        check_latent_d(latent, nm, run_dir, cfg)
    if nm is None:
        fail(run_dir, "the run has no normal modes (d = 0): every exported model would be "
                      "the reference itself")
    d, M = nm.n_modes, model.n_atoms
    p = pca(latent.z) if (latent is not None and latent.n >= 2 and latent.d > 0) else None

    entries = []      # (name stem, info dict, z)
    if pcs:
        if p is None:
            fail(latent.path, "PC traversal needs at least 2 particles")
        for pt in traversal_points(p, pcs, steps, low, high, latent.z):
            entries.append(("pc%d_%0*d" % (pt["pc"], _width(steps), pt["step"]),
                            dict(kind="pc", pc=pt["pc"], step=pt["step"],
                                 percentile=pt["percentile"]), pt["z"]))
    if kmeans_k:
        centres, labels, counts = kmeans(latent.z, kmeans_k, seed=seed)
        for j in range(len(centres)):
            entries.append((numbered_name("cluster", j, len(centres)),
                            dict(kind="cluster", cluster=j + 1, n_particles=int(counts[j])),
                            centres[j]))
    if maxima:
        if p is None:
            fail(latent.path, "density maxima need at least 2 particles")
        from .maxima import POINT_ESTIMATE_NOTE, from_latent
        from .maxima import maxima as landscape_maxima
        sm = landscape_maxima(from_latent(latent), bandwidth=bandwidth, min_height=min_height,
                              min_prominence=min_prominence,
                              min_significance=min_significance)
        if latent.z_cov is None:
            log("export: note: %s" % POINT_ESTIMATE_NOTE)
        mx = sm.maxima
        counts = mx.basin_counts
        for j in range(len(mx)):
            members = mx.near[j]
            zj = sm.z[j]
            entries.append((numbered_name("maximum", j, len(mx)),
                            dict(kind="maximum", maximum=j + 1,
                                 pc1_position=float(mx.positions[j]),
                                 density=float(mx.densities[j]),
                                 n_particles=int(len(members)), n_basin=int(counts[j]),
                                 bandwidth=float(mx.bandwidth)), zj))
    for j, zt in enumerate(z_list):
        zj = _parse_z(zt, d) if isinstance(zt, str) else np.asarray(zt, dtype=np.float64)
        if zj.shape != (d,):
            raise NmaemError("z of shape %s for d = %d modes" % (zj.shape, d))
        entries.append(("z_%0*d" % (_width(len(z_list)), j + 1), dict(kind="z"), zj))

    check_deformations(model, nm, entries, latent)      # before minutes of refinement
    files = ["%s.%s" % (stem, fmt) for stem, _, _ in entries] + ["models.json", "models.csv"]
    thumbs = ["%s.png" % stem for stem, _, _ in entries] if thumbnails else []
    with command_outputs(out_dir, "export", products=files + thumbs,
                         inputs=[latent_path] + run_files(run_dir), force=overwrite,
                         hint=OVERWRITE_HINT) as out:
        from ..physics.structure import write_model
        listing = dict(latent=None if latent is None else os.path.abspath(latent.path),
                       model=os.path.abspath(str(run_dir)), n_particles=None if latent is None
                       else latent.n, d=d, n_atoms=M, format=fmt, seed=seed, models=[])
        if p is not None:
            listing["pca"] = dict(explained_variance_ratio=p.explained_variance_ratio.tolist(),
                                  explained_variance=p.explained_variance.tolist(),
                                  mean=p.mean.tolist(), components=p.components.tolist())
        refined = [None] * len(entries)
        if refine:
            from .refine import refine_models
            refined = refine_models([deformed_coords(model, nm, zj) for _, _, zj in entries],
                                    model, hydrogens=hydrogens, log=log,
                                    **(refine_options or {}))
        written = []        # heavy-atom coordinates of each model, for its thumbnail
        for (stem, info, zj), fname, rf in zip(entries, files, refined):
            if rf is None:
                written.append(deformed_coords(model, nm, zj))
                write_model(out.path(fname), model, written[-1])
            elif hydrogens and rf[0].ok:
                written.append(rf[0].coords)
                write_model(out.path(fname), rf[0].model_with_hydrogens(model))
            else:
                written.append(rf[0].coords)
                write_model(out.path(fname), model, rf[0].coords)
            row = dict(file=fname, **info)
            if thumbnails:
                row["thumbnail"] = stem + ".png"
            if rf is not None:
                row.update(rf[1])
            row["z"] = [float(v) for v in zj]
            row["pc_coords"] = None if p is None else [float(v) for v in p.transform(zj)]
            row["rmsd_to_reference"] = float(np.linalg.norm(zj) / np.sqrt(M))
            row.setdefault("n_particles", None)
            listing["models"].append(row)
        if thumbnails:              # one frame for the series: the thumbnails compare
            from .thumbnails import series_thumbnails
            series_thumbnails(written, model.elements,
                              [out.path(row["thumbnail"]) for row in listing["models"]])
        if latent is not None:      # every model's particles, PC steps and given z included
            for row, n in zip(listing["models"], particle_counts(listing, latent.z)):
                row["n_particles"] = n
        with atomic_open(out.path("models.json"), "w") as fh:
            fh.write(format_json(listing) + "\n")
        with atomic_open(out.path("models.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "kind", "n_particles", "rmsd_to_reference"]
                       + ["z%d" % (l + 1) for l in range(d)]
                       + (["pc%d" % (l + 1) for l in range(d)] if p is not None else []))
            for row in listing["models"]:
                w.writerow([row["file"], row["kind"],
                            "" if row["n_particles"] is None else row["n_particles"],
                            "%.6g" % row["rmsd_to_reference"]]
                           + ["%.6g" % v for v in row["z"]]
                           + (["%.6g" % v for v in row["pc_coords"]] if p is not None else []))
    log("export: %d model(s) of %d atoms -> %s (listing in models.json, models.csv)"
        % (len(entries), M, out_dir))
    return listing


def particle_counts(listing: dict, z: np.ndarray) -> List[int]:
    """Particles each exported model represents, from ``models.json`` (``listing``) and the
    latent amplitudes ``z`` (N, d): the count nmaem gives (clusters, maxima); for PC steps,
    the particles whose coordinate on that PC is nearest to the step's (among the steps of
    that PC); for given amplitudes, the particles nearest in z."""
    z = np.asarray(z, dtype=np.float64)
    models = listing["models"]
    counts = [m.get("n_particles") for m in models]
    pca_ = listing.get("pca")
    if pca_ is not None and len(z):
        comps = np.asarray(pca_["components"], dtype=np.float64)
        pc = z @ comps.T
        for k in sorted({m["pc"] for m in models if m.get("kind") == "pc"}):
            rows = [i for i, m in enumerate(models)
                    if m.get("kind") == "pc" and m["pc"] == k]
            steps = np.array([models[i]["pc_coords"][k - 1] for i in rows])
            nearest = np.argmin(np.abs(pc[:, k - 1][:, None] - steps[None]), axis=1)
            for j, i in enumerate(rows):
                counts[i] = int(np.sum(nearest == j))
    rows = [i for i, m in enumerate(models) if m.get("kind") == "z"]
    if rows and len(z):
        centres = np.array([models[i]["z"] for i in rows], dtype=np.float64)
        d2 = ((z[:, None, :] - centres[None]) ** 2).sum(-1)
        nearest = np.argmin(d2, axis=1)
        for j, i in enumerate(rows):
            counts[i] = int(np.sum(nearest == j))
    return [0 if c is None else int(c) for c in counts]
