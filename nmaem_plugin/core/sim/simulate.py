"""Synthetic particle datasets: frames, distributions, poses, defocus, shifts, noise.

A dataset is made from F frames of one molecule (a multi-model trajectory, or a morph
between two models) in the frame of a consensus map of box D and pixel size apix: the
rotation centre, the box centre (D//2)*apix in x, y and z, is where the reference model's
centre of mass is placed (unless the models are already docked, as with ``--like``).
Each particle gets a frame drawn from a distribution over frames, a pose uniform on
SO(3), a log-normal defocus, a 2D shift and white noise at a given SNR; it is rendered
with :class:`Renderer` (band-limited projection, RELION CTF).

Frame distributions over F frames (x = frame index, 0..F-1), docs/simulation.md:

* ``uniform``: every frame equally likely.
* ``continuous``: a mixture of 3 equal Gaussians centred at 0.2, 0.5 and 0.8 of the
  trajectory, standard deviation 0.1 (F - 1): neighbouring components overlap, every
  frame has particles.
* ``discontinuous``: 3 equal Gaussians centred at 1/6, 1/2 and 5/6 of the trajectory,
  standard deviation 0.03 (F - 1), each truncated at 2.5 standard deviations, so the
  populated intervals are separated by empty frames.

Outputs (DESIGN.md contract): ``particles.star`` (RELION 3.1), ``stacks/*.mrcs``,
``ground_truth.npz`` (``frame``, ``shift``, the true angles ``euler`` and the written ones
``euler_file``, ``origin_file``, ``rigid_core`` (the atoms a consensus refinement aligns,
every atom unless ``consensus_poses``) and the generation parameters),
``frames.pdb`` (the frames, one model each, in the dataset's frame) and
``reference.pdb`` (the reference model, frame 0's atoms at the reference coordinates,
in the same frame: the X0 to train with). ``DATASET_FILES`` and the stacks are listed in
``.nmaem-simulate.json`` (the output policy, ``io.outputs``).
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from ..physics.ctf import CTFParams
from ..physics.renderer import Renderer
from ..physics.white_noise import noise_sigma
from ..io import poses
from ..base.atomic import atomic_savez
from ..base.choices import DISTRIBUTIONS
from ..base.errors import NmaemError, fail
from .nuisances import (Nuisances, coloured_noise, consensus_errors, random_rotation_errors,
                        relion_normalise, rigid_core, stream)
from ..io.outputs import OVERWRITE_HINT, command_outputs
from ..io.table import ParticleTable
from ..io.stacks import write_stack
from ..io.star import write_star
from ..base.progress import Progress, release_memory
from ..io.provenance import dumps, particle_fingerprint
from ..physics.structure import (AtomicModel, kabsch, match_atoms, read_model, read_trajectory,
                                 superpose, write_models)

DATASET_FILES = ("particles.star", "ground_truth.npz", "frames.pdb", "reference.pdb")
__all__ = ["DISTRIBUTIONS", "SimulationSettings", "frame_probabilities", "sample_frames",
           "uniform_rotations", "lognormal_defocus", "morph_frames", "simulate", "load_frames",
           "DATASET_FILES"]


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class SimulationSettings:
    """What a synthetic dataset is: its size, image formation and randomness.

    ``n`` particles (None: all of a ``like`` file's), drawn over the frames by
    ``distribution``; images of ``box`` pixels of ``apix`` Angstrom; ``snr_db`` the SNR in
    dB, 10 log10(var(clean CTF image) / var(noise)) (None: noise-free); defocus log-normal
    with mean ``defocus_mean`` and standard deviation ``defocus_std`` (um); 2D shifts
    N(0, ``shift_std``^2) per axis (A); the optics ``voltage`` (kV), ``cs`` (mm) and
    ``amp_contrast``; ``seed`` for every draw; ``recentre`` the reference's centre of mass
    to the box centre; ``unknown_shifts`` writes zero origins; ``nuisances`` the nuisances
    of real data (:class:`nuisances.Nuisances`). With a ``like`` file its n, box and pixel
    size replace these (:meth:`matching`). The defaults are those of :func:`simulate`'s
    Python callers; ``nmaem simulate`` has its own (50,000 particles).
    """
    n: Optional[int] = 1000
    distribution: str = "uniform"
    box: int = 192
    apix: float = 0.8
    snr_db: Optional[float] = -20.0
    defocus_mean: float = 1.0
    defocus_std: float = 0.3
    shift_std: float = 0.0
    voltage: float = 300.0
    cs: float = 2.7
    amp_contrast: float = 0.1
    seed: int = 0
    recentre: bool = True
    unknown_shifts: bool = False
    nuisances: Nuisances = field(default_factory=Nuisances)

    def validate(self) -> "SimulationSettings":
        """Raise :class:`NmaemError` (one line, naming the option) on a setting no dataset
        can have; returns ``self``. ``n`` None is allowed (a ``like`` file's count)."""
        if self.n is not None and int(self.n) < 1:
            raise NmaemError("--n must be at least 1")
        if self.distribution not in DISTRIBUTIONS:
            raise NmaemError("unknown distribution %r (choose from %s)"
                             % (self.distribution, ", ".join(DISTRIBUTIONS)))
        if self.box < 8 or self.box % 2:
            raise NmaemError("--box must be even and at least 8 (got %d)" % self.box)
        if not (math.isfinite(self.apix) and self.apix > 0):
            raise NmaemError("--apix must be a positive number of Angstrom (got %s)"
                             % self.apix)
        for name, v, low, high in (("--voltage", self.voltage, 1.0, 3000.0),
                                   ("--cs", self.cs, 0.0, 100.0),
                                   ("--amp-contrast", self.amp_contrast, 0.0, 1.0),
                                   ("--shift-std", self.shift_std, 0.0, math.inf)):
            if not (math.isfinite(v) and low <= v <= high):
                raise NmaemError("%s must be a number from %g to %g (got %s)"
                                 % (name, low, high, v) if math.isfinite(high) else
                                 "%s must be a finite number of at least %g (got %s)"
                                 % (name, low, v))
        if self.snr_db is not None and not math.isfinite(self.snr_db):
            raise NmaemError("--snr-db must be a finite number of decibels (got %s); "
                             "--no-noise gives noise-free images" % self.snr_db)
        _check_defocus(self.defocus_mean, self.defocus_std)
        return self

    def matching(self, like: ParticleTable) -> "SimulationSettings":
        """These settings for rendering like the particle table ``like``: its first ``n``
        particles (all when ``n`` is None), its box and pixel size, no recentring (the model
        is taken as docked in its map). One-line error naming the file when its box is
        unknown or not one box and pixel size."""
        if self.n is not None and int(self.n) < 1:
            self.validate()                 # the --n error, before the file's
        n = like.n if self.n is None else min(int(self.n), like.n)
        sub = like.subset(np.arange(n))
        if np.any(sub.box <= 0):
            fail(like.path, "image size unknown (no rlnImageSize and no readable stack)")
        if len(np.unique(sub.box)) != 1 or len(np.unique(sub.apix)) != 1:
            fail(like.path, "particles of several box or pixel sizes; split the file by "
                            "optics group first")
        return self.with_(n=n, box=int(sub.box[0]), apix=float(sub.apix[0]), recentre=False)

    def with_(self, **changes: Any) -> "SimulationSettings":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)



# ----------------------------------------------------------------------------- sampling

def frame_probabilities(n_frames: int, distribution: str) -> np.ndarray:
    """Probability of each frame (n_frames,) under a named distribution (module doc)."""
    F = int(n_frames)
    if F < 1:
        raise NmaemError("need at least one frame")
    x = np.arange(F, dtype=np.float64)
    L = max(F - 1, 1)
    if distribution == "uniform":
        p = np.ones(F)
    elif distribution == "continuous":
        mus, sd, cut = (0.2 * L, 0.5 * L, 0.8 * L), 0.1 * L, np.inf
        p = sum(np.exp(-0.5 * ((x - m) / sd) ** 2) for m in mus)
    elif distribution == "discontinuous":
        mus, sd, cut = (L / 6.0, L / 2.0, 5.0 * L / 6.0), 0.03 * L, 2.5
        p = np.zeros(F)
        for m in mus:
            z = (x - m) / sd
            p += np.where(np.abs(z) <= cut, np.exp(-0.5 * z ** 2), 0.0)
        if np.count_nonzero(p) < 3:
            raise NmaemError("the discontinuous distribution needs more frames (got %d)" % F)
    else:
        raise NmaemError("unknown distribution %r (choose from %s)"
                         % (distribution, ", ".join(DISTRIBUTIONS)))
    return p / p.sum()


def sample_frames(n: int, n_frames: int, distribution: str,
                  rng: np.random.Generator) -> np.ndarray:
    return rng.choice(n_frames, size=n, p=frame_probabilities(n_frames, distribution))


def uniform_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """n rotation matrices uniform on SO(3) (normalised Gaussian quaternions)."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def _check_defocus(mean_um, std_um):
    if not (math.isfinite(mean_um) and math.isfinite(std_um)) or mean_um <= 0 or std_um < 0:
        raise NmaemError("defocus mean must be > 0 and std >= 0 (got %g, %g um)"
                         % (mean_um, std_um))


def lognormal_defocus(n: int, mean_um: float, std_um: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Defocus in Angstrom, log-normal with the given mean and standard deviation (um)."""
    _check_defocus(mean_um, std_um)
    return np.exp(rng.normal(*lognormal_params(std_um, mean_um), n)) * 1e4


def lognormal_params(sd: float, mean: float = 1.0) -> tuple[float, float]:
    """(mu, sigma) of the log-normal distribution with this mean and standard deviation."""
    s2 = np.log1p((sd / mean) ** 2)
    return np.log(mean) - 0.5 * s2, np.sqrt(s2)


def morph_frames(ref: AtomicModel, target: AtomicModel,
                 n_frames: int) -> tuple[AtomicModel, np.ndarray]:
    """Linear morph from ``ref`` to ``target`` superposed on it (atoms matched).

    Returns (model, frames): ``model`` is ``ref`` restricted to the shared atoms and
    ``frames`` (F, M, 3) goes from ref's coordinates (frame 0) to target's, superposed
    on ref by Kabsch over the shared atoms (frame F-1).
    """
    if n_frames < 2:
        raise NmaemError("a morph needs --frames >= 2 (got %d)" % n_frames)
    ia, ib = match_atoms(ref, target)
    model = ref.select(ia) if len(ia) != ref.n_atoms else ref
    a = ref.coords[ia]
    b = superpose(target.coords[ib], a)
    t = np.linspace(0.0, 1.0, n_frames)[:, None, None]
    return model, a[None] + t * (b - a)[None]


# ----------------------------------------------------------------------------- simulate

def _particle_table(n, stack_paths, stack_index, euler, origin, defocus_u, defocus_v,
                    defocus_angle, voltage, cs, amp_contrast, apix, box, path,
                    phase_shift=None, bfactor=None, optics_group=None):
    return ParticleTable(
        path=path, n=n, image_names=None, stack_paths=np.asarray(stack_paths),
        stack_index=np.asarray(stack_index, dtype=np.int64), euler=euler, origin=origin,
        defocus_u=defocus_u, defocus_v=defocus_v, defocus_angle=defocus_angle,
        phase_shift=np.zeros(n) if phase_shift is None else phase_shift,
        ctf_bfactor=np.zeros(n) if bfactor is None else bfactor,
        voltage=np.broadcast_to(np.asarray(voltage, float), (n,)).copy(),
        cs=np.broadcast_to(np.asarray(cs, float), (n,)).copy(),
        amp_contrast=np.broadcast_to(np.asarray(amp_contrast, float), (n,)).copy(),
        apix=np.broadcast_to(np.asarray(apix, float), (n,)).copy(),
        box=np.broadcast_to(np.asarray(box, np.int64), (n,)).copy(),
        optics_group=(np.ones(n, np.int64) if optics_group is None
                      else np.asarray(optics_group, np.int64)),
        extra=pd.DataFrame(index=range(n)))


def simulate(out_dir: str, model: AtomicModel, frames: np.ndarray,
             settings: SimulationSettings = SimulationSettings(), *,
             like: Optional[ParticleTable] = None,
             reference_model: Optional[AtomicModel] = None, chunk: int = 256,
             batch: int = 32, device: Optional[str] = None, overwrite: bool = False,
             inputs: Sequence[Optional[str]] = (), log: Callable[[str], Any] = print) -> dict:
    """Write a synthetic dataset to ``out_dir``; returns a dict summary.

    ``model`` (AtomicModel) names the atoms of ``frames`` (F, M, 3), coordinates in the
    model file's frame; ``settings`` (:class:`SimulationSettings`, checked by its
    ``validate``) says what the dataset is. With ``like`` (a ParticleTable with poses and
    CTF) its poses, origins, CTFs, box and pixel size are used instead of random ones and
    the model is taken as docked (no recentring, :meth:`SimulationSettings.matching`);
    otherwise ``settings.recentre`` moves the reference centre of mass (frame 0's mean atom
    position) to the box centre. The same arguments and seed give byte-identical files.

    ``reference_model`` (AtomicModel) is written as ``reference.pdb`` instead of the
    first frame's model, superposed on it over the shared atoms (a different structure of
    the same molecule handed to the method as its reference). ``chunk`` images go to each
    MRC stack (the unit of memory use), ``batch`` are rendered at once on ``device``
    (default: cuda when present). The files are written through the output policy
    (``io.outputs.command_outputs``): ``overwrite`` replaces an earlier dataset of nmaem in
    ``out_dir`` (only the files its manifest lists), ``inputs`` are files it must not
    replace; an interrupted run leaves nothing (or, killed, is rolled back by the next).
    """
    t_start = time.perf_counter()
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim != 3 or frames.shape[1:] != (model.n_atoms, 3):
        raise ValueError("frames of shape %s for a model of %d atoms"
                         % (frames.shape, model.n_atoms))
    if not np.all(np.isfinite(frames)):
        fail(model.source, "non-finite coordinates in the frames")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if like is not None:
        like.require(poses=True, ctf=True)
        settings = settings.matching(like)
        like = like.subset(np.arange(settings.n))
    elif settings.n is None:
        raise NmaemError("--n must be at least 1 (all of a file's particles only with --like)")
    settings.validate()
    st, nz = settings, settings.nuisances
    n, box, apix, snr_db, seed = int(st.n), st.box, st.apix, st.snr_db, st.seed
    rng = np.random.default_rng(seed)
    F = len(frames)

    centre = np.full(3, (box // 2) * apix)
    offset = centre - frames[0].mean(axis=0) if st.recentre else np.zeros(3)
    frames = frames + offset
    reference = model.coords + offset if st.recentre else model.coords.copy()
    consensus_reference = reference      # the model's own atoms (consensus_poses)
    ref_model = model
    if reference_model is not None:
        ia, ib = match_atoms(model, reference_model)
        if len(ia) < 3:
            fail(reference_model.source, "shares fewer than 3 atoms with the simulated model "
                                         "(atoms matched by chain, residue and atom name)")
        R, t = kabsch(reference_model.coords[ib], reference[ia])
        ref_model = reference_model
        reference = reference_model.coords @ R.T + t
    if nz.atom_jitter > 0:
        frames = frames + stream(seed, "jitter").normal(0.0, nz.atom_jitter, frames.shape)

    # per-particle parameters, all drawn up front from one generator (small arrays)
    frame = sample_frames(n, F, st.distribution, rng) if F > 1 else np.zeros(n, dtype=np.int64)
    if like is None:
        A = uniform_rotations(n, rng)
        rot, tilt, psi = poses.matrix_to_euler(A)
        euler = np.stack([rot, tilt, psi], axis=1)
        shift = rng.normal(0.0, st.shift_std, (n, 2)) if st.shift_std > 0 else np.zeros((n, 2))
        dfu = lognormal_defocus(n, st.defocus_mean, st.defocus_std, rng)
        ctf = CTFParams(defocus_u=dfu, defocus_v=dfu.copy(), defocus_angle=np.zeros(n),
                        voltage=np.full(n, st.voltage), cs=np.full(n, st.cs),
                        amp_contrast=np.full(n, st.amp_contrast), phase_shift=np.zeros(n),
                        bfactor=np.zeros(n))
    else:
        euler = like.euler.copy()
        shift = -like.origin_or_zero()
        ctf = CTFParams(defocus_u=like.defocus_u, defocus_v=like.defocus_v,
                        defocus_angle=like.defocus_angle, voltage=like.voltage,
                        cs=like.cs, amp_contrast=like.amp_contrast,
                        phase_shift=like.phase_shift, bfactor=like.ctf_bfactor)
    # render from the matrices of the angles as written (what any reader will use)
    A = poses.euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2])

    # what the STAR will say: the truth, or the truth with the nuisances' errors
    euler_file = euler
    A_file = A
    origin_err = (stream(seed, "origin").normal(0.0, nz.origin_error_sd, (n, 2))
                  if nz.origin_error_sd > 0 else np.zeros((n, 2)))
    core = None
    if nz.consensus_poses:
        # the pose a consensus refinement gives: the reference aligned by the rigid core
        core = rigid_core(consensus_reference, frames)
        Rf, tf = consensus_errors(consensus_reference, frames, core, centre)
        A_file = A @ np.swapaxes(Rf[frame], 1, 2)
        origin_err = origin_err + np.einsum("nij,nj->ni", A_file, tf[frame])[:, :2]
    if nz.angle_error_sd > 0:
        E = random_rotation_errors(n, nz.angle_error_sd, stream(seed, "angle"))
        A_file = E @ A_file
    if A_file is not A:
        euler_file = np.stack(poses.matrix_to_euler(A_file), axis=1)
    origin_true = -shift
    dfu_file = np.asarray(ctf.defocus_u, float)
    dfv_file = np.asarray(ctf.defocus_v, float)
    if nz.defocus_error_sd > 0:
        d_err = stream(seed, "defocus").normal(0.0, nz.defocus_error_sd, n)
        dfu_file, dfv_file = dfu_file + d_err, dfv_file + d_err
    contrast = (stream(seed, "contrast").lognormal(*lognormal_params(nz.contrast_sd), n)
                if nz.contrast_sd > 0 else np.ones(n))
    grey = (stream(seed, "offset").normal(0.0, nz.offset_sd, n) if nz.offset_sd > 0
            else np.zeros(n))
    render_ctf = ctf.replace(bfactor=np.asarray(ctf.bfactor, float) + nz.bfactor)

    n_chunks = (n + chunk - 1) // chunk
    stack_names = ["stacks/particles_%05d.mrcs" % c for c in range(n_chunks)]
    with command_outputs(out_dir, "simulate", products=list(DATASET_FILES) + stack_names,
                         inputs=inputs, force=overwrite, hint=OVERWRITE_HINT) as out:
        renderer = Renderer(model.elements, box, apix, centre=centre, device=device)
        frames_t = torch.as_tensor(frames, dtype=torch.float32, device=device)

        def render(idx):
            imgs = torch.empty(len(idx), box, box, dtype=torch.float32, device=device)
            for s in range(0, len(idx), batch):
                j = idx[s:s + batch]

                def t(x):
                    return torch.as_tensor(np.asarray(x)[j], dtype=torch.float32, device=device)
                c = renderer.ctf(render_ctf[j].to(device, torch.float32))
                with torch.no_grad():
                    imgs[s:s + len(j)] = renderer.render(
                        frames_t[torch.as_tensor(frame[j], device=device)], t(A), t(shift), c)
            return imgs

        stack_paths = np.empty(n, dtype=object)
        stack_index = np.empty(n, dtype=np.int64)
        sigma = 0.0
        var_clean, var_noise = [], []
        progress = Progress(n, "simulate", unit="images")
        for c in range(n_chunks):
            idx = np.arange(c * chunk, min(n, (c + 1) * chunk))
            images = render(idx)
            var_clean.append(images.reshape(len(idx), -1).var(1, unbiased=False).cpu())
            if c == 0 and snr_db is not None:
                # one noise level for the dataset, set by the first chunk's clean images
                sigma = noise_sigma(images, snr_db)
            if nz.contrast_sd > 0:
                images.mul_(torch.as_tensor(contrast[idx], dtype=images.dtype,
                                            device=device)[:, None, None])
            if snr_db is not None:
                gen = torch.Generator(device=device).manual_seed(int(seed) * 1000003 + c)
                noise = coloured_noise(images.shape, sigma, nz.noise_falloff, generator=gen,
                                       device=device)
                var_noise.append(noise.reshape(len(idx), -1).var(1, unbiased=False).cpu())
                images.add_(noise)           # in place: one chunk of images in memory
                del noise
            if nz.offset_sd > 0:
                images.add_(torch.as_tensor(grey[idx] * (sigma if sigma > 0 else 1.0),
                                            dtype=images.dtype, device=device)[:, None, None])
            if nz.normalise:
                relion_normalise(images, nz.bg_radius)
            name = out.path(stack_names[c])
            write_stack(name, images.cpu().numpy(), apix)
            stack_paths[idx] = os.path.abspath(name)
            stack_index[idx] = np.arange(len(idx))
            del images
            release_memory()
            progress.update(len(idx))

        origin = (np.zeros((n, 2)) if st.unknown_shifts else origin_true) + origin_err
        if like is not None:
            table = like.subset(np.arange(n))
            table.stack_paths = stack_paths.astype(str)
            table.stack_index = stack_index
            table.image_names = None
            table.path = os.path.join(out_dir, "particles.star")
            if st.unknown_shifts or nz.origin_error_sd > 0:
                table.origin = origin
            table.euler = euler_file
            table.defocus_u, table.defocus_v = dfu_file, dfv_file
        else:
            table = _particle_table(n, stack_paths.astype(str), stack_index, euler_file, origin,
                                    dfu_file, dfv_file, ctf.defocus_angle,
                                    st.voltage, st.cs, st.amp_contrast, apix, box,
                                    os.path.join(out_dir, "particles.star"))
        vc = torch.cat(var_clean).double()
        measured_snr = (10 * np.log10(vc.mean().item() / torch.cat(var_noise).double().mean().item())
                        if var_noise else None)
        params = dict(n=n, frames=F, distribution=st.distribution, box=box, apix=apix,
                      snr_db=snr_db, measured_snr_db=measured_snr, noise_sigma=sigma,
                      defocus_mean_um=st.defocus_mean, defocus_std_um=st.defocus_std,
                      shift_std=st.shift_std, voltage=st.voltage, cs=st.cs,
                      amp_contrast=st.amp_contrast, seed=seed,
                      like=None if like is None else like.path,
                      centre=centre.tolist(), offset=offset.tolist(),
                      unknown_shifts=bool(st.unknown_shifts), nuisances=nz.as_dict(),
                      reference_model=(None if reference_model is None
                                       else reference_model.source))
        atomic_savez(out.path("ground_truth.npz"), frame=frame.astype(np.int64),
                     shift=shift.astype(np.float32), euler=euler, defocus_u=np.asarray(ctf.defocus_u, float),
                     euler_file=np.asarray(euler_file, float),
                     origin_file=np.asarray(origin, float),
                     defocus_u_file=dfu_file, defocus_v_file=dfv_file,
                     contrast=contrast.astype(np.float64), offset=grey * sigma,
                     rigid_core=(np.ones(model.n_atoms, bool) if core is None else core),
                     params=np.array(json.dumps(params)),
                     particles_fingerprint=dumps(particle_fingerprint(table)))
        write_models(out.path("frames.pdb"), model, list(frames))
        write_models(out.path("reference.pdb"), ref_model, [reference])
        write_star(out.path("particles.star"), table)   # last: marks completion
    params["seconds"] = time.perf_counter() - t_start
    log("simulate: %d particles of %d px at %.3f A/px from %d frame(s) -> %s (%.1f s%s)"
        % (n, box, apix, F, out_dir, params["seconds"],
           "" if measured_snr is None else ", SNR %.2f dB" % measured_snr))
    return params


def load_frames(trajectory: Optional[str] = None, ref: Optional[str] = None,
                target: Optional[str] = None,
                n_frames: int = 50) -> tuple[AtomicModel, np.ndarray]:
    """(model, frames) from a trajectory file, a ref/target morph, or a single ref."""
    if trajectory:
        return read_trajectory(trajectory)
    if ref is None:
        raise NmaemError("give --trajectory, or --ref (with --target for a morph)")
    a = read_model(ref)
    if target:
        return morph_frames(a, read_model(target), n_frames)
    return a, a.coords[None]
