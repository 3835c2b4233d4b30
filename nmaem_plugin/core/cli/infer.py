"""``nmaem infer``: z and shift of every particle from a trained run."""
import argparse
import os
from typing import Any

from ..base.choices import (EM_FIT_ITERATIONS_DEFAULT, FIT_ITERATIONS_DEFAULT,
                            POPULATION_DEFAULT,
                            POPULATION_MAX_COMPONENTS, POPULATIONS, workers_problem)
from ..base.errors import NmaemError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "infer", help="z and shift of every particle from a trained run",
        description="Run the trained encoder on every particle: writes latent.npz (z (N,d) "
                    "Angstrom, shift (N,2) Angstrom, index (N,)) and optionally a STAR copy "
                    "with nmaemZ01... columns and refined origins (origin - shift).")
    p.add_argument("--particles", required=True, metavar="P.star",
                   help="particle file (same box and pixel size as in training)")
    p.add_argument("--model", required=True, metavar="RUN", help="training run folder")
    p.add_argument("-o", "--output", required=True, metavar="latent.npz")
    p.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--star", metavar="OUT.star", default=None,
                   help="also write the particles with amplitudes and refined origins")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes that read images (default 0)")
    p.add_argument("--checkpoint", default="last", metavar="last|best|FILE",
                   help="which weights: last (the last epoch, default), best (the epoch of "
                        "lowest validation loss, RUN/checkpoints/best.pt) or a checkpoint file")
    p.add_argument("--fit-iterations", type=int, default=None, metavar="N",
                   help="iterations of the per-particle fit after the encoder, each a "
                        "Gauss-Newton step of every particle's z and shift under the "
                        "population (default %d, %d with --population em, for runs with "
                        "the whitened loss and particles with poses and CTF; 0: the "
                        "encoder's output; "
                        "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/"
                        "training.md)" % (FIT_ITERATIONS_DEFAULT, EM_FIT_ITERATIONS_DEFAULT))
    p.add_argument("--population", choices=POPULATIONS, default=POPULATION_DEFAULT,
                   help="the population the fit works under: encoder (the default), a "
                        "Gaussian with the encoder's mean and covariance (shrunk where the "
                        "encoder is); em, a mixture estimated from the particles by "
                        "deconvolution, with each particle's posterior covariance (z_cov) "
                        "and the shrinkage check in the latent (about 8x slower on a CPU; "
                        "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/"
                        "training.md, 'The population')")
    p.add_argument("--components", default="auto", metavar="auto|K",
                   help="with --population em: the most Gaussian components of the "
                        "population, chosen by BIC (auto: up to %d; 1: one Gaussian)"
                        % POPULATION_MAX_COMPONENTS)
    p.add_argument("--fit-bfactor", default="auto", metavar="auto|B",
                   help="B-factor (A^2) of the envelope exp(-B s^2/4) that the fit's "
                        "renderings get, for the fall-off of the images' signal with "
                        "resolution: auto (the default: estimated by maximum likelihood on "
                        "512 particles) or a number (0: none)")
    p.add_argument("--fit-pose", action="store_true",
                   help="the fit also refines each particle's rotation (a local refinement "
                        "with a prior whose spread is measured on the particles); the latent "
                        "and --star then hold the refined angles")
    p.add_argument("--force", action="store_true",
                   help="replace existing output files (never an input)")
    p.set_defaults(func=run)


def _bfactor_arg(text):
    """--fit-bfactor: None for auto, else the number."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise NmaemError("--fit-bfactor must be auto or a number of A^2 (got %r)" % text)


def run(args: argparse.Namespace) -> int:
    from ..base.errors import fail
    from ..inference.infer import infer
    from ..io.outputs import command_outputs, run_files, same_path
    inputs = [args.particles] + run_files(args.model)
    if workers_problem(args.num_workers):
        raise NmaemError(workers_problem(args.num_workers))
    if args.star is not None and same_path(args.star, args.output):
        fail(args.star, "--star and -o name the same file")
    bfactor = _bfactor_arg(args.fit_bfactor)
    components = _components_arg(args.components, args.population)
    figure = os.path.basename(shrinkage_figure_path(args.output))
    # the latent (with its figure beside it) and the STAR: both written or neither;
    # locked from the start
    with command_outputs(args.output, "infer", kind="file", products=[figure],
                         inputs=inputs, force=args.force) as lat, \
            command_outputs(args.star, "infer", kind="file", inputs=inputs + [args.output],
                            force=args.force) as star:
        infer(args.particles, args.model, lat.path(), batch=args.batch, device=args.device,
              star=star.path(), num_workers=args.num_workers, checkpoint=args.checkpoint,
              fit_iterations=args.fit_iterations, fit_pose=args.fit_pose,
              fit_bfactor=bfactor, population=args.population, components=components)
        _draw_shrinkage(lat.path(), lat.path(figure))
    return 0


def shrinkage_figure_path(latent: str) -> str:
    """``<latent>_shrinkage.png``: the shrinkage check's figure beside the latent."""
    return os.path.splitext(latent)[0] + "_shrinkage.png"


def _draw_shrinkage(latent: str, path: str) -> None:
    """The figure of the latent's shrinkage check (``report.uncertainty``), when it has one."""
    from ..io.latent import read_latent
    check = read_latent(latent).shrinkage
    if check is None:
        return
    from ..base.figures import save
    from ..report.uncertainty import shrinkage_figure
    save(shrinkage_figure(check), path)
    print("infer: the shrinkage check's figure -> %s" % path, flush=True)


def _components_arg(text, population):
    """--components: None for auto, else a whole number >= 1 (with --population em)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        k = int(text)
    except ValueError:
        raise NmaemError("--components must be auto or a whole number (got %r)" % text)
    if k < 1:
        raise NmaemError("--components must be at least 1 (got %d)" % k)
    if population != "em":
        raise NmaemError("--components applies to --population em only")
    return k
