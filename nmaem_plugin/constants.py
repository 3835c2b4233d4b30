"""Constants shared by protocols, viewers and convert (no heavy imports here)."""
PROGRAM_NAME = "nmaem"

# The option lists (coarse-graining, distributions, encoders, losses, ...) live in
# core/base/choices.py, read by the command line and the protocols alike.

# Where the frames of a simulated dataset come from (NmaemProtSimulate.inputSource).
SIM_MORPH = 0        # --ref A --target B --frames F
SIM_TRAJECTORY = 1   # --trajectory MULTIMODEL.pdb
SIM_LIKE = 2         # --like PARTICLES.star --ref A (poses and CTFs of a real set)
SIM_SOURCES = ["morph between two models", "multi-model trajectory",
               "poses and CTFs of existing particles"]

# Extra attributes that nmaem protocols set on Scipion objects.
ATTR_FRAME = "_nmaem_frame"            # Particle: ground-truth frame (0-based) of simulated data
ATTR_MODE_INDEX = "_nmaem_modeIndex"   # NormalMode: 0-based row of modes.npz 'modes'
ATTR_EIGENVALUE = "_nmaem_eigenvalue"  # NormalMode: ANM eigenvalue
ATTR_OVERLAP = "_nmaem_overlap"        # NormalMode: overlap with the displacement to a target
ATTR_ANIMATION = "_nmaem_animation"    # NormalMode: multi-model PDB animating the mode
ATTR_LATENT_INDEX = "_nmaem_latentIndex"  # ParticleFlex: row of latent.npz
ATTR_Z_COV = "_nmaem_zCov"             # ParticleFlex: posterior covariance of z (upper triangle, row-major)
ATTR_Z_SD = "_nmaem_zSd"               # ParticleFlex: posterior sd of z, sqrt(trace z_cov) (A)
ATTR_RUN_DIR = "_nmaem_runDir"         # FlexInfo: the training run folder (RUN)

# FlexInfo attributes the Flexibility Hub's normal-mode tools read (scipion-em-flexutils'
# names), set next to ATTR_RUN_DIR by convert.hubFlexAttributes
HUB_REF_STRUCT = "refStruct"           # String: the run's reference model (absolute path)
HUB_N_MODES = "n_modes"                # Integer: d, the number of modes z deforms along
HUB_MODES_FILE = "modesFile"           # String: the run's modes.npz (absolute path)

# Column of the STAR files written by convert that carries Scipion's particle ids.
STAR_ID_COLUMN = "rlnImageId"
