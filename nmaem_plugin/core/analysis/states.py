"""States: the latent landscape cut into classes of particles (``nmaem states``).

A state is a set of particles and a representative amplitude vector z. Three ways to
make them, each giving every particle at most one state:

* ``maxima``: the density maxima along PC1 with their basins (``landscape.maxima``, the
  same states ``nmaem export --maxima`` deforms to). For a latent with posterior
  covariances (``z_cov``) the landscape is deconvolved: the average of the particles'
  posteriors, each particle in the basin holding most of its posterior mass, the
  representative the conditional mean of z at the maximum. For an older latent: the
  KDE of the point estimates' PC1 (``analysis.density_maxima``), each particle in the
  basin it lies in, the representative the mean z of the basin's particles within the
  bandwidth of the maximum.
* ``kmeans``: the K clusters of ``analysis.kmeans`` on z; representative = the centre.
* ``ranges``: boxes the user draws in PC coordinates (``pc = z @ V.T``, measured from
  z = 0 as everywhere in ``analysis``), one per state, each a list of (PC, low, high)
  intervals; a particle belongs to the first state whose every interval holds it, and to
  no state (label -1) when none does; representative = the mean z of the state's
  particles (the box centre on the PC axes when the state is empty).

Files (written through the output policy of ``outputs.py``): ``DIR/states.npz`` with
``label`` (N,) int64 (0-based state, -1 none), ``index`` (N,) the latent file's rows
(rows of the particle file given to ``nmaem infer``), ``z`` (K, d) the representatives,
``count`` (K,); ``DIR/states.json`` (one row per state: name, count, z, PC coordinates,
and for maxima the PC1 position and density); with ``--particles`` one RELION STAR per
state, ``state_01.star`` ..., the rows of that particle file in the state (every column and
data block of the input kept, ``io/subsets.py``; a .cs input gives a converted STAR, and
with ``formats`` "cs" also ``state_01.cs``, its own fields kept, written by cryosparc-tools);
with ``--model RUN`` a thumbnail of each state's model, ``state_01.png`` ...; with
``--reconstruct`` (``statemaps.py``) each state's RELION maps, model and FSCs in
``state_01/`` ... and their figures in states.json.
Numpy only (torch-free), but for the thumbnails (``--model``), which render with torch.
"""
import json
import os
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from .landscape import DEFAULTS, PCA, format_json, kmeans, pca
from ..base.atomic import atomic_open, atomic_savez
from ..base.errors import NmaemError, fail
from ..io.npz import read_npz

if TYPE_CHECKING:
    from ..modes.modesfile import NormalModes
    from ..physics.structure import AtomicModel

__all__ = ["States", "assign_maxima", "assign_kmeans", "assign_ranges", "parse_range",
           "write_states", "write_thumbnails", "read_states", "read_states_json",
           "states_command", "state_names", "STATES_FILE", "STATES_JSON"]

STATES_FILE = "states.npz"
STATES_JSON = "states.json"


class States:
    """``label`` (N,) int64, 0-based state of each particle (-1: none); ``z`` (K, d) the
    representative of each state; ``method``; ``info`` a list of K dicts (per-state
    details for states.json)."""

    def __init__(self, label: np.ndarray, z: np.ndarray, method: str, info: List[dict]):
        self.label = np.asarray(label, dtype=np.int64)
        self.z = np.asarray(z, dtype=np.float64)
        self.method, self.info = method, info

    def __len__(self):
        return len(self.z)

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.label[self.label >= 0], minlength=len(self)).astype(np.int64)

    def members(self, k: int) -> np.ndarray:
        """Positions (rows of z) of the particles of state ``k`` (0-based)."""
        return np.flatnonzero(self.label == k)


def _z(z):
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] == 0 or len(z) < 2:
        raise NmaemError("states need amplitudes z of shape (N, d) with N >= 2 and d >= 1 "
                         "(got %s)" % (z.shape,))
    return z


def assign_maxima(z: np.ndarray, bandwidth: Optional[float] = None,
                  min_height: float = DEFAULTS["min_height"],
                  min_prominence: float = DEFAULTS["min_prominence"],
                  min_significance: float = DEFAULTS["min_significance"],
                  z_cov: Optional[np.ndarray] = None) -> States:
    """States = the basins of the density maxima along PC1 (see the module docstring;
    with ``z_cov`` those of the deconvolved landscape, ``landscape.py``)."""
    from .maxima import landscape, maxima
    sm = maxima(landscape(_z(z), z_cov), bandwidth=bandwidth, min_height=min_height,
                min_prominence=min_prominence, min_significance=min_significance)
    mx = sm.maxima
    info = [dict(pc1_position=float(mx.positions[k]), density=float(mx.densities[k]),
                 n_near=int(len(mx.near[k])), bandwidth=float(mx.bandwidth),
                 landscape="deconvolved" if sm.landscape.deconvolved else "point estimates")
            for k in range(len(mx))]
    return States(mx.basin, sm.z, "maxima", info)


def assign_kmeans(z: np.ndarray, k: int, seed: int = 0) -> States:
    """States = the k-means clusters of z (numbered by decreasing size)."""
    z = _z(z)
    centres, labels, _ = kmeans(z, k, seed=seed)
    return States(labels, centres, "kmeans", [dict(seed=int(seed)) for _ in range(len(centres))])


def parse_range(text: str) -> List[Tuple[int, float, float]]:
    """``"PC:LOW:HIGH[,PC:LOW:HIGH...]"`` (e.g. ``"1:-5:5,2:0:3"``) -> [(pc, low, high)]:
    one state's box, 1-based PCs, in Angstrom along the PC axis."""
    box = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        bits = part.split(":")
        try:
            if len(bits) != 3:
                raise ValueError
            pc, lo, hi = int(bits[0]), float(bits[1]), float(bits[2])
        except ValueError:
            raise NmaemError("--range takes PC:LOW:HIGH intervals separated by commas, "
                             "e.g. 1:-5:5 or 1:-5:5,2:0:3 (got %r)" % text)
        if pc < 1 or not (np.isfinite(lo) and np.isfinite(hi)) or lo >= hi:
            raise NmaemError("--range %r: PC numbers start at 1 and each interval needs "
                             "LOW < HIGH" % text)
        box.append((pc, lo, hi))
    if not box:
        raise NmaemError("--range %r holds no interval" % text)
    return box


def assign_ranges(z: np.ndarray, boxes: Sequence) -> States:
    """States = boxes in PC coordinates (each a list of (pc, low, high) or a string for
    :func:`parse_range`); a particle goes to the first box holding it (interval ends
    included), -1 when none does."""
    z = _z(z)
    p = pca(z)
    pc = p.transform(z)
    boxes = [parse_range(b) if isinstance(b, str) else [tuple(t) for t in b] for b in boxes]
    if not boxes:
        raise NmaemError("give at least one --range")
    label = np.full(len(z), -1, dtype=np.int64)
    reps, info = [], []
    for k, box in enumerate(boxes):
        inside = np.ones(len(z), dtype=bool)
        centre = np.zeros(z.shape[1])
        for c, lo, hi in box:
            if c > z.shape[1]:
                raise NmaemError("--range uses PC%d but z has %d dimensions" % (c, z.shape[1]))
            inside &= (pc[:, c - 1] >= lo) & (pc[:, c - 1] <= hi)
            centre[c - 1] = 0.5 * (lo + hi)
        rows = np.flatnonzero(inside & (label < 0))
        label[rows] = k
        reps.append(z[rows].mean(0) if len(rows) else p.inverse(centre))
        info.append(dict(box=[[int(c), float(lo), float(hi)] for c, lo, hi in box],
                         data_range=[[float(pc[:, c - 1].min()), float(pc[:, c - 1].max())]
                                     for c, _, _ in box]))
    return States(label, np.array(reps), "ranges", info)


def state_names(n: int) -> List[str]:
    """``state_01``, ``state_02``, ... (two digits at least)."""
    from .export import numbered_name
    return [numbered_name("state", k, n) for k in range(n)]


def write_thumbnails(out_dir: str, names: Sequence[str], model: "AtomicModel", nm: "NormalModes",
                     z: np.ndarray) -> None:
    """``DIR/state_01.png``...: each state's model X0 + U z_k drawn by
    ``thumbnails.model_thumbnail`` in the frame of all of them (so that they compare)."""
    from .landscape import deformed_coords
    from .thumbnails import series_thumbnails
    series_thumbnails([deformed_coords(model, nm, zk) for zk in z], model.elements,
                      [os.path.join(out_dir, name) for name in names])


def write_states(out_dir: str, states: States, index: Optional[np.ndarray] = None,
                 pcs: Optional[PCA] = None, star_files: Optional[Sequence[str]] = None,
                 thumbnails: Optional[Sequence[str]] = None, n_atoms: Optional[int] = None,
                 **extra: Any) -> dict:
    """Write DIR/states.npz and DIR/states.json (atomically); returns the listing.
    ``index``: the latent rows (default 0..N-1); ``pcs``: a :class:`analysis.PCA` for the
    representatives' PC coordinates; ``star_files``: per-state STAR names already written
    (listed in states.json); ``thumbnails``: per-state PNG names already written;
    ``n_atoms`` M: each state's RMSD to the reference
    |z| / sqrt(M); ``extra``: more top-level entries of states.json."""
    n = len(states.label)
    index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, np.int64)
    counts = states.counts
    atomic_savez(os.path.join(out_dir, STATES_FILE), label=states.label, index=index,
                 z=states.z, count=counts)
    names = state_names(len(states))
    rows = []
    for k in range(len(states)):
        row = dict(state=k + 1, name=names[k], n_particles=int(counts[k]),
                   z=[float(v) for v in states.z[k]],
                   pc_coords=None if pcs is None else [float(v) for v in
                                                       pcs.transform(states.z[k])],
                   rmsd_to_reference=None if not n_atoms else
                   float(np.linalg.norm(states.z[k]) / np.sqrt(n_atoms)), star=None)
        row.update(states.info[k])
        if star_files:
            row["star"] = star_files[k]
        if thumbnails:
            row["thumbnail"] = thumbnails[k]
        rows.append(row)
    listing = dict(method=states.method, n_particles=n, n_assigned=int((states.label >= 0).sum()),
                   d=int(states.z.shape[1]), states=rows)
    listing.update(extra)
    with atomic_open(os.path.join(out_dir, STATES_JSON), "w") as fh:
        fh.write(format_json(listing) + "\n")
    return listing


def read_states(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(label (N,), index (N,), z (K, d), count (K,)) of a states.npz, checked."""
    path = os.fspath(path)
    data = read_npz(path, "states")
    for key in ("label", "index", "z", "count"):
        if key not in data:
            fail(path, "not a states file: missing %s" % key)
    label, index, z, count = (np.asarray(data[k]) for k in ("label", "index", "z", "count"))
    if label.ndim != 1 or index.shape != label.shape:
        fail(path, "label and index must be (N,) arrays of the same length")
    if z.ndim != 2 or count.shape != (len(z),):
        fail(path, "z must be (K, d) and count (K,)")
    if len(label) and (label.min() < -1 or label.max() >= len(z)):
        fail(path, "labels must lie in -1..K-1 (K = %d)" % len(z))
    if not np.array_equal(np.bincount(label[label >= 0], minlength=len(z)), count):
        fail(path, "count disagrees with label")
    return label.astype(np.int64), index.astype(np.int64), z.astype(np.float64), \
        count.astype(np.int64)


def states_command(latent_path: str, out_dir: str, maxima: bool = False,
                   kmeans_k: Optional[int] = None, ranges: Sequence = (), seed: int = 0,
                   particles: Optional[str] = None, force: bool = False,
                   bandwidth: Optional[float] = None, min_height: float = DEFAULTS["min_height"],
                   min_prominence: float = DEFAULTS["min_prominence"],
                   min_significance: float = DEFAULTS["min_significance"],
                   model_atoms: Optional[int] = None, thumbnails_run: Optional[str] = None,
                   log: Callable[[str], object] = print, formats: Sequence[str] = ("star",),
                   reconstruct: bool = False, model_run: Optional[str] = None,
                   refine: bool = True, half_seed: int = 0) -> dict:
    """``nmaem states``: exactly one of ``maxima``, ``kmeans_k``, ``ranges``; see the
    module docstring. ``particles``: the particle file given to ``nmaem infer`` (STAR or
    .cs), for one STAR per state. ``model_atoms`` M adds each state's RMSD to the
    reference, |z| / sqrt(M). ``thumbnails_run``: a training run folder whose reference and
    modes give each state's model X0 + U z, drawn as ``state_01.png``... (its projections
    along z, y and x, ``thumbnails.model_thumbnail``, one frame for all states).
    ``formats``: the subsets of ``particles`` per state ("star", and "cs" for a .cs input).
    ``reconstruct``: each state's maps (``statemaps.state_maps``) from ``particles`` with
    the models of the run ``model_run`` (refined unless ``refine`` is off); ``half_seed``
    seeds the random halves."""
    from ..io.latent import read_latent
    from ..io.outputs import OVERWRITE_HINT, command_outputs
    chosen = [bool(maxima), kmeans_k is not None, bool(ranges)]
    if sum(chosen) != 1:
        raise NmaemError("choose one of --maxima, --kmeans K or --range (got %d)"
                         % sum(chosen))
    latent = read_latent(latent_path)
    if latent.d == 0:
        fail(latent_path, "the latent file has no amplitudes (d = 0): no states to find")
    if latent.n < 2:
        fail(latent_path, "states need at least 2 particles")
    if maxima:
        st = assign_maxima(latent.z, bandwidth=bandwidth, min_height=min_height,
                           min_prominence=min_prominence, min_significance=min_significance,
                           z_cov=latent.z_cov)
        if latent.z_cov is None:
            from .maxima import POINT_ESTIMATE_NOTE
            log("states: note: %s" % POINT_ESTIMATE_NOTE)
    elif kmeans_k is not None:
        if int(kmeans_k) < 1:
            raise NmaemError("--kmeans must be at least 1 (got %d)" % int(kmeans_k))
        st = assign_kmeans(latent.z, kmeans_k, seed=seed)
    else:
        st = assign_ranges(latent.z, ranges)
    names = state_names(len(st))
    formats = _subset_formats(formats, particles)
    stars = [n + ".star" for n in names] if particles else None
    subsets = [n + ".cs" for n in names] if "cs" in formats else []
    table = None
    if particles:
        from ..io.particles import read_particles
        from ..io.provenance import check_particles
        table = read_particles(particles)
        if latent.index.max() >= table.n:
            fail(latent_path, "index %d beyond the %d particles of %s"
                 % (latent.index.max(), table.n, particles))
        check_particles(latent.particles, latent_path, table)   # the rows of that file
    run = None
    if thumbnails_run is not None:
        from .landscape import check_latent_d, load_run
        run = load_run(thumbnails_run)
        check_latent_d(latent, run[1], thumbnails_run, run[2])
    thumbs = [n + ".png" for n in names] if run is not None else None
    rec, maps = None, []
    if reconstruct:
        from .statemaps import map_files
        rec = _check_reconstruction(particles, table, latent, st, model_run,
                                    run is None or thumbnails_run != model_run)
        maps = map_files(names, st.label)
    products = [STATES_FILE, STATES_JSON] + (stars or []) + (thumbs or []) + subsets + maps
    with command_outputs(out_dir, "states", products=products, inputs=[latent_path, particles],
                         force=force, hint=OVERWRITE_HINT) as out:
        extra = {}
        if rec is not None:     # each state's folder: the files listed in the manifest
            extra = _state_maps(out.folder, names, st, rec, model_run, refine, half_seed, log)
        if table is not None:
            _write_subsets(out.folder, particles, table, latent.index, st, stars, subsets)
        if run is not None:
            write_thumbnails(out.folder, thumbs, run[0], run[1], st.z)
        from .maxima import from_latent
        listing = write_states(out.folder, st, index=latent.index, pcs=from_latent(latent).pca,
                               star_files=stars, thumbnails=thumbs, n_atoms=model_atoms,
                               latent=os.path.abspath(latent.path),
                               particles=None if particles is None
                               else os.path.abspath(particles), **extra)
    log("states: %d %s state(s), %d of %d particles assigned (%s) -> %s"
        % (len(st), st.method, listing["n_assigned"], latent.n,
           ", ".join(str(int(c)) for c in st.counts), out_dir))
    return listing


def _subset_formats(formats, particles):
    from ..io.subsets import SUBSET_FORMATS
    formats = tuple(formats or ("star",))
    bad = [f for f in formats if f not in SUBSET_FORMATS]
    if bad:
        raise NmaemError("--format takes %s (got %s)" % (" or ".join(SUBSET_FORMATS), bad[0]))
    if "cs" in formats and (not particles or not str(particles).lower().endswith(".cs")):
        raise NmaemError("--format cs writes each state's rows of a cryoSPARC .cs particle "
                         "file with its own fields: give --particles FILE.cs")
    return formats


def _write_subsets(out_dir, particles, table, index, st, stars, subsets):
    """Each state's rows of the particle file: a STAR keeping the input's blocks and
    columns (a converted one for a .cs input), and the .cs subsets."""
    from ..io.subsets import write_cs_subset, write_star_subset
    from ..io.star import write_star
    is_star = str(particles).lower().endswith(".star")
    for k, name in enumerate(stars):
        rows = index[st.members(k)]
        if is_star:
            write_star_subset(particles, os.path.join(out_dir, name), rows)
        else:
            write_star(os.path.join(out_dir, name), table.subset(rows))
    for k, name in enumerate(subsets):
        write_cs_subset(particles, os.path.join(out_dir, name), index[st.members(k)])


def _check_reconstruction(particles, table, latent, st, model_run, check_run=True):
    """Before any work: what ``--reconstruct`` needs (particles, a run, RELION, one box and
    pixel size, the reference model in the box) and, with ``check_run``, that the latent
    was made by the run ``model_run`` (its model fingerprint); returns the reconstruction
    table."""
    from ..base.relion import relion_program
    from .landscape import check_latent_d, load_run
    from .statemaps import check_model_in_box, particle_geometry, reconstruction_table
    if table is None:
        raise NmaemError("--reconstruct needs --particles (the particle file given to "
                         "nmaem infer)")
    if not model_run:
        raise NmaemError("--reconstruct needs --model RUN (the training run whose reference "
                         "and modes give each state's model)")
    relion_program("relion_reconstruct")
    rec = reconstruction_table(table, latent)
    box, apix = particle_geometry(rec.subset(st.label >= 0))
    model, nm, cfg = load_run(model_run)
    if check_run:
        check_latent_d(latent, nm, model_run, cfg)
    # refused before the long work; a state's model reaching past the box is warned about
    # once, by state_maps, on the model it maps
    check_model_in_box(model.coords, box, apix, "the reference model of %s" % model_run)
    return rec


def _state_maps(out_dir, names, st, rec, model_run, refine, half_seed, log):
    """:func:`statemaps.state_maps` of the states; returns the entries of states.json (its
    per-state rows get theirs in ``st.info``)."""
    from .statemaps import MAP_FILES, state_maps, state_models
    model, coords, records = state_models(model_run, st.z, refine=refine, log=log)
    infos, corr = state_maps(out_dir, names, rec, st.label, model, coords, seed=half_seed,
                             log=log)
    for k, (name, info) in enumerate(zip(names, infos)):
        row = st.info[k]
        if info is None:
            row.update(map=None, map_note="too few particles for two half-maps")
            continue
        row.update({key: "%s/%s" % (name, MAP_FILES[key])
                    for key in ("map", "half1", "half2", "model", "model_map", "fsc")})
        row["map_figure"] = "%s/%s" % (name, MAP_FILES["figure"])
        row["model_refined"] = bool(records[k] is not None
                                    and records[k]["refinement"].get("refined", False))
        for key in ("resolution_0143", "fsc_0143_crossed", "model_map_resolution_05",
                    "model_fsc_05_crossed", "n_half1", "n_half2", "halves"):
            row[key] = info[key]
    return dict(map_model_correlation=corr)


def read_states_json(path: str) -> dict:
    """The listing of ``DIR/states.json`` (one-line error when unreadable)."""
    path = os.fspath(path)
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        fail(path, "cannot read the states listing (%s)" % exc)
