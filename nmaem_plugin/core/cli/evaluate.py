"""``nmaem evaluate``: accuracy against a simulation's ground truth."""
import argparse
import sys
from typing import Any

from .options import add_maxima_options, bandwidth_value

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate", help="accuracy of a latent file on a simulated dataset (JSON on stdout)",
        description="Compare X0 + U z_i with each particle's true frame (RMSD, no "
                    "superposition), against the best the modes allow (floor RMSD); PC1 "
                    "explained variance, |corr(PC1, frame)|, density maxima along PC1 and "
                    "the RMSD of the model at each maximum. See "
                    "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/analysis.md.")
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
    add_maxima_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.landscape import format_json
    from ..analysis.evaluate import evaluate
    from ..io.outputs import command_outputs, run_files
    with command_outputs(args.per_particle, "evaluate", kind="file",
                         inputs=[args.latent, args.particles] + run_files(args.model),
                         force=args.force) as pp:
        result = evaluate(args.latent, args.truth, args.model, per_particle=pp.path(),
                          bandwidth=bandwidth_value(args.bandwidth),
                          min_height=args.min_height, min_prominence=args.min_prominence,
                          min_significance=args.min_significance, particles=args.particles)
    sys.stdout.write(format_json(result) + "\n")
    return 0
