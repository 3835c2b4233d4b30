"""The ``nmaem`` command (also ``python -m nmaem_plugin``).

Each subcommand has ``--help``, prints progress for long work, and on bad input prints
``nmaem: error: <one line naming the file and the problem>`` and exits with status 2.
"""
import argparse
import sys
from typing import TYPE_CHECKING, Optional, Sequence

from ..base.choices import (CG_CHOICES, DISTRIBUTIONS, ENCODERS, FIT_ITERATIONS_DEFAULT, LOSSES,
                            LR_SCHEDULES, MODEL_FORMATS, MODES_SOLVERS, POSE_INPUT_DEFAULT,
                            POSE_INPUTS, RENDER_ROUTES)
from ..base.errors import NmaemError

if TYPE_CHECKING:                     # the commands import their modules when they run
    from ..sim.nuisances import Nuisances
    from ..sim.simulate import SimulationSettings


def _add_modes(subparsers):
    """Define the ``nmaem modes`` subcommand on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "modes", help="normal modes of a reference atomic model (ANM, interpolated on all atoms)",
        description="Coarse-grain REF, build its ANM Hessian, take the lowest non-rigid "
                    "modes, interpolate them onto every atom (PyKeOps) and write an orthonormal "
                    "all-atom basis to a modes.npz file.")
    p.add_argument("ref", metavar="REF", help="reference atomic model (PDB or mmCIF)")
    p.add_argument("-o", "--output", required=True, metavar="MODES.npz", help="modes file to write")
    p.add_argument("--n-modes", type=int, default=16, help="number of non-rigid modes d (16)")
    p.add_argument("--cg", choices=CG_CHOICES, default="ca",
                   help="coarse graining: ca = CA of amino acids and C4' (or P) of nucleotides, "
                        "one node per residue (default); backbone; heavy = all heavy atoms")
    p.add_argument("--cutoff", type=float, default=15.0, help="ANM cutoff in Angstrom (15)")
    p.add_argument("--gamma", type=float, default=1.0, help="ANM spring constant (1)")
    p.add_argument("--sigma", type=float, default=None,
                   help="interpolation kernel width in Angstrom (default: half the median "
                        "distance of a CG node to its nearest node, 1.9 A for CA)")
    p.add_argument("--solver", choices=MODES_SOLVERS, default="auto",
                   help="eigensolver: dense torch eigh or sparse ARPACK shift-invert (auto: by "
                        "network size)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    p.add_argument("--target", metavar="B.pdb", default=None,
                   help="a second conformation: report per-mode overlaps with the displacement "
                        "to it and the floor RMSD the modes can reach")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="also write DIR/modes.nmd (VMD NMWiz) and DIR/mode_NN.pdb animations")
    p.add_argument("--amplitude", type=float, default=3.0,
                   help="largest atom displacement in the mode animations, Angstrom (3)")
    p.add_argument("--force", action="store_true",
                   help="replace existing output files (never an input)")
    p.set_defaults(func=_run_modes)
    return p


def _run_modes(args):
    """Run ``nmaem modes`` from parsed arguments; returns 0. Errors raise NmaemError."""
    from ..modes.compute import compute_modes
    from ..modes.modesfile import export_modes, save_modes
    from ..modes.diagnostics import target_diagnostics
    from ..physics.structure import read_model

    def say(msg):
        print(msg, flush=True)

    from ..io.outputs import check_output_dir, check_output_file
    out = str(args.output)
    inputs = [args.ref, args.target]
    check_output_file(out, inputs=inputs, force=args.force)
    if args.export:
        n_files = ["modes.nmd"] + ["mode_%02d.pdb" % (l + 1) for l in range(args.n_modes)]
        check_output_dir(args.export, n_files, inputs=inputs + [out], force=args.force)
    model = read_model(args.ref)
    say("reference: %s, %d atoms" % (args.ref, model.n_atoms))
    target = read_model(args.target) if args.target else None
    nm = compute_modes(model, n_modes=args.n_modes, cg=args.cg, cutoff=args.cutoff,
                       gamma=args.gamma, solver=args.solver, sigma=args.sigma,
                       device=args.device, log=say)
    diag = None
    if target is not None:
        diag = target_diagnostics(nm, model, target, args.target)
        for k in ("overlap", "cumulative_overlap", "rmsd", "floor_rmsd", "n_matched",
                  "target_path", "cg_cumulative_overlap", "cg_overlap"):
            if k in diag:
                nm.info["target_" + k if not k.startswith("target") else k] = diag[k]
    say("")
    head = "mode  eigenvalue  collectivity"
    if diag:
        head += "  overlap  cumulative"
    say(head)
    for l in range(nm.n_modes):
        row = "%4d  %10.4g  %12.3f" % (l + 1, nm.eigenvalues[l], nm.info["collectivity"][l])
        if diag:
            row += "  %7.3f  %10.3f" % (diag["overlap"][l], diag["cumulative_overlap"][l])
        say(row)
    if diag:
        say("")
        say("target %s: %d matched atoms, RMSD %.3f A after superposition" %
            (args.target, diag["n_matched"], diag["rmsd"]))
        say("cumulative overlap of %d modes: %.3f on all matched atoms%s" %
            (nm.n_modes, diag["cumulative_overlap"][-1],
             ", %.3f on the CG nodes" % diag["cg_cumulative_overlap"][-1]
             if "cg_cumulative_overlap" in diag else ""))
        say("floor RMSD (best reachable with these modes): %.3f A" % diag["floor_rmsd"])
    save_modes(out, nm)
    say("wrote %s (%d modes x %d atoms)" % (out, nm.n_modes, nm.n_atoms))
    if args.export:
        for p in export_modes(nm, model, args.export, amplitude=args.amplitude):
            say("wrote %s" % p)
    return 0


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
        "nuisances of real data (docs/simulation.md; all off by default, each switchable)")
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
                           "error depends on the conformation (docs/simulation.md)")
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
    p.set_defaults(func=_run_simulate)


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


def _run_simulate(args) -> int:
    from ..io.particles import read_particles
    from ..sim.simulate import load_frames, simulate
    from ..physics.structure import read_model
    if args.like and not args.ref and not args.trajectory:
        raise NmaemError("--like needs a model to render: give --ref (or --trajectory)")
    if args.trajectory and (args.ref or args.target):
        raise NmaemError("give either --trajectory or --ref/--target, not both")
    from ..io.outputs import OVERWRITE_HINT, check_output_dir
    settings = simulation_settings_from_args(args)
    check_output_dir(args.output, ["particles.star", "ground_truth.npz", "frames.pdb",
                                   "reference.pdb"],
                     inputs=[args.trajectory, args.ref, args.target, args.like,
                             args.reference_model], force=args.force, hint=OVERWRITE_HINT)
    model, frames = load_frames(args.trajectory, args.ref, args.target, args.frames)
    like = read_particles(args.like) if args.like else None
    reference_model = read_model(args.reference_model) if args.reference_model else None
    simulate(args.output, model, frames, settings, like=like,
             reference_model=reference_model, chunk=args.chunk, device=args.device,
             overwrite=args.force)
    return 0


def _add_maxima_options(p):
    p.add_argument("--bandwidth", default=None, metavar="H|RULE",
                   help="KDE bandwidth on PC1: a number, or isj (default, improved "
                        "Sheather-Jones), silverman or scott")
    p.add_argument("--min-height", type=float, default=0.1,
                   help="keep maxima at least this fraction of the highest (default 0.1)")
    p.add_argument("--min-prominence", type=float, default=0.1,
                   help="keep maxima rising at least this fraction of their height above "
                        "the dip to any higher maximum (default 0.1)")
    p.add_argument("--min-significance", type=float, default=3.0,
                   help="... and by at least this many standard errors of the density "
                        "estimate (default 3; 0 keeps noise bumps)")


def _bandwidth(text):
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


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
    p.add_argument("--format", choices=MODEL_FORMATS, default="pdb",
                   help="model file format (default pdb)")
    p.add_argument("--seed", type=int, default=0, help="k-means random seed (default 0)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace existing output files (never an input)")
    p.add_argument("--no-refine", action="store_true",
                   help="write the plain X0 + U z models; by default each model is refined "
                        "(restrained minimisation with OpenMM: amber99sb-ILDN, OBC2 implicit "
                        "solvent) and validated (models.json)")
    p.add_argument("--hydrogens", action="store_true",
                   help="write the hydrogens added for refinement (default heavy atoms only)")
    p.add_argument("--restraint", type=float, default=None, metavar="K",
                   help="refinement restraint to the normal-mode positions, kcal/mol/A^2 "
                        "(default 30)")
    p.add_argument("--platform", default=None, choices=("CPU", "CUDA", "OpenCL", "Reference"),
                   help="OpenMM platform for refinement (default CUDA, OpenCL, then CPU)")
    p.add_argument("--no-thumbnails", action="store_true",
                   help="write no PNG thumbnail (projections along z, y, x) beside each model")
    _add_maxima_options(p)
    p.set_defaults(func=_run_export)


def _run_export(args):
    from ..analysis.export import export
    export(args.latent, args.model, args.output, pcs=args.pcs, steps=args.steps,
           low=args.low, high=args.high, kmeans_k=args.kmeans, maxima=args.maxima,
           z_list=args.z, fmt=args.format, seed=args.seed, overwrite=args.force,
           bandwidth=_bandwidth(args.bandwidth), min_height=args.min_height,
           min_prominence=args.min_prominence, min_significance=args.min_significance,
           refine=not args.no_refine, hydrogens=args.hydrogens,
           thumbnails=not args.no_thumbnails,
           refine_options={k: v for k, v in (("restraint", args.restraint),
                                             ("platform", args.platform)) if v is not None})
    return 0


def _add_states(sub):
    p = sub.add_parser(
        "states", help="particles per state: maxima basins, k-means clusters or PC ranges",
        description="Cut the latent landscape into states, each a set of particles with a "
                    "representative z: the basins of the density maxima along PC1 "
                    "(--maxima), k-means clusters of z (--kmeans K) or boxes in PC "
                    "coordinates (--range, one per state). Writes DIR/states.npz (a label "
                    "per particle, -1 for none), DIR/states.json and, with --particles, "
                    "one STAR per state (state_01.star, ...).")
    p.add_argument("--latent", required=True, metavar="latent.npz",
                   help="latent file of nmaem infer")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--maxima", action="store_true",
                   help="one state per density maximum of PC1, its whole basin")
    p.add_argument("--kmeans", type=int, default=None, metavar="K",
                   help="one state per k-means cluster of z")
    p.add_argument("--range", dest="ranges", action="append", default=[],
                   metavar="PC:LOW:HIGH[,PC:LOW:HIGH...]",
                   help="one state: the particles whose PC coordinates (Angstrom, from z = 0) "
                        "lie in all these intervals, e.g. 1:-5:5 or 1:-5:5,2:0:3 (repeat for "
                        "more states; a particle goes to the first that holds it)")
    p.add_argument("--particles", default=None, metavar="FILE",
                   help="the particle file given to nmaem infer (STAR or .cs): write one "
                        "RELION STAR of each state's particles")
    p.add_argument("--model", default=None, metavar="RUN",
                   help="training run folder: adds each state's RMSD to the reference and "
                        "a PNG thumbnail of its model X0 + U z (state_01.png, ...)")
    p.add_argument("--no-thumbnails", action="store_true",
                   help="with --model, write no thumbnails")
    p.add_argument("--seed", type=int, default=0, help="k-means random seed (default 0)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace existing output files (never an input)")
    _add_maxima_options(p)
    p.set_defaults(func=_run_states)


def _run_states(args):
    from ..io.runfolder import read_config
    from ..analysis.states import states_command
    atoms = None
    if args.model:
        atoms = read_config(args.model).get("n_atoms")
    states_command(args.latent, args.output, maxima=args.maxima, kmeans_k=args.kmeans,
                   ranges=args.ranges, seed=args.seed, particles=args.particles,
                   force=args.force, bandwidth=_bandwidth(args.bandwidth),
                   min_height=args.min_height, min_prominence=args.min_prominence,
                   min_significance=args.min_significance, model_atoms=atoms,
                   thumbnails_run=None if args.no_thumbnails else args.model)
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
    p.add_argument("--particles", default=None, metavar="P.star",
                   help="the particle file whose rows the latent's index counts, when it is "
                        "not the simulation's particles.star (a subset, refined particles): "
                        "rows are matched to the simulation by rlnImageId and the shift is "
                        "the latent's plus the simulated origin minus this file's origin")
    p.add_argument("--per-particle", default=None, metavar="FILE.npz",
                   help="also save per-particle RMSD, floor, frame and PC1 arrays")
    p.add_argument("--force", action="store_true",
                   help="replace existing output files (never an input)")
    _add_maxima_options(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args):
    from ..analysis.landscape import format_json
    from ..analysis.evaluate import evaluate
    from ..io.outputs import check_output_file, run_files
    check_output_file(args.per_particle,
                      inputs=[args.latent, args.particles] + run_files(args.model),
                      force=args.force)
    result = evaluate(args.latent, args.truth, args.model, per_particle=args.per_particle,
                      bandwidth=_bandwidth(args.bandwidth), min_height=args.min_height,
                      min_prominence=args.min_prominence,
                      min_significance=args.min_significance, particles=args.particles)
    sys.stdout.write(format_json(result) + "\n")
    return 0


def _add_report(sub):
    p = sub.add_parser(
        "report", help="figures of a run (PNG) and an index.html",
        description="Training curves, normal-mode diagnostics and, with --latent, the latent "
                    "landscape (PCA, PC1 density maxima, PC1-PC2 hexbin, mode amplitudes; "
                    "split by ground-truth frame with --truth), as PNG files in DIR with an "
                    "index.html showing them.")
    p.add_argument("run", metavar="RUN", help="training run folder (log.csv, config.json)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--latent", default=None, metavar="latent.npz",
                   help="latent file of nmaem infer")
    p.add_argument("--modes", default=None, metavar="modes.npz",
                   help="modes file (default: the run's modes.npz)")
    p.add_argument("--truth", default=None, metavar="SIMDIR",
                   help="folder written by nmaem simulate: colour the latent by true frame")
    p.add_argument("--models", default=None, metavar="DIR",
                   help="folder written by nmaem export: a table of its models' geometry "
                        "(bond and angle deviations, contacts, Ramachandran outliers)")
    p.add_argument("--states", default=None, metavar="DIR",
                   help="folder written by nmaem states: a table of the states (particles, "
                        "model RMSD to the reference, files)")
    p.add_argument("--force", action="store_true",
                   help="replace existing output files (never an input)")
    p.set_defaults(func=_run_report)


def _run_report(args):
    import matplotlib
    matplotlib.use("Agg")
    from ..io.outputs import check_output_dir, run_files
    from ..report.report import write_report
    check_output_dir(args.output, ["index.html"],
                     inputs=[args.run, args.latent, args.modes] + run_files(args.run),
                     force=args.force)
    write_report(args.run, args.output, latent=args.latent, modes=args.modes,
                 truth=args.truth, models=args.models, states=args.states)
    return 0


def _int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, got %r" % text)


def _batch_arg(text):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected an integer or auto, got %r" % text)


def _add_train(sub):
    p = sub.add_parser(
        "train", help="train the autoencoder (encoder + physics decoder)",
        description="Train the encoder that maps each particle image to a 2D shift and "
                    "normal-mode amplitudes, through the physics decoder (X0 + U z rendered "
                    "with the particle's pose and CTF). Writes the run folder -o "
                    "(config.json, checkpoints/, log.csv; see docs/training.md).")
    p.add_argument("--particles", metavar="P.star",
                   help="RELION STAR or cryoSPARC .cs with poses, CTF and images")
    p.add_argument("--ref", metavar="A.pdb", help="reference model X0, docked in the map")
    p.add_argument("--modes", metavar="modes.npz", help="normal modes of --ref (nmaem modes)")
    p.add_argument("-o", "--output", required=True, metavar="RUN", help="run folder")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 200)")
    p.add_argument("--batch", type=_batch_arg, default=None, metavar="B|auto",
                   help="images per optimisation step, over all processes (default auto: "
                        "min(256, max(16, training images // 64)), at least 64 steps per "
                        "epoch on small datasets; the paper's is 256)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    p.add_argument("--box", type=int, default=None,
                   help="train on images Fourier-cropped to this box (default: no cropping)")
    p.add_argument("--n-modes", type=int, default=None,
                   help="use the first N modes of --modes (default all; 0: shift only)")
    p.add_argument("--loss", choices=LOSSES, default=None,
                   help="whitened (default: Gaussian likelihood with the particles' own noise "
                        "spectrum, per-particle scale and offset solved; real data), l2 (the "
                        "paper's; images in the renderer's units) or corr (1 - correlation); "
                        "see docs/likelihood.md")
    p.add_argument("--resolution-low", type=float, default=None, metavar="A",
                   help="whitened loss: ignore frequencies coarser than this (default: all "
                        "but zero)")
    p.add_argument("--resolution-high", type=float, default=None, metavar="A",
                   help="whitened loss: ignore frequencies finer than this (default: Nyquist "
                        "of the training box)")
    p.add_argument("--mask-radius", type=float, default=None, metavar="A",
                   help="whitened loss: soft circular mask on images and renderings against "
                        "neighbouring particles (default none)")
    p.add_argument("--no-check", dest="check", action="store_false", default=None,
                   help="skip the fit check of the reference against the particles")
    p.add_argument("--force", action="store_true", default=None,
                   help="train even when the fit check says the reference does not explain "
                        "the particles")
    p.add_argument("--encoder", choices=ENCODERS, default=None,
                   help="encoder size: paper (filters 32..512, MLP 512, 256) or small "
                        "(default paper)")
    p.add_argument("--encoder-box", type=int, default=None, metavar="PX",
                   help="the box (even, px) the encoder sees, the images Fourier-cropped to it "
                        "(default: the training box up to 128 px, 128 px above; the decoder "
                        "and the loss use the whole training box)")
    p.add_argument("--filters", type=_int_list, default=None, metavar="F1,F2,...",
                   help="override the encoder's convolution filters (one block each)")
    p.add_argument("--hidden", type=_int_list, default=None, metavar="H1,H2",
                   help="override the MLP hidden sizes")
    p.add_argument("--rmsd-unit", type=float, default=None,
                   help="RMSD (A) of one unit of network output along a mode (default 1)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="constant learning rate (default, as in the paper) or cosine decay "
                        "from --lr to 0 over --epochs")
    p.add_argument("--no-whiten-input", dest="whiten_input", action="store_false",
                   default=None,
                   help="with the whitened loss, give the encoder the images as they are "
                        "instead of whitened by the estimated noise spectrum")
    p.add_argument("--refine-pose", action="store_true", default=None,
                   help="also learn a small rotation per particle that corrects the file's "
                        "pose (written by nmaem infer; see docs/training.md)")
    p.add_argument("--max-pose-correction", type=float, default=None, metavar="DEG",
                   help="--refine-pose: the largest correction angle (default 5 degrees)")
    p.add_argument("--pose-prior-sd", type=float, default=None, metavar="DEG",
                   help="--refine-pose: sd of the Gaussian prior on the correction angle "
                        "(default 3 degrees)")
    p.add_argument("--pose-input", choices=POSE_INPUTS, default=None,
                   help="--refine-pose: the correction is computed from the image or from "
                        "the conformation z (a consensus refinement's misalignment depends "
                        "on the conformation; default %s; see docs/training.md)"
                        % POSE_INPUT_DEFAULT)
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when "
                                                  "present)")
    p.add_argument("--gpus", type=_int_list, default=None, metavar="0,1,...",
                   help="train on these GPUs with DistributedDataParallel (torchrun)")
    p.add_argument("--nproc", type=int, default=None,
                   help="number of DDP processes (default: one per --gpus entry; with "
                        "--device cpu, gloo processes)")
    p.add_argument("--bf16", action="store_true", default=None,
                   help="bfloat16 autocast for the encoder (GPU)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader worker processes that read images (default 0)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="working memory of the renderer in GiB: atoms and images are "
                        "rendered in chunks that fit (default: a quarter of the free RAM, "
                        "half of the free GPU memory)")
    p.add_argument("--renderer", choices=RENDER_ROUTES, default=None,
                   help="structure factor: auto (default: the faster for the model, box and "
                        "device), gemm (cos/sin matrix products, exact) or nufft (FINUFFT, "
                        "CPU, optional: pip install finufft); see docs/imaging.md")
    p.add_argument("--checkpoint-minutes", type=float, default=None, metavar="MIN",
                   help="also write RUN/checkpoints/last.pt every MIN minutes within an epoch "
                        "(long epochs; --resume continues from that batch; one process)")
    p.add_argument("--keep", type=int, default=None,
                   help="per-epoch checkpoints kept besides last.pt (default 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in -o from its last checkpoint")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_run_train)


def _run_train(args):
    import os
    from ..learn.distributed import launch_distributed
    from ..io.runfolder import run_lock
    from ..learn.train import prepare_run, train_run
    if args.worker:                       # one torchrun process: the run is prepared
        rank = int(os.environ.get("RANK", "0"))
        try:
            train_run(args.output)
        except NmaemError:
            if rank != 0:
                return 2
            raise
        return 0
    nproc = args.nproc or (len(args.gpus) if args.gpus else 1)
    if args.gpus and args.device is None:
        # one process: that GPU; several: CUDA_VISIBLE_DEVICES + one process per GPU
        args.device = "cuda:%d" % args.gpus[0] if nproc == 1 else "cuda"
    with run_lock(args.output):           # one run, one writer (torchrun workers: no lock)
        _prepare_and_train(args, nproc, prepare_run, train_run, launch_distributed)
    return 0


def _prepare_and_train(args, nproc, prepare_run, train_run, launch_distributed):
    prepare_run(args.output, args.particles, args.ref, args.modes, resume=args.resume,
                epochs=args.epochs, batch=args.batch, lr=args.lr, box=args.box,
                n_modes=args.n_modes, loss=args.loss, encoder=args.encoder,
                encoder_box=args.encoder_box, filters=args.filters,
                hidden=args.hidden, rmsd_unit=args.rmsd_unit, seed=args.seed,
                device=args.device, bf16=args.bf16, num_workers=args.num_workers,
                keep=args.keep, lr_schedule=args.lr_schedule,
                memory_budget=args.memory_budget, renderer=args.renderer,
                checkpoint_minutes=args.checkpoint_minutes,
                resolution_low=args.resolution_low, resolution_high=args.resolution_high,
                mask_radius=args.mask_radius, check=args.check, force=args.force,
                whiten_input=args.whiten_input, refine_pose=args.refine_pose,
                max_pose_correction=args.max_pose_correction, pose_prior_sd=args.pose_prior_sd,
                pose_input=args.pose_input)
    if nproc > 1:
        launch_distributed(args.output, nproc, gpus=args.gpus)
    else:
        train_run(args.output)


def _add_infer(sub):
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
                   help="Gauss-Newton iterations of each particle's z and shift, fitted to "
                        "its image after the encoder (default %d for runs with the whitened "
                        "loss and particles with poses and CTF; 0: the encoder's output; "
                        "docs/training.md)" % FIT_ITERATIONS_DEFAULT)
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
    p.set_defaults(func=_run_infer)


def _bfactor_arg(text):
    """--fit-bfactor: None for auto, else the number."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise NmaemError("--fit-bfactor must be auto or a number of A^2 (got %r)" % text)


def _run_infer(args):
    from ..base.errors import fail
    from ..inference.infer import infer
    from ..io.outputs import check_output_file, run_files, same_path
    inputs = [args.particles] + run_files(args.model)
    if args.num_workers < 0:
        raise NmaemError("--num-workers must be 0 or more (got %d)" % args.num_workers)
    check_output_file(args.output, inputs=inputs, force=args.force)
    if args.star is not None:
        if same_path(args.star, args.output):
            fail(args.star, "--star and -o name the same file")
        check_output_file(args.star, inputs=inputs, force=args.force)
    infer(args.particles, args.model, args.output, batch=args.batch, device=args.device,
          star=args.star, num_workers=args.num_workers, checkpoint=args.checkpoint,
          fit_iterations=args.fit_iterations, fit_pose=args.fit_pose,
          fit_bfactor=_bfactor_arg(args.fit_bfactor))
    return 0


def _add_check(sub):
    p = sub.add_parser(
        "check", help="check that the reference explains the particles at their poses",
        description="Render the reference at the particles' poses and CTFs, score them with "
                    "the whitened correlation against shuffled poses, and name the likely "
                    "cause when it fails (docking offset, map origin, pixel size, hand, "
                    "contrast). See docs/likelihood.md.")
    p.add_argument("--particles", required=True, metavar="P.star",
                   help="particles with poses, CTF and images (RELION STAR or cryoSPARC .cs)")
    p.add_argument("--ref", required=True, metavar="A.pdb", help="reference atomic model")
    p.add_argument("--n", type=int, default=300, help="particles checked (300)")
    p.add_argument("--seed", type=int, default=0, help="random subset and shuffles (0)")
    p.add_argument("--resolution-high", type=float, default=None, metavar="A",
                   help="high-resolution limit of the score (default max(Nyquist, 6 A))")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--json", default=None, metavar="OUT.json",
                   help="also write the result (an existing file only with --force)")
    p.add_argument("--force", action="store_true",
                   help="report a failed check but exit 0; replace an existing --json file")
    p.set_defaults(func=_run_check)


def _run_check(args):
    import json
    from ..base.atomic import atomic_open
    from ..physics.fitcheck import fit_check, format_report
    from ..io.outputs import check_output_file
    check_output_file(args.json, inputs=[args.particles, args.ref], force=args.force)
    res = fit_check(args.particles, args.ref, n=args.n, seed=args.seed, device=args.device,
                    resolution_high=args.resolution_high,
                    log=lambda m: sys.stderr.write(m + "\n"))
    if args.json:
        with atomic_open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=float)
    print(format_report(res))
    if res["verdict"] != "pass" and not args.force:
        raise NmaemError(res["message"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nmaem_plugin import __version__
    parser = argparse.ArgumentParser(
        prog="nmaem",
        description="Heterogeneous reconstruction of deformable atomic models in cryo-EM: "
                    "normal modes, simulation, training, inference, export.")
    parser.add_argument("--version", action="version", version="nmaem " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_modes(sub)
    _add_simulate(sub)
    _add_train(sub)
    _add_infer(sub)
    _add_export(sub)
    _add_states(sub)
    _add_evaluate(sub)
    _add_report(sub)
    _add_check(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt: every ``with`` block
    unwinds (atomic writes remove their temporary file, the run lock is released)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _checkpoint_epoch(run_dir):
    """The epochs done in the last checkpoint of ``run_dir`` (0 when there is none)."""
    from ..io.runfolder import checkpoint_file, read_log_rows
    try:
        import torch
        ck = torch.load(checkpoint_file(run_dir, "last"), map_location="cpu",
                        weights_only=True)
        return int(ck["epoch"])
    except Exception:
        rows = read_log_rows(run_dir)
        return int(rows[-1]["epoch"]) if rows else 0


def _interrupted_line(args, how):
    """The one line printed when a command is stopped by a signal."""
    if getattr(args, "command", None) == "train":
        done = _checkpoint_epoch(args.output)
        kept = ("keeps its last checkpoint (epoch %d)" % done if done
                else "has no finished epoch yet")
        return ("nmaem: interrupted by %s; the run %s %s: continue it with nmaem train -o "
                "%s --resume" % (how, args.output, kept, args.output))
    return ("nmaem: interrupted by %s; outputs are written whole or not at all (no "
            "partial file was left); run the command again" % how)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import signal
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if not getattr(args, "worker", False):       # torchrun workers: their launcher's
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:                       # not the main thread
            previous = None
    try:
        return args.func(args) or 0
    except NmaemError as exc:
        sys.stderr.write("nmaem: error: %s\n" % str(exc).replace("\n", " "))
        return 2
    except OSError as exc:
        from ..base.atomic import is_no_space
        if not is_no_space(exc):
            raise
        sys.stderr.write("nmaem: error: no space left on device%s\n"
                         % (" writing %s" % exc.filename if exc.filename else ""))
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(_interrupted_line(args, "Ctrl-C") + "\n")
        return 130
    except Terminated:
        sys.stderr.write(_interrupted_line(args, "SIGTERM") + "\n")
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
