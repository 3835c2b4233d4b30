"""Geometry refinement of deformed all-atom models: restrained minimisation with OpenMM.

A model X(z) = X0 + U z moves atoms along linear modes, which stretches bonds and makes
atoms touch. :func:`refine_coords` restores the chemistry while keeping the shape:

1. the reference's atoms at the new coordinates become an OpenMM topology (names kept;
   standard bonds from OpenMM's residue templates, disulfides by distance, chains split
   where the reference has a chain break; a missing C-terminal OXT is added, and the
   5'-phosphate of a nucleic-acid chain is held out of the system: neither is written);
2. hydrogens are added for pH 7 (``Modeller.addHydrogens`` with the force field);
3. force field amber99sb-ILDN with the OBC2 generalised-Born implicit solvent
   (``amber99sbildn.xml`` + ``amber99_obc.xml``: OpenMM's native GBSAOBCForce, 4x faster on
   CPU than the CustomGBForce of amber14's ``implicit/gbn2.xml``, which ``solvent='gbn2'``
   selects), non-periodic cutoff 1 nm; ``solvent='vacuum'`` drops the solvent term;
4. the covalent terms between heavy atoms take the reference model's own bond lengths and
   angles as equilibrium values, with force constants x10 (bonds) and x4 (angles)
   (``ideal='reference'``, ``covalent_scale``): the reference is the chemically valid
   model whose geometry the deformed one should keep, and the stiffer terms stop the
   position restraints from stretching bonds (Amber's own constants leave 0.03 A rms);
5. harmonic restraints 0.5 k |x - x_NM|^2 on every heavy atom towards its normal-mode
   position (``CustomExternalForce``), k = ``restraint`` kcal/mol/A^2 (default 30: on
   adenylate kinase at 6.9 A from the reference it moves atoms 0.48 A rms from the plain
   model while bonds end within 0.008 A rms of the reference's);
6. ``LocalEnergyMinimizer`` (L-BFGS) to an RMS force ``tolerance`` (kJ/mol/nm) or
   ``max_iterations``;
7. the heavy atoms are mapped back to the reference's rows by (chain, residue number,
   insertion code, atom name); hydrogens are returned on request.

OpenMM is imported inside the functions: importing this module costs nothing.

Size: about 500 lines for one procedure, the seven steps above; its helpers (topology,
reference ideals, hydrogens) share the OpenMM system's details and have no other user.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import numpy as np

from ..base.errors import NmaemError

if TYPE_CHECKING:                   # openmm and gemmi are imported when refining
    import openmm
    from ..physics.structure import AtomicModel

__all__ = ["DEFAULTS", "RefinementResult", "refine_coords", "refine_models",
           "choose_platform", "check_refinable"]

DEFAULTS = dict(
    restraint=30.0,        # kcal/mol/A^2 on heavy atoms (see docs/analysis.md for the scan)
    tolerance=10.0,        # kJ/mol/nm, RMS force at which L-BFGS stops (OpenMM's default)
    max_iterations=2000,
    solvent="obc",         # obc (GBSAOBCForce), gbn2 (amber14 + CustomGBForce, slow), vacuum
    cutoff_nm=1.0,
    covalent_scale=(10.0, 4.0),  # factors on heavy-atom bond and angle force constants
    ideal="reference",     # heavy-atom bond lengths/angles: "reference" geometry or "forcefield"         # non-periodic cutoff (nm) for non-bonded and GB terms; 0: none
    ph=7.0,
)
_KCAL_A2_TO_KJ_NM2 = 418.4
_BACKBONE = ("N", "CA", "C", "O")
_FORCEFIELDS = {
    "obc": ("amber99sbildn.xml", "amber99_obc.xml"),
    "gbn2": ("amber14-all.xml", "implicit/gbn2.xml"),
    "vacuum": ("amber99sbildn.xml",),
}
_FF_NAMES = {"obc": "amber99sb-ILDN + OBC2 implicit solvent (GBSAOBCForce)",
             "gbn2": "amber14 (ff14SB) + GBn2 implicit solvent",
             "vacuum": "amber99sb-ILDN in vacuum"}
_NOT_CONVERGED_FACTOR = 100.0   # RMS force above 100x the tolerance: not a minimum


class RefinementResult:
    """One refined model.

    ``coords`` (M, 3): heavy atoms in the reference's order (the plain coordinates when
    refinement failed); ``ok``: refinement accepted; ``info``: a JSON-able dict (converged,
    iterations, energies in kJ/mol, rms_force, seconds, message); ``hydrogens``: list of
    (row of the parent residue's first atom, atom name, (x, y, z)) when asked for.
    """

    def __init__(self, coords: np.ndarray, ok: bool, info: dict,
                 hydrogens: Optional[list] = None) -> None:
        self.coords = coords
        self.ok = ok
        self.info = info
        self.hydrogens = hydrogens

    def model_with_hydrogens(self, reference: AtomicModel) -> AtomicModel:
        """An :class:`AtomicModel` with the hydrogens after each residue's heavy atoms."""
        return _with_hydrogens(reference, self.coords, self.hydrogens or [])


def choose_platform(name: Optional[str] = None) -> "openmm.Platform":
    """The OpenMM platform: ``name`` when given, else CUDA, then OpenCL, then CPU."""
    import openmm as mm
    names = [mm.Platform.getPlatform(i).getName() for i in range(mm.Platform.getNumPlatforms())]
    if name:
        if name not in names:
            raise NmaemError("OpenMM platform %r is not available (have: %s)"
                             % (name, ", ".join(names)))
        return mm.Platform.getPlatformByName(name)
    for n in ("CUDA", "OpenCL", "CPU", "Reference"):
        if n in names:
            return mm.Platform.getPlatformByName(n)
    raise NmaemError("OpenMM has no usable platform")


def _residue_slices(model):
    key = list(zip(model.chain, model.resnum, model.icode))
    starts = [0] + [i for i in range(1, len(key)) if key[i] != key[i - 1]]
    return list(zip(starts, starts[1:] + [len(key)]))


def _label(model, i):
    ic = model.icode[i]
    return "%s:%d%s %s" % (model.chain[i], model.resnum[i], ic, model.resname[i])


def _known_residue_names():
    """Residue names with OpenMM hydrogen definitions (standard amino acids, nucleotides)."""
    import os
    from openmm import app
    if not app.Modeller._hasLoadedStandardHydrogens:
        app.Modeller.loadHydrogenDefinitions(
            os.path.join(os.path.dirname(app.__file__), "data", "hydrogens.xml"))
        app.Modeller._hasLoadedStandardHydrogens = True
    return set(app.Modeller._residueHydrogens.keys())


def check_refinable(model: AtomicModel,
                    source: Optional[str] = None) -> tuple[set, Optional[str]]:
    """Problems that stop refinement, as (unknown residue labels, message or None).

    Unknown residues are those the force field's hydrogen definitions do not name
    (ligands, modified residues); amino acids without all of N, CA, C, O are refused.
    """
    import gemmi
    src = source or model.source or "model"
    known = _known_residue_names()
    unknown, missing = [], []
    names = np.asarray(model.atom_name)
    for a, b in _residue_slices(model):
        rn = str(model.resname[a])
        if rn not in known and rn != "HOH":
            unknown.append(_label(model, a))
            continue
        info = gemmi.find_tabulated_residue(rn)
        if info is not None and info.is_amino_acid():
            lack = [n for n in _BACKBONE if n not in set(names[a:b])]
            if lack:
                missing.append("%s (no %s)" % (_label(model, a), ",".join(lack)))
    msg = None
    if missing:
        msg = ("%s: cannot refine: %d residue(s) miss backbone atoms, e.g. %s; rebuild them "
               "(e.g. PDBFixer) or export with --no-refine"
               % (src, len(missing), "; ".join(missing[:3])))
    return unknown, msg


def _build(model, coords, skip_rows):
    """OpenMM topology/positions for the rows of ``model`` not in ``skip_rows``; returns
    (modeller, keys) where keys maps (chain index, resid, icode, atom name) -> row."""
    import openmm.app as app
    from openmm import Vec3, unit
    X0 = np.asarray(model.coords, dtype=np.float64)
    X = np.asarray(coords, dtype=np.float64)
    names = np.asarray(model.atom_name)
    top = app.Topology()
    pos = []
    keys = {}
    chain = None
    prev = None   # (chain id, C row or O3' row) of the previous residue
    slices = [s for s in _residue_slices(model) if s[0] not in skip_rows]
    last_in_segment = []
    for a, b in slices:
        ch = str(model.chain[a])
        rows = {str(names[k]): k for k in range(a, b)}
        new_chain = chain is None or prev is None or prev[0] != ch
        if not new_chain:   # a chain break in the reference starts a new OpenMM chain
            if "N" in rows and prev[1] is not None and prev[2] == "C":
                new_chain = np.linalg.norm(X0[rows["N"]] - X0[prev[1]]) > 2.0
            elif "P" in rows and prev[1] is not None and prev[2] == "O3'":
                new_chain = np.linalg.norm(X0[rows["P"]] - X0[prev[1]]) > 2.2
            else:
                new_chain = True
        if new_chain:
            chain = top.addChain(ch)
            if last_in_segment:
                last_in_segment[-1] = True
            first = True
        else:
            first = False
        res = top.addResidue(str(model.resname[a]), chain, str(int(model.resnum[a])),
                             str(model.icode[a]) or " ")
        for k in range(a, b):
            if first and names[k] in ("P", "OP1", "OP2", "OP3", "O5'") and "O3'" in rows \
                    and names[k] != "O5'":
                continue   # 5'-terminal phosphate: Amber's 5' templates have none
            el = app.Element.getBySymbol(str(model.elements[k]))
            top.addAtom(str(names[k]), el, res)
            pos.append(Vec3(*(X[k] / 10.0)))
            keys[(chain.index, res.id, res.insertionCode, str(names[k]))] = k
        res._rows = rows
        last_in_segment.append(False)
        prev = (ch, rows.get("C", rows.get("O3'")), "C" if "C" in rows else "O3'")
    if last_in_segment:
        last_in_segment[-1] = True
    # a C-terminal OXT where the chain segment ends without one (not written back)
    for res, is_last in zip(list(top.residues()), last_in_segment):
        r = res._rows
        if is_last and all(n in r for n in ("C", "O", "CA")) and "OXT" not in r:
            c, o, ca = X[r["C"]], X[r["O"]], X[r["CA"]]
            u = (o - c) / np.linalg.norm(o - c) + (ca - c) / np.linalg.norm(ca - c)
            oxt = c - 1.25 * u / np.linalg.norm(u)
            # insert after the residue's atoms: rebuild its atom list order is not needed
            top.addAtom("OXT", app.Element.getBySymbol("O"), res)
            pos.append(Vec3(*(oxt / 10.0)))
    # OXT was appended after later residues' atoms: rebuild so atoms run residue by residue
    top2 = app.Topology()
    pos2 = []
    for ch in top.chains():
        c2 = top2.addChain(ch.id)
        for res in ch.residues():
            r2 = top2.addResidue(res.name, c2, res.id, res.insertionCode)
            for at in res.atoms():
                top2.addAtom(at.name, at.element, r2)
                pos2.append(pos[at.index])
    top2.createStandardBonds()
    positions = unit.Quantity(pos2, unit.nanometer)
    top2.createDisulfideBonds(positions)
    modeller = app.Modeller(top2, positions)
    return modeller, keys


def _reference_ideals(system, rows, X0, bond_scale=1.0, angle_scale=1.0):
    """Set the equilibrium length of every heavy-atom bond and the equilibrium value of
    every heavy-atom bond angle to the reference model's own (force constants kept)."""
    import openmm as mm
    X0 = np.asarray(X0, dtype=np.float64) / 10.0
    for f in system.getForces():
        if isinstance(f, mm.HarmonicBondForce):
            for b in range(f.getNumBonds()):
                i, j, r, k = f.getBondParameters(b)
                if rows[i] >= 0 and rows[j] >= 0:
                    f.setBondParameters(b, i, j, float(np.linalg.norm(X0[rows[i]] - X0[rows[j]])),
                                        k * bond_scale)
        elif isinstance(f, mm.HarmonicAngleForce):
            for a in range(f.getNumAngles()):
                i, j, l, t, k = f.getAngleParameters(a)
                if rows[i] >= 0 and rows[j] >= 0 and rows[l] >= 0:
                    u = X0[rows[i]] - X0[rows[j]]
                    v = X0[rows[l]] - X0[rows[j]]
                    c = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
                    f.setAngleParameters(a, i, j, l, float(np.arccos(np.clip(c, -1, 1))),
                                         k * angle_scale)


def _with_hydrogens(reference, coords, hydrogens):
    import gemmi
    from ..physics.structure import arrays_from_structure, AtomicModel, set_positions
    st = reference._structure.clone()
    set_positions(st[0], np.asarray(coords, dtype=np.float64))
    by_res = {}
    for row, name, xyz in hydrogens:
        key = (reference.chain[row], int(reference.resnum[row]), reference.icode[row])
        by_res.setdefault(key, []).append((name, xyz))
    for ch in st[0]:
        for res in ch:
            for name, xyz in by_res.get((ch.name, res.seqid.num, res.seqid.icode.strip()), []):
                at = gemmi.Atom()
                at.name = name
                at.element = gemmi.Element("H")
                at.pos = gemmi.Position(*xyz)
                at.occ = 1.0
                at.b_iso = 0.0
                res.add_atom(at)
    X, elements, rows = arrays_from_structure(st, reference.source)
    return AtomicModel(
        coords=X, elements=elements, chain=np.array([r[4] for r in rows]),
        resnum=np.array([r[5] for r in rows], dtype=int), icode=np.array([r[6] for r in rows]),
        resname=np.array([r[7] for r in rows]), atom_name=np.array([r[8] for r in rows]),
        b_factor=np.array([r[9] for r in rows], dtype=float),
        occupancy=np.array([r[10] for r in rows], dtype=float),
        source=reference.source, _structure=st)


def refine_coords(model: AtomicModel, coords: np.ndarray, restraint: float = DEFAULTS["restraint"],
                  tolerance: float = DEFAULTS["tolerance"],
                  max_iterations: int = DEFAULTS["max_iterations"], hydrogens: bool = False,
                  platform: Optional[str] = None, unknown: str = "refuse",
                  source: Optional[str] = None, solvent: str = DEFAULTS["solvent"],
                  cutoff_nm: float = DEFAULTS["cutoff_nm"], ideal: str = DEFAULTS["ideal"],
                  covalent_scale: Sequence[float] = DEFAULTS["covalent_scale"],
                  log: Optional[Callable[[str], object]] = None,
                  progress_every: float = 10.0) -> RefinementResult:
    """Refine one model: ``model`` (the reference :class:`AtomicModel`, heavy atoms) at
    ``coords`` (M, 3) A. Returns a :class:`RefinementResult`.

    ``restraint`` k in kcal/mol/A^2 on each heavy atom towards ``coords``; ``tolerance``
    the RMS force (kJ/mol/nm) and ``max_iterations`` for L-BFGS; ``platform`` an OpenMM
    platform name (default CUDA > OpenCL > CPU); ``unknown``: ``"refuse"`` raises
    :class:`NmaemError` naming residues the force field does not know, ``"fix"`` leaves
    them out of the system at their given coordinates. ``log`` receives progress lines
    every ``progress_every`` seconds. ``info['converged']`` says whether the RMS force
    reached ``tolerance``; with the 1 nm cutoff L-BFGS usually stops near 50-100 kJ/mol/nm
    (line-search failure on the cutoff's small discontinuities), which is accepted. A
    minimisation that ends far from a minimum (RMS force above 100x the tolerance) or with
    non-finite energy is not accepted: the result then holds the plain coordinates, ``ok``
    False, ``info['refined']`` False and the reason in ``info['message']``.
    """
    import openmm as mm
    import openmm.app as app
    from openmm import unit

    say = log or (lambda *a: None)
    src = source or model.source or "model"
    X = np.asarray(coords, dtype=np.float64)
    if X.shape != model.coords.shape or not np.all(np.isfinite(X)):
        raise NmaemError("%s: coordinates of shape %s (finite: %s) for a model of %d atoms"
                         % (src, X.shape, bool(np.all(np.isfinite(X))), model.n_atoms))
    if solvent not in _FORCEFIELDS:
        raise NmaemError("solvent must be one of %s (got %r)" % (", ".join(_FORCEFIELDS), solvent))
    if unknown not in ("refuse", "fix"):
        raise ValueError("unknown must be 'refuse' or 'fix'")
    t0 = time.time()
    bad, msg = check_refinable(model, src)
    if msg:
        raise NmaemError(msg)
    skip = set()
    if bad:
        if unknown == "refuse":
            raise NmaemError(
                "%s: cannot refine: the force field does not know %d residue(s): %s; "
                "export with --no-refine (or hold them fixed)"
                % (src, len(bad), ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")))
        skip = {a for a, b in _residue_slices(model) if _label(model, a) in bad}
        say("refine: %d residue(s) unknown to the force field are held at their positions: %s"
            % (len(bad), ", ".join(bad[:5])))

    ff_files = _FORCEFIELDS[solvent]
    ff = app.ForceField(*ff_files)
    modeller, keys = _build(model, X, skip)
    try:   # the hydrogens' own short minimisation runs in vacuum (fast)
        modeller.addHydrogens(app.ForceField(ff_files[0]), pH=DEFAULTS["ph"])
    except Exception as exc:
        raise NmaemError("%s: cannot refine: adding hydrogens failed (%s); export with "
                         "--no-refine" % (src, str(exc).splitlines()[0]))
    top = modeller.topology
    unmatched = ff.getUnmatchedResidues(top)
    if unmatched:
        lab = ["%s:%s%s %s" % (r.chain.id, r.id, r.insertionCode.strip(), r.name)
               for r in unmatched]
        raise NmaemError("%s: cannot refine: %d residue(s) do not match the force field's "
                         "templates (missing or extra atoms), e.g. %s; export with --no-refine"
                         % (src, len(lab), ", ".join(lab[:3])))
    n_all = top.getNumAtoms()
    method = app.CutoffNonPeriodic if cutoff_nm else app.NoCutoff
    kw = dict(nonbondedCutoff=cutoff_nm * unit.nanometer) if cutoff_nm else {}
    system = ff.createSystem(top, nonbondedMethod=method, constraints=None, **kw)

    rows = np.full(n_all, -1, dtype=np.int64)     # reference row of each OpenMM atom
    for at in top.atoms():
        rows[at.index] = keys.get((at.residue.chain.index, at.residue.id,
                                   at.residue.insertionCode, at.name), -1)
    if ideal == "reference":
        _reference_ideals(system, rows, model.coords, *covalent_scale)
    is_h = np.array([at.element is not None and at.element.symbol == "H" for at in top.atoms()])
    force = mm.CustomExternalForce("0.5*k*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    force.addGlobalParameter("k", restraint * _KCAL_A2_TO_KJ_NM2)
    for p in ("x0", "y0", "z0"):
        force.addPerParticleParameter(p)
    for i in np.nonzero(~is_h)[0]:
        # restrained to the given model; atoms added here (OXT) to where they were placed
        xyz = X[rows[i]] / 10.0 if rows[i] >= 0 else np.array(
            modeller.positions[int(i)].value_in_unit(unit.nanometer))
        force.addParticle(int(i), [float(v) for v in xyz])
    system.addForce(force)
    # force groups: 0 = force field, 1 = restraint
    for f in system.getForces():
        f.setForceGroup(0)
    force.setForceGroup(1)

    plat = choose_platform(platform)
    integrator = mm.VerletIntegrator(0.001)
    context = mm.Context(system, integrator, plat)
    context.setPositions(modeller.positions)
    e0 = context.getState(getEnergy=True, groups={0}).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)
    say("refine: %d atoms (%d with hydrogens), %s platform, restraint %g kcal/mol/A^2, "
        "initial energy %.4g kJ/mol" % (model.n_atoms - len(skip), n_all, plat.getName(),
                                         restraint, e0))

    class _Reporter(mm.MinimizationReporter):
        iterations = 0
        last = time.time()

        def report(self, iteration, x, grad, args):
            self.iterations = iteration + 1
            now = time.time()
            if now - self.last >= progress_every:
                self.last = now
                say("refine: iteration %d, minimiser energy %.6g kJ/mol, %.0f s"
                    % (iteration, (args["system energy"] if "system energy" in args else float("nan")), now - t0))
            return False

    rep = _Reporter()
    mm.LocalEnergyMinimizer.minimize(context, tolerance, max_iterations, rep)
    st = context.getState(getEnergy=True, getPositions=True, getForces=True, groups={0, 1})
    e_ff = context.getState(getEnergy=True, groups={0}).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)
    e_rest = context.getState(getEnergy=True, groups={1}).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)
    Y = np.array(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)) * 10.0
    F = np.array(st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    rms_force = float(np.sqrt(np.mean(F ** 2)))
    info = dict(refined=True, forcefield=_FF_NAMES[solvent], cutoff_nm=float(cutoff_nm),
                restraint_kcal_mol_A2=float(restraint), ideal_geometry=ideal, tolerance_kj_mol_nm=float(tolerance),
                max_iterations=int(max_iterations), iterations=int(rep.iterations),
                energy_initial=float(e0), energy_final=float(e_ff),
                restraint_energy=float(e_rest), rms_force=rms_force,
                # converged: RMS force at the tolerance; L-BFGS may also stop earlier when its
                # line search fails (the 1 nm cutoff makes the energy slightly discontinuous)
                converged=bool(rms_force <= tolerance * 1.0001),
                stopped_by="max_iterations" if rep.iterations >= max_iterations
                else "minimizer",
                platform=plat.getName(), n_atoms_with_hydrogens=int(n_all),
                held_fixed=list(bad) if skip else [], seconds=None, message="")
    del context, integrator
    ok = bool(np.all(np.isfinite(Y)) and math.isfinite(e_ff)
              and rms_force <= _NOT_CONVERGED_FACTOR * tolerance)
    out = X.copy()
    hyd = [] if hydrogens else None
    if ok:
        m = rows >= 0
        out[rows[m]] = Y[m]
        if hydrogens:
            for at in top.atoms():
                if is_h[at.index]:
                    parent = [a for a in at.residue.atoms() if rows[a.index] >= 0]
                    if parent:
                        hyd.append((int(rows[parent[0].index]), at.name,
                                    tuple(float(v) for v in Y[at.index])))
    else:
        info["refined"] = False
        info["message"] = ("minimisation did not converge (RMS force %.3g kJ/mol/nm after %d "
                           "iterations, energy %.4g kJ/mol): the plain model is kept"
                           % (rms_force, rep.iterations, e_ff))
        say("refine: %s: %s" % (src, info["message"]))
    info["seconds"] = round(time.time() - t0, 3)
    say("refine: done in %.1f s, %d iterations, energy %.6g kJ/mol, RMS force %.3g kJ/mol/nm"
        % (info["seconds"], rep.iterations, e_ff, rms_force))
    return RefinementResult(out, ok, info, hyd)


def refine_models(models: Sequence[Union[np.ndarray, str]], reference: Union[AtomicModel, str],
                  true_model: Union[AtomicModel, str, None] = None, hydrogens: bool = False,
                  validate: bool = True, log: Optional[Callable[[str], object]] = None,
                  **kw) -> list[tuple[RefinementResult, dict]]:
    """Refine several models of one reference and validate them.

    ``models``: (M, 3) coordinate arrays in the reference's atom order, or paths of model
    files (matched to the reference by chain, residue number, icode and atom name; every
    reference atom must be present); ``reference``: an :class:`AtomicModel` or a path;
    ``true_model``: optional :class:`AtomicModel` or path, for RMSD to the truth (its atoms
    matched the same way). ``kw`` goes to :func:`refine_coords`. Returns a list of
    (RefinementResult, dict) where the dict is ``{"refinement": info, "validation": ...}``
    for ``models.json`` (validation has the plain model's figures under ``plain``).
    """
    from ..physics.structure import read_model, match_atoms
    from .validation import reference_geometry, validate as _validate
    ref = reference if hasattr(reference, "coords") else read_model(str(reference))
    geom = reference_geometry(ref) if validate else None
    true = None
    if true_model is not None:
        tm = true_model if hasattr(true_model, "coords") else read_model(str(true_model))
        ia, ib = match_atoms(ref, tm)
        if len(ia) != ref.n_atoms:
            raise NmaemError("%s: has %d of the reference's %d atoms; RMSD to the truth needs "
                             "them all" % (tm.source, len(ia), ref.n_atoms))
        true = np.empty_like(ref.coords)
        true[ia] = tm.coords[ib]
    out = []
    for k, m in enumerate(models):
        src = None
        if isinstance(m, (str, bytes)) or hasattr(m, "__fspath__"):
            src = str(m)
            mm_ = read_model(src)
            ia, ib = match_atoms(ref, mm_, ref.source, src)
            if len(ia) != ref.n_atoms:
                raise NmaemError("%s: has %d of the reference's %d atoms"
                                 % (src, len(ia), ref.n_atoms))
            X = np.empty_like(ref.coords)
            X[ia] = mm_.coords[ib]
        else:
            X = np.asarray(m, dtype=np.float64)
        if log:
            log("refine: model %d of %d" % (k + 1, len(models)))
        r = refine_coords(ref, X, hydrogens=hydrogens, source=src, log=log, **kw)
        entry = {"refinement": r.info}
        if geom is not None:
            entry["validation"] = _validate(r.coords, geom, plain=X, true=true)
        out.append((r, entry))
    return out
