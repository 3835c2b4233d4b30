"""The option lists of the project, written once: read by the ``nmaem`` command line, the
Scipion protocols (EnumParam choices, in this order) and the core modules that act on them.

Pure Python (no numpy, no torch): protocols import it at start-up.
"""
import os
from typing import Dict, Optional, Tuple

__all__ = ["CG_CHOICES", "DISTRIBUTIONS", "ENCODER_PRESETS", "ENCODERS", "LOSSES",
           "LR_SCHEDULES", "CHECKPOINTS", "MODEL_FORMATS", "MODES_SOLVERS",
           "RENDER_ROUTES", "POSE_INPUTS", "POSE_INPUT_DEFAULT", "FIT_ITERATIONS_DEFAULT",
           "POSE_FIT_CALIBRATION", "EM_FIT_ITERATIONS_DEFAULT", "POPULATIONS", "POPULATION_DEFAULT",
           "POPULATION_MAX_COMPONENTS", "POSE_FIT_BROAD_SD_DEG", "POSE_FIT_MIN_SD_DEG",
           "max_workers", "workers_problem"]


def max_workers() -> int:
    """The most DataLoader worker processes ``--num-workers`` may ask for: 4 per CPU of this
    machine (each is a process; more only fill the memory and the process table)."""
    return 4 * (os.cpu_count() or 1)


def workers_problem(n: int) -> Optional[str]:
    """The one-line problem of ``--num-workers n``, or None when it is fine."""
    if int(n) < 0:
        return "--num-workers must be 0 or more (got %d)" % int(n)
    if int(n) > max_workers():
        return ("--num-workers %d is more than 4 per CPU of this machine (%d CPUs, at most "
                "%d): each worker is a process" % (int(n), os.cpu_count() or 1, max_workers()))
    return None

# nmaem modes --cg: coarse-grained nodes of the elastic network
CG_CHOICES: Tuple[str, ...] = ("ca", "backbone", "heavy")
# nmaem modes --solver
MODES_SOLVERS: Tuple[str, ...] = ("auto", "dense", "sparse")

# nmaem simulate --distribution: how particles are spread over the frames
DISTRIBUTIONS: Tuple[str, ...] = ("uniform", "continuous", "discontinuous")

# nmaem train --encoder: CNN filters per VGG block (one 2x pooling each) and MLP widths
ENCODER_PRESETS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "paper": dict(filters=(32, 64, 128, 256, 512), hidden=(512, 256)),
    "small": dict(filters=(8, 16, 32), hidden=(64, 32)),
}
ENCODERS: Tuple[str, ...] = tuple(ENCODER_PRESETS)
# nmaem train --loss: the whitened likelihood (likelihood.WhitenedLikelihood, the default)
# or the paper's plain losses (network.image_loss)
LOSSES: Tuple[str, ...] = ("whitened", "l2", "corr")
# nmaem train --lr-schedule
LR_SCHEDULES: Tuple[str, ...] = ("constant", "cosine")
# nmaem train --renderer: the structure factor's route (physics.renderer.Renderer): auto (the faster
# for the model, box and device), gemm (cos/sin matrix products, exact), nufft (FINUFFT
# type-1 non-uniform FFT, CPU, optional package)
RENDER_ROUTES: Tuple[str, ...] = ("auto", "gemm", "nufft")

# nmaem train --pose-input: what the pose head reads (network.Encoder): the image's features
# or the conformation z (a consensus refinement's misalignment is a function of it)
POSE_INPUTS: Tuple[str, ...] = ("image", "z")
POSE_INPUT_DEFAULT = "z"       # measured: docs/benchmarks.md, "Pose refinement"

# nmaem infer --fit-iterations: Gauss-Newton iterations of each particle's fit after the
# encoder (particle_fit.py); measured: docs/benchmarks.md, "Per-particle fit"
FIT_ITERATIONS_DEFAULT = 5
EM_FIT_ITERATIONS_DEFAULT = 10   # with --population em: over its resolution stages
# the population the per-particle fit works under (nmaem infer --population)
POPULATIONS = ("em", "encoder")
POPULATION_DEFAULT = "encoder"   # em: opt-in (docs/training.md, "The population")
POPULATION_MAX_COMPONENTS = 6   # --components auto: K = 1 .. this, by BIC
# nmaem infer --fit-pose: particles whose fit under a broad prior (sd in degrees) measures
# the spread of the rotation errors, and the smallest sd of the prior that follows
POSE_FIT_CALIBRATION = 512
POSE_FIT_BROAD_SD_DEG = 10.0
POSE_FIT_MIN_SD_DEG = 0.1

# nmaem infer --checkpoint (besides a file): RUN/checkpoints/<name>.pt
CHECKPOINTS: Tuple[str, ...] = ("last", "best")

# nmaem export --format
MODEL_FORMATS: Tuple[str, ...] = ("pdb", "cif")
