"""``nmaem simulate``: a synthetic dataset (the options become a ``SimulationSettings``)."""
import argparse
from typing import TYPE_CHECKING, Any

from ..base.choices import DISTRIBUTIONS
from ..base.errors import NmaemError

if TYPE_CHECKING:                     # the command imports its modules when it runs
    from ..sim.nuisances import Nuisances
    from ..sim.simulate import SimulationSettings

__all__ = ["add_parser", "run", "nuisances_from_args", "simulation_settings_from_args"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate", help="synthetic particles from a trajectory, a morph or a real dataset",
        description="Simulate particle images: a trajectory (--trajectory), a morph between "
                    "two models (--ref --target --frames), or a model rendered with the poses, "
                    "shifts and CTFs of a real particle file (--like P.star --ref A.pdb).")
    src = p.add_argument_group("frames")
    src.add_argument("--trajectory", metavar="MULTIMODEL.pdb",
                     help="frames are the models of this file (same atoms in each)")
    src.add_argument("--ref", metavar="A.pdb", help="reference model (frame 0)")
    src.add_argument("--target", metavar="B.pdb",
                     help="morph to this model (superposed on --ref, atoms matched)")
    src.add_argument("--frames", type=int, default=50, help="morph frames (default 50)")
    src.add_argument("--like", metavar="PARTICLES.star",
                     help="use the poses, origins, CTFs, box and pixel size of this RELION "
                          "STAR or cryoSPARC .cs file; the model is taken as docked in its map")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--n", type=int, default=None,
                   help="number of particles (default 50000; with --like, all of the file's)")
    p.add_argument("--distribution", default="uniform",
                   choices=DISTRIBUTIONS,
                   help="distribution of particles over frames (default uniform)")
    p.add_argument("--box", type=int, default=192, help="box size in pixels (default 192)")
    p.add_argument("--apix", type=float, default=0.8, help="pixel size in A (default 0.8)")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--snr-db", type=float, default=-20.0,
                       help="SNR in dB, 10 log10(var(clean CTF image)/var(noise)) (default -20)")
    noise.add_argument("--no-noise", action="store_true", help="noise-free images")
    p.add_argument("--defocus-mean", type=float, default=1.0,
                   help="log-normal defocus mean in um (default 1.0)")
    p.add_argument("--defocus-std", type=float, default=0.3,
                   help="log-normal defocus standard deviation in um (default 0.3)")
    p.add_argument("--shift-std", type=float, default=0.0,
                   help="standard deviation of the random 2D shifts in A (default 0)")
    p.add_argument("--unknown-shifts", action="store_true",
                   help="write zero origins in the STAR (the shifts are then only in "
                        "ground_truth.npz, for the encoder to find)")
    p.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm (default 2.7)")
    p.add_argument("--amp-contrast", type=float, default=0.1,
                   help="amplitude contrast (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--chunk", type=int, default=256,
                   help="images per MRC stack, the unit of memory use (default 256)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace a dataset already in the output folder (never an input)")
    real = p.add_argument_group(
        "nuisances of real data ("
        "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/simulation.md"
        "; all off by default, each switchable)")
    real.add_argument("--realistic", action="store_true",
                      help="switch every nuisance on at typical levels (noise falloff 10, "
                           "contrast sd 0.2, offset sd 1, RELION normalisation, angle error "
                           "2 deg, origin error 0.5 A, defocus error 300 A, B-factor 50 A^2, "
                           "atom jitter 0.5 A); the options below override single ones")
    real.add_argument("--noise-falloff", type=float, metavar="R",
                      help="coloured noise: power at zero frequency / power at Nyquist, "
                           "log-linear in frequency (1 = white)")
    real.add_argument("--contrast-sd", type=float, metavar="SD",
                      help="per-particle contrast, log-normal with mean 1 and this sd")
    real.add_argument("--offset-sd", type=float, metavar="SD",
                      help="per-particle grey offset, Gaussian, in units of the noise sd")
    norm = real.add_mutually_exclusive_group()
    norm.add_argument("--normalise", dest="normalise", action="store_true", default=None,
                      help="normalise each image as RELION does (background mean 0, sd 1)")
    norm.add_argument("--no-normalise", dest="normalise", action="store_false",
                      help="do not normalise (the default without --realistic)")
    real.add_argument("--bg-radius", type=float, metavar="F",
                      help="background radius for --normalise, fraction of the box half-width "
                           "(default 0.75, RELION's)")
    real.add_argument("--angle-error", dest="angle_error_sd", type=float, metavar="DEG",
                      help="rms angle of random errors of the poses written to the STAR")
    real.add_argument("--consensus-poses", dest="consensus_poses", action="store_true",
                      default=None,
                      help="write the poses and origins a consensus refinement would give: "
                           "the reference aligned on each frame's largest rigid part, so the "
                           "error depends on the conformation ("
                           "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/simulation.md)")
    real.add_argument("--origin-error", dest="origin_error_sd", type=float, metavar="A",
                      help="sd per axis of random errors of the origins written (Angstrom)")
    real.add_argument("--defocus-error", dest="defocus_error_sd", type=float, metavar="A",
                      help="sd of random errors of the defocus written (Angstrom)")
    real.add_argument("--bfactor", type=float, metavar="A2",
                      help="B-factor envelope on the images, not in the STAR (A^2)")
    real.add_argument("--atom-jitter", type=float, metavar="A",
                      help="fixed random displacement of each frame's atoms (sd, Angstrom): "
                           "no state of the data is exactly in the reference's mode space")
    real.add_argument("--reference-model", metavar="B.pdb",
                      help="write this model (superposed on frame 0) as reference.pdb: a "
                           "different structure of the molecule handed to the method")
    p.set_defaults(func=run)


def nuisances_from_args(args: argparse.Namespace) -> "Nuisances":
    """The :class:`nuisances.Nuisances` of ``nmaem simulate``'s options."""
    from ..sim.nuisances import REALISTIC, Nuisances
    base = REALISTIC if args.realistic else Nuisances()
    changes = {k: getattr(args, k) for k in (
        "noise_falloff", "contrast_sd", "offset_sd", "normalise", "bg_radius",
        "angle_error_sd", "consensus_poses", "origin_error_sd", "defocus_error_sd", "bfactor",
        "atom_jitter")
        if getattr(args, k) is not None}
    return base.with_(**changes)


def simulation_settings_from_args(args: argparse.Namespace) -> "SimulationSettings":
    """The :class:`simulate.SimulationSettings` of ``nmaem simulate``'s options, validated
    (``n`` None with ``--like``: all of the file's particles; else default 50,000)."""
    from ..sim.simulate import SimulationSettings
    n = args.n if (args.n is not None or args.like) else 50000
    return SimulationSettings(
        n=n, distribution=args.distribution, box=args.box, apix=args.apix,
        snr_db=None if args.no_noise else args.snr_db, defocus_mean=args.defocus_mean,
        defocus_std=args.defocus_std, shift_std=args.shift_std, voltage=args.voltage,
        cs=args.cs, amp_contrast=args.amp_contrast, seed=args.seed,
        unknown_shifts=args.unknown_shifts, nuisances=nuisances_from_args(args)).validate()


def run(args: argparse.Namespace) -> int:
    from ..io.particles import read_particles
    from ..sim.simulate import load_frames, simulate
    from ..physics.structure import read_model
    if args.like and not args.ref and not args.trajectory:
        raise NmaemError("--like needs a model to render: give --ref (or --trajectory)")
    if args.trajectory and (args.ref or args.target):
        raise NmaemError("give either --trajectory or --ref/--target, not both")
    if args.chunk < 1:
        raise NmaemError("--chunk must be at least 1 image per stack (got %d)" % args.chunk)
    from ..io.outputs import OVERWRITE_HINT, check_outputs
    from ..sim.simulate import DATASET_FILES
    from .options import warn_inert
    like = "with --like (the file's poses, CTFs, box and pixel size are used)"
    normalised = args.normalise if args.normalise is not None else args.realistic
    warn_inert(args, [("frames", args.target is not None, "without --target (a morph)")]
               + [(k, not args.like, like) for k in (
                   "box", "apix", "defocus_mean", "defocus_std", "voltage", "cs",
                   "amp_contrast", "shift_std")]
               + [("bg_radius", bool(normalised), "without --normalise"),
                  ("noise_falloff", not args.no_noise, "with --no-noise"),
                  ("snr_db", not args.no_noise, "with --no-noise")])
    settings = simulation_settings_from_args(args)
    inputs = [args.trajectory, args.ref, args.target, args.like, args.reference_model]
    check_outputs(args.output, "simulate", products=DATASET_FILES, inputs=inputs,
                  force=args.force, hint=OVERWRITE_HINT)     # before reading the inputs
    model, frames = load_frames(args.trajectory, args.ref, args.target, args.frames)
    like = read_particles(args.like) if args.like else None
    reference_model = read_model(args.reference_model) if args.reference_model else None
    simulate(args.output, model, frames, settings, like=like,
             reference_model=reference_model, chunk=args.chunk, device=args.device,
             overwrite=args.force, inputs=inputs)
    return 0
