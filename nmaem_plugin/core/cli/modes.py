"""``nmaem modes``: normal modes of a reference atomic model."""
import argparse
from typing import Any

from ..base.choices import CG_CHOICES, MODES_SOLVERS

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
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
                   help="eigensolver: dense torch eigh, or shift and invert on the sparse "
                        "Hessian (MUMPS + block Lanczos; SuperLU + ARPACK without python-mumps); "
                        "auto: dense up to 300 nodes on a CPU, 4000 on a GPU")
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
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
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
