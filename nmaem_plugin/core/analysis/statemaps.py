"""State maps: each state's particles reconstructed by RELION, without the model, and the
state's model validated against its map (``nmaem states --reconstruct``).

For every state with enough particles, in ``DIR/state_NN/`` (the files :func:`map_files`
names; ``nmaem states`` lists them in its output's manifest before any is written,
``io/outputs.py``, so a failure removes them all and ``--force`` exactly them):

* ``particles.star``: what RELION reconstructed: the state's particles with their poses and
  origins, the refined ones where ``nmaem infer`` refined them (origin - the latent's
  ``shift``; the latent's ``euler`` when the run refined poses), absolute image names, and
  ``rlnRandomSubset``: the input file's halves when it has them (a refinement's gold-standard
  halves) and both hold at least ``MIN_PER_HALF`` of the state's particles, else a random
  split in two equal halves (seeded);
* ``half1.mrc``, ``half2.mrc``, ``map.mrc``: ``relion_reconstruct --ctf`` of each half and of
  all (the particles' box and pixel size, the origin as RELION writes it: voxel D//2 at the
  box centre the poses refer to);
* ``model.pdb``: the state's model (X0 + U z of the run's reference, heavy atoms, refined with
  OpenMM like ``nmaem export`` unless ``refine`` is off) and ``model_map.mrc``, its map made
  with the renderer's form factors (``physics.density.model_map``) on the same grid;
* ``fsc.json``: the half-map FSC and its 0.143 resolution (``resolution_0143``, A), the FSC
  of the map with the model's map and its 0.5 resolution (``model_map_resolution_05``, A)
  (``fsc.py``), the RELION commands;
* ``map.png``: central sections of the map low-passed to its resolution with the model
  map's contour, and the FSC curves (``mapfigure.py``).

Across states (``states.json``): ``map_model_correlation``, the correlation of every state's
map with every state's model map, both low-passed to the coarsest of the states'
resolutions (``fsc.correlation_table``): each row's maximum on the diagonal says that each
state's map is its own model's.

Checks before any work (one-line errors naming the file): one box and one pixel size among
the particles, a known image size, every model inside the box, RELION present. A state with
fewer than 2 * ``MIN_PER_HALF`` particles gets no map (a warning; an error when no state
has enough).
"""
import json
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import numpy as np

from .fsc import correlation_table, fsc, lowpass
from ..base.atomic import atomic_open
from ..base.errors import NmaemError, fail
from ..base.relion import relion_program, run_relion
from ..io.maps import read_map, write_map

if TYPE_CHECKING:
    from ..io.latent import Latent
    from ..io.table import ParticleTable
    from ..physics.structure import AtomicModel

__all__ = ["MIN_PER_HALF", "MAP_FILES", "reconstruction_table", "particle_geometry",
           "half_sets", "check_model_in_box", "reconstruct_state", "map_files", "state_maps",
           "state_models", "read_fsc_json"]

MIN_PER_HALF = 2
MAP_FILES = dict(map="map.mrc", half1="half1.mrc", half2="half2.mrc",
                 particles="particles.star", model="model.pdb", model_map="model_map.mrc",
                 fsc="fsc.json", figure="map.png")
SUBSET_COLUMN = "rlnRandomSubset"


def reconstruction_table(table: "ParticleTable", latent: "Latent") -> "ParticleTable":
    """The particles of ``latent`` (rows ``latent.index`` of ``table``, in the latent's
    order) with refined origins (origin - shift) and, when the latent has them, refined
    angles (``latent.euler``)."""
    table.require(poses=True, ctf=True, images=True)
    sub = table.subset(latent.index)
    origin = sub.origin_or_zero() - np.asarray(latent.shift, dtype=np.float64)
    euler = sub.euler if latent.euler is None else np.asarray(latent.euler, np.float64)
    return replace(sub, origin=origin, euler=euler)


def particle_geometry(table: "ParticleTable") -> Tuple[int, float]:
    """(box, pixel size) of the particles: one of each, or a one-line error naming the
    file."""
    boxes, apixes = np.unique(table.box), np.unique(np.round(table.apix, 6))
    if len(boxes) != 1 or len(apixes) != 1:
        fail(table.path, "particles of several box sizes (%s px) or pixel sizes (%s A): a "
             "map needs one of each; split the particles by optics group first"
             % (", ".join(str(int(b)) for b in boxes[:4]),
                ", ".join("%g" % a for a in apixes[:4])))
    if boxes[0] <= 0:
        fail(table.path, "image size unknown (no rlnImageSize and no readable stack): "
                         "cannot reconstruct")
    return int(boxes[0]), float(table.apix[0])


def half_sets(table: "ParticleTable", rows: np.ndarray, seed: int) -> Tuple[np.ndarray, str]:
    """(halves (n,) of 1 and 2 for the particles ``rows`` of ``table``, how they were
    chosen): the table's ``rlnRandomSubset`` when both halves hold at least
    ``MIN_PER_HALF`` of them, else a random split in two equal halves (``seed``)."""
    rows = np.asarray(rows, dtype=np.int64)
    extra = table.extra
    if SUBSET_COLUMN in extra.columns:
        try:
            given = extra[SUBSET_COLUMN].to_numpy().astype(np.int64)[rows]
        except (TypeError, ValueError):
            given = None
        if (given is not None and np.all((given == 1) | (given == 2))
                and min(np.sum(given == 1), np.sum(given == 2)) >= MIN_PER_HALF):
            return given, "input %s" % SUBSET_COLUMN
    rng = np.random.default_rng(seed)
    halves = np.full(len(rows), 2, dtype=np.int64)
    halves[rng.permutation(len(rows))[:(len(rows) + 1) // 2]] = 1
    return halves, "random (seed %d)" % seed


def check_model_in_box(coords: np.ndarray, box: int, apix: float, what: str,
                       strict: bool = True) -> None:
    """Atoms of ``coords`` outside the particles' box (the map frame: voxel D//2 at
    (D//2)*apix; ``what`` names the model): a one-line error when ``strict`` (the
    reference: not docked in the frame of the poses), else a warning (a state's deformed
    model reaching past the box: its model map is cut there)."""
    from ..physics.density import map_frame_positions
    u = map_frame_positions(coords, box, apix)
    out = np.maximum(-u, u - (box - 1)).max()
    if out <= 0:
        return
    where = ("atoms lie up to %.1f A outside the particles' box (%d px of %g A, centre at "
             "%g A)" % (out * apix, box, apix, (box // 2) * apix))
    if strict:
        fail(what, where + ": is the model docked in the frame of the consensus map the "
                           "poses refer to?")
    from ..base.errors import warning
    warning("%s: %s: its model map is cut at the box's edges (the map-model FSC and the "
            "states x models table under-rate it)" % (what, where))


def _resolutions(curve, threshold):
    res, crossed = curve.resolution(threshold)
    return float(res), bool(crossed)


def reconstruct_state(folder: str, table: "ParticleTable", halves: np.ndarray,
                      model: "AtomicModel", coords: np.ndarray, box: int, apix: float,
                      name: str = "", halves_note: str = "",
                      log: Callable[[str], object] = print) -> dict:
    """Write the files of one state into ``folder`` (module docstring): RELION's maps of the
    particles of ``table`` (``halves`` 1/2 each), the model (``model`` atoms at
    ``coords``), its map, the FSCs, the figure; returns the contents of ``fsc.json``."""
    from ..io.star import write_star
    from ..physics.density import model_map
    from ..physics.structure import write_model
    t0 = time.perf_counter()
    write_star(os.path.join(folder, MAP_FILES["particles"]), table,
               extra_columns={SUBSET_COLUMN: np.asarray(halves, dtype=np.int64)})
    commands = []
    for key, subset in (("half1", 1), ("half2", 2), ("map", None)):
        args = ["--i", MAP_FILES["particles"], "--o", MAP_FILES[key], "--ctf",
                "--angpix", "%.6g" % apix]
        if subset is not None:
            args += ["--subset", subset]
        run_relion("relion_reconstruct", args, cwd=folder, log=log)
        commands.append(" ".join(["relion_reconstruct"] + [str(a) for a in args]))
        path = os.path.join(folder, MAP_FILES[key])
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise NmaemError("relion_reconstruct wrote no %s (see its output above)" % path)
    t_relion = time.perf_counter() - t0
    vols = {k: read_map(os.path.join(folder, MAP_FILES[k]))[0] for k in ("half1", "half2", "map")}
    for k, v in vols.items():
        if v.shape != (box,) * 3:
            fail(os.path.join(folder, MAP_FILES[k]), "RELION wrote a %s map for particles of "
                 "%d px" % ("x".join(map(str, v.shape)), box))
    write_model(os.path.join(folder, MAP_FILES["model"]), model, coords)
    mmap = model_map(coords, model.elements, box, apix)
    write_map(os.path.join(folder, MAP_FILES["model_map"]), mmap, apix)
    half = fsc(vols["half1"], vols["half2"], apix)
    vs_model = fsc(vols["map"], mmap, apix)
    res, crossed = _resolutions(half, 0.143)
    mres, mcrossed = _resolutions(vs_model, 0.5)
    info = dict(state=name, n_particles=int(table.n), n_half1=int(np.sum(halves == 1)),
                n_half2=int(np.sum(halves == 2)), halves=halves_note, box=int(box),
                apix=float(apix), resolution_0143=res, fsc_0143_crossed=crossed,
                model_map_resolution_05=mres, model_fsc_05_crossed=mcrossed,
                half_map_fsc=half.as_dict(), model_map_fsc=vs_model.as_dict(),
                files=dict(MAP_FILES), relion_commands=commands,
                seconds=dict(relion=round(t_relion, 3),
                             total=round(time.perf_counter() - t0, 3)))
    from ..base.figures import save
    from .mapfigure import draw_state_map
    fig = draw_state_map(lowpass(vols["map"], apix, res), lowpass(mmap, apix, res), apix,
                         [("half maps", half.freq, half.fsc, 0.143, res if crossed else None),
                          ("map vs model", vs_model.freq, vs_model.fsc, 0.5,
                           mres if mcrossed else None)],
                         title="%s: %d particles" % (name, table.n))
    save(fig, os.path.join(folder, MAP_FILES["figure"]))
    info["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    with atomic_open(os.path.join(folder, MAP_FILES["fsc"]), "w") as fh:
        json.dump(info, fh, indent=1)
        fh.write("\n")
    log("states: %s: %d particles, half-map resolution %.2f A (FSC 0.143%s), map-model "
        "%.2f A (FSC 0.5%s), %.1f s" % (name, table.n, res, "" if crossed else ", Nyquist",
                                        mres, "" if mcrossed else ", Nyquist",
                                        info["seconds"]["total"]))
    return info


def _too_small(names: Sequence[str], labels: np.ndarray) -> List[int]:
    """The states (0-based) with fewer particles than two half-maps need; a one-line error
    when no state has enough."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels[labels >= 0], minlength=len(names))
    small = [k for k in range(len(names)) if counts[k] < 2 * MIN_PER_HALF]
    if len(small) == len(names):
        raise NmaemError("no state has the %d particles two half-maps need (%s): nothing to "
                         "reconstruct" % (2 * MIN_PER_HALF, ", ".join(
                             "%s %d" % (names[k], counts[k]) for k in range(len(names)))))
    return small


def map_files(names: Sequence[str], labels: np.ndarray) -> List[str]:
    """The files :func:`state_maps` writes, relative to its ``out_dir``
    (``state_01/map.mrc``, ...: every file of ``MAP_FILES`` for each state with enough
    particles), known before any work; a one-line error when no state has enough."""
    small = _too_small(names, labels)
    return ["%s/%s" % (name, f) for k, name in enumerate(names) if k not in small
            for f in MAP_FILES.values()]


def state_maps(out_dir: str, names: Sequence[str], table: "ParticleTable",
               labels: np.ndarray, model: "AtomicModel", coords: Sequence[np.ndarray],
               seed: int = 0, log: Callable[[str], object] = print
               ) -> Tuple[List[Optional[dict]], dict]:
    """Reconstruct and validate every state (module docstring). ``table``: the
    reconstruction table (:func:`reconstruction_table`), ``labels`` (N,) each of its rows'
    state (-1: none); ``coords``: each state's model (atoms of ``model``). Writes the files
    :func:`map_files` names into ``out_dir/NAME`` (the caller's output policy makes them
    all or nothing). Returns (per state: the fsc.json contents or None when it has too few
    particles, the ``map_model_correlation`` of states.json)."""
    relion_program("relion_reconstruct")
    labels = np.asarray(labels, dtype=np.int64)
    box, apix = particle_geometry(table.subset(labels >= 0))
    for name, c in zip(names, coords):
        check_model_in_box(c, box, apix, "the model of %s" % name, strict=False)
    small = _too_small(names, labels)
    infos: List[Optional[dict]] = []
    for k, name in enumerate(names):
        if k in small:
            log("nmaem: warning: %s has %d particle(s), fewer than the %d two half-maps "
                "need: no map" % (name, np.sum(labels == k), 2 * MIN_PER_HALF))
            infos.append(None)
            continue
        rows = np.flatnonzero(labels == k)
        halves, note = half_sets(table, rows, seed + k)
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        infos.append(reconstruct_state(folder, table.subset(rows), halves, model, coords[k],
                                       box, apix, name=name, halves_note=note, log=log))
    done = [k for k, i in enumerate(infos) if i is not None]
    worst = max(infos[k]["resolution_0143"] for k in done)
    maps = [read_map(os.path.join(out_dir, names[k], MAP_FILES["map"]))[0] for k in done]
    mmaps = [read_map(os.path.join(out_dir, names[k], MAP_FILES["model_map"]))[0]
             if k in done else _model_map(model, coords[k], box, apix)
             for k in range(len(names))]
    table_ = correlation_table(maps, mmaps, apix, worst)
    corr = dict(resolution=float(worst), maps=[names[k] for k in done], models=list(names),
                table=[[float(v) for v in row] for row in table_],
                diagonal_is_row_maximum=[bool(np.argmax(row) == k)
                                         for row, k in zip(table_, done)])
    return infos, corr


def state_models(run_dir: str, z: np.ndarray, refine: bool = True,
                 log: Callable[[str], object] = print
                 ) -> Tuple["AtomicModel", List[np.ndarray], List[Optional[dict]]]:
    """(the run's reference, each state's model coordinates X0 + U z_k, refined with
    OpenMM as ``nmaem export`` refines unless ``refine`` is off, and each one's
    refinement/validation record or None)."""
    from .landscape import deformed_coords, load_run
    model, nm, _ = load_run(run_dir)
    plain = [deformed_coords(model, nm, zk) for zk in np.asarray(z, dtype=np.float64)]
    if not refine:
        return model, plain, [None] * len(plain)
    from .refine import refine_models
    done = refine_models(plain, model, log=log)
    return model, [r.coords for r, _ in done], [entry for _, entry in done]


def _model_map(model, coords, box, apix):
    from ..physics.density import model_map
    return model_map(coords, model.elements, box, apix)


def read_fsc_json(path: str) -> dict:
    """The contents of a state's ``fsc.json`` (one-line error when unreadable)."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        fail(path, "cannot read the state's FSC file (%s)" % exc)
