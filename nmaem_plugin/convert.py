# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""Scipion objects <-> the particle files of ``nmaem`` (RELION 3.1 STAR): the only pose glue.

Conventions (derived in ``docs/scipion.md``; tested in ``tests/test_convert.py``)
================================================================================

**Poses.** A Scipion particle with a projection alignment (``ALIGN_PROJ``) carries a
4x4 ``Transform`` T. The RELION plugin (``relion.convert``, "inverse transform" for
projections) relates T to RELION's angles and origin as

    T = M^-1,   M = [[E, -s], [0, 1]],

where E is the matrix of the RELION angles and s = (originX, originY, originZ) / apix is the
origin in pixels. E is pwem's ``euler_matrix(-rot, -tilt, -psi, 'szyz')``, which equals
RELION's own matrix A (``Euler_angles2matrix``; ``core.poses.euler_to_matrix``): the
negated angles about static axes turn the active rotations Rz Ry Rz into RELION's passive
ones. Hence

    T = [[A^T, A^T s], [0, 1]]   and   A = (T^-1)[:3, :3],  s = -(T^-1)[:3, 3],

so writing inverts T, decomposes its rotation with RELION's decomposition
(``core.poses.matrix_to_euler``, tilt in [0, 180], the same angles the RELION plugin
writes) and takes the origin as minus its translation, in Angstrom
(``rlnOriginXAngst = s_x * apix``). ``rlnOriginZ`` has no meaning for 2D particles and is
dropped (it is zero for every transform made from a RELION or cryoSPARC file).

**CTF.** ``CTFModel`` defocus U/V (Angstrom) and angle (degrees) are RELION's
``rlnDefocusU/V/Angle`` as they are (no standardisation, no swap); the phase shift
(degrees) is ``rlnPhaseShift``.

**Acquisition and sampling.** Voltage (kV), spherical aberration (mm) and amplitude
contrast go to the optics table with the set's sampling rate (``rlnImagePixelSize``) and
the image size; particles with their own ``Acquisition`` or ``_rlnOpticsGroup`` get
their own optics groups.

**Images.** ``index@file`` locations of MRC stacks (``.mrc``, ``.mrcs``, ``.st``, with
or without Scipion's ``:mrcs`` suffix) are written as they are (absolute paths); other
formats are converted to MRC stacks with pwem's ``ImageHandler``.

**Ids.** The particles' object ids are written as ``rlnImageId`` and read back from it;
``latent.npz`` rows (``index``) are mapped to ids through that column.

Only numpy, pwem and pyworkflow are imported at module level; ``nmaem_plugin.core``
(which imports torch) is imported inside the functions that need it.
"""
import os

import numpy as np

from .constants import (ATTR_LATENT_INDEX, ATTR_RUN_DIR, ATTR_Z_COV, ATTR_Z_SD, HUB_MODES_FILE,
                        HUB_N_MODES, HUB_REF_STRUCT, PROGRAM_NAME, STAR_ID_COLUMN)

# ============================================================================ poses

def matricesToRelion(matrices, apix):
    """RELION angles and origins of Scipion ``ALIGN_PROJ`` transforms.

    ``matrices`` (N, 4, 4) or (4, 4); ``apix`` the pixel size (A/px) the shifts of the
    transforms are in. Returns ``(euler, origin)``: (N, 3) rot, tilt, psi in degrees and
    (N, 2) ``rlnOriginXAngst/YAngst`` (Angstrom); see the module docstring.
    """
    from .core.io.poses import matrix_to_euler
    M = np.asarray(matrices, dtype=np.float64)
    single = M.ndim == 2
    M = M.reshape(-1, 4, 4)
    inv = np.linalg.inv(M)
    A = inv[:, :3, :3]
    rot, tilt, psi = matrix_to_euler(A)
    euler = np.stack([rot, tilt, psi], axis=1)
    origin = -inv[:, :2, 3] * float(apix)
    if single:
        return euler[0], origin[0]
    return euler, origin


def relionToMatrices(euler, origin, apix):
    """Scipion ``ALIGN_PROJ`` transforms (N, 4, 4) of RELION angles (N, 3) in degrees and
    origins (N, 2) in Angstrom (None: zero), for pixel size ``apix``; inverse of
    :func:`matricesToRelion`: T = [[A^T, A^T s], [0, 1]] with s = origin / apix."""
    from .core.io.poses import euler_to_matrix
    e = np.asarray(euler, dtype=np.float64).reshape(-1, 3)
    n = len(e)
    A = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
    s = np.zeros((n, 3))
    if origin is not None:
        s[:, :2] = np.asarray(origin, dtype=np.float64).reshape(n, 2) / float(apix)
    T = np.zeros((n, 4, 4))
    At = np.swapaxes(A, 1, 2)
    T[:, :3, :3] = At
    T[:, :3, 3] = np.einsum("nij,nj->ni", At, s)
    T[:, 3, 3] = 1.0
    return T


def foldShiftIntoMatrix(matrix, shift, apix, replace=False):
    """The transform ``matrix`` (4x4) with an ``nmaem`` shift folded into its origin.

    ``shift`` (x, y) in Angstrom is the translation ``nmaem`` applies to the rendered
    projection (the ``shift`` of ``latent.npz`` and ``ground_truth.npz``; for a particle
    with origin o the renderer translates by -o, see docs/conventions.md). With
    ``replace=False`` the shift is a correction on top of the particle's origin, so the
    new origin is o - shift; with ``replace=True`` the shift is the whole translation and
    the new origin is -shift. The rotation is unchanged.
    """
    M = np.asarray(matrix, dtype=np.float64)
    inv = np.linalg.inv(M)                 # [[A, -s], [0, 1]]
    t = np.asarray(shift, dtype=np.float64).reshape(2) / float(apix)
    if replace:
        inv[:3, 3] = 0.0
    inv[:2, 3] += t                        # -s' = -(s - t)
    out = np.linalg.inv(inv)
    out[3] = (0.0, 0.0, 0.0, 1.0)
    return out


def refinePoseInMatrix(matrix, rotvec):
    """The transform ``matrix`` (4x4) with an ``nmaem`` pose correction applied.

    ``rotvec`` (3,) radians is the ``pose_correction`` of ``latent.npz`` (``nmaem train
    --refine-pose``); the refined RELION matrix is A R(v) (``core.poses.correct_rotations``,
    the correction acts in the model's frame). With T^-1 = [[A, -s], [0, 1]] only the
    rotation block changes: the origin s is kept.
    """
    from .core.io.poses import correct_rotations
    M = np.asarray(matrix, dtype=np.float64)
    inv = np.linalg.inv(M)                 # [[A, -s], [0, 1]]
    inv[:3, :3] = correct_rotations(inv[:3, :3], np.asarray(rotvec, dtype=np.float64).reshape(3))
    out = np.linalg.inv(inv)
    out[3] = (0.0, 0.0, 0.0, 1.0)
    return out


# ============================================================================ helpers

def _splitLocation(location):
    """(index 0-based, file name without Scipion's ':mrcs' style suffix)."""
    index, fn = location
    fn = str(fn)
    if ":" in os.path.basename(fn):
        fn = fn[:fn.rindex(":")]
    index = int(index) if index else 1       # NO_INDEX (0) means the single image
    return index - 1, fn


def _getAcquisitionValues(obj, fallback):
    acq = obj.getAcquisition() if hasattr(obj, "getAcquisition") else None
    vals = []
    for getter in ("getVoltage", "getSphericalAberration", "getAmplitudeContrast"):
        v = getattr(acq, getter)() if acq is not None else None
        if v is None and fallback is not None:
            v = getattr(fallback, getter)()
        vals.append(v)
    return vals


# ============================================================================ Scipion -> STAR

def particlesToTable(partSet, starFile, stackDir=None):
    """A :class:`core.particles.ParticleTable` of the particles of ``partSet`` (see the
    module docstring for the conventions), in the set's id order.

    Particles must have a projection alignment and a CTF. ``stackDir`` is where stacks
    that are not MRC get converted (default: the STAR file's folder). The table's
    ``extra`` holds ``rlnImageId`` (the object ids).
    """
    import pandas as pd
    from pwem.constants import ALIGN_PROJ
    from .core.io.table import ParticleTable
    from .core.io.stacks import is_mrc, stack_box

    if partSet.getAlignment() != ALIGN_PROJ:
        raise ValueError("%s has no 3D projection alignment (alignment: %s)"
                         % (partSet.getNameId() or "particles", partSet.getAlignment()))
    if not partSet.hasCTF():
        raise ValueError("%s has no CTF" % (partSet.getNameId() or "particles"))
    apix = float(partSet.getSamplingRate())
    setAcq = partSet.getAcquisition()
    stackDir = stackDir or os.path.dirname(os.path.abspath(starFile))

    ids, locs, mats, ctf, acq, ogs = [], [], [], [], [], []
    for part in partSet.iterItems(orderBy="id"):
        ids.append(part.getObjId())
        locs.append(_splitLocation(part.getLocation()))
        t = part.getTransform()
        if t is None:
            raise ValueError("particle %d has no transform" % part.getObjId())
        mats.append(t.getMatrix())
        c = part.getCTF()
        if c is None:
            raise ValueError("particle %d has no CTF" % part.getObjId())
        ps = c.getPhaseShift() if hasattr(c, "getPhaseShift") else None
        ctf.append((c.getDefocusU(), c.getDefocusV(), c.getDefocusAngle(), ps or 0.0))
        acq.append(_getAcquisitionValues(part, setAcq))
        og = part.getAttributeValue("_rlnOpticsGroup", 1) if hasattr(
            part, "getAttributeValue") else 1
        ogs.append(int(og or 1))
    n = len(ids)
    if n == 0:
        raise ValueError("no particles to write")

    # images: MRC stacks as they are, anything else converted to one MRC stack per file
    stack_paths, stack_index = [], []
    converted = {}
    ih = None
    for (idx, fn) in locs:
        if is_mrc(fn):
            stack_paths.append(os.path.abspath(fn))
            stack_index.append(idx)
            continue
        if ih is None:
            from pwem.emlib.image import ImageHandler
            ih = ImageHandler()
            os.makedirs(stackDir, exist_ok=True)
        key = os.path.abspath(fn)
        if key not in converted:
            base = os.path.splitext(os.path.basename(fn))[0]
            converted[key] = [os.path.join(stackDir, "%s_%d.mrcs" % (base, len(converted))), 0]
        out, k = converted[key]
        ih.convert((idx + 1, fn), (k + 1, out))
        converted[key][1] = k + 1
        stack_paths.append(os.path.abspath(out))
        stack_index.append(k)
    stack_paths = np.asarray(stack_paths, dtype=str)
    boxes = {p: stack_box(p, default=None) for p in np.unique(stack_paths).tolist()}
    box = np.array([boxes[p] for p in stack_paths.tolist()], dtype=np.int64)

    euler, origin = matricesToRelion(np.asarray(mats), apix)
    ctf = np.asarray(ctf, dtype=np.float64)
    acq = np.asarray([[np.nan if v is None else v for v in row] for row in acq],
                     dtype=np.float64)
    if np.isnan(acq).any():
        raise ValueError("the particles' acquisition lacks voltage, spherical aberration "
                         "or amplitude contrast")
    return ParticleTable(
        path=os.fspath(starFile), n=n, image_names=None, stack_paths=stack_paths,
        stack_index=np.asarray(stack_index, dtype=np.int64), euler=euler, origin=origin,
        defocus_u=ctf[:, 0], defocus_v=ctf[:, 1], defocus_angle=ctf[:, 2],
        phase_shift=ctf[:, 3], ctf_bfactor=np.zeros(n),
        voltage=acq[:, 0], cs=acq[:, 1], amp_contrast=acq[:, 2],
        apix=np.full(n, apix), box=box, optics_group=np.asarray(ogs, dtype=np.int64),
        extra=pd.DataFrame({STAR_ID_COLUMN: np.asarray(ids, dtype=np.int64)}))


def writeSetOfParticles(partSet, starFile, stackDir=None):
    """Write ``partSet`` (3D alignment + CTF) as a RELION 3.1 STAR file that ``nmaem``
    reads; returns the number of particles. See :func:`particlesToTable`."""
    from .core.io.star import write_star
    table = particlesToTable(partSet, starFile, stackDir=stackDir)
    write_star(starFile, table)
    return table.n


# ============================================================================ STAR -> Scipion

def readSetOfParticles(starFile, partSet, extraAttributes=None, particleIds=None):
    """Fill the empty ``partSet`` (SetOfParticles) from a RELION STAR (or cryoSPARC .cs)
    particle file: locations, ``ALIGN_PROJ`` transforms, CTFs, acquisition and sampling.

    Object ids come from ``particleIds`` when given, else from the file's ``rlnImageId``
    column when it has one, else 1..N. ``extraAttributes`` maps attribute names (e.g.
    ``_nmaem_frame``) to arrays of N values set on each particle (Integer, Float or
    String by dtype). Returns ``partSet``.
    """
    from pwem.constants import ALIGN_NONE
    from pwem.objects import Acquisition, CTFModel, Particle, Transform
    from pyworkflow.object import Float, Integer, String
    from .core.io.particles import read_particles

    table = read_particles(starFile)
    n = table.n
    if table.stack_paths is None:
        raise ValueError("%s: no image names" % starFile)
    if len(np.unique(table.apix)) != 1:
        raise ValueError("%s: particles of several pixel sizes" % starFile)
    apix = float(table.apix[0])
    if particleIds is None and STAR_ID_COLUMN in table.extra.columns:
        particleIds = table.extra[STAR_ID_COLUMN].to_numpy()
    ids = (np.arange(1, n + 1) if particleIds is None
           else np.asarray(particleIds, dtype=np.int64))
    if len(ids) != n or len(np.unique(ids)) != n:
        raise ValueError("%s: need %d distinct particle ids" % (starFile, n))
    T = relionToMatrices(table.euler, table.origin, apix) if table.euler is not None else None
    hasCtf = table.defocus_u is not None
    hasAcq = table.voltage is not None

    partSet.setSamplingRate(apix)
    acq = Acquisition()
    if hasAcq:
        acq.setVoltage(float(table.voltage[0]))
        acq.setSphericalAberration(float(table.cs[0]))
        acq.setAmplitudeContrast(float(table.amp_contrast[0]))
        acq.setMagnification(10000.0)
    partSet.setAcquisition(acq)
    partSet.setHasCTF(hasCtf)
    if T is not None:
        partSet.setAlignmentProj()
    else:
        partSet.setAlignment(ALIGN_NONE)

    extras = []
    for name, values in (extraAttributes or {}).items():
        v = np.asarray(values)
        if len(v) != n:
            raise ValueError("attribute %s: %d values for %d particles" % (name, len(v), n))
        kind = Integer if v.dtype.kind in "iub" else Float if v.dtype.kind == "f" else String
        extras.append((name, kind, v.tolist()))

    multiOptics = len(np.unique(table.optics_group)) > 1
    part = Particle()
    for i in range(n):
        part.cleanObjId()
        part.setObjId(int(ids[i]))
        part.setLocation(int(table.stack_index[i]) + 1, str(table.stack_paths[i]))
        part.setSamplingRate(apix)
        if hasCtf:
            c = CTFModel()
            c.setDefocusU(float(table.defocus_u[i]))
            c.setDefocusV(float(table.defocus_v[i]))
            c.setDefocusAngle(float(table.defocus_angle[i]))
            c.setPhaseShift(float(table.phase_shift[i]))
            part.setCTF(c)
        if T is not None:
            part.setTransform(Transform(T[i]))
        if hasAcq:
            a = Acquisition()
            a.setVoltage(float(table.voltage[i]))
            a.setSphericalAberration(float(table.cs[i]))
            a.setAmplitudeContrast(float(table.amp_contrast[i]))
            a.setMagnification(10000.0)
            part.setAcquisition(a)
        if multiOptics:
            setattr(part, "_rlnOpticsGroup", Integer(int(table.optics_group[i])))
        for name, kind, vals in extras:
            setattr(part, name, kind(vals[i]))
        partSet.append(part)
    return partSet


# ============================================================================ latent -> Flexibility Hub

def _checkedLatent(latentFile):
    """The ``core.latent.Latent`` of a file, its rows distinct (one per particle)."""
    from .core.io.latent import read_latent
    lat = read_latent(latentFile)           # one-line NmaemError on a bad file
    if len(np.unique(lat.index)) != lat.n:
        raise ValueError("%s: 'index' must hold distinct non-negative rows" % latentFile)
    return lat


def starRowIds(starFile):
    """Particle ids (``rlnImageId``) of the rows of a STAR file written by
    :func:`writeSetOfParticles` (1..N when the column is absent)."""
    from .core.io.star import read_star_blocks
    blocks = read_star_blocks(starFile)
    parts = blocks.get("particles")
    if parts is None:
        parts = [b for k, b in blocks.items() if k != "optics"][0]
    if STAR_ID_COLUMN in parts.columns:
        return parts[STAR_ID_COLUMN].to_numpy().astype(np.int64)
    return np.arange(1, len(parts) + 1, dtype=np.int64)


def hubFlexAttributes(runDir):
    """{name: value} of the Flexibility Hub attributes of a training run folder: the
    reference model (:data:`HUB_REF_STRUCT`), the modes file (:data:`HUB_MODES_FILE`) and
    d (:data:`HUB_N_MODES`), those the run has."""
    if not runDir:
        return {}
    from .core.io.runfolder import read_config_or_none, reference_and_modes
    ref, modes = reference_and_modes(runDir)
    cfg = read_config_or_none(runDir) or {}
    out = {ATTR_RUN_DIR: runDir}
    if ref:
        out[HUB_REF_STRUCT] = ref
    if modes:
        out[HUB_MODES_FILE] = modes
    if cfg.get("n_modes") is not None:
        out[HUB_N_MODES] = int(cfg["n_modes"])
    return out


def pcaCoordinates(z):
    """zRed of the Flexibility Hub: the PC coordinates of each z (N, d) over the whole
    set (``core.analysis.pca``: axes by decreasing variance, measured from z = 0), or
    None for fewer than 2 particles or d = 0."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or len(z) < 2 or z.shape[1] == 0:
        return None
    from .core.analysis.landscape import pca
    return pca(z).transform(z)


def latentFromParticlesFlex(particles, latentFile, idsFile=None):
    """Write the zFlex of a SetOfParticlesFlex as ``latentFile`` (``core.latent``; rows
    in id order, shifts zero, index 0..N-1), with each particle's posterior covariance
    ``z_cov`` when every particle has one (:data:`ATTR_Z_COV`), and their ids as
    ``idsFile`` (.npy); returns the ids (N,) int64."""
    from .core.io.latent import write_latent
    ids, z, cov = [], [], []
    for p in particles.iterItems(orderBy="id"):
        ids.append(p.getObjId())
        z.append(np.asarray(p.getZFlex(), dtype=np.float64))
        cov.append(zCovOf(p, len(z[-1])))
    d = len(z[0]) if z else 0
    ids = np.asarray(ids, dtype=np.int64)
    if idsFile is not None:
        np.save(idsFile, ids)
    zCov = np.asarray(cov) if cov and all(c is not None for c in cov) else None
    write_latent(latentFile, np.asarray(z, dtype=np.float64).reshape(-1, d), z_cov=zCov)
    return ids


def zCovToText(c):
    """A (d, d) posterior covariance as the text of :data:`ATTR_Z_COV`: its upper triangle
    (row-major, d(d+1)/2 values) at float32's full precision."""
    c = np.asarray(c, dtype=np.float32)
    return ",".join("%.9g" % v for v in c[np.triu_indices(len(c))])


def zCovOf(particle, d):
    """The (d, d) float32 posterior covariance of z a particle holds (:data:`ATTR_Z_COV`),
    or None when it has none (a latent from before ``z_cov``, or another program's)."""
    attr = getattr(particle, ATTR_Z_COV, None)
    text = None if attr is None else attr.get()
    if not text:
        return None
    vals = np.asarray([float(v) for v in str(text).split(",")], dtype=np.float32)
    iu = np.triu_indices(d)
    if len(vals) != len(iu[0]):
        raise ValueError("particle %s: %s holds %d values, expected %d for d = %d"
                         % (particle.getObjId(), ATTR_Z_COV, len(vals), len(iu[0]), d))
    c = np.zeros((d, d), dtype=np.float32)
    c[iu] = vals
    return c + np.triu(c, 1).T


def copySetInfo(outputSet, inputSet):
    """``outputSet.copyInfo(inputSet)`` and the has-CTF flag, which pwem's
    ``SetOfParticlesFlex.copyInfo`` skips (it bypasses ``SetOfParticles.copyInfo``): a
    flex set made from particles with CTFs says it has them, so it can be written as a
    STAR or given to a protocol that needs CTFs."""
    outputSet.copyInfo(inputSet)
    outputSet.setHasCTF(inputSet.hasCTF())


def setOfParticlesFlexFromLatent(inputSet, latentFile, outputSet, starFile=None,
                                 foldShift=True, replaceShift=False, flexAttributes=None,
                                 foldPose=True):
    """Fill the empty ``outputSet`` (``SetOfParticlesFlex``) with a copy of each particle
    of ``inputSet`` that has a row in ``latentFile``, as ``ParticleFlex`` items with
    ``setZFlex(z)``, ``setZRed`` (:func:`pcaCoordinates`) and ``FlexInfo`` program name
    "nmaem", keeping the input ids.

    Rows of the latent file (``index``) are rows of ``starFile`` (the STAR given to
    ``nmaem``, whose ``rlnImageId`` column holds the ids); without ``starFile`` they are
    positions in ``inputSet`` in id order. With ``foldShift`` the predicted ``shift``
    is folded into each particle's transform (:func:`foldShiftIntoMatrix`, a correction
    on top of the input origin unless ``replaceShift``); with ``foldPose`` the pose
    correction of a run trained with ``--refine-pose`` (``pose_correction``, absent
    otherwise) is applied to its rotation (:func:`refinePoseInMatrix`). ``flexAttributes``
    (name -> value) are stored on the set's ``FlexInfo``, with :func:`hubFlexAttributes` of
    the run folder among them. A latent with posterior covariances (``z_cov``) gives each
    particle :data:`ATTR_Z_COV` (:func:`zCovToText`) and its total sd :data:`ATTR_Z_SD`.
    Returns the number of particles.
    """
    from pwem.objects import FlexInfo, ParticleFlex, Transform
    from pyworkflow.object import Float, Integer, String

    lat = _checkedLatent(latentFile)        # read once
    zCov, zSd = lat.z_cov, lat.z_sd()
    z, shift, index = lat.z.astype(np.float32), lat.shift.astype(np.float32), lat.index
    poseCorrection = lat.pose_correction if foldPose else None
    rowIds = (starRowIds(starFile) if starFile is not None
              else np.asarray([p.getObjId() for p in inputSet.iterItems(orderBy="id")],
                              dtype=np.int64))
    if len(index) and index.max() >= len(rowIds):
        raise ValueError("%s: index %d beyond the %d particles of the input"
                         % (latentFile, index.max(), len(rowIds)))
    byId = {int(rowIds[r]): k for k, r in enumerate(index.tolist())}
    apix = float(inputSet.getSamplingRate())

    copySetInfo(outputSet, inputSet)
    info = FlexInfo(PROGRAM_NAME)
    info.setAttr("_nmaem_latentDim", int(z.shape[1]))
    attrs = dict(flexAttributes or {})
    attrs.update(hubFlexAttributes(attrs.get(ATTR_RUN_DIR)))
    for name, value in attrs.items():
        info.setAttr(name, value)
    outputSet.setFlexInfo(info)
    zRed = pcaCoordinates(z)

    count = 0
    for part in inputSet.iterItems(orderBy="id"):
        k = byId.get(int(part.getObjId()))
        if k is None:
            continue
        item = ParticleFlex(progName=PROGRAM_NAME)
        item.copy(part, copyId=True)
        item.setFlexInfo(FlexInfo(PROGRAM_NAME))
        item.setZFlex(z[k].astype(float).tolist())
        if zRed is not None:
            item.setZRed(zRed[k].tolist())
        setattr(item, ATTR_LATENT_INDEX, Integer(int(index[k])))
        if zCov is not None:
            setattr(item, ATTR_Z_COV, String(zCovToText(zCov[k])))
            setattr(item, ATTR_Z_SD, Float(float(zSd[k])))
        if part.getTransform() is not None and (foldShift or poseCorrection is not None):
            M = part.getTransform().getMatrix()
            if foldShift and shift is not None:
                M = foldShiftIntoMatrix(M, shift[k], apix, replace=replaceShift)
            if poseCorrection is not None:
                M = refinePoseInMatrix(M, poseCorrection[k])
            item.setTransform(Transform(M))
        outputSet.append(item)
        count += 1
    return count
