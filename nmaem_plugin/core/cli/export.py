"""``nmaem export``: deformed all-atom models at chosen latent points."""
import argparse
from typing import Any

from ..base.choices import MODEL_FORMATS
from .options import MAXIMA_OPTIONS, add_maxima_options, bandwidth_value, warn_inert

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
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
    add_maxima_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.export import export
    refine = not args.no_refine
    traversal = args.pcs is not None or not (args.kmeans is not None or args.maxima or args.z)
    warn_inert(args, [("restraint", refine, "with --no-refine"),
                      ("platform", refine, "with --no-refine"),
                      ("seed", args.kmeans is not None, "without --kmeans"),
                      ("steps", traversal, "without a PC traversal (--pcs)"),
                      ("low", traversal, "without a PC traversal (--pcs)"),
                      ("high", traversal, "without a PC traversal (--pcs)")]
               + [(m, args.maxima, "without --maxima") for m in MAXIMA_OPTIONS])
    export(args.latent, args.model, args.output, pcs=args.pcs, steps=args.steps,
           low=args.low, high=args.high, kmeans_k=args.kmeans, maxima=args.maxima,
           z_list=args.z, fmt=args.format, seed=args.seed, overwrite=args.force,
           bandwidth=bandwidth_value(args.bandwidth), min_height=args.min_height,
           min_prominence=args.min_prominence, min_significance=args.min_significance,
           refine=not args.no_refine, hydrogens=args.hydrogens,
           thumbnails=not args.no_thumbnails,
           refine_options={k: v for k, v in (("restraint", args.restraint),
                                             ("platform", args.platform)) if v is not None})
    return 0
