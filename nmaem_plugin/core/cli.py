"""The ``nmaem`` command (also ``python -m nmaem_plugin``).

Each subcommand has ``--help``, prints progress for long work, and on bad input prints
``nmaem: error: <one line naming the file and the problem>`` and exits with status 2.
"""
import argparse
import sys

from .errors import NmaemError


def _add_simulate(sub):
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
                   choices=["uniform", "continuous", "discontinuous"],
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already in the output folder")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args):
    from .metadata import read_particles
    from .simulate import load_frames, simulate
    if args.like and not args.ref and not args.trajectory:
        raise NmaemError("--like needs a model to render: give --ref (or --trajectory)")
    if args.trajectory and (args.ref or args.target):
        raise NmaemError("give either --trajectory or --ref/--target, not both")
    model, frames = load_frames(args.trajectory, args.ref, args.target, args.frames)
    like = read_particles(args.like) if args.like else None
    n = args.n if (args.n is not None or like is not None) else 50000
    simulate(args.output, model, frames, n=n, distribution=args.distribution, box=args.box,
             apix=args.apix, snr_db=None if args.no_noise else args.snr_db,
             defocus_mean=args.defocus_mean, defocus_std=args.defocus_std,
             shift_std=args.shift_std, voltage=args.voltage, cs=args.cs,
             amp_contrast=args.amp_contrast, seed=args.seed, like=like,
             unknown_shifts=args.unknown_shifts, chunk=args.chunk, device=args.device,
             overwrite=args.overwrite)
    return 0


def _add_export(sub):
    p = sub.add_parser(
        "export", help="deformed all-atom models at chosen latent points",
        description="Write X0 + U z as PDB/mmCIF models at points of the latent space: along "
                    "principal components (--pcs, --steps), at k-means centres (--kmeans), at "
                    "density maxima of PC1 (--maxima) or at given amplitudes (--z); any "
                    "combination (default: --pcs 1). DIR/models.json and DIR/models.csv list "
                    "each file with its z, PC coordinates and particle count.")
    p.add_argument("--latent", metavar="latent.npz",
                   help="latent file of nmaem infer (needed except with --z alone)")
    p.add_argument("--model", required=True, metavar="RUN",
                   help="training run folder (config.json, reference model, modes.npz)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--pcs", default=None, metavar="K[,K...]",
                   help="principal components to traverse, e.g. 1 or 1,2")
    p.add_argument("--steps", type=int, default=10, help="models per PC (default 10)")
    p.add_argument("--low", type=float, default=5.0,
                   help="traversal start, percentile of the PC coordinates (default 5)")
    p.add_argument("--high", type=float, default=95.0,
                   help="traversal end, percentile of the PC coordinates (default 95)")
    p.add_argument("--kmeans", type=int, default=None, metavar="K",
                   help="models at the centres of K k-means clusters of z")
    p.add_argument("--maxima", action="store_true",
                   help="models at the density maxima along PC1 (Gaussian KDE)")
    p.add_argument("--z", action="append", default=[], metavar="Z1,Z2,...",
                   help="a model at these d amplitudes in Angstrom (repeat for more)")
    p.add_argument("--format", choices=("pdb", "cif"), default="pdb",
                   help="model file format (default pdb)")
    p.add_argument("--seed", type=int, default=0, help="k-means random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_run_export)


def _run_export(args):
    from .analysis import export
    export(args.latent, args.model, args.output, pcs=args.pcs, steps=args.steps,
           low=args.low, high=args.high, kmeans_k=args.kmeans, maxima=args.maxima,
           z_list=args.z, fmt=args.format, seed=args.seed, overwrite=args.overwrite)
    return 0


def _add_evaluate(sub):
    p = sub.add_parser(
        "evaluate", help="accuracy of a latent file on a simulated dataset (JSON on stdout)",
        description="Compare X0 + U z_i with each particle's true frame (RMSD, no "
                    "superposition), against the best the modes allow (floor RMSD); PC1 "
                    "explained variance, |corr(PC1, frame)|, density maxima along PC1 and "
                    "the RMSD of the model at each maximum. See docs/analysis.md.")
    p.add_argument("--latent", required=True, metavar="latent.npz", help="latent file")
    p.add_argument("--truth", required=True, metavar="SIMDIR",
                   help="folder written by nmaem simulate (ground_truth.npz, frames.pdb)")
    p.add_argument("--model", required=True, metavar="RUN", help="training run folder")
    p.add_argument("--per-particle", default=None, metavar="FILE.npz",
                   help="also save per-particle RMSD, floor, frame and PC1 arrays")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args):
    from .analysis import evaluate, format_json
    result = evaluate(args.latent, args.truth, args.model, per_particle=args.per_particle)
    sys.stdout.write(format_json(result) + "\n")
    return 0


def build_parser():
    from nmaem_plugin import __version__
    parser = argparse.ArgumentParser(
        prog="nmaem",
        description="Heterogeneous reconstruction of deformable atomic models in cryo-EM: "
                    "normal modes, simulation, training, inference, export.")
    parser.add_argument("--version", action="version", version="nmaem " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    try:
        from .modes import add_modes_parser
    except ImportError:
        add_modes_parser = None
    if add_modes_parser is not None:
        add_modes_parser(sub)
    _add_simulate(sub)
    _add_export(sub)
    _add_evaluate(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except NmaemError as exc:
        sys.stderr.write("nmaem: error: %s\n" % str(exc).replace("\n", " "))
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("nmaem: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
