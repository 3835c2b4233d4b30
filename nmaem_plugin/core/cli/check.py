"""``nmaem check``: does the reference explain the particles at their poses."""
import argparse
import sys
from typing import Any

from ..base.errors import NmaemError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "check", help="check that the reference explains the particles at their poses",
        description="Render the reference at the particles' poses and CTFs, score them with "
                    "the whitened correlation against shuffled poses, and name the likely "
                    "cause when it fails (docking offset, map origin, pixel size, hand, "
                    "contrast). See "
                    "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/likelihood.md.")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from ..base.atomic import atomic_open
    from ..physics.fitcheck import fit_check, format_report
    from ..io.outputs import command_outputs
    if args.n < 1:
        raise NmaemError("--n must be at least 1 particle (got %d)" % args.n)
    with command_outputs(args.json, "check", kind="file", inputs=[args.particles, args.ref],
                         force=args.force) as js:
        res = fit_check(args.particles, args.ref, n=args.n, seed=args.seed,
                        device=args.device, resolution_high=args.resolution_high,
                        log=lambda m: sys.stderr.write(m + "\n"))
        if args.json:
            with atomic_open(js.path(), "w") as fh:
                json.dump(res, fh, indent=1, default=float)
    print(format_report(res))
    if res["verdict"] != "pass" and not args.force:
        raise NmaemError(res["message"])
    return 0
