# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""What the train, infer, export and evaluate protocols share: the attributes that tie a
trained network (a pwem ``FlexInfo``) and Flexibility Hub particles to the ``nmaem`` run
folder, and small readers of that folder. Only the standard library at the top."""
import os

from ..constants import PROGRAM_NAME

# FlexInfo attributes (train output, and the FlexInfo of infer's SetOfParticlesFlex)
ATTR_RUN_DIR = "_nmaem_runDir"          # the training run folder (RUN), relative to the project
ATTR_LATENT_DIM = "_nmaem_latentDim"    # d (set by convert.setOfParticlesFlexFromLatent too)
ATTR_EPOCHS = "_nmaem_epochs"           # epochs completed (train output)
ATTR_BOX = "_nmaem_box"                 # training box (px)
ATTR_APIX = "_nmaem_apix"               # training pixel size (A/px)
ATTR_LATENT_FILE = "_nmaem_latentFile"  # infer: latent.npz
ATTR_STAR_FILE = "_nmaem_starFile"      # infer: the STAR given to nmaem infer (row -> id)

# per-item attributes of the export and evaluate outputs
ATTR_N_PARTICLES = "_nmaem_nParticles"  # AtomStruct: particles the model represents
ATTR_Z = "_nmaem_z"                     # AtomStruct: its amplitudes z (A), comma-separated
ATTR_KIND = "_nmaem_kind"               # AtomStruct: pc | cluster | maximum | z
ATTR_RMSD_REF = "_nmaem_rmsdToReference"  # AtomStruct: |z| / sqrt(M)
ATTR_RMSD = "_nmaem_rmsd"               # ParticleFlex (evaluate): RMSD to the true frame
ATTR_FLOOR_RMSD = "_nmaem_floorRmsd"    # ParticleFlex (evaluate): best RMSD the modes allow


def runDirOf(obj):
    """The run folder recorded on a FlexInfo, or on a SetOfParticlesFlex's FlexInfo
    (None when absent or not an nmaem object)."""
    info = obj.getFlexInfo() if hasattr(obj, "getFlexInfo") else obj
    if info is None or not hasattr(info, ATTR_RUN_DIR):
        return None
    if hasattr(info, "getProgName") and info.getProgName() not in (PROGRAM_NAME, None, ""):
        return None
    value = getattr(info, ATTR_RUN_DIR).get()
    return value or None


def findSimulationDir(particles, levels=2):
    """The folder written by ``nmaem simulate`` that holds the images of ``particles``
    (``ground_truth.npz`` and ``frames.pdb`` in the stacks' folder or one of its
    ``levels`` parents), or None."""
    first = particles.getFirstItem() if particles is not None else None
    if first is None or not first.getFileName():
        return None
    fn = first.getFileName()
    if ":" in os.path.basename(fn):
        fn = fn[:fn.rindex(":")]
    folder = os.path.dirname(os.path.abspath(fn))
    for _ in range(levels + 1):
        if all(os.path.isfile(os.path.join(folder, f))
               for f in ("ground_truth.npz", "frames.pdb", "particles.star")):
            return folder
        folder = os.path.dirname(folder)
    return None


def createSetOfParticlesFlex(prot, suffix=""):
    """A new, empty SetOfParticlesFlex in the protocol's folder (any old file removed)."""
    import pyworkflow.utils as pwutils
    from pwem.objects import SetOfParticlesFlex
    fn = prot._getPath("particles_flex%s.sqlite" % suffix)
    pwutils.cleanPath(fn)
    return SetOfParticlesFlex(filename=fn, progName=PROGRAM_NAME)
