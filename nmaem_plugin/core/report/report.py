"""``nmaem report RUN -o DIR``: the figures of a run as PNG files and an index.html.

Figures come from :mod:`nmaem_plugin.core.report.figures` (the ones the Scipion viewers show):
training curves (``RUN/log.csv``), the modes' diagnostics (``--modes``, default the run's
``modes.npz``), and with ``--latent`` the latent landscape and the mode amplitudes,
split by ground-truth frame with ``--truth SIMDIR`` (a folder of ``nmaem simulate``).
"""
import html
import os
from typing import Callable, Optional, Sequence

import numpy as np

from ..base.atomic import atomic_copy, atomic_open
from ..base.errors import fail, require_file, require_folder
from ..io.outputs import command_outputs


def _truth_file(truth_dir):
    """TRUTH/ground_truth.npz, or a one-line error when the folder or the file is missing."""
    gt_path = os.path.join(truth_dir, "ground_truth.npz")
    require_folder(truth_dir, "simulated dataset folder (--truth)")
    if not os.path.isfile(gt_path):
        fail(gt_path, "missing: --truth must be a folder written by nmaem simulate")
    return gt_path


def _frames_for(latent, truth_dir):
    gt_path = _truth_file(truth_dir)
    try:
        with np.load(gt_path, allow_pickle=False) as f:
            frame = f["frame"] if "frame" in f.files else None
            fingerprint = (f["particles_fingerprint"] if "particles_fingerprint" in f.files
                           else None)
    except Exception as exc:  # numpy raises several types for corrupt archives
        fail(gt_path, "not readable (%s)" % (str(exc).splitlines() or ["?"])[0])
    from ..io.latent import check_latent
    from ..io.provenance import loads
    check_latent(latent, truth=(loads(fingerprint), gt_path))
    if frame is None:
        fail(gt_path, "no 'frame' array")
    if latent.index.max() >= len(frame):
        fail(latent.path, "index goes up to %d but %s has %d particles"
             % (latent.index.max(), gt_path, len(frame)))
    return np.asarray(frame)[latent.index]


def read_models_listing(models_dir: str) -> dict:
    """The ``models.json`` of an ``nmaem export`` folder (a dict), or a one-line error."""
    import json
    path = os.path.join(str(models_dir), "models.json")
    if not os.path.isfile(path):
        fail(path, "missing: --models must be a folder written by nmaem export")
    try:
        with open(path) as fh:
            listing = json.load(fh)
    except ValueError:
        fail(path, "not readable as JSON")
    if not isinstance(listing, dict) or not isinstance(listing.get("models"), list):
        fail(path, "not a models listing: no 'models' list")
    return listing


# the documentation's address (an installed package has no docs/ folder)
ANALYSIS_DOC = "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/analysis.md"

VALIDATION_COLUMNS = (
    ("bond_rmsd", "bond rms dev. (A)", "%.3f"), ("bond_max_deviation", "max bond dev. (A)", "%.3f"),
    ("angle_rmsd", "angle rms dev. (deg)", "%.2f"), ("close_contacts", "contacts < 2.2 A", "%d"),
    ("ramachandran_outliers", "Ramachandran outliers", "%d"),
    ("rmsd_to_plain", "moved by refinement (A)", "%.2f"))


def _thumbnail(folder, row):
    """The path of a row's ``thumbnail`` PNG in ``folder`` when it exists, else None."""
    name = row.get("thumbnail")
    if not name:
        return None
    path = os.path.join(str(folder), os.path.basename(str(name)))
    return path if os.path.isfile(path) else None


def validation_rows(listing: dict, folder: Optional[str] = None) -> list[tuple]:
    """(file, n particles, [formatted figures], thumbnail path or None) per model; figures
    '-' when the model was not refined (``nmaem export --no-refine``); thumbnails looked up
    in ``folder`` (the export folder)."""
    out = []
    for m in listing["models"]:
        v = m.get("validation") or {}
        cells = [(fmt % v[k]) if v.get(k) is not None else "-" for k, _, fmt in
                 VALIDATION_COLUMNS]
        out.append((str(m.get("file", "?")), m.get("n_particles"), cells,
                    None if folder is None else _thumbnail(folder, m)))
    return out


def states_rows(states_dir: str) -> tuple[dict, list[tuple]]:
    """(listing, rows) of an ``nmaem states`` folder: one row per state, (state, particles,
    share of the particles, RMSD of its model to the reference or '-', its STAR file or
    '-', the path of its model's thumbnail or None); a one-line error when the folder has
    no states.json."""
    from ..analysis.states import STATES_JSON, read_states_json
    listing = read_states_json(os.path.join(str(states_dir), STATES_JSON))
    if not isinstance(listing, dict) or not isinstance(listing.get("states"), list):
        fail(os.path.join(str(states_dir), STATES_JSON), "not a states listing: no 'states'")
    n = max(int(listing.get("n_particles") or 0), 1)
    rows = []
    for s in listing["states"]:
        r = s.get("rmsd_to_reference")
        rows.append((str(s.get("name", s.get("state"))), int(s["n_particles"]),
                     "%.1f%%" % (100.0 * s["n_particles"] / n),
                     "-" if r is None else "%.2f" % r, s.get("star") or "-",
                     _thumbnail(states_dir, s)))
    return listing, rows


def write_report(run_dir: str, out_dir: str, latent: Optional[str] = None,
                 modes: Optional[str] = None, truth: Optional[str] = None,
                 models: Optional[str] = None, states: Optional[str] = None,
                 log: Callable[[str], object] = print, force: bool = False,
                 inputs: Sequence[Optional[str]] = ()) -> list[tuple[str, str]]:
    """Write the figures and ``index.html`` into ``out_dir``; returns the list of
    (file name, caption) written. Raises NmaemError (one line) on missing input.
    ``models``: an ``nmaem export`` folder, whose models' validation becomes a table;
    ``states``: an ``nmaem states`` folder, a table of its states; their thumbnails are
    copied into ``out_dir/models/`` and ``out_dir/states/``. The files are written through
    the output policy (``io.outputs.command_outputs``): ``force`` replaces an earlier
    report of nmaem there; ``inputs`` are files it must not replace."""
    from ..base.figures import save
    from .figures import (latent_landscape, load_modes_file, mode_amplitudes, modes_overview,
                          training_curves)
    from ..io.latent import read_latent
    from ..io.runfolder import config_path, log_path, read_config_or_none, read_log_columns
    run_dir = str(run_dir)
    require_folder(run_dir, "training run folder")
    log_csv = log_path(run_dir)
    if not os.path.isfile(log_csv):
        fail(log_csv, "missing: not a training run folder, or no epoch finished yet")
    try:
        config = read_config_or_none(run_dir) or {}
    except ValueError:
        fail(config_path(run_dir), "not readable as JSON")
    if modes is None and config.get("modes"):
        candidate = os.path.join(run_dir, str(config["modes"]))
        modes = candidate if os.path.isfile(candidate) else None
    elif modes is not None:
        require_file(modes, "modes file")
    if truth is not None and latent is None:
        fail(truth, "--truth needs --latent (the frames colour the latent landscape)")
    listing = read_models_listing(models) if models is not None else None
    state_table = states_rows(states) if states is not None else None
    lat = read_latent(latent) if latent is not None else None   # checks before any output
    if truth is not None:
        _truth_file(truth)          # a missing truth fails before the provenance warnings
    if lat is not None and config.get("reference") and config.get("modes"):
        from ..io.latent import check_latent
        check_latent(lat, run_dir, config)          # made by this run (provenance.py)
    frames = _frames_for(lat, truth) if truth is not None else None
    if modes is not None:
        try:
            mdata = load_modes_file(modes)
        except Exception as exc:  # not an npz, truncated...
            fail(modes, "not a readable modes file (%s)" % (str(exc).splitlines() or ["?"])[0])
        for key in ("modes", "eigenvalues", "atom_ids"):
            if key not in mdata:
                fail(modes, "not a modes file: no '%s'" % key)
    figures = ["training.png"] + (["modes.png"] if modes is not None else [])
    if lat is not None:
        if lat.d == 0:
            fail(lat.path, "z has d = 0 amplitudes (a run without modes): no landscape")
        if lat.n < 2:
            fail(lat.path, "one particle: no landscape")
        figures += ["latent.png"] + (["amplitudes.png"] if lat.d > 1 else [])
    # thumbnails are copied into the report (its links stay inside its folder)
    model_rows = validation_rows(listing, models) if listing is not None else None
    copies = {}
    for sub, rows in (("models", model_rows or ()),
                      ("states", state_table[1] if state_table is not None else ())):
        for row in rows:
            if row[-1] is not None:
                copies[row[-1]] = "%s/%s" % (sub, os.path.basename(row[-1]))
    with command_outputs(out_dir, "report", products=figures + sorted(copies.values())
                         + ["index.html"], inputs=inputs, force=force, log=None) as out:
        written = []

        def emit(fig, name, caption):
            save(fig, out.path(name))
            written.append((name, caption))
            log("wrote %s" % out.path(name))

        rows = read_log_columns(log_csv)
        n_ep = len(rows.get("epoch", []))
        emit(training_curves(rows, title="Training of %s" % run_label(run_dir)),
             "training.png",
             "Training: loss on the training and validation particles per epoch, and "
             "training speed in images per second (%d epochs, %s)." % (n_ep, log_csv))
        if modes is not None:
            emit(modes_overview(mdata), "modes.png",
                 "Normal modes (%s): ANM eigenvalues, collectivity of each mode, per-residue "
                 "fluctuation (sum over modes of |u|^2 / eigenvalue)%s." % (
                     modes, ", overlap with the target and floor RMSD"
                     if "target_overlap" in mdata else ""))
        if lat is not None:
            what = ("histogram of z with its density maxima" if lat.d == 1 else
                    "explained variance of the principal components of z, PC1 histogram "
                    "with its density maxima, PC1-PC2 density (hexagonal bins, log scale)")
            if frames is not None:
                what += ", PC1 by ground-truth frame (%s)" % truth
            n_atoms = (int(np.shape(mdata["modes"])[1]) if modes is not None
                       and np.ndim(mdata["modes"]) == 3 else None)
            emit(latent_landscape(lat.z, frames=frames, n_atoms=n_atoms), "latent.png",
                 "Latent landscape of %s particles (%s): %s." % (format(lat.n, ","),
                                                                 lat.path, what))
            if lat.d > 1:
                emit(mode_amplitudes(lat.z), "amplitudes.png",
                     "Distribution of each mode amplitude z_l (Angstrom).")
        for src, name in sorted(copies.items()):
            atomic_copy(src, out.path(name))
        _write_index(out.path("index.html"), run_dir, written, models, model_rows, states,
                     state_table, copies)
        log("wrote %s" % out.path("index.html"))
    return written


def run_label(run_dir: str) -> str:
    """How figures name a run: its folder's name, with its parent's when the name alone
    says little (``run``, ``RUN``, ``train``...)."""
    path = os.path.abspath(str(run_dir))
    name = os.path.basename(path)
    if name.lower() in ("run", "train", "training", "output", "out", "results"):
        name = os.path.join(os.path.basename(os.path.dirname(path)), name)
    return name


def _thumbnail_cell(name):
    """A table cell showing the PNG ``name`` (a path inside the report folder)."""
    if name is None:
        return "<td>-</td>"
    src = html.escape(name)
    return "<td><a href=\"%s\"><img class=\"thumb\" src=\"%s\" alt=\"%s\"></a></td>" % (
        src, src, html.escape(os.path.basename(name)))


def _write_index(index_path, run_dir, written, models=None, model_rows=None, states=None,
                 state_table=None, copies=None):
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
             "<title>nmaem report: %s</title>" % esc(run_dir),
             "<style>body{font-family:sans-serif;max-width:1150px;margin:auto}"
             "img{max-width:100%}figure{margin:1.5em 0}"
             "figcaption{color:#333}img.thumb{height:80px}</style></head><body>",
             "<h1>nmaem report</h1>",
             "<p>Training run: <code>%s</code></p>" % esc(os.path.abspath(run_dir))]
    for name, caption in written:
        parts.append("<figure><img src=\"%s\" alt=\"%s\"><figcaption>%s</figcaption></figure>"
                     % (esc(name), esc(name), esc(caption)))
    copies = copies or {}
    if model_rows is not None:
        parts.append("<h2>Models</h2><p>Geometry of the models in <code>%s</code> (refined "
                     "by nmaem export; %s), against the reference's own bonds and angles:</p>"
                     % (esc(os.path.abspath(str(models))), ANALYSIS_DOC))
        head = "".join("<th>%s</th>" % esc(t) for _, t, _ in VALIDATION_COLUMNS)
        parts.append("<table border=\"1\" cellpadding=\"4\"><tr><th>model</th>"
                     "<th>particles</th>%s<th>projections (z, y, x)</th></tr>" % head)
        for name, n, cells, thumb in model_rows:
            parts.append("<tr><td>%s</td><td>%s</td>%s%s</tr>" % (
                esc(name), "-" if n is None else n,
                "".join("<td>%s</td>" % esc(c) for c in cells),
                _thumbnail_cell(copies.get(thumb))))
        parts.append("</table>")
    if state_table is not None:
        slisting, srows = state_table
        parts.append("<h2>States</h2><p>%d states (%s) of %s particles, %s assigned, in "
                     "<code>%s</code> (nmaem states; %s):</p>" % (
                         len(srows), esc(str(slisting.get("method"))),
                         format(int(slisting.get("n_particles") or 0), ","),
                         format(int(slisting.get("n_assigned") or 0), ","),
                         esc(os.path.abspath(str(states))), ANALYSIS_DOC))
        parts.append("<table border=\"1\" cellpadding=\"4\"><tr><th>state</th>"
                     "<th>particles</th><th>share</th><th>model RMSD to reference (A)</th>"
                     "<th>particles file</th><th>model projections (z, y, x)</th></tr>")
        for row in srows:
            parts.append("<tr>%s%s</tr>" % ("".join("<td>%s</td>" % esc(str(c))
                                                    for c in row[:-1]),
                                            _thumbnail_cell(copies.get(row[-1]))))
        parts.append("</table>")
    parts.append("</body></html>")
    with atomic_open(index_path, "w") as fh:
        fh.write("\n".join(parts) + "\n")
