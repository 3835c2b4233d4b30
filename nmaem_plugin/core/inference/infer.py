"""Amortised inference: z and shift of every particle from a trained run.

``latent.npz`` (``io/latent.py``): ``z`` (N, d) amplitudes in Angstrom (X(z) = X0 + U z);
``shift`` (N, 2) Angstrom (x, y), the residual displacement of the particle centre (the
refined RELION origin is ``origin - shift``); ``index`` (N,) the particles' rows in the
input file; ``pose_correction`` and ``euler`` after ``--refine-pose`` or ``--fit-pose``.
The images are preprocessed as in training; the encoder runs in eval mode, in float32.

Then, for runs trained with the whitened likelihood (the default) and particles with poses
and CTFs, each particle's z and shift are fitted to its own image (``--fit-iterations``),
starting from the encoder's output, with the images' envelope (``--fit-bfactor``): under
the encoder's own spread (``--population encoder``, the default, ``particle_fit.py``) or a
population estimated from the particles by deconvolution (``--population em``,
``deconvolve.py``; the latent gets ``z_cov``, the population and the shrinkage check).
``--fit-pose`` also refines each particle's rotation, under a prior whose spread a
calibration set measures.
"""

import math
import os
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple, Union

import numpy as np
import torch

from ..base.choices import EM_FIT_ITERATIONS_DEFAULT
from ..io.latent import write_latent
from ..base.errors import NmaemError, fail, warning

if TYPE_CHECKING:
    from ..io.latent import Latent, ShrinkageCheck
    from ..io.table import ParticleTable
    from .particle_fit import FitStats

__all__ = ["infer", "encode_images", "z_column_names", "fit_plan", "shrinkage_profile"]


def z_column_names(d: int) -> List[str]:
    """STAR column names of the amplitudes: nmaemZ01, nmaemZ02, ..."""
    width = max(2, len(str(d)))
    return ["nmaemZ%0*d" % (width, l + 1) for l in range(d)]


POSE_COLUMNS = ("nmaemPoseCorrX", "nmaemPoseCorrY", "nmaemPoseCorrZ")
FIT_BATCH = 32      # particles per batch of the fit (its Jacobian holds (d + 3) transforms each)


def encode_images(encoder: torch.nn.Module, images: torch.Tensor,
                  device: Union[str, torch.device]
                  ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(shift, z, pose correction or None) numpy float32 of preprocessed images
    (B, box, box) with ``encoder``."""
    from ..learn.network import split_outputs
    with torch.no_grad():
        shift, z, rotvec = split_outputs(encoder(images.to(device)))
    return (shift.float().cpu().numpy(), z.float().cpu().numpy(),
            None if rotvec is None else rotvec.float().cpu().numpy())


def fit_plan(cfg: dict, table: "ParticleTable", fit_iterations: Optional[int], run_dir: str,
              particles: str) -> Tuple[int, str]:
    """(iterations, why not) of the per-particle fit: ``fit_iterations`` None is the
    default (``FIT_ITERATIONS_DEFAULT`` where the fit applies, else 0 with the reason);
    an explicit number where it cannot apply is an error."""
    from ..base.choices import FIT_ITERATIONS_DEFAULT
    from ..io.runfolder import has_noise_model
    if fit_iterations is not None and int(fit_iterations) < 0:
        raise NmaemError("--fit-iterations must be 0 or more (got %d)" % int(fit_iterations))
    n = FIT_ITERATIONS_DEFAULT if fit_iterations is None else int(fit_iterations)
    if n == 0:
        return 0, "--fit-iterations 0"
    why = None
    if not has_noise_model(cfg):
        why = ("the run was trained with --loss %s; the fit needs the whitened likelihood's "
               "noise model" % cfg.get("loss"), run_dir)
    elif table.euler is None:
        why = ("the particles have no poses", particles)
    elif table.defocus_u is None or table.voltage is None:
        why = ("the particles have no CTF", particles)
    elif table.n < 2:
        why = ("one particle is too few for the prior (the population of z)", particles)
    if why is None:
        return n, ""
    if fit_iterations is not None:
        fail(why[1], "cannot fit the particles (--fit-iterations %d): %s" % (n, why[0]))
    return 0, why[0]


def _turn_prior(stats: "FitStats") -> np.ndarray:
    """sd (3,) radians of the rotation errors about the model's axes, by the method of
    moments from a calibration fit under a broad prior: the mean square of the fitted
    rotations minus their mean posterior variance (``POSE_FIT_MIN_SD_DEG`` at least)."""
    from ..base.choices import POSE_FIT_MIN_SD_DEG
    w = np.concatenate(stats.dturn).astype(np.float64)
    var = np.concatenate(stats.turn_var).astype(np.float64)
    tau2 = (w ** 2).mean(0) - var.mean(0)
    return np.sqrt(np.maximum(tau2, math.radians(POSE_FIT_MIN_SD_DEG) ** 2))


def _fit_particles(ae, cfg, run_dir, table, dataset, z, shift, rotvec, iterations, dev,
                   num_workers, log, fit_pose=False, bfactor=None, population="em",
                   components=None, extras=None):
    """Replace ``z`` and ``shift`` (numpy, in place) by each particle's fit
    (``particle_fit.py``; with ``population`` "em", under the population estimated by
    deconvolution, ``deconvolve.py``); with ``fit_pose``, return each particle's fitted
    rotation w (N, 3) radians (applied after the run's correction), else None.
    ``bfactor``: the envelope's B (A^2) of the renderings, or None to estimate it.
    ``components``: the most mixture components (None: the default; 1: one Gaussian).
    ``extras`` (a dict) receives ``z_cov``, the population arrays and the shrinkage
    check's profile."""
    from ..base.choices import POSE_FIT_BROAD_SD_DEG, POSE_FIT_CALIBRATION
    from ..learn.data import ParticleMetadata, make_loader
    from ..physics.likelihood import WhitenedLikelihood
    from .particle_fit import (BFACTOR_MAX, BFACTOR_TOL, FitStats, envelope_bfactor,
                               fit_batch, population_prior, prior_floor)
    from ..base.progress import Progress
    lik = WhitenedLikelihood.for_run(run_dir, cfg, dev, source=table.path)
    mu, prec = population_prior(np.concatenate([z, shift], 1),
                                min_sd=prior_floor(z.shape[1], ae.decoder.coords.shape[0]))
    meta = ParticleMetadata(table, dev)
    n = table.n
    turn = np.zeros((n, 3), dtype=np.float32) if fit_pose else None
    calib = np.unique(np.linspace(0, n - 1, min(n, POSE_FIT_CALIBRATION)).astype(np.int64))

    def device_rows(r):
        return torch.as_tensor(r, device=dev)

    estimate_b = bfactor is None
    if bfactor is None:
        _, images = dataset[calib]
        rt = device_rows(calib)
        rot, base, ctf_params = meta.batch(rt)
        bfactor, chi2_b, chi2_0 = envelope_bfactor(
            ae.decoder, lik, images.to(dev), meta.optics_group[rt],
            torch.as_tensor(z[calib], device=dev), torch.as_tensor(shift[calib], device=dev),
            rot, base, ae.decoder.ctf(ctf_params),
            rotvec=None if rotvec is None else torch.as_tensor(rotvec[calib], device=dev))
        log("infer: the images' envelope: B = %.0f A^2 (maximum likelihood over %d "
            "particles at the encoder's z; chi2 %.1f lower than without it)"
            % (bfactor, len(calib), chi2_0 - chi2_b))
        if bfactor >= BFACTOR_MAX - 2 * BFACTOR_TOL:
            log("infer: warning: the envelope reached the search's bound (%.0f A^2): the "
                "encoder's models explain little of the images' high-resolution signal "
                "(too short a training, or a reference that does not fit); see the run's "
                "training curves, or give --fit-bfactor" % BFACTOR_MAX)

    envelope = [float(bfactor)]

    def ctf_of(ctf_params):
        if envelope[0]:
            ctf_params = ctf_params.replace(bfactor=ctf_params.bfactor + envelope[0])
        return ae.decoder.ctf(ctf_params)

    def with_turn(sd):
        m, q = mu, prec
        if fit_pose:
            m = np.concatenate([mu, np.zeros(3)])
            q = np.zeros((len(m), len(m)))
            q[:len(mu), :len(mu)] = prec
            q[len(mu):, len(mu):] = np.diag(1.0 / np.asarray(sd, dtype=np.float64) ** 2)
        return (torch.as_tensor(m, dtype=torch.float32, device=dev),
                torch.as_tensor(q, dtype=torch.float32, device=dev))

    def run(rows_all, mu_t, prec_t, label, keep):
        size = FIT_BATCH
        batches = [rows_all[i:i + size] for i in range(0, len(rows_all), size)]
        stats = FitStats()
        progress = Progress(len(rows_all), label, unit="images")
        for rows, images in make_loader(dataset, batches, num_workers, dev.type == "cuda"):
            r = rows.numpy()
            rt = rows.to(dev)
            rot, base, ctf_params = meta.batch(rt)
            out = fit_batch(ae.decoder, lik, images.to(dev), meta.optics_group[rt],
                            torch.as_tensor(z[r], device=dev),
                            torch.as_tensor(shift[r], device=dev), rot, base,
                            ctf_of(ctf_params), mu_t, prec_t, iterations,
                            stats=stats,
                            rotvec=None if rotvec is None else torch.as_tensor(rotvec[r],
                                                                               device=dev),
                            turn0=(torch.zeros(len(r), 3, device=dev) if fit_pose else None))
            if keep:
                z[r], shift[r] = out[0].cpu().numpy(), out[1].cpu().numpy()
                if fit_pose:
                    turn[r] = out[2].cpu().numpy()
            progress.update(len(r))
        return stats

    what = "z, shift and rotation" if fit_pose else "z and shift"
    sd = None
    extras = {} if extras is None else extras
    if fit_pose:
        log("infer: the rotation errors' spread, from a fit of %d particles under a broad "
            "prior (sd %g deg)" % (len(calib), POSE_FIT_BROAD_SD_DEG))
        sd = _turn_prior(run(calib, *with_turn([math.radians(POSE_FIT_BROAD_SD_DEG)] * 3),
                             "calibration", keep=False))
        log("infer: rotation prior: sd %.2f, %.2f, %.2f deg about the model's x, y, z"
            % tuple(np.degrees(sd)))
    if population == "em" and z.shape[1] > 0:      # d = 0: no landscape to deconvolve
        from . import population as popmod
        from .deconvolve import deconvolve
        log("infer: fitting each particle's %s to its image under the population estimated "
            "from the particles (up to %d iterations, each a Gauss-Newton step of every "
            "particle and a deconvolution of the population%s; envelope B = %.0f A^2)"
            % (what, iterations, ", with the rotation prior" if fit_pose else "",
               float(bfactor)))
        floor = prior_floor(z.shape[1], ae.decoder.coords.shape[0])
        def bfactor_at(zz, ss):
            if not estimate_b:
                return ctf_of
            rt = device_rows(calib)
            rot, base, ctf_params = meta.batch(rt)
            _, images = dataset[calib]
            b, chi2_b, chi2_0 = envelope_bfactor(
                ae.decoder, lik, images.to(dev), meta.optics_group[rt],
                torch.as_tensor(zz[calib], dtype=torch.float32, device=dev),
                torch.as_tensor(ss[calib], dtype=torch.float32, device=dev), rot, base,
                ae.decoder.ctf(ctf_params),
                rotvec=None if rotvec is None else torch.as_tensor(rotvec[calib], device=dev))
            log("infer: the images' envelope again, at the fit's z: B = %.0f A^2 (was %.0f)"
                % (b, envelope[0]))
            envelope[0] = b
            return ctf_of

        res = deconvolve(ae.decoder, lik, dataset, meta, np.concatenate([z, shift], 1),
                         ctf_of, floor, dev, iterations, rotvec=rotvec, bfactor_at=bfactor_at,
                         turn_sd=sd if fit_pose else None, num_workers=num_workers,
                         max_components=(popmod.DEFAULTS["max_components"]
                                         if components is None else int(components)),
                         log=log)
        d = z.shape[1]
        log("infer: fit: %s" % res.describe(np.concatenate([z, shift], 1),
                                              ae.decoder.coords.shape[0]))
        z[:] = res.mean[:, :d]
        shift[:] = res.mean[:, d:d + 2]
        if fit_pose:
            turn[:] = res.mean[:, d + 2:]
        extras["z_cov"] = res.cov[:, :d, :d]
        extras["population"] = res.population.arrays()
        if len(res.unconstrained):
            log("infer: the images hardly constrain mode(s) %s: their population spread "
                "stays near its starting value (the encoder's), and so does the posterior "
                "there" % ", ".join(str(int(k) + 1) for k in res.unconstrained))
        lin, pop = res.lin, res.population
    else:
        log("infer: fitting each particle's %s to its image (%d Gauss-Newton iterations; "
            "prior: the encoder's z and shifts of %d particles%s; envelope B = %.0f A^2)"
            % (what, iterations, n, ", and the rotation prior" if fit_pose else "",
               float(bfactor)))
        stats = run(np.arange(n, dtype=np.int64), *with_turn(sd), "fit", keep=True)
        log("infer: fit: %s" % stats.describe())
        lin = pop = None
    extras["shrinkage"] = _shrinkage_check(ae, lik, dataset, meta, z, shift, turn, rotvec,
                                           ctf_of, calib, dev, num_workers, lin, pop,
                                           extras.get("z_cov"))
    log("infer: " + extras["shrinkage"].verdict())
    return turn


def _linearise_rows(ae, lik, dataset, meta, q, rows, ctf_of, rotvec, fit_turn, dev):
    """``population.Linearised`` of the particles ``rows`` about their parameters ``q``
    (len(rows), P), one batch of ``FIT_BATCH`` at a time."""
    from . import population as popmod
    from .particle_fit import linearise_batch
    P = q.shape[1]
    h = np.zeros((len(rows), P))
    H = np.zeros((len(rows), P, P))
    for s in range(0, len(rows), FIT_BATCH):
        r = rows[s:s + FIT_BATCH]
        _, images = dataset[r]
        rt = torch.as_tensor(r, device=dev)
        rot, base, ctf_params = meta.batch(rt)
        _, g, hh = linearise_batch(
            ae.decoder, lik, images.to(dev), meta.optics_group[rt],
            torch.as_tensor(q[s:s + len(r)], dtype=torch.float32, device=dev), rot, base,
            ctf_of(ctf_params),
            rotvec=None if rotvec is None else torch.as_tensor(rotvec[r], device=dev),
            fit_turn=fit_turn)
        H[s:s + len(r)] = hh.cpu().numpy()
        h[s:s + len(r)] = g.cpu().numpy() + np.einsum("nij,nj->ni", H[s:s + len(r)],
                                                     q[s:s + len(r)])
    return popmod.Linearised(h, H, ae.decoder.n_modes, q.copy())


def _shrinkage_check(ae, lik, dataset, meta, z, shift, turn, rotvec, ctf_of, calib, dev,
                     num_workers, lin, pop, z_cov):
    """The shrinkage check (``shrinkage.scale_profile``) on the calibration particles:
    the population as inferred (the deconvolved one, else the one the latent implies,
    ``shrinkage.latent_population``), the particles' likelihoods linearised at their
    inferred parameters (``lin`` where the fit has them)."""
    from .shrinkage import latent_population, scale_profile
    if lin is None:
        q = np.concatenate([z, shift] + ([turn] if turn is not None else []), 1)
        lin = _linearise_rows(ae, lik, dataset, meta, q[calib].astype(np.float64), calib,
                              ctf_of, rotvec, turn is not None, dev)
    else:
        lin = lin.subset(calib)
    if pop is None:
        pop = latent_population(z, shift, z_cov, turn)
    return scale_profile(lin, pop)


def shrinkage_profile(particles: str, run_dir: str, latent: "Latent",
                      device: Union[str, torch.device, None] = None,
                      bfactor: Optional[float] = None, checkpoint: str = "last",
                      n: Optional[int] = None) -> "ShrinkageCheck":
    """The shrinkage check of a latent file's landscape (``shrinkage.scale_profile``): the
    marginal likelihood of ``n`` particles (default ``POSE_FIT_CALIBRATION``, evenly spaced
    rows) of ``particles`` under the latent's population (or the one it implies), as its
    spread is scaled, with the run's likelihood and the envelope ``bfactor`` (A^2; None:
    estimated at the latent's z). A latent with pose corrections is not handled (its
    rotations are then the file's)."""
    from ..base.choices import POSE_FIT_CALIBRATION
    from ..io.particles import read_particles
    from ..learn.checkpoints import load_trained
    from ..learn.data import ParticleImages, ParticleMetadata
    from ..learn.distributed import resolve_device
    from ..physics.likelihood import WhitenedLikelihood
    from . import population as popmod
    from .particle_fit import envelope_bfactor
    from .shrinkage import latent_population, scale_profile
    dev = resolve_device(device)
    ae, cfg = load_trained(run_dir, dev, checkpoint)
    table = read_particles(particles)
    if latent.index.max() >= table.n:
        fail(latent.path, "index %d beyond the %d particles of %s"
             % (latent.index.max(), table.n, particles))
    table = table.subset(latent.index)
    lik = WhitenedLikelihood.for_run(run_dir, cfg, dev, source=table.path)
    dataset = ParticleImages(table, cfg["box"])
    meta = ParticleMetadata(table, dev)
    m = latent.n if n is None else int(n)
    calib = np.unique(np.linspace(0, latent.n - 1, min(latent.n, m or POSE_FIT_CALIBRATION)
                                  ).astype(np.int64))
    if bfactor is None:
        _, images = dataset[calib]
        rt = torch.as_tensor(calib, device=dev)
        rot, base, ctf_params = meta.batch(rt)
        bfactor = envelope_bfactor(
            ae.decoder, lik, images.to(dev), meta.optics_group[rt],
            torch.as_tensor(latent.z[calib], dtype=torch.float32, device=dev),
            torch.as_tensor(latent.shift[calib], dtype=torch.float32, device=dev), rot, base,
            ae.decoder.ctf(ctf_params))[0]

    envelope = [float(bfactor)]

    def ctf_of(ctf_params):
        if envelope[0]:
            ctf_params = ctf_params.replace(bfactor=ctf_params.bfactor + envelope[0])
        return ae.decoder.ctf(ctf_params)

    q = np.concatenate([latent.z, latent.shift], 1)[calib]
    lin = _linearise_rows(ae, lik, dataset, meta, q, calib, ctf_of, None, False, dev)
    pop = popmod.Population.from_arrays(latent.population)
    if pop is None or len(pop.extra_mean) != 2:
        pop = latent_population(latent.z, latent.shift, latent.z_cov)
    return scale_profile(lin, pop)


def infer(particles: str, run_dir: str, out: str, batch: int = 256,
          device: Union[str, torch.device, None] = None, star: Optional[str] = None,
          num_workers: int = 0, checkpoint: str = "last",
          log: Callable[[str], None] = print,
          fit_iterations: Optional[int] = None, fit_pose: bool = False,
          fit_bfactor: Optional[float] = None, population: str = "encoder",
          components: Optional[int] = None) -> dict:
    """Write ``out`` (latent.npz) for every particle of ``particles``; optionally ``star``,
    a copy of the particle file with amplitude columns and refined origins (and, for a run
    trained with ``--refine-pose``, refined angles and the corrections in degrees,
    nmaemPoseCorrX/Y/Z). ``checkpoint``: ``last``, ``best`` (lowest validation loss) or a
    checkpoint file of the run. ``fit_iterations``: of the per-particle fit; None:
    ``FIT_ITERATIONS_DEFAULT`` (``EM_FIT_ITERATIONS_DEFAULT`` with ``em``) when the run has
    the whitened likelihood and the particles poses and CTFs, else none; 0: the encoder's.
    ``fit_pose``: the fit also refines each particle's rotation (``pose_fit`` in
    docs/training.md); the latent and the STAR then hold the refined angles.
    ``fit_bfactor``: the B-factor (A^2) of the envelope the fit's renderings get; None:
    estimated from the particles (``particle_fit.envelope_bfactor``); 0: none.
    ``population``: ``encoder`` (default): under a Gaussian with the encoder's mean and
    covariance (``particle_fit.py``); ``em``: under the population estimated by
    deconvolution (``deconvolve.py``; the latent then holds ``z_cov`` and the
    population). ``components``: the most mixture
    components of the population (None: ``population.DEFAULTS``; 1: one Gaussian).

    Memory: one batch of images at a time plus the (N, d + 2) results.
    """
    from ..io.particles import read_particles
    from ..io.star import write_star
    from ..base.progress import Progress
    from ..learn.data import ParticleImages, make_loader
    from ..learn.distributed import is_oom, resolve_device, use_fast_kernels
    from ..learn.checkpoints import load_trained
    if int(batch) < 1:
        raise NmaemError("--batch must be at least 1")
    dev = resolve_device(device)
    ae, cfg = load_trained(run_dir, dev, checkpoint)
    use_fast_kernels(dev, ae.encoder)
    table = read_particles(particles)
    refine_pose = bool(cfg.get("refine_pose"))
    table.require(poses=refine_pose, ctf=False, images=True)
    boxes, apixes = np.unique(table.box), np.unique(table.apix)
    if len(boxes) != 1 or len(apixes) != 1:
        fail(particles, "particles of several box or pixel sizes; split the file by optics "
                        "group first")
    if int(boxes[0]) != cfg["box0"] or abs(float(apixes[0]) - cfg["apix0"]) > 1e-6 * cfg["apix0"]:
        fail(particles, "images are %d px at %g A/px, but the model was trained on %d px at "
                        "%g A/px" % (boxes[0], apixes[0], cfg["box0"], cfg["apix0"]))
    from ..io.stacks import ImageStack
    ImageStack(table, check=True).close()
    if fit_iterations is None and population == "em":
        fit_iterations = EM_FIT_ITERATIONS_DEFAULT
    n_fit, no_fit = fit_plan(cfg, table, fit_iterations, run_dir, particles)
    if fit_bfactor is not None and not (0.0 <= float(fit_bfactor) < 1e4):
        raise NmaemError("--fit-bfactor must be 0 or more, below 10000 A^2 (got %g)"
                         % float(fit_bfactor))
    if fit_pose and not n_fit:
        fail(particles, "--fit-pose needs the per-particle fit, which does not run: %s"
             % no_fit)
    if fit_bfactor is not None and not n_fit:
        warning("--fit-bfactor %g does nothing: the per-particle fit does not run (%s)"
                % (float(fit_bfactor), no_fit))
    n, d = table.n, int(cfg["n_modes"])
    z = np.zeros((n, d), dtype=np.float32)
    shift = np.zeros((n, 2), dtype=np.float32)
    rotvec = np.zeros((n, 3), dtype=np.float32) if refine_pose else None
    rows_all = np.arange(n, dtype=np.int64)
    batches = [rows_all[i:i + int(batch)] for i in range(0, n, int(batch))]
    dataset = ParticleImages(table, cfg["box"])
    progress = Progress(n, "infer", unit="images")
    try:
        for rows, images in make_loader(dataset, batches, num_workers, dev.type == "cuda"):
            s, zz, v = encode_images(ae.encoder, images, dev)
            r = rows.numpy()
            shift[r], z[r] = s, zz
            if rotvec is not None:
                rotvec[r] = v
            progress.update(len(r))
    except RuntimeError as exc:
        if is_oom(exc):
            raise NmaemError("out of memory on %s with --batch %d; try --batch %d"
                             % (dev, batch, max(1, int(batch) // 2)))
        raise
    if not (np.all(np.isfinite(z)) and np.all(np.isfinite(shift))
            and (rotvec is None or np.all(np.isfinite(rotvec)))):
        fail(run_dir, "the model gives non-finite outputs")
    from ..base.choices import POPULATIONS
    if population not in POPULATIONS:
        raise NmaemError("--population must be one of %s (got %r)"
                         % (", ".join(POPULATIONS), population))
    if components is not None and int(components) < 1:
        raise NmaemError("--components must be at least 1 (got %d)" % int(components))
    extras = {}
    if n_fit:
        turn = _fit_particles(ae, cfg, run_dir, table, dataset, z, shift, rotvec, n_fit, dev,
                              num_workers, log, fit_pose=fit_pose, bfactor=fit_bfactor,
                              population=population, components=components, extras=extras)
        if turn is not None:        # the total correction: R(v) R(w), or R(w) alone
            from ..io.poses import matrix_to_rotvec, rotvec_to_matrix
            total = rotvec_to_matrix(turn.astype(np.float64))
            if rotvec is not None:
                total = rotvec_to_matrix(rotvec.astype(np.float64)) @ total
            rotvec = matrix_to_rotvec(total).astype(np.float32)
    elif fit_iterations is None and no_fit:
        log("infer: no per-particle fit (%s): the encoder's output" % no_fit)
    euler = None
    if rotvec is not None:
        from ..io.poses import correct_rotations, matrix_to_euler
        refined = correct_rotations(table.rotation_matrices(), rotvec.astype(np.float64))
        euler = np.stack(matrix_to_euler(refined), axis=1)
    from ..io.provenance import particle_fingerprint, run_model_fingerprint
    write_latent(out, z, shift, rows_all, pose_correction=rotvec, euler=euler,
                 particles=particle_fingerprint(table),
                 model=run_model_fingerprint(os.path.abspath(run_dir), cfg),
                 z_cov=extras.get("z_cov"), population=extras.get("population"),
                 shrinkage=extras.get("shrinkage"))
    log("infer: %d particles -> %s (z: %d modes, model of epoch %d, %s checkpoint)"
        % (n, out, d, cfg["epoch"], checkpoint if checkpoint in ("last", "best") else
           "the given"))
    if rotvec is not None:
        angle = np.degrees(np.linalg.norm(rotvec.astype(np.float64), axis=1))
        log("infer: pose corrections: median %.2f deg, 95th percentile %.2f, largest %.2f "
            "(%s)" % (np.median(angle), np.percentile(angle, 95), angle.max(),
                      "refined by the fit" if fit_pose else
                      "bound %g deg" % float(cfg.get("max_pose_correction") or 0)))
    if star:
        from dataclasses import replace
        refined = (table.origin_or_zero() - shift.astype(np.float64))
        extra = {name: z[:, l].astype(np.float64) for l, name in enumerate(z_column_names(d))}
        extra["nmaemShiftXAngst"] = shift[:, 0].astype(np.float64)
        extra["nmaemShiftYAngst"] = shift[:, 1].astype(np.float64)
        changes = dict(origin=refined)
        if euler is not None:
            changes["euler"] = euler
            for k, name in enumerate(POSE_COLUMNS):
                extra[name] = np.degrees(rotvec[:, k].astype(np.float64))
        write_star(star, replace(table, **changes), extra_columns=extra)
        log("infer: wrote %s (refined origins%s, columns %s...)" % (
            star, " and angles" if euler is not None else "", ", ".join(list(extra)[:3])))
    out_dict = dict(z=z, shift=shift, index=rows_all)
    if rotvec is not None:
        out_dict.update(pose_correction=rotvec, euler=euler)
    return out_dict
