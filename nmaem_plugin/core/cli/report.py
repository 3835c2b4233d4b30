"""``nmaem report``: the figures of a run and an index.html."""
import argparse
from typing import Any


__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")
    from ..io.outputs import check_outputs, run_files
    from ..report.report import write_report
    inputs = [args.run, args.latent, args.modes] + run_files(args.run)
    check_outputs(args.output, "report", products=["index.html"], inputs=inputs,
                  force=args.force)
    write_report(args.run, args.output, latent=args.latent, modes=args.modes,
                 truth=args.truth, models=args.models, states=args.states, force=args.force,
                 inputs=inputs)
    return 0
