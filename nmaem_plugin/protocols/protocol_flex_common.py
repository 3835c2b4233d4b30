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

from ..constants import ATTR_RUN_DIR, PROGRAM_NAME  # noqa: F401 (ATTR_RUN_DIR re-exported)

# FlexInfo attributes (train output, and the FlexInfo of infer's SetOfParticlesFlex)
# ATTR_RUN_DIR (constants): the training run folder (RUN), relative to the project
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
ATTR_STATE = "_nmaem_state"             # ParticleFlex in a states class: its state (1-based)



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


def hubFlexInfo(particles, runDir=None):
    """A FlexInfo (program "nmaem") for the Flexibility Hub outputs made from
    ``particles``: a copy of the particles' FlexInfo, with the run's reference structure,
    modes file and d (``convert.hubFlexAttributes``) of ``runDir`` (default: the run
    recorded on the particles)."""
    from pwem.objects import FlexInfo
    from ..convert import hubFlexAttributes
    info = FlexInfo(PROGRAM_NAME)
    src = particles.getFlexInfo() if hasattr(particles, "getFlexInfo") else None
    if src is not None:
        info.copyInfo(src)
    for name, value in hubFlexAttributes(runDir or runDirOf(particles)).items():
        info.setAttr(name, value)
    return info


def modelStructFlex(filename, z, zRed=None, flexInfo=None):
    """An AtomStructFlex of the model file with its amplitudes z (zFlex and, as a
    comma-separated list, :data:`ATTR_Z`), its PC coordinates (zRed) and a copy of
    ``flexInfo``."""
    from pwem.objects import AtomStructFlex, FlexInfo
    from pyworkflow.object import CsvList
    a = AtomStructFlex(progName=PROGRAM_NAME, filename=os.path.relpath(filename))
    a.setZFlex([float(v) for v in z])
    if zRed is not None:
        a.setZRed([float(v) for v in zRed])
    zl = CsvList(pType=float)
    for v in z:
        zl.append(float(v))
    setattr(a, ATTR_Z, zl)
    if flexInfo is not None:
        info = FlexInfo(PROGRAM_NAME)
        info.copyInfo(flexInfo)
        a.setFlexInfo(info)
    return a


def createSetOfAtomStructFlex(prot, suffix=""):
    """A new, empty SetOfAtomStructFlex in the protocol's folder (any old file removed)."""
    import pyworkflow.utils as pwutils
    from pwem.objects import SetOfAtomStructFlex
    fn = prot._getPath("structures_flex%s.sqlite" % suffix)
    pwutils.cleanPath(fn)
    return SetOfAtomStructFlex(filename=fn, progName=PROGRAM_NAME)
