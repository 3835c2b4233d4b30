"""Held-out particles made without our renderer, and the metrics of issue 28.

Why: on particles made by someone else's renderer, with a noise spectrum that falls steeply
at low frequency onto a flat floor and a transition that is not a straight line in mode
space, the inferred states came out shrunk toward the reference (issue 28), while our own
simulator (``nmaem simulate``) did not show it. This script makes such data independently of
``nmaem_plugin``'s renderer, and runs the user's first-run configuration on them with the
issue's metrics. The plugin is driven through the ``nmaem`` command (subprocesses); the only
package imports are the frame distributions of ``simulate`` (one home for "discontinuous")
and the particle fingerprint of ``provenance`` (so that ``nmaem evaluate`` can check that a
latent file belongs with the truth).

Subcommands (each writes under ``--work``, default ``/work/scratch/heldout`` on the team
machine; every step is skipped when its output exists, unless ``--force``):

``paths``
    The transitions, in the reference's atom order and naming, every frame superposed on
    the reference (4AKE, ``nmaem_plugin/data/ak_open_4ake.pdb``) by the CORE domain
    (residues 1-29, 60-121, 160-214) as a consensus refinement docked to the reference
    would, oriented open -> closed:

    * ``dims``: the DIMS MD transition of E. coli adenylate kinase shipped with the PyPI
      package MDAnalysisTests (``MDAnalysisTests/data/adk.psf`` + ``adk_dims.dcd``, 98
      frames, closed -> open, reversed here). Read with the small PSF and DCD readers
      below (CHARMM DCD: Fortran records of float32 X, Y, Z per frame), so that this script
      needs no MDAnalysis; they were checked once against MDAnalysis 2.11.0 (in a scratch
      venv): identical coordinates (``--check-mdanalysis VENV_PYTHON`` repeats it). Heavy
      atoms are matched to the reference by residue number and atom name, CHARMM names
      mapped (HSD/HSE/HSP -> HIS, ILE CD -> CD1, C-terminal OT1/OT2 -> O/OXT); every atom
      of the reference must be matched. The report gives the RMSD of the DIMS end frames to
      the open and closed crystals after superposition.
    * ``curved``: open crystal -> an intermediate whose LID (122-159) has closed but whose
      NMP (30-59) has not -> closed crystal (1AKE). Built by domain-wise superposition
      (the closed crystal on the open one by the CORE; each moving domain's closed pose
      relative to the CORE); each segment moves one domain along the screw motion (Chasles)
      between its two poses, rotation about the screw axis interpolated in angle, while its
      internal coordinates and the CORE's interpolate linearly. Not linear in Cartesian
      space (the domains turn), and an L in mode space (LID first, then NMP).

    ``WORK/paths/NAME.npz``: ``frames`` (F, M, 3) in the reference file's frame, the
    reference's ``atom_ids``, the ``core`` mask; ``WORK/paths/NAME.pdb`` (multi-model);
    ``WORK/paths/report.json``.

``render``
    Clean particles of one path (no noise, no nuisance): per particle a frame (from a
    distribution over the path: ``islands``, the three separated islands of
    ``nmaem simulate --distribution discontinuous``, or ``continuous``), a pose uniform on
    SO(3), an origin N(0, 2 A) per axis, a log-normal defocus (mean 1 um, sd 0.3 um) with
    astigmatism |N(0, 200 A)| at a random angle, 300 kV, Cs 2.7 mm, amplitude contrast 0.1.
    Renderer: for each frame, its heavy atoms -> 3D Coulomb potential by
    ``gemmi.DensityCalculatorE`` (electron form factors, International Tables C 4.3.2.2)
    on a fine grid (``--oversample`` 2: 0.4 A for 0.8 A pixels) with a blur of 10 A^2 to
    keep the fine grid free of aliasing, removed again in Fourier space, then cropped in
    Fourier space to the particles' grid (a band-limited map of box D at the pixel size);
    -> ``relion_project --ctf --ang`` at each particle's pose, origin and CTF, from a
    RELION 3.1 STAR written here. Default 192 px at 0.8 A (the paper's, and the defaults
    of ``nmaem simulate`` and ``bench/ak_paper.py``). Not 128 px at 1.2 A, though the
    field of view is the same (153.6 A) and the training box (``--box 64``) sees 64 px
    at 2.4 A either way (a Fourier crop): the SNR is defined per pixel, so at the same
    nominal dB, white noise on 1.2 A pixels puts 2.25x more noise power into each
    frequency the training sees than on 0.8 A pixels, and "-20 dB" would not mean what
    it means in our other benchmarks and in issue 28. Writes ``CLEAN/clean.mrcs``
    (N, D, D) and ``CLEAN/clean.npz`` (poses, origins, CTF, frames in the dataset frame).
    The map is accurate to 0.3 % (relative L2 of a 2x against a 4x oversampled grid).

``check``
    Renderer agreement on a few particles of a clean set: the same particles rendered by
    our renderer (``nmaem simulate --like STAR --ref FRAME.pdb --no-noise``, per frame,
    which renders a STAR's own poses, origins and CTFs) against ``relion_project``'s images:
    normalised cross-correlation per particle, over the full image and after a low-pass
    at the training box's Nyquist (what ``--box 64`` sees). This is an independent check
    of our pose, origin and CTF conventions (a mirror, transposition or origin sign would
    give a low or negative NCC, and is also tested against the flipped/transposed images).

    Result (``check --clean WORK/clean_dims_islands_n8000``, 16 particles of 192 px at
    0.8 A, astigmatic CTFs, origins N(0, 2 A)): NCC median 0.99995, minimum 0.99990 over
    the full image; median 0.999989, minimum 0.999985 in the band of the 64 px training
    box. Controls: the same images transposed, mirrored in x, or rendered with the
    origins' sign flipped give median NCC 0.21, 0.19, 0.31 (at most 0.36, 0.36, 0.71).
    Our pose, origin and CTF conventions are RELION's. (RELION's projections are sums
    over voxels, ours line integrals in A: a constant scale 1 / apix = 1.25, irrelevant
    here since the SNR sets the noise.) Also ``nmaem train``'s own check on these
    particles: no origin, hand or pixel-size alternative is preferred (fit_check.json).

``information``
    The Fisher information of the images about the path coordinate under each noise shape,
    against white noise of the same total variance (``WORK/CLEAN/information.json``):
    sum over the training box's band of |dS/dt|^2 / P, dS/dt from ``relion_project``
    images of frames c +- 3 at 32 particles' poses and CTFs, c each island's centre.
    On the DIMS islands (192 px, 0.8 A, band of the 64 px box), median ratios: floor
    (s0 = 0.15) 0.48, inverse 0.48, bump 0.94, and ``nmaem simulate --noise-falloff 10``
    0.41.

``corrupt``
    A dataset from a clean set, with the nuisances of real data, each switchable, with
    their ground truth: noise of a spectral shape (``--noise``: ``white``; ``floor``,
    P(s) = f + (1 - f) exp(-(s / s0)^2), f = 0.1 (``--floor``), s0 = 0.15 1/A
    (``--s0``): power at low frequency falling onto a flat floor, as ice and the detector
    give, s0 chosen so that the images' Fisher information about the path coordinate is
    0.48 of white noise's at the same SNR, as issue 28 measured on its data (``information``
    below: s0 = 0.04, 0.08, 0.1, 0.15, 0.2 1/A give 0.96, 0.87, 0.77, 0.48, 0.36); ``inverse``, P(s) = s1 / (s + s1), s1 = 0.02 1/A: a 1/f-like
    fall-off; ``bump``, P(s) = 1 + 4 exp(-((s - 0.1) / 0.02)^2): white with a bump at
    10 A), s in 1/A, the total variance set by the SNR, 10 log10(var(clean CTF image) /
    var(noise)) (``--snr-db``, default -20; the clean variance is the mean over particles
    of each image's variance); per-particle contrast a_i, log-normal with mean 1 and sd
    0.2 (``--contrast-sd``), multiplying the clean image; a grey offset N(0, sigma^2)
    (``--offset-sd`` 1, in units of the noise sd); RELION normalisation by the real tool
    (``relion_preprocess --operate_on STACK --norm --bg_radius 72`` for 192 px: the
    background outside 0.75 of the box half-width, RELION's default, to mean 0 and sd 1
    after a fitted ramp is removed; ``--no-normalise`` to skip); pose errors: the angles
    written are those of E A_true, E a random rotation of rms angle 2 degrees
    (``--angle-error``); defocus errors: U and V written plus one N(0, 300^2 A^2) per
    particle (``--defocus-error``). The images are made with the true poses and CTFs.
    Writes the plugin's simulation contract (``nmaem_plugin/core/sim/simulate.py``), so that
    ``nmaem evaluate --truth DIR`` scores it: ``particles.star`` (RELION 3.1, optics
    table, ``rlnImageId`` 1..N), ``stacks/*.mrcs``, ``ground_truth.npz`` (``frame``,
    ``shift`` (the true, = -origin), ``euler`` / ``euler_file`` (true / written angles),
    ``origin_file``, ``defocus_u`` / ``defocus_u_file`` / ``defocus_v_file``,
    ``contrast``, ``offset``, ``state`` (the island of each particle, 0 = open end),
    ``rigid_core``, ``noise_power`` (the radial noise shape on the image grid),
    ``params`` and ``particles_fingerprint``), ``frames.pdb`` (the path's frames in the
    reference's atom order and naming, in the dataset frame), ``reference.pdb`` (the 4AKE
    crystal, or with ``--reference frame0`` the path's first frame, in the same frame).
    The dataset frame puts the reference's atom mean at the box centre (D/2) * apix, the
    map centre that RELION rotates about.

``run``
    The user's first run on a dataset: ``nmaem modes DIR/reference.pdb -o DIR/modes.npz``
    (16 modes), ``nmaem train --particles DIR/particles.star --ref DIR/reference.pdb
    --modes DIR/modes.npz -o RUN --box 64 --epochs 30 --encoder small``, ``nmaem infer``
    with its defaults, ``nmaem evaluate`` and ``nmaem states --maxima``, then the metrics
    (below) into ``RUN/heldout_metrics.json``. ``--variant paper4k``: the first 4,000
    particles (``DIR/particles_first4000.star``, matched to the truth by ``rlnImageId``),
    12 epochs, the paper's encoder. ``--train-args`` / ``--infer-args`` pass more flags.

``metrics``
    Only the metrics of an existing run (e.g. after the lead's ``nmaem infer`` again).

``summary``
    A Markdown table of the metrics files given (``RUN/heldout_metrics.json`` ...).

Metrics (``RUN/heldout_metrics.json``; true z of a particle = its frame's displacement
from the reference projected on the modes by least squares onto U; states = the islands,
0 open, 1 intermediate, 2 closed; all RMSDs over every atom, no superposition: the frames
are in the reference's frame):

* ``amplitude``: ``ratio`` = (mean z of the closed state - mean z of the open state,
  inferred) . u / |true difference|, u the unit true difference; ``cosine`` between the
  inferred and the true difference; both lengths.
* ``states``: each state's model X0 + U z at its mean inferred z against the state's mean
  true structure (``rmsd``), that structure's 16-mode floor (``floor``: the closest any z
  gets), ``excess`` = rmsd - floor; and at the mean true z (= the floor model).
* ``scatter``: per-particle sd of (z_i - state mean) . u (inferred and true), pooled over
  the states, against the states' separation |true difference|.
* ``abs_corr_pc1_frame`` (PCA of the inferred z, as ``nmaem evaluate``) and
  ``pc1_explained_variance``.
* ``maxima``: the states ``nmaem states --maxima`` finds, each model's RMSD to every true
  state's mean structure, the nearest state, its floor and excess.
* ``coverage`` (when ``latent.npz`` has ``z_cov`` (N, d, d)): the fractions of particles
  whose true z lies inside the 68 % and 95 % posterior regions (Mahalanobis distance
  against the chi-square quantiles with d degrees of freedom); else null.
* ``path_in_mode_space``: the true z of every frame; how far the path bends away from the
  straight line between its ends (max and rms distance / |end - start|).
* ``noise_model``: the run's noise spectrum (``RUN/noise.npz``) against the true shape,
  per shell in the training band (relative deviation after a common scale).
* ``evaluate``: the summary of ``nmaem evaluate``.

The main configuration of issue 28 (exact commands, from the worktree root; ``PY`` the
project's venv python with the tree on PYTHONPATH; the trainings take about 20-30 minutes
each on one core)::

    W=/work/scratch/heldout
    $PY bench/heldout.py paths --work $W
    $PY bench/heldout.py render --work $W --path dims --n 8000 --distribution islands
    $PY bench/heldout.py check  --work $W --clean $W/clean_dims_islands_n8000
    $PY bench/heldout.py corrupt --work $W --clean $W/clean_dims_islands_n8000 \\
        --noise floor --snr-db -20 -o $W/dims_islands_floor
    $PY bench/heldout.py corrupt --work $W --clean $W/clean_dims_islands_n8000 \\
        --noise white --snr-db -20 -o $W/dims_islands_white
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 19 \\
        $PY bench/heldout.py run --data $W/dims_islands_floor --name run_user
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 19 \\
        $PY bench/heldout.py run --data $W/dims_islands_white --name run_user
    $PY bench/heldout.py metrics --data $W/dims_islands_floor --name run_user
"""
import argparse
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
DATA = os.path.join(ROOT, "nmaem_plugin", "data")
REF_OPEN = os.path.join(DATA, "ak_open_4ake.pdb")
REF_CLOSED = os.path.join(DATA, "ak_closed_1ake.pdb")
MDT_DATA = "mdanalysistests-2.11.0/MDAnalysisTests/data"

# adenylate kinase domains (residue ranges, inclusive)
CORE = ((1, 29), (60, 121), (160, 214))
NMP = ((30, 59),)
LID = ((122, 159),)

CHARMM_RESNAMES = {"HSD": "HIS", "HSE": "HIS", "HSP": "HIS"}
CHARMM_NAMES = {"OT1": "O", "OT2": "OXT"}            # C-terminal oxygens
CHARMM_RES_NAMES = {("ILE", "CD"): "CD1"}

STATE_NAMES = ("open", "intermediate", "closed")


def log(msg):
    print(msg, flush=True)


def dump_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def run_cmd(cmd, logfile=None, capture=False, env=None):
    """Run a command (echoed); exit with its log on failure; returns stdout if captured."""
    line = " ".join(shlex.quote(str(c)) for c in cmd)
    log("$ " + line)
    out = subprocess.PIPE if (capture or logfile is None) else None
    fh = open(logfile, "a") if logfile else None
    try:
        if fh:
            fh.write("$ %s\n" % line)
            fh.flush()
        p = subprocess.run([str(c) for c in cmd], stdout=out if out else fh,
                           stderr=fh if fh else subprocess.STDOUT, text=True, env=env)
    finally:
        if fh:
            fh.close()
    if p.returncode != 0:
        tail = (p.stdout or "")[-3000:]
        sys.exit("command failed (status %d%s): %s\n%s"
                 % (p.returncode, ", log " + logfile if logfile else "", line, tail))
    return p.stdout


def nmaem_cmd():
    exe = os.path.join(os.path.dirname(sys.executable), "nmaem")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "nmaem_plugin"]


# ----------------------------------------------------------------------------- geometry

def kabsch(mobile, target):
    """(R, t) minimising |R mobile + t - target| (rows are points)."""
    cm, ct = mobile.mean(0), target.mean(0)
    H = (mobile - cm).T @ (target - ct)
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(Vt.T @ U.T))
    R = Vt.T @ np.diag([1.0, 1.0, d]) @ U.T
    return R, ct - R @ cm


def rmsd(a, b):
    return float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=1))))


def superposed_rmsd(a, b, sel=None):
    sel = np.ones(len(a), bool) if sel is None else sel
    R, t = kabsch(a[sel], b[sel])
    return rmsd(a @ R.T + t, b)


def residue_mask(resnums, ranges):
    r = np.asarray(resnums)
    m = np.zeros(len(r), bool)
    for lo, hi in ranges:
        m |= (r >= lo) & (r <= hi)
    return m


# ----------------------------------------------------------------------------- structures

class Atoms:
    """The atoms of a PDB model (one conformation): keys (resnum, name), resnames,
    elements, coords (M, 3), and the gemmi structure to write others from."""

    def __init__(self, path):
        import gemmi
        st = gemmi.read_structure(path)
        st.remove_hydrogens()
        st.remove_alternative_conformations()
        self.structure = st
        self.path = path
        keys, resn, elem, xyz, chain, icode = [], [], [], [], [], []
        for ch in st[0]:
            for res in ch:
                for at in res:
                    keys.append((res.seqid.num, at.name))
                    resn.append(res.name)
                    elem.append(at.element.name)
                    xyz.append(at.pos.tolist())
                    chain.append(ch.name)
                    icode.append(res.seqid.icode.strip())
        self.keys, self.resnames, self.elements = keys, resn, elem
        self.chains, self.icodes = chain, icode
        self.coords = np.asarray(xyz, float)
        self.resnums = np.array([k[0] for k in keys])

    @property
    def n(self):
        return len(self.keys)

    def atom_ids(self):
        """``chain:resnum:icode:resname:atom``, the plugin's atom ids (modes.npz)."""
        return np.array(["%s:%d:%s:%s:%s" % (c, k[0], i, r, k[1]) for c, k, i, r
                         in zip(self.chains, self.keys, self.icodes, self.resnames)])

    def match(self, other_keys):
        """Indices into ``other_keys`` of each of this model's atoms (-1: unmatched)."""
        pos = {k: i for i, k in enumerate(other_keys)}
        return np.array([pos.get(k, -1) for k in self.keys])

    def write(self, path, frames):
        """Write conformations (F, M, 3) of these atoms as the models of one PDB file."""
        st = self.structure.clone()
        base = st[0].clone()
        while len(st) > 0:
            del st[0]
        for f, xyz in enumerate(frames):
            st.add_model(base.clone())
            m = st[len(st) - 1]
            m.num = f + 1
            set_positions(m, xyz)
        st.setup_entities()
        tmp = path + ".tmp.pdb"
        st.write_pdb(tmp)
        os.replace(tmp, path)


def set_positions(model, xyz):
    """Put coordinates (M, 3) on a gemmi model's atoms in file order, B = 0, occupancy 1."""
    import gemmi
    k = 0
    for ch in model:
        for res in ch:
            for at in res:
                at.pos = gemmi.Position(*map(float, xyz[k]))
                at.b_iso = 0.0
                at.occ = 1.0
                k += 1


def read_psf(path):
    """Atoms of a CHARMM/X-PLOR PSF: list of (segid, resid, resname, name, mass)."""
    with open(path) as fh:
        lines = fh.read().splitlines()
    for i, line in enumerate(lines):
        if "!NATOM" in line:
            n = int(line.split()[0])
            atoms = []
            for row in lines[i + 1:i + 1 + n]:
                f = row.split()
                resid = int("".join(c for c in f[2] if c.isdigit() or c == "-"))
                atoms.append((f[1], resid, f[3], f[4], float(f[7])))
            return atoms
    sys.exit("%s: no !NATOM section" % path)


def read_dcd(path):
    """Coordinates (F, N, 3) float64 of a CHARMM/NAMD DCD file (Fortran unformatted
    records: header with ICNTRL, title, NATOM, then per frame an optional unit-cell record
    and the X, Y and Z records of N float32). Fixed atoms and 4D files are refused."""
    with open(path, "rb") as fh:
        data = fh.read()
    if struct.unpack_from("<i", data, 0)[0] == 84:
        end = "<"
    elif struct.unpack_from(">i", data, 0)[0] == 84:
        end = ">"
    else:
        sys.exit("%s: not a DCD file (first record is not 84 bytes)" % path)
    pos = 0

    def record():
        nonlocal pos
        n = struct.unpack_from(end + "i", data, pos)[0]
        body = data[pos + 4:pos + 4 + n]
        if struct.unpack_from(end + "i", data, pos + 4 + n)[0] != n:
            sys.exit("%s: broken Fortran record at byte %d" % (path, pos))
        pos += n + 8
        return body

    hdr = record()
    if hdr[:4] != b"CORD":
        sys.exit("%s: not a coordinate DCD (%r)" % (path, hdr[:4]))
    icntrl = struct.unpack(end + "20i", hdr[4:84])
    charmm = icntrl[19] != 0
    has_cell = charmm and icntrl[10] != 0
    if charmm and icntrl[11] != 0:
        sys.exit("%s: 4D DCD files are not supported" % path)
    if icntrl[8] != 0:
        sys.exit("%s: DCD with fixed atoms (NAMNF=%d) is not supported" % (path, icntrl[8]))
    record()                                   # title
    natom = struct.unpack(end + "i", record())[0]
    frames = []
    while pos < len(data):
        if has_cell:
            record()
        xyz = [np.frombuffer(record(), dtype=end + "f4") for _ in range(3)]
        if any(len(c) != natom for c in xyz):
            sys.exit("%s: frame %d has the wrong number of atoms" % (path, len(frames)))
        frames.append(np.stack(xyz, axis=1))
    return np.asarray(frames, dtype=np.float64)


def charmm_key(resid, resname, name):
    """(resnum, PDB atom name, PDB residue name) of a CHARMM atom."""
    resname = CHARMM_RESNAMES.get(resname, resname)
    name = CHARMM_RES_NAMES.get((resname, name), CHARMM_NAMES.get(name, name))
    return (resid, name), resname


def mdt_files(work):
    """adk.psf and adk_dims.dcd, extracted from the MDAnalysisTests sdist when needed."""
    d = os.path.join(work, "mdt", MDT_DATA)
    psf, dcd = os.path.join(d, "adk.psf"), os.path.join(d, "adk_dims.dcd")
    if not (os.path.isfile(psf) and os.path.isfile(dcd)):
        import tarfile
        sdist = os.environ.get("MDT_SDIST", "/tmp/mdt/mdanalysistests-2.11.0.tar.gz")
        if not os.path.isfile(sdist):
            sys.exit("need MDAnalysisTests' adk.psf and adk_dims.dcd: set MDT_SDIST to the "
                     "mdanalysistests-2.11.0 sdist (pip download MDAnalysisTests==2.11.0 "
                     "--no-deps --no-binary :all:)")
        with tarfile.open(sdist) as tf:
            for m in (MDT_DATA + "/adk.psf", MDT_DATA + "/adk_dims.dcd"):
                tf.extract(m, os.path.join(work, "mdt"))
    return psf, dcd


# ----------------------------------------------------------------------------- paths

def dims_path(work, ref, closed, report, check_python=None):
    """The DIMS frames (F, M, 3) in the reference's atom order, oriented open -> closed,
    not yet superposed; fills ``report``."""
    psf, dcd = mdt_files(work)
    atoms = read_psf(psf)
    xyz = read_dcd(dcd)
    if xyz.shape[1] != len(atoms):
        sys.exit("%s has %d atoms, %s %d" % (dcd, xyz.shape[1], psf, len(atoms)))
    heavy = [i for i, a in enumerate(atoms) if a[4] > 1.5]
    keys, resn = [], []
    for i in heavy:
        k, rn = charmm_key(atoms[i][1], atoms[i][2], atoms[i][3])
        keys.append(k)
        resn.append(rn)
    if len(set(keys)) != len(keys):
        sys.exit("%s: repeated (residue, atom name) among heavy atoms" % psf)
    idx = ref.match(keys)
    missing = [ref.keys[j] for j in np.flatnonzero(idx < 0)]
    if missing:
        sys.exit("reference atoms not in the DIMS topology: %s" % missing[:10])
    bad_res = sorted({(ref.keys[j][0], ref.resnames[j], resn[idx[j]])
                      for j in range(ref.n) if ref.resnames[j] != resn[idx[j]]})
    if bad_res:
        sys.exit("residue names differ between the reference and the DIMS topology: %s"
                 % bad_res[:10])
    extra = sorted(set(keys) - set(ref.keys))
    frames = xyz[:, [heavy[i] for i in idx], :]
    ends = {}
    for name, f in (("first", frames[0]), ("last", frames[-1])):
        ends[name] = dict(open=superposed_rmsd(f, ref.coords),
                          closed=superposed_rmsd(f, closed))
    reverse = ends["first"]["open"] > ends["first"]["closed"]
    if reverse:
        frames = frames[::-1].copy()
    report["dims"] = dict(
        psf=os.path.relpath(psf, work), dcd=os.path.relpath(dcd, work),
        frames_in_file=int(len(xyz)), atoms_in_file=len(atoms), heavy_atoms=len(heavy),
        reference_atoms=ref.n, reference_atoms_matched=int(np.sum(idx >= 0)),
        heavy_atoms_not_in_reference=[list(k) for k in extra],
        name_mapping=dict(resnames=CHARMM_RESNAMES, names=CHARMM_NAMES,
                          residue_names={"%s %s" % k: v for k, v in CHARMM_RES_NAMES.items()}),
        rmsd_after_superposition_A=ends, reversed_to_open_closed=bool(reverse))
    if check_python:
        report["dims"]["mdanalysis_check"] = check_dcd_with_mdanalysis(check_python, psf, dcd,
                                                                       xyz)
    return frames


def check_dcd_with_mdanalysis(python, psf, dcd, xyz):
    """Max |difference| (A) between our DCD reader and MDAnalysis's, and its version."""
    code = ("import sys, numpy as np, MDAnalysis as mda\n"
            "u = mda.Universe(sys.argv[1], sys.argv[2])\n"
            "np.save(sys.argv[3], np.array([ts.positions.copy() for ts in u.trajectory]))\n"
            "print(mda.__version__, ' '.join(sorted(set(u.atoms.resnames))))\n")
    tmp = os.path.join(os.path.dirname(dcd), "mda_check.npy")
    out = subprocess.run([python, "-c", code, psf, dcd, tmp], capture_output=True, text=True)
    if out.returncode != 0:
        return dict(error=out.stderr.strip().splitlines()[-1:])
    ref = np.load(tmp)
    os.remove(tmp)
    return dict(mdanalysis_version=out.stdout.split()[0],
                frames=int(len(ref)), same_shape=bool(ref.shape == xyz.shape),
                max_abs_diff_A=float(np.abs(ref - xyz).max()) if ref.shape == xyz.shape
                else None)


def screw(R, t):
    """Screw decomposition of x -> R x + t: (rotation vector (3,), point p on the axis,
    translation d along the unit axis u) with R x + t = R (x - p) + p + d u."""
    from scipy.spatial.transform import Rotation
    v = Rotation.from_matrix(R).as_rotvec()
    theta = np.linalg.norm(v)
    if theta < 1e-9:
        return v, np.zeros(3), t
    u = v / theta
    d = float(t @ u)
    p = np.linalg.lstsq(np.eye(3) - R, t - d * u, rcond=None)[0]
    return v, p, d * u


def screw_interpolate(a, b, s):
    """Coordinates at s in [0, 1] of a rigid domain moving from ``a`` (K, 3) to ``b``:
    the screw motion (rotation s theta about the axis, translation s d along it) of a's
    coordinates blended with b's internal coordinates (b superposed on a)."""
    from scipy.spatial.transform import Rotation
    R, t = kabsch(a, b)
    b_in_a = (b - t) @ R          # R^T (b - t): b in a's frame
    v, p, du = screw(R, t)
    Rs = Rotation.from_rotvec(s * v).as_matrix()
    x = (1.0 - s) * a + s * b_in_a
    return (x - p) @ Rs.T + p + s * du, float(np.degrees(np.linalg.norm(v)))


def curved_path(ref, closed, n_seg, report):
    """Open -> (LID closed, NMP open) -> closed: 2 n_seg - 1 frames (F, M, 3)."""
    core = residue_mask(ref.resnums, CORE)
    lid = residue_mask(ref.resnums, LID)
    nmp = residue_mask(ref.resnums, NMP)
    o = ref.coords
    R, t = kabsch(closed[core], o[core])
    c = closed @ R.T + t                          # closed, superposed by the CORE
    # each CORE atom changes from its open to its closed position with the domain whose
    # hinges are nearer (weight w: 1 at the LID's junctions, 0 at the NMP's, smooth in
    # between), so that no junction breaks at the intermediate
    key = {k: i for i, k in enumerate(ref.keys)}
    junction = dict(LID=[key[(r, "CA")] for r in (121, 122, 159, 160)],
                    NMP=[key[(r, "CA")] for r in (29, 30, 59, 60)])
    d_lid = np.min(np.linalg.norm(o[:, None] - o[None, junction["LID"]], axis=2), axis=1)
    d_nmp = np.min(np.linalg.norm(o[:, None] - o[None, junction["NMP"]], axis=2), axis=1)
    w = d_nmp / (d_lid + d_nmp)
    frames = []
    angles = {}
    for seg, dom, name in ((0, lid, "LID"), (1, nmp, "NMP")):
        for k in range(n_seg if seg == 1 else n_seg - 1):
            s = k / (n_seg - 1.0)
            s_lid, s_nmp = (s, 0.0) if seg == 0 else (1.0, s)
            g = (w * s_lid + (1.0 - w) * s_nmp)[:, None]
            x = (1.0 - g) * o + g * c
            x[lid], angles["LID"] = screw_interpolate(o[lid], c[lid], s_lid)
            x[nmp], angles["NMP"] = screw_interpolate(o[nmp], c[nmp], s_nmp)
            frames.append(x)
    frames = np.asarray(frames)
    # geometry at the domain junctions: peptide C-N bond lengths over the path
    cn = peptide_bonds(ref)
    bl = np.linalg.norm(frames[:, cn[:, 0]] - frames[:, cn[:, 1]], axis=2)
    bl_open = np.linalg.norm(o[cn[:, 0]] - o[cn[:, 1]], axis=1)
    ca = np.array([key[(r, "CA")] for r in range(1, 215) if (r, "CA") in key])
    cad = np.linalg.norm(frames[:, ca[1:]] - frames[:, ca[:-1]], axis=2)
    report["curved"] = dict(
        frames=int(len(frames)), segments="open -> LID closed (NMP open) -> closed",
        rotation_deg=angles, rmsd_core_open_closed=rmsd(o[core], c[core]),
        peptide_CN_max_deviation_from_open_A=float(np.abs(bl - bl_open[None]).max()),
        peptide_CN_range_A=[float(bl.min()), float(bl.max())],
        CA_CA_range_A=[float(cad.min()), float(cad.max())],
        intermediate_rmsd_to_open=rmsd(frames[n_seg - 1], o),
        intermediate_rmsd_to_closed=rmsd(frames[n_seg - 1], c))
    return frames


def peptide_bonds(ref):
    key = {k: i for i, k in enumerate(ref.keys)}
    return np.array([(key[(r, "C")], key[(r + 1, "N")]) for r in range(1, 214)
                     if (r, "C") in key and (r + 1, "N") in key])


def regularise(frames, ref, report):
    """Each frame after OpenMM's restrained minimisation (``refine.refine_coords``, the
    refinement of ``nmaem export``, in vacuum: only the covalent geometry matters here),
    which mends the bonds that the domain-wise interpolation stretches at the hinges."""
    from nmaem_plugin.core.analysis.refine import refine_coords
    from nmaem_plugin.core.physics.structure import read_model
    model = read_model(REF_OPEN)
    if list(model.atom_ids) != list(ref.atom_ids()):
        sys.exit("%s: the plugin reads other atoms than this script" % REF_OPEN)
    cn = peptide_bonds(ref)
    out, moved, t0 = [], [], time.time()
    for f, x in enumerate(frames):
        r = refine_coords(model, x, platform="CPU", solvent="vacuum")
        if not r.ok:
            sys.exit("regularising frame %d failed: %s" % (f, r.info.get("message")))
        out.append(r.coords)
        moved.append(rmsd(r.coords, x))
        if f % 10 == 0:
            log("regularise: frame %d of %d (%.0f s)" % (f + 1, len(frames), time.time() - t0))
    out = np.asarray(out)
    bl = np.linalg.norm(out[:, cn[:, 0]] - out[:, cn[:, 1]], axis=2)
    report["regularised"] = dict(
        method="refine.refine_coords(solvent='vacuum'), restraint 30 kcal/mol/A^2",
        rmsd_moved_A=dict(max=float(max(moved)), mean=float(np.mean(moved))),
        peptide_CN_range_after_A=[float(bl.min()), float(bl.max())])
    return out


def superpose_by_core(frames, ref_coords, core):
    out = np.empty_like(frames)
    for f, x in enumerate(frames):
        R, t = kabsch(x[core], ref_coords[core])
        out[f] = x @ R.T + t
    return out


def cmd_paths(args):
    outdir = os.path.join(args.work, "paths")
    os.makedirs(outdir, exist_ok=True)
    rep_path = os.path.join(outdir, "report.json")
    if os.path.exists(rep_path) and not args.force:
        log("paths exist: %s (--force to rebuild)" % rep_path)
        return
    ref = Atoms(REF_OPEN)
    cl = Atoms(REF_CLOSED)
    ci = ref.match(cl.keys)
    if np.any(ci < 0):
        sys.exit("%s lacks atoms of the reference: %s" % (REF_CLOSED,
                                                          [ref.keys[j] for j in np.flatnonzero(ci < 0)][:5]))
    closed = cl.coords[ci]
    core = residue_mask(ref.resnums, CORE)
    report = dict(reference=os.path.basename(REF_OPEN), closed=os.path.basename(REF_CLOSED),
                  core_residues=CORE, lid_residues=LID, nmp_residues=NMP,
                  crystals_rmsd_superposed_A=superposed_rmsd(closed, ref.coords))
    paths = {}
    paths["dims"] = dims_path(args.work, ref, closed, report, args.check_mdanalysis)
    paths["curved"] = curved_path(ref, closed, args.curved_frames, report)
    if not args.no_regularise:
        paths["curved"] = regularise(paths["curved"], ref, report["curved"])
    for name, frames in paths.items():
        fr = superpose_by_core(frames, ref.coords, core)
        r = report[name]
        r["core_rmsd_after_superposition_A"] = dict(
            max=float(max(rmsd(x[core], ref.coords[core]) for x in fr)))
        r["rmsd_to_reference_A"] = [rmsd(x, ref.coords) for x in fr]
        r["rmsd_first_frame_to_open_A"] = rmsd(fr[0], ref.coords)
        r["rmsd_last_frame_to_closed_superposed_A"] = superposed_rmsd(fr[-1], closed)
        np.savez(os.path.join(outdir, name + ".npz"), frames=fr, atom_ids=ref.atom_ids(),
                 core=core)
        ref.write(os.path.join(outdir, name + ".pdb"), fr)
    dump_json(rep_path, report)
    log(json.dumps(report, indent=1)[:6000])


def load_path(work, name):
    p = os.path.join(work, "paths", name + ".npz")
    if not os.path.isfile(p):
        sys.exit("%s missing: run `bench/heldout.py paths` first" % p)
    with np.load(p) as f:
        return f["frames"], f["core"]



# ----------------------------------------------------------------------------- poses, CTF

def euler_to_matrix(rot, tilt, psi):
    """RELION's matrix A (Euler_angles2matrix, ZYZ, degrees): a model point r projects as
    A r along z. Written out from RELION's formula (not the plugin's poses.py)."""
    a, b, g = (np.radians(np.asarray(v, float)) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty(np.shape(a) + (3, 3))
    A[..., 0, 0] = cg * cc - sg * sa
    A[..., 0, 1] = cg * cs + sg * ca
    A[..., 0, 2] = -cg * sb
    A[..., 1, 0] = -sg * cc - cg * sa
    A[..., 1, 1] = -sg * cs + cg * ca
    A[..., 1, 2] = sg * sb
    A[..., 2, 0] = sc
    A[..., 2, 1] = ss
    A[..., 2, 2] = cb
    return A


def matrix_to_euler(A):
    """(rot, tilt, psi) degrees of RELION matrices A (N, 3, 3): A = (Rz(rot) Ry(tilt)
    Rz(psi))^T in scipy's active intrinsic ZYZ convention."""
    from scipy.spatial.transform import Rotation
    e = Rotation.from_matrix(np.swapaxes(A, -1, -2)).as_euler("ZYZ", degrees=True)
    return e


def random_rotation_errors(n, sd_deg, rng):
    """(N, 3, 3) rotations whose rotation vectors have N(0, sd^2 / 3) components: rms
    angle ``sd_deg``."""
    from scipy.spatial.transform import Rotation
    v = rng.normal(0.0, math.radians(sd_deg) / math.sqrt(3.0), (n, 3))
    return Rotation.from_rotvec(v).as_matrix()


def lognormal(n, mean, sd, rng):
    s2 = math.log1p((sd / mean) ** 2)
    return np.exp(rng.normal(math.log(mean) - 0.5 * s2, math.sqrt(s2), n))


# ----------------------------------------------------------------------------- files

STAR_COLUMNS = ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV",
                "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor", "rlnOpticsGroup",
                "rlnImageId")


def write_star(path, names, euler, origin, dfu, dfv, dfang, ids, box, apix, voltage=300.0,
               cs=2.7, q0=0.1):
    """A RELION 3.1 particle STAR (optics table + particles), written by hand."""
    lines = ["", "# version 30001", "", "data_optics", "", "loop_"]
    optics = (("rlnOpticsGroupName", "opticsGroup1"), ("rlnOpticsGroup", "1"),
              ("rlnMicrographOriginalPixelSize", "%.6f" % apix),
              ("rlnVoltage", "%.3f" % voltage), ("rlnSphericalAberration", "%.3f" % cs),
              ("rlnAmplitudeContrast", "%.3f" % q0), ("rlnImagePixelSize", "%.6f" % apix),
              ("rlnImageSize", "%d" % box), ("rlnImageDimensionality", "2"))
    lines += ["_%s #%d" % (k, i + 1) for i, (k, _) in enumerate(optics)]
    lines += [" ".join(v for _, v in optics), "", "", "# version 30001", "",
              "data_particles", "", "loop_"]
    lines += ["_%s #%d" % (k, i + 1) for i, k in enumerate(STAR_COLUMNS)]
    for i in range(len(names)):
        lines.append("%s %.6f %.6f %.6f %.6f %.6f %.3f %.3f %.4f 0.000000 0.000000 1 %d" % (
            names[i], euler[i, 0], euler[i, 1], euler[i, 2], origin[i, 0], origin[i, 1],
            dfu[i], dfv[i], dfang[i], ids[i]))
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def write_mrc(path, data, apix):
    """An MRC file (stack: (N, D, D) images; map: (Z, Y, X)) of float32."""
    import mrcfile
    tmp = path + ".tmp"
    with mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(np.ascontiguousarray(data, dtype=np.float32))
        m.voxel_size = apix
        if data.ndim == 3 and path.endswith(".mrcs"):
            m.set_image_stack()
    os.replace(tmp, path)


def read_mrc(path):
    import mrcfile
    with mrcfile.open(path, permissive=True) as m:
        return np.array(m.data, dtype=np.float32)


# ----------------------------------------------------------------------------- the renderer

def potential_map(ref, coords, box, apix, oversample=2, blur=10.0):
    """Coulomb potential (Z, Y, X) of box^3 voxels of ``apix`` A, band-limited, with gemmi:
    ``DensityCalculatorE`` (electron form factors, atoms with B = 0) on a grid ``oversample``
    times finer, blurred by ``blur`` A^2 against aliasing, the blur removed in Fourier space
    and the transform cropped to the box's frequencies (a Fourier crop: the map of the same
    potential sampled at ``apix``, band-limited at the coarse grid's Nyquist). ``coords``
    (M, 3) in A: voxel (i, j, k) sits at (k, j, i) * apix."""
    import gemmi
    st = ref.structure.clone()
    set_positions(st[0], coords)
    L = box * apix
    st.cell = gemmi.UnitCell(L, L, L, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    n = box * oversample
    dc = gemmi.DensityCalculatorE()
    dc.grid.set_unit_cell(st.cell)
    dc.grid.set_size(n, n, n)
    dc.blur = blur
    dc.initialize_grid()
    dc.add_model_density_to_grid(st[0])
    dc.grid.symmetrize_sum()
    fine = np.array(dc.grid, copy=True)                  # [x, y, z]
    F = np.fft.rfftn(fine)
    kf = np.fft.fftfreq(n, 1.0 / n)
    keep = np.r_[0:box // 2, n - box // 2:n]             # the box's frequencies -D/2..D/2-1
    F = F[keep][:, keep][:, :, :box // 2 + 1]
    kc = np.fft.fftfreq(box, 1.0 / box)
    s2 = (kc[:, None, None] ** 2 + kc[None, :, None] ** 2
          + np.arange(box // 2 + 1)[None, None, :] ** 2) / L ** 2
    F *= np.exp(blur * s2 / 4.0)
    assert np.allclose(kf[keep], kc)
    coarse = np.fft.irfftn(F, s=(box, box, box)) * (box / n) ** 3
    return coarse.transpose(2, 1, 0)                     # [z, y, x]


def relion_project(map_path, star_path, out_root, apix, logfile):
    """Projections of the map at the STAR's poses, origins and CTFs (relion_project)."""
    run_cmd(["relion_project", "--i", map_path, "--ang", star_path, "--o", out_root,
             "--ctf", "--angpix", "%.6f" % apix], logfile=logfile)
    im = read_mrc(out_root + ".mrcs")
    return im.reshape((-1,) + im.shape[-2:])





# ----------------------------------------------------------------------------- render

DISTRIBUTIONS = {"islands": "discontinuous", "continuous": "continuous", "uniform": "uniform"}


def island_centres(n_frames):
    """Frames at the centres of the three islands (simulate.py's discontinuous)."""
    return (n_frames - 1) * np.array([1.0 / 6.0, 0.5, 5.0 / 6.0])


def clean_name(args):
    name = "clean_%s_%s_n%d" % (args.path, args.distribution, args.n)
    if (args.box, args.apix) != (192, 0.8):
        name += "_b%d_a%g" % (args.box, args.apix)
    return name + ("_seed%d" % args.seed if args.seed else "")


def cmd_render(args):
    from nmaem_plugin.core.sim.simulate import frame_probabilities
    out = os.path.abspath(args.output or os.path.join(args.work, clean_name(args)))
    done = os.path.join(out, "clean.npz")
    if os.path.exists(done) and not args.force:
        log("clean set exists: %s" % out)
        return out
    os.makedirs(os.path.join(out, "tmp"), exist_ok=True)
    frames, core = load_path(args.work, args.path)
    ref = Atoms(REF_OPEN)
    D, apix, n = args.box, args.apix, args.n
    centre = (D // 2) * apix
    offset = centre - ref.coords.mean(0)
    rng = np.random.default_rng(args.seed)
    F = len(frames)
    frame = rng.choice(F, size=n, p=frame_probabilities(F, DISTRIBUTIONS[args.distribution]))
    euler = np.stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                      rng.uniform(-180, 180, n)], axis=1)        # uniform on SO(3)
    origin = rng.normal(0.0, args.origin_sd, (n, 2))
    mean_df = lognormal(n, args.defocus_mean, args.defocus_std, rng) * 1e4
    astig = np.abs(rng.normal(0.0, args.astigmatism, n))
    dfu, dfv = mean_df + astig / 2, mean_df - astig / 2
    dfang = rng.uniform(0.0, 180.0, n)
    import mrcfile
    stack_path = os.path.join(out, "clean.mrcs")
    with mrcfile.new_mmap(stack_path, shape=(n, D, D), mrc_mode=2, overwrite=True) as mrc:
        mrc.voxel_size = apix
        used = np.unique(frame)
        t0 = time.time()
        for j, f in enumerate(used):
            idx = np.flatnonzero(frame == f)
            mp = potential_map(ref, frames[f] + offset, D, apix, args.oversample, args.blur)
            map_path = os.path.join(out, "tmp", "map.mrc")
            write_mrc(map_path, mp, apix)
            star = os.path.join(out, "tmp", "frame.star")
            write_star(star, ["%d@none.mrcs" % (i + 1) for i in idx], euler[idx], origin[idx],
                       dfu[idx], dfv[idx], dfang[idx], idx + 1, D, apix)
            im = relion_project(map_path, star, os.path.join(out, "tmp", "proj"), apix,
                                os.path.join(out, "render.log"))
            if im.shape != (len(idx), D, D):
                sys.exit("relion_project wrote %s images for %d particles" % (im.shape, len(idx)))
            mrc.data[idx] = im
            el = time.time() - t0
            log("render: frame %d (%d of %d), %d particles, %.0f s, ETA %.0f s"
                % (f, j + 1, len(used), len(idx), el, el / (j + 1) * (len(used) - j - 1)))
    shutil.rmtree(os.path.join(out, "tmp"))
    np.savez(os.path.join(out, "clean.npz"), frame=frame, euler=euler, origin=origin,
             defocus_u=dfu, defocus_v=dfv, defocus_angle=dfang, offset=offset,
             frames=frames + offset, core=core, box=D, apix=apix,
             params=np.array(json.dumps(dict(
                 path=args.path, distribution=args.distribution, n=n, box=D, apix=apix,
                 seed=args.seed, origin_sd=args.origin_sd, defocus_mean_um=args.defocus_mean,
                 defocus_std_um=args.defocus_std, astigmatism_sd=args.astigmatism,
                 voltage=300.0, cs=2.7, amp_contrast=0.1, oversample=args.oversample,
                 blur=args.blur, renderer="gemmi.DensityCalculatorE + relion_project --ctf",
                 frames=F))))
    log("clean set: %s" % out)
    return out


def load_clean(path):
    with np.load(os.path.join(path, "clean.npz")) as f:
        c = {k: f[k] for k in f.files}
    c["params"] = json.loads(str(c["params"]))
    return c


# ----------------------------------------------------------------------------- check

def ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def lowpass(img, box):
    """The image with its Fourier components outside a centred box x box square removed
    (what a Fourier crop to ``box`` keeps)."""
    F = np.fft.fft2(img)
    k = np.fft.fftfreq(img.shape[-1], 1.0 / img.shape[-1])
    keep = (np.abs(k) < box // 2)
    return np.fft.ifft2(F * (keep[:, None] & keep[None, :])).real


def cmd_check(args):
    """Our renderer against relion_project's images on a few particles (module doc)."""
    clean = load_clean(args.clean)
    D, apix = int(clean["box"]), float(clean["apix"])
    stack = read_mrc_rows(os.path.join(args.clean, "clean.mrcs"), None)
    ref = Atoms(REF_OPEN)
    rng = np.random.default_rng(12345)
    pick = np.sort(rng.choice(len(clean["frame"]), size=args.n, replace=False))
    work = os.path.join(args.clean, "check")
    os.makedirs(work, exist_ok=True)
    rows = []
    for sign in (1, -1):
        for f in np.unique(clean["frame"][pick]):
            idx = pick[clean["frame"][pick] == f]
            fdir = os.path.join(work, "f%03d%s" % (f, "" if sign > 0 else "_flip"))
            if os.path.exists(fdir):
                shutil.rmtree(fdir)
            os.makedirs(fdir)
            model = os.path.join(fdir, "frame.pdb")
            ref.write(model, clean["frames"][f][None])
            star = os.path.join(fdir, "like.star")
            write_star(star, ["%d@%s" % (i + 1, os.path.join(args.clean, "clean.mrcs"))
                              for i in idx], clean["euler"][idx], sign * clean["origin"][idx],
                       clean["defocus_u"][idx], clean["defocus_v"][idx],
                       clean["defocus_angle"][idx], idx + 1, D, apix)
            run_cmd(nmaem_cmd() + ["simulate", "--like", star, "--ref", model, "--no-noise",
                                   "-o", os.path.join(fdir, "ours"), "--device", "cpu"],
                    logfile=os.path.join(work, "check.log"))
            ours = read_mrc(os.path.join(fdir, "ours", "stacks", "particles_00000.mrcs"))
            ours = ours.reshape((-1, D, D))
            for k, i in enumerate(idx):
                a, b = stack[i], ours[k]
                row = dict(particle=int(i), frame=int(f))
                if sign > 0:
                    row.update(ncc=ncc(a, b), ncc_train_band=ncc(lowpass(a, 64), lowpass(b, 64)),
                               ncc_transposed=ncc(a, b.T), ncc_mirror_x=ncc(a, b[:, ::-1]),
                               scale_relion_over_ours=float(a.std() / b.std()))
                    rows.append(row)
                else:
                    next(r for r in rows if r["particle"] == i)["ncc_origin_sign_flipped"] = \
                        ncc(a, b)
            shutil.rmtree(fdir)

    def stat(k):
        v = np.array([r[k] for r in rows])
        return dict(median=float(np.median(v)), min=float(v.min()), max=float(v.max()))
    res = dict(clean=args.clean, n=len(rows), box=D, apix=apix,
               ncc=stat("ncc"), ncc_train_band_64px=stat("ncc_train_band"),
               ncc_transposed=stat("ncc_transposed"), ncc_mirror_x=stat("ncc_mirror_x"),
               ncc_origin_sign_flipped=stat("ncc_origin_sign_flipped"),
               scale_relion_over_ours=stat("scale_relion_over_ours"), particles=rows)
    dump_json(os.path.join(args.clean, "check.json"), res)
    log(json.dumps({k: v for k, v in res.items() if k != "particles"}, indent=1))


def read_mrc_rows(path, rows):
    import mrcfile
    m = mrcfile.mmap(path, permissive=True, mode="r")
    return m.data if rows is None else np.array(m.data[rows], dtype=np.float32)


# ----------------------------------------------------------------------------- corrupt

NOISE_SHAPES = ("white", "floor", "inverse", "bump")


def noise_power(box, apix, shape, floor=0.1, s0=0.15, s1=0.02, bump_at=0.1, bump_width=0.02,
                bump_height=4.0):
    """The noise power shape P on the full (D, D) FFT grid (mean 1), s = |k| / (D apix)
    in 1/A (module doc)."""
    k = np.fft.fftfreq(box, 1.0 / box)
    s = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2) / (box * apix)
    if shape == "white":
        P = np.ones_like(s)
    elif shape == "floor":
        P = floor + (1.0 - floor) * np.exp(-(s / s0) ** 2)
    elif shape == "inverse":
        P = s1 / (s + s1)
    elif shape == "bump":
        P = 1.0 + bump_height * np.exp(-((s - bump_at) / bump_width) ** 2)
    else:
        sys.exit("unknown noise shape %r" % shape)
    return P / P.mean()


def radial_profile(P, box, apix, nbins=None):
    k = np.fft.fftfreq(box, 1.0 / box)
    r = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    ring = np.rint(r).astype(int)
    nb = box // 2 + 1
    prof = np.bincount(ring.ravel(), P.ravel(), minlength=nb)[:nb] / np.maximum(
        np.bincount(ring.ravel(), minlength=nb)[:nb], 1)
    return np.arange(nb) / (box * apix), prof


# the generator of each nuisance (switching one does not change the others' draws)
STREAMS = dict(contrast=1, offset=2, angle=3, defocus=4, noise=100)


def stream(seed, name, k=0):
    return np.random.default_rng([int(seed), STREAMS[name] + int(k)])


def cmd_corrupt(args):
    out = os.path.abspath(args.output)
    gt_path = os.path.join(out, "ground_truth.npz")
    if os.path.exists(gt_path) and not args.force:
        log("dataset exists: %s" % out)
        return
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "stacks"))
    clean = load_clean(args.clean)
    cp = clean["params"]
    D, apix = int(clean["box"]), float(clean["apix"])
    n = len(clean["frame"])
    stack = read_mrc_rows(os.path.join(args.clean, "clean.mrcs"), None)
    seed = args.seed
    # the SNR's clean variance: mean over particles of each clean image's variance
    var_clean = sum(float(stack[s:s + 1000].reshape(-1, D * D).astype(np.float64).var(1).sum())
                    for s in range(0, n, 1000)) / n
    sigma = math.sqrt(var_clean / 10 ** (args.snr_db / 10.0))
    P = noise_power(D, apix, args.noise, floor=args.floor, s0=args.s0)
    amp = np.sqrt(P)
    contrast = (lognormal(n, 1.0, args.contrast_sd, stream(seed, "contrast"))
                if args.contrast_sd > 0 else np.ones(n))
    offset = (stream(seed, "offset").normal(0.0, args.offset_sd, n) * sigma
              if args.offset_sd > 0 else np.zeros(n))
    bg_radius = int(round(args.bg_radius * D / 2))
    names = np.empty(n, dtype=object)
    noise_var = []
    chunk = args.chunk
    t0 = time.time()
    for c, s in enumerate(range(0, n, chunk)):
        idx = np.arange(s, min(n, s + chunk))
        x = stack[idx].astype(np.float64) * contrast[idx, None, None]
        w = stream(seed, "noise", c).standard_normal((len(idx), D, D))
        noise = np.fft.ifft2(np.fft.fft2(w) * amp).real * sigma
        noise_var.append(noise.reshape(len(idx), -1).var(1))
        x += noise + offset[idx, None, None]
        rel = os.path.join("stacks", "particles_%03d.mrcs" % c)
        final = os.path.join(out, rel)
        if args.normalise:
            raw = os.path.join(out, "stacks", "raw_%03d.mrcs" % c)
            write_mrc(raw, x, apix)
            run_cmd(["relion_preprocess", "--operate_on", raw, "--operate_out", final,
                     "--norm", "--bg_radius", str(bg_radius)],
                    logfile=os.path.join(out, "corrupt.log"))
            os.remove(raw)
        else:
            write_mrc(final, x, apix)
        names[idx] = ["%d@%s" % (k + 1, rel) for k in range(len(idx))]
        log("corrupt: %d / %d images (%.0f s)" % (idx[-1] + 1, n, time.time() - t0))
    noise_var = np.concatenate(noise_var)
    # what the STAR says: the truth with errors
    A = euler_to_matrix(*clean["euler"].T)
    if args.angle_error > 0:
        A_file = random_rotation_errors(n, args.angle_error, stream(seed, "angle")) @ A
        euler_file = matrix_to_euler(A_file)
    else:
        euler_file = clean["euler"].copy()
    dfu, dfv = clean["defocus_u"], clean["defocus_v"]
    d_err = (stream(seed, "defocus").normal(0.0, args.defocus_error, n)
             if args.defocus_error > 0 else np.zeros(n))
    star = os.path.join(out, "particles.star")
    write_star(star, names, euler_file, clean["origin"], dfu + d_err, dfv + d_err,
               clean["defocus_angle"], np.arange(1, n + 1), D, apix)
    # the truth
    ref = Atoms(REF_OPEN)
    frames = clean["frames"]
    F = len(frames)
    if args.reference == "crystal":
        ref_coords = ref.coords + clean["offset"]
    else:
        ref_coords = frames[0]
    ref.write(os.path.join(out, "reference.pdb"), ref_coords[None])
    ref.write(os.path.join(out, "frames.pdb"), frames)
    frame = clean["frame"]
    state = np.argmin(np.abs(frame[:, None] - island_centres(F)[None]), axis=1)
    ang_err = np.degrees(np.arccos(np.clip(
        (np.einsum("nij,nij->n", euler_to_matrix(*euler_file.T), A) - 1) / 2, -1, 1)))
    measured = 10 * math.log10(var_clean / float(noise_var.mean()))
    k_s, prof = radial_profile(P, D, apix)
    params = dict(cp, n=n, frames=F, distribution=cp["distribution"],
                  frame_distribution=DISTRIBUTIONS[cp["distribution"]], snr_db=args.snr_db,
                  measured_snr_db=measured, noise_sigma=sigma, var_clean=var_clean,
                  noise=args.noise, noise_floor=args.floor, noise_s0=args.s0,
                  contrast_sd=args.contrast_sd, offset_sd=args.offset_sd,
                  normalise=bool(args.normalise), bg_radius_px=bg_radius,
                  angle_error_sd=args.angle_error, angle_error_rms_measured=float(
                      np.sqrt(np.mean(ang_err ** 2))), defocus_error_sd=args.defocus_error,
                  reference=args.reference, unknown_shifts=False, seed=seed,
                  clean=os.path.abspath(args.clean), island_centres=island_centres(F).tolist(),
                  states=list(STATE_NAMES), centre=[(D // 2) * apix] * 3,
                  offset=clean["offset"].tolist())
    from nmaem_plugin.core.io.particles import read_particles
    from nmaem_plugin.core.io.provenance import dumps, particle_fingerprint
    fp = dumps(particle_fingerprint(read_particles(star)))
    np.savez(gt_path + ".tmp.npz", frame=frame.astype(np.int64),
             shift=(-clean["origin"]).astype(np.float32), euler=clean["euler"],
             euler_file=euler_file, origin_file=clean["origin"],
             defocus_u=dfu, defocus_v=dfv, defocus_angle=clean["defocus_angle"],
             defocus_u_file=dfu + d_err, defocus_v_file=dfv + d_err, contrast=contrast,
             offset=offset, state=state, rigid_core=clean["core"],
             noise_power_radial=np.stack([k_s, prof]), params=np.array(json.dumps(params)),
             particles_fingerprint=fp)
    os.replace(gt_path + ".tmp.npz", gt_path)
    log("dataset %s: %d particles, SNR %.2f dB (noise %s), states %s"
        % (out, n, measured, args.noise, np.bincount(state).tolist()))



# ----------------------------------------------------------------------------- information

def cmd_information(args):
    """Fisher information about the path coordinate under each noise shape, against white
    noise of the same total variance: F = sum_k |dS/dt(k)|^2 / P(k) over the training
    box's band (a Fourier crop to ``--train-box``), dS/dt the difference of relion_project
    images of frames c + h and c - h at the same pose and CTF, c each island centre."""
    clean = load_clean(args.clean)
    D, apix = int(clean["box"]), float(clean["apix"])
    frames = clean["frames"]
    F = len(frames)
    ref = Atoms(REF_OPEN)
    rng = np.random.default_rng(7)
    pick = rng.choice(len(clean["frame"]), size=args.n, replace=False)
    tmp = os.path.join(args.clean, "information")
    os.makedirs(tmp, exist_ok=True)
    star = os.path.join(tmp, "p.star")
    write_star(star, ["%d@none.mrcs" % (i + 1) for i in range(args.n)], clean["euler"][pick],
               clean["origin"][pick], clean["defocus_u"][pick], clean["defocus_v"][pick],
               clean["defocus_angle"][pick], pick + 1, D, apix)
    k = np.fft.fftfreq(D, 1.0 / D)
    band = (np.abs(k)[:, None] < args.train_box // 2) & (np.abs(k)[None, :] < args.train_box // 2)
    shapes = {"white": noise_power(D, apix, "white"),
              "inverse": noise_power(D, apix, "inverse"),
              "bump": noise_power(D, apix, "bump")}
    for s0 in args.s0:
        shapes["floor_s0_%g" % s0] = noise_power(D, apix, "floor", s0=s0)
    # nmaem simulate --noise-falloff 10 at the paper's 192 px, 0.8 A (Nyquist 0.625 1/A)
    s = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2) / (D * apix)
    e = 10.0 ** (-s / 0.625)
    shapes["nmaem_falloff10_192px"] = e / e.mean()
    power = []
    for c in island_centres(F):
        fa, fb = int(round(c)) - args.h, int(round(c)) + args.h
        ims = []
        for f in (fa, fb):
            mp = potential_map(ref, frames[f], D, apix)
            write_mrc(os.path.join(tmp, "map.mrc"), mp, apix)
            ims.append(relion_project(os.path.join(tmp, "map.mrc"), star,
                                      os.path.join(tmp, "proj"), apix,
                                      os.path.join(tmp, "log")))
        power.append(np.abs(np.fft.fft2(ims[1] - ims[0])) ** 2)
    shutil.rmtree(tmp)
    power = np.concatenate(power)[:, band]                 # (3 n, K)
    white = power.sum(1)
    res = {}
    for name, P in shapes.items():
        r = (power / P[band][None]).sum(1) / white
        res[name] = dict(median_ratio=float(np.median(r)), mean_ratio=float(r.mean()))
    out = dict(clean=args.clean, n=args.n, h=args.h, train_box=args.train_box,
               fisher_information_over_white=res)
    dump_json(os.path.join(args.clean, "information.json"), out)
    log(json.dumps(out, indent=1))


# ----------------------------------------------------------------------------- run

VARIANTS = {
    # the user's first run (issue 28): 8,000 particles, --box 64 --epochs 30 --encoder small
    "user": dict(n=None, train=["--box", "64", "--epochs", "30", "--encoder", "small"]),
    # 4,000 particles, 12 epochs, the paper's encoder
    "paper4k": dict(n=4000, train=["--box", "64", "--epochs", "12", "--encoder", "paper"]),
}


def subset_star(star, n, out):
    """The first ``n`` particles of a STAR written by this script (same optics)."""
    with open(star) as fh:
        lines = fh.read().splitlines()
    i = lines.index("data_particles")
    j = i + 1
    while j < len(lines) and not lines[j].startswith("_"):
        j += 1
    while j < len(lines) and lines[j].startswith("_"):
        j += 1
    rows = [ln for ln in lines[j:] if ln.strip()]
    rows = [ln.replace("@stacks/", "@" + os.path.join(os.path.dirname(star), "stacks") + "/")
            if not os.path.isabs(ln.split()[0].split("@")[1]) else ln for ln in rows]
    with open(out + ".tmp", "w") as fh:
        fh.write("\n".join(lines[:j] + rows[:n]) + "\n")
    os.replace(out + ".tmp", out)


def star_ids(star):
    """rlnImageId of each row of a particle STAR's data_particles table."""
    with open(star) as fh:
        lines = fh.read().splitlines()
    i = lines.index("data_particles")
    cols, ids = [], []
    for ln in lines[i + 1:]:
        t = ln.strip()
        if t.startswith("_"):
            cols.append(t.split()[0][1:])
        elif t and cols and not t.startswith("loop_"):
            ids.append(int(t.split()[cols.index("rlnImageId")]))
    return np.array(ids, dtype=np.int64)


def cmd_run(args):
    data = os.path.abspath(args.data)
    var = VARIANTS[args.variant]
    name = args.name or "run_%s" % args.variant
    run = os.path.join(data, name)
    nm = nmaem_cmd()
    logf = os.path.join(data, name + ".log")
    modes = os.path.join(data, "modes.npz")
    if not os.path.exists(modes):
        run_cmd(nm + ["modes", os.path.join(data, "reference.pdb"), "-o", modes], logf)
    star = os.path.join(data, "particles.star")
    if var["n"]:
        sub = os.path.join(data, "particles_first%d.star" % var["n"])
        if not os.path.exists(sub):
            subset_star(star, var["n"], sub)
        star = sub
    timings = {}
    if args.force or not os.path.exists(os.path.join(run, "checkpoints", "last.pt")):
        t0 = time.time()
        run_cmd(nm + ["train", "--particles", star, "--ref", os.path.join(data, "reference.pdb"),
                      "--modes", modes, "-o", run] + var["train"] + shlex.split(args.train_args)
                + (["--force"] if os.path.exists(run) else []), logf)
        timings["train_s"] = time.time() - t0
    latent = os.path.join(run, "latent.npz")
    if "train_s" in timings or args.reinfer or not os.path.exists(latent):
        t0 = time.time()
        run_cmd(nm + ["infer", "--particles", star, "--model", run, "-o", latent, "--force"]
                + shlex.split(args.infer_args), logf)
        timings["infer_s"] = time.time() - t0
    metrics(data, run, star, timings)


def cmd_metrics(args):
    data = os.path.abspath(args.data)
    run = os.path.join(data, args.name)
    star = args.particles or os.path.join(data, "particles.star")
    if not os.path.isabs(star):
        star = os.path.join(data, star)
    if args.particles is None and os.path.exists(os.path.join(run, "config.json")):
        with open(os.path.join(run, "config.json")) as fh:
            star = json.load(fh).get("particles", star)
    metrics(data, run, star, {}, latent_name=args.latent)


def load_modes(path):
    with np.load(path, allow_pickle=False) as f:
        return f["coords"].astype(np.float64), f["modes"].astype(np.float64), f["atom_ids"]


def read_frames_pdb(path, atom_ids):
    """Frames (F, M, 3) of a multi-model PDB, atoms in the order of ``atom_ids``."""
    import gemmi
    st = gemmi.read_structure(path)
    out = []
    for m in st:
        pos = {}
        for ch in m:
            for res in ch:
                for at in res:
                    pos["%s:%d:%s:%s:%s" % (ch.name, res.seqid.num, res.seqid.icode.strip(),
                                            res.name, at.name)] = at.pos.tolist()
        missing = [a for a in atom_ids if a not in pos]
        if missing:
            sys.exit("%s: atoms of the modes missing: %s" % (path, missing[:5]))
        out.append([pos[a] for a in atom_ids])
    return np.asarray(out, dtype=np.float64)


def metrics(data, run, star, timings, latent_name="latent.npz"):
    """The issue's metrics of a run on a dataset (module docstring) -> RUN/heldout_metrics.json."""
    from scipy.stats import chi2
    nm = nmaem_cmd()
    latent_path = os.path.join(run, latent_name)
    tag = os.path.splitext(os.path.basename(latent_name))[0].replace("latent", "")
    is_subset = os.path.abspath(star) != os.path.join(data, "particles.star")
    ev_path = os.path.join(run, "evaluate%s.json" % tag)
    ev_out = run_cmd(nm + ["evaluate", "--latent", latent_path, "--truth", data, "--model", run]
                     + (["--particles", star] if is_subset else []), capture=True)
    ev = json.loads(ev_out[ev_out.index("{"):])
    dump_json(ev_path, ev)
    st_dir = os.path.join(run, "states%s" % tag)
    run_cmd(nm + ["states", "--latent", latent_path, "-o", st_dir, "--maxima", "--force"],
            capture=True)

    with np.load(os.path.join(data, "ground_truth.npz"), allow_pickle=False) as f:
        gt = {k: f[k] for k in f.files}
    params = json.loads(str(gt["params"]))
    with np.load(latent_path, allow_pickle=False) as f:
        lat = {k: f[k] for k in f.files}
    x0, U, atom_ids = load_modes(os.path.join(data, "modes.npz"))
    d = U.shape[0]
    frames = read_frames_pdb(os.path.join(data, "frames.pdb"), list(atom_ids))
    Uf = U.reshape(d, -1).T                                   # (3M, d)

    def z_of(X):                                              # least squares onto U
        return np.linalg.lstsq(Uf, (X - x0).reshape(-1), rcond=None)[0]

    def model(z):
        return x0 + np.tensordot(z, U, axes=(0, 0))

    z_frames = np.array([z_of(X) for X in frames])            # (F, d)
    # rows of the latent -> rows of the simulation (by rlnImageId when a subset)
    rows = lat["index"].astype(np.int64)
    if is_subset:
        rows = star_ids(star)[rows] - 1
    frame = gt["frame"][rows]
    state = gt["state"][rows]
    z = lat["z"].astype(np.float64)
    zt = z_frames[frame]
    K = int(state.max()) + 1
    mean_inf = np.array([z[state == k].mean(0) for k in range(K)])
    mean_true = np.array([zt[state == k].mean(0) for k in range(K)])
    dt, di = mean_true[K - 1] - mean_true[0], mean_inf[K - 1] - mean_inf[0]
    u = dt / np.linalg.norm(dt)
    amp = dict(ratio=float(di @ u / np.linalg.norm(dt)),
               cosine=float(di @ dt / (np.linalg.norm(di) * np.linalg.norm(dt))),
               true_length=float(np.linalg.norm(dt)), inferred_length=float(np.linalg.norm(di)))
    states = []
    for k in range(K):
        sel = state == k
        S = frames[frame[sel]].mean(0)                        # the state's mean structure
        floor = rmsd(model(z_of(S)), S)
        r = rmsd(model(mean_inf[k]), S)
        states.append(dict(
            name=STATE_NAMES[k] if K == 3 else str(k), n=int(sel.sum()),
            frames=[int(frame[sel].min()), int(frame[sel].max())],
            rmsd=r, floor=floor, excess=r - floor, rmsd_reference=rmsd(x0, S),
            rmsd_at_mean_true_z=rmsd(model(mean_true[k]), S),
            along_inferred=float((mean_inf[k] - mean_true[0]) @ u),
            along_true=float((mean_true[k] - mean_true[0]) @ u)))
    within_inf = np.concatenate([(z[state == k] - mean_inf[k]) @ u for k in range(K)])
    within_true = np.concatenate([(zt[state == k] - mean_true[k]) @ u for k in range(K)])
    scatter = dict(sd_inferred=float(within_inf.std()), sd_true=float(within_true.std()),
                   separation_open_closed=float(np.linalg.norm(dt)),
                   per_state_sd_inferred=[float(((z[state == k] - mean_inf[k]) @ u).std())
                                          for k in range(K)])
    zc = z - z.mean(0)
    _, sv, Vt = np.linalg.svd(zc, full_matrices=False)
    pc1 = zc @ Vt[0]
    # states found by nmaem states --maxima
    with np.load(os.path.join(st_dir, "states.npz"), allow_pickle=False) as f:
        sz, scount = f["z"].astype(np.float64), f["count"]
    true_S = [frames[frame[state == k]].mean(0) for k in range(K)]
    found = []
    for j in range(len(sz)):
        X = model(sz[j])
        r = [rmsd(X, S) for S in true_S]
        k = int(np.argmin(r))
        found.append(dict(count=int(scount[j]), nearest_state=states[k]["name"],
                          rmsd=r[k], floor=states[k]["floor"], excess=r[k] - states[k]["floor"],
                          rmsd_to_each_state=r,
                          along_true=float((sz[j] - mean_true[0]) @ u)))
    coverage = None
    if "z_cov" in lat:
        C = lat["z_cov"].astype(np.float64)
        diff = zt - z
        try:
            m2 = np.einsum("ni,ni->n", diff, np.linalg.solve(C, diff[:, :, None])[:, :, 0])
            coverage = dict(d=d, inside_68=float(np.mean(m2 <= chi2.ppf(0.68, d))),
                            inside_95=float(np.mean(m2 <= chi2.ppf(0.95, d))),
                            median_mahalanobis2=float(np.median(m2)))
        except np.linalg.LinAlgError as exc:
            coverage = dict(error="z_cov not invertible: %s" % exc)
    noise_model = None
    noise_path = os.path.join(run, "noise.npz")
    if os.path.exists(noise_path) and "noise_power_radial" in gt:
        # the run's noise spectrum against the true shape, per shell of the image grid, in
        # the band the training box sees (shells 2 .. 64 px / 2; shells 0-1 are the mean)
        with np.load(noise_path, allow_pickle=False) as f:
            s2, nbox = f["sigma2"][0].astype(np.float64), int(f["box"])
        true_P = gt["noise_power_radial"][1]
        if nbox == int(params["box"]):
            hi = min(len(s2), len(true_P), 33)
            r = s2[2:hi] / true_P[2:hi]
            r /= r.mean()
            noise_model = dict(shells="2..%d of %d px" % (hi - 1, nbox),
                               max_abs_rel_dev=float(np.abs(r - 1).max()),
                               rel_dev_per_shell=[float(v - 1) for v in r])
    # the path in mode space: distance of each frame's true z from the chord
    chord = z_frames[-1] - z_frames[0]
    w = chord / np.linalg.norm(chord)
    rel = z_frames - z_frames[0]
    perp = rel - np.outer(rel @ w, w)
    dist = np.linalg.norm(perp, axis=1)
    out = dict(
        data=data, run=run, latent=latent_path, particles=star, n_particles=int(len(z)), d=d,
        dataset=dict((k, params.get(k)) for k in (
            "path", "distribution", "n", "box", "apix", "snr_db", "measured_snr_db", "noise",
            "noise_floor", "noise_s0", "contrast_sd", "offset_sd", "normalise",
            "angle_error_sd", "defocus_error_sd", "reference", "renderer")),
        amplitude=amp, states=states, scatter=scatter,
        abs_corr_pc1_frame=float(abs(np.corrcoef(pc1, frame)[0, 1])),
        pc1_explained_variance=float(sv[0] ** 2 / (sv ** 2).sum()),
        maxima=dict(n_states=int(len(sz)), states=found), coverage=coverage,
        noise_model=noise_model,
        path_in_mode_space=dict(
            z_frames=z_frames.tolist(), chord_length=float(np.linalg.norm(chord)),
            max_distance_from_chord_over_chord=float(dist.max() / np.linalg.norm(chord)),
            rms_distance_from_chord_over_chord=float(np.sqrt((dist ** 2).mean())
                                                     / np.linalg.norm(chord)),
            floor_per_frame=[rmsd(model(z_of(X)), X) for X in frames]),
        evaluate=ev.get("summary"), timings=timings)
    dump_json(os.path.join(run, "heldout_metrics%s.json" % tag), out)
    short = dict(amplitude=amp, states=[{k: s_[k] for k in ("name", "rmsd", "floor", "excess")}
                                        for s_ in states],
                 scatter={k: scatter[k] for k in ("sd_inferred", "sd_true",
                                                  "separation_open_closed")},
                 abs_corr_pc1_frame=out["abs_corr_pc1_frame"],
                 pc1_explained_variance=out["pc1_explained_variance"],
                 maxima=[{k: f_[k] for k in ("count", "nearest_state", "rmsd", "floor", "excess")}
                         for f_ in found], coverage=coverage, timings=timings,
                 noise_model_max_rel_dev=(noise_model or {}).get("max_abs_rel_dev"))
    log(json.dumps(short, indent=1))
    return out



def cmd_summary(args):
    rows = ["| dataset / run | noise | amplitude ratio | cosine | state RMSD / floor (A): open, "
            "intermediate, closed | scatter sd inf. / true / separation | abs corr(PC1, frame) "
            "| PC1 var. | maxima: n, nearest state RMSD / floor (A) | coverage 68 / 95 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for path in args.files:
        with open(path) as fh:
            m = json.load(fh)
        a, sc = m["amplitude"], m["scatter"]
        st = ", ".join("%.2f / %.2f" % (s_["rmsd"], s_["floor"]) for s_ in m["states"])
        mx = "%d: " % m["maxima"]["n_states"] + "; ".join(
            "%s %.2f / %.2f" % (f_["nearest_state"], f_["rmsd"], f_["floor"])
            for f_ in m["maxima"]["states"])
        cov = m.get("coverage") or {}
        rows.append("| %s | %s | %.2f | %.3f | %s | %.1f / %.1f / %.1f | %.2f | %.4f | %s | %s |" % (
            os.path.relpath(m["run"], os.path.dirname(os.path.dirname(m["run"]))),
            m["dataset"].get("noise"), a["ratio"], a["cosine"], st, sc["sd_inferred"],
            sc["sd_true"], sc["separation_open_closed"], m["abs_corr_pc1_frame"],
            m["pc1_explained_variance"], mx,
            "%.2f / %.2f" % (cov["inside_68"], cov["inside_95"]) if "inside_68" in cov else "-"))
    print("\n".join(rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/work/scratch/heldout")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("paths", help="the transitions (DIMS, curved) in the reference's frame")
    p.add_argument("--curved-frames", type=int, default=50, help="frames per segment")
    p.add_argument("--no-regularise", action="store_true",
                   help="keep the curved path's frames as interpolated (no OpenMM)")
    p.add_argument("--check-mdanalysis", metavar="PYTHON",
                   help="a python with MDAnalysis: compare its DCD reading with ours")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_paths)

    p = sub.add_parser("render", help="clean particles of a path: gemmi + relion_project")
    p.add_argument("--path", choices=("dims", "curved"), default="dims")
    p.add_argument("--n", type=int, default=8000)
    p.add_argument("--distribution", choices=sorted(DISTRIBUTIONS), default="islands")
    p.add_argument("--box", type=int, default=192)
    p.add_argument("--apix", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--origin-sd", type=float, default=2.0, help="true origins, A per axis")
    p.add_argument("--defocus-mean", type=float, default=1.0, help="um")
    p.add_argument("--defocus-std", type=float, default=0.3, help="um")
    p.add_argument("--astigmatism", type=float, default=200.0,
                   help="sd of |defocus U - V| (A)")
    p.add_argument("--oversample", type=int, default=2,
                   help="gemmi's grid is this many times finer than the pixels")
    p.add_argument("--blur", type=float, default=10.0, help="gemmi blur (A^2), removed")
    p.add_argument("-o", "--output", help="default WORK/clean_PATH_DIST_nN")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("check", help="our renderer against relion_project's images")
    p.add_argument("--clean", required=True)
    p.add_argument("--n", type=int, default=16)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("corrupt", help="a dataset from a clean set, with nuisances")
    p.add_argument("--clean", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--noise", choices=NOISE_SHAPES, default="floor")
    p.add_argument("--floor", type=float, default=0.1, help="floor of the 'floor' shape")
    p.add_argument("--s0", type=float, default=0.15,
                   help="fall-off frequency of the 'floor' shape (1/A)")
    p.add_argument("--snr-db", type=float, default=-20.0)
    p.add_argument("--contrast-sd", type=float, default=0.2)
    p.add_argument("--offset-sd", type=float, default=1.0)
    p.add_argument("--no-normalise", dest="normalise", action="store_false")
    p.add_argument("--bg-radius", type=float, default=0.75,
                   help="relion_preprocess --bg_radius, fraction of the box half-width")
    p.add_argument("--angle-error", type=float, default=2.0, help="rms degrees")
    p.add_argument("--defocus-error", type=float, default=300.0, help="sd, A")
    p.add_argument("--reference", choices=("crystal", "frame0"), default="crystal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=1000, help="images per stack")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_corrupt)
    p = sub.add_parser("information", help="Fisher information of each noise shape / white")
    p.add_argument("--clean", required=True)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--h", type=int, default=3, help="frames either side of each island centre")
    p.add_argument("--train-box", type=int, default=64)
    p.add_argument("--s0", type=float, nargs="+",
                   default=[0.02, 0.04, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3])
    p.set_defaults(func=cmd_information)

    p = sub.add_parser("run", help="the user's first run on a dataset, and the metrics")
    p.add_argument("--data", required=True)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="user")
    p.add_argument("--name", help="run folder name in DATA (default run_VARIANT)")
    p.add_argument("--train-args", default="", help="more nmaem train flags, one string")
    p.add_argument("--infer-args", default="", help="more nmaem infer flags, one string")
    p.add_argument("--reinfer", action="store_true", help="run nmaem infer again")
    p.add_argument("--force", action="store_true", help="retrain")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("metrics", help="the metrics of an existing run")
    p.add_argument("--data", required=True)
    p.add_argument("--name", required=True, help="run folder in DATA")
    p.add_argument("--latent", default="latent.npz",
                   help="latent file: a name in the run, or a path (the metrics files are "
                   "named after it, in the run)")
    p.add_argument("--particles", help="the STAR given to nmaem infer (default: the run's)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("summary", help="a Markdown table of metrics files")
    p.add_argument("files", nargs="+", metavar="heldout_metrics.json")
    p.set_defaults(func=cmd_summary)
    args = ap.parse_args(argv)
    args.work = os.path.abspath(args.work)
    os.makedirs(args.work, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()
