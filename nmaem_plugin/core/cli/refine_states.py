"""``nmaem refine-states``: each state's all-atom model refined against its own particles."""
import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    from ..analysis.refine_states import DEFAULTS
    p = sub.add_parser(
        "refine-states", help="refine each state's all-atom model against its particles",
        description="For each state of nmaem states, start from its exported model (X0 + U z "
                    "refined by OpenMM) and refine every heavy atom against the state's "
                    "particles in the training likelihood (poses, origins, shifts, CTF, the "
                    "run's noise model and band, grey scales, the envelope), with geometry "
                    "restraints and OpenMM after each round. The particles are split in two "
                    "halves: one refines, the other scores; the refinement stops when the "
                    "held-out half stops improving, and a model the held-out half does not "
                    "prefer significantly is never returned (the start is kept). Writes "
                    "OUT/state_NN/refined.pdb, OUT/state_NN/start.pdb and OUT/refine.json.")
    p.add_argument("--states", required=True, metavar="ST",
                   help="states folder of nmaem states (states.npz, states.json)")
    p.add_argument("--model", required=True, metavar="RUN", help="training run folder")
    p.add_argument("--particles", required=True, metavar="FILE",
                   help="the particle file given to nmaem infer (STAR or .cs)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--latent", default=None, metavar="latent.npz",
                   help="the latent file the states were cut from (default: the one "
                        "states.json names)")
    p.add_argument("--box", type=int, default=None, metavar="PX",
                   help="refinement box: the images Fourier-cropped from their original "
                        "size to PX pixels (even; default the run's training box; the "
                        "particles' own box for full resolution)")
    p.add_argument("--particle-z", action="store_true",
                   help="render each particle at its own z about the state's representative "
                        "(X + U (z_i - z_state)); default: one model for all")
    p.add_argument("--iterations", type=int, default=DEFAULTS["iterations"],
                   help="L-BFGS iterations per round at most (default %d)"
                        % DEFAULTS["iterations"])
    p.add_argument("--check-every", type=int, default=DEFAULTS["check_every"],
                   help="L-BFGS iterations between held-out checks (default %d)"
                        % DEFAULTS["check_every"])
    p.add_argument("--patience", type=int, default=DEFAULTS["patience"],
                   help="held-out checks without improvement before a round stops "
                        "(default %d)" % DEFAULTS["patience"])
    p.add_argument("--rounds", type=int, default=DEFAULTS["rounds"],
                   help="rounds at most, each ending with OpenMM and the held-out gate "
                        "(default %d)" % DEFAULTS["rounds"])
    p.add_argument("--min-significance", type=float, default=DEFAULTS["min_significance"],
                   help="standard errors of the held-out gain a refined model needs "
                        "(paired over particles; default %g)" % DEFAULTS["min_significance"])
    p.add_argument("--max-particles", type=int, default=DEFAULTS["max_particles"],
                   help="particles per state at most, drawn at random (default %d)"
                        % DEFAULTS["max_particles"])
    p.add_argument("--states-only", default=None, metavar="K[,K...]",
                   help="refine only these states (numbers as nmaem states gives them)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                   help="seed of the halves and of the particle draw (default 0)")
    p.add_argument("--restraint", type=float, default=DEFAULTS["restraint"], metavar="K",
                   help="OpenMM restraint to the refined positions, kcal/mol/A^2 (default %g)"
                        % DEFAULTS["restraint"])
    p.add_argument("--platform", default=None, choices=("CPU", "CUDA", "OpenCL", "Reference"),
                   help="OpenMM platform (default CUDA, OpenCL, then CPU)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace existing output files (never an input)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.refine_states import refine_states_command
    refine_states_command(args.states, args.model, args.particles, args.output,
                          latent=args.latent, box=args.box, particle_z=args.particle_z,
                          iterations=args.iterations, check_every=args.check_every,
                          patience=args.patience, rounds=args.rounds,
                          min_significance=args.min_significance,
                          max_particles=args.max_particles, seed=args.seed,
                          states=args.states_only, restraint=args.restraint,
                          platform=args.platform, force=args.force)
    return 0
