"""``nmaem states``: particles per state."""
import argparse
from typing import Any

from .options import add_maxima_options, bandwidth_value

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "states", help="particles per state: maxima basins, k-means clusters or PC ranges",
        description="Cut the latent landscape into states, each a set of particles with a "
                    "representative z: the basins of the density maxima along PC1 "
                    "(--maxima), k-means clusters of z (--kmeans K) or boxes in PC "
                    "coordinates (--range, one per state). Writes DIR/states.npz (a label "
                    "per particle, -1 for none), DIR/states.json and, with --particles, "
                    "one STAR per state (state_01.star, ...); with --reconstruct, each "
                    "state's RELION maps and their validation against its model "
                    "(DIR/state_01/...).")
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
    p.add_argument("--format", dest="formats", choices=("star", "cs", "both"), default="star",
                   help="the particles of each state: a STAR keeping every column and data "
                        "block of --particles (star, the default), a cryoSPARC .cs keeping "
                        "its fields (cs, for a .cs --particles; written with cryosparc-tools) "
                        "or both")
    p.add_argument("--reconstruct", action="store_true",
                   help="each state's map from its own particles with RELION "
                        "(relion_reconstruct, CTF-corrected, the particles' refined poses and "
                        "origins): DIR/state_01/map.mrc, half1.mrc, half2.mrc, the state's "
                        "model (model.pdb) and its map, fsc.json (half-map FSC and its 0.143 "
                        "resolution, map-model FSC and its 0.5 resolution), map.png; needs "
                        "--particles, --model and RELION (RELION_HOME or PATH)")
    p.add_argument("--no-refine", action="store_true",
                   help="with --reconstruct, validate the plain models X0 + U z (no OpenMM "
                        "geometry refinement)")
    p.add_argument("--half-seed", type=int, default=0,
                   help="seed of the random half sets when the particle file has no "
                        "rlnRandomSubset (default 0)")
    p.add_argument("--seed", type=int, default=0, help="k-means random seed (default 0)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace existing output files (never an input)")
    add_maxima_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.runfolder import read_config
    from ..analysis.states import states_command
    atoms = None
    if args.model:
        atoms = read_config(args.model).get("n_atoms")
    states_command(args.latent, args.output, maxima=args.maxima, kmeans_k=args.kmeans,
                   ranges=args.ranges, seed=args.seed, particles=args.particles,
                   force=args.force, bandwidth=bandwidth_value(args.bandwidth),
                   min_height=args.min_height, min_prominence=args.min_prominence,
                   min_significance=args.min_significance, model_atoms=atoms,
                   thumbnails_run=None if args.no_thumbnails else args.model,
                   formats=("star", "cs") if args.formats == "both" else (args.formats,),
                   reconstruct=args.reconstruct, model_run=args.model,
                   refine=not args.no_refine, half_seed=args.half_seed)
    return 0
