"""Atomic models: read, select, write, superpose, match; electron form factors.

An :class:`AtomicModel` is a flat list of M atoms (coordinates in Angstrom, in the frame
of the file) with the identifiers that tie each row back to the file:
``chain:resnum:icode:resname:atom`` (``atom_ids``, the key of ``modes.npz``).
Reading and writing go through gemmi, so PDB and mmCIF (and their compressed
forms) both work; writing keeps chain, residue and atom names.
"""
import gzip
from dataclasses import dataclass, field
from typing import Optional, Sequence

import gemmi
import numpy as np

from ..base.atomic import atomic_open
from ..base.errors import NmaemError, fail, require_file

__all__ = ["AtomicModel", "read_model", "read_trajectory", "write_model", "write_models",
           "form_factor_table", "kabsch", "superpose", "rmsd", "match_atoms",
           "atom_id_strings", "arrays_from_structure", "set_positions", "tile_model"]


@dataclass
class AtomicModel:
    """Atoms of one model, in file order after selection."""
    coords: np.ndarray          # (M, 3) float64, Angstrom
    elements: np.ndarray        # (M,) str, e.g. "C", "N", "Se"
    chain: np.ndarray           # (M,) str
    resnum: np.ndarray          # (M,) int
    icode: np.ndarray           # (M,) str ("" when none)
    resname: np.ndarray         # (M,) str
    atom_name: np.ndarray       # (M,) str
    b_factor: np.ndarray        # (M,) float
    occupancy: np.ndarray       # (M,) float
    source: str = ""
    _structure: object = field(default=None, repr=False)  # the selected gemmi.Structure

    @property
    def n_atoms(self) -> int:
        return len(self.coords)

    @property
    def atom_ids(self) -> np.ndarray:
        return atom_id_strings(self.chain, self.resnum, self.icode, self.resname, self.atom_name)

    def select(self, mask: np.ndarray) -> "AtomicModel":
        """A new model with the atoms where ``mask`` (bool array or index array) holds."""
        idx = np.arange(self.n_atoms)[mask]
        st = _select_structure(self._structure, idx)
        return AtomicModel(self.coords[idx].copy(), self.elements[idx], self.chain[idx],
                           self.resnum[idx], self.icode[idx], self.resname[idx],
                           self.atom_name[idx], self.b_factor[idx], self.occupancy[idx],
                           self.source, st)

    def with_coords(self, coords: np.ndarray) -> "AtomicModel":
        """The same atoms at other coordinates (M, 3)."""
        coords = np.asarray(coords, dtype=np.float64)
        if coords.shape != self.coords.shape:
            raise ValueError("coordinates of shape %s for a model of %d atoms"
                             % (coords.shape, self.n_atoms))
        return AtomicModel(coords.copy(), self.elements, self.chain, self.resnum, self.icode,
                           self.resname, self.atom_name, self.b_factor, self.occupancy,
                           self.source, self._structure)


def atom_id_strings(chain: Sequence[str], resnum: Sequence[int], icode: Sequence[str],
                    resname: Sequence[str], atom_name: Sequence[str]) -> np.ndarray:
    return np.array(["%s:%d:%s:%s:%s" % t for t in zip(chain, resnum, icode, resname, atom_name)])


def _check_pdb_numbers(path):
    """gemmi reads 'nan' in PDB coordinate columns as 0: refuse such files instead."""
    if path.lower().endswith((".cif", ".mmcif", ".cif.gz", ".mmcif.gz")):
        return
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", errors="replace") as fh:
            for k, line in enumerate(fh, 1):
                if line.startswith(("ATOM", "HETATM")):
                    field = line[30:54].lower()
                    if "nan" in field or "inf" in field:
                        fail(path, "line %d: non-finite atom coordinates" % k)
    except (OSError, EOFError):
        return  # gemmi reports unreadable files


def _read_structure(path):
    require_file(path, "model file")
    _check_pdb_numbers(path)
    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with its own text
        fail(path, "cannot be read as PDB or mmCIF (%s)" % str(exc).splitlines()[0])
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        fail(path, "the file holds no atoms (no ATOM/HETATM records)")
    return st


def _is_polymer_residue(res):
    info = gemmi.find_tabulated_residue(res.name)
    if info is not None and (info.is_amino_acid() or info.is_nucleic_acid()):
        return True
    return res.entity_type == gemmi.EntityType.Polymer and not res.is_water()


def _filtered_structure(st, path, model, keep_hydrogens, keep_waters, keep_ligands):
    if not (0 <= model < len(st)):
        fail(path, "model %d asked but the file has %d model(s)" % (model, len(st)))
    st = st.clone()
    st.setup_entities()
    for i in range(len(st) - 1, -1, -1):
        if i != model:
            del st[i]
    st.remove_alternative_conformations()  # keeps the first alternative location
    if not keep_hydrogens:
        st.remove_hydrogens()
    mdl = st[0]
    for ch in mdl:
        for ir in range(len(ch) - 1, -1, -1):
            res = ch[ir]
            if res.is_water():
                if not keep_waters:
                    del ch[ir]
            elif not keep_ligands and not _is_polymer_residue(res):
                del ch[ir]
    st.remove_empty_chains()
    return st


def arrays_from_structure(st: gemmi.Structure,
                          path: str) -> tuple[np.ndarray, np.ndarray, list]:
    rows = []
    for ch in st[0]:
        for res in ch:
            for at in res:
                rows.append((at.pos.x, at.pos.y, at.pos.z, at.element, ch.name, res.seqid.num,
                             res.seqid.icode.strip(), res.name, at.name, at.b_iso, at.occ))
    if not rows:
        fail(path, "no atoms left after selection (hydrogens, waters and ligands are "
                   "dropped by default)")
    coords = np.array([r[:3] for r in rows], dtype=np.float64)
    if not np.all(np.isfinite(coords)):
        fail(path, "non-finite atom coordinates")
    unknown = sorted({"%s:%d %s" % (r[4], r[5], r[8]) for r in rows if r[3].atomic_number == 0})
    if unknown:
        fail(path, "%d atom(s) with an unknown element, e.g. %s (fill the element columns 77-78)"
             % (len(unknown), ", ".join(unknown[:3])))
    elements = np.array([r[3].name for r in rows])
    return coords, elements, rows


def read_model(path: str, model: int = 0, keep_hydrogens: bool = False,
               keep_waters: bool = False, keep_ligands: bool = False) -> AtomicModel:
    """Read one model of a PDB/mmCIF file.

    The first model unless ``model`` says otherwise; the first alternative location;
    hydrogens, waters and ligands (non-polymer residues) dropped unless kept on request.
    Raises :class:`NmaemError` (``path: problem``) on a missing, corrupt or empty file
    and on atoms whose element is unknown.
    """
    path = str(path)
    st = _filtered_structure(_read_structure(path), path, model, keep_hydrogens,
                             keep_waters, keep_ligands)
    return _model_of_structure(st, path, path)


def _model_of_structure(st, path, source):
    """The :class:`AtomicModel` of a (selected) gemmi structure."""
    coords, elements, rows = arrays_from_structure(st, path)
    return AtomicModel(
        coords=coords, elements=elements,
        chain=np.array([r[4] for r in rows]), resnum=np.array([r[5] for r in rows], dtype=int),
        icode=np.array([r[6] for r in rows]), resname=np.array([r[7] for r in rows]),
        atom_name=np.array([r[8] for r in rows]),
        b_factor=np.array([r[9] for r in rows], dtype=float),
        occupancy=np.array([r[10] for r in rows], dtype=float),
        source=source, _structure=st)


def tile_model(model: AtomicModel, copies: int,
               spacing: float = 80.0) -> tuple[AtomicModel, np.ndarray]:
    """A model of ``copies`` copies of ``model`` on a cubic lattice of ``spacing`` Angstrom
    (the benchmarks' large complexes), chains renamed (one or two characters: write it as
    mmCIF beyond 62 copies). Returns (AtomicModel, the (copies, 3) translations)."""
    import string
    names = string.ascii_uppercase + string.ascii_lowercase + string.digits
    st = model._structure.clone()
    base = st[0].clone()
    for ch in list(st[0]):
        st[0].remove_chain(ch.name)
    n = int(np.ceil(copies ** (1.0 / 3.0) - 1e-9))
    shifts = np.array([[k % n, (k // n) % n, k // (n * n)] for k in range(int(copies))],
                      dtype=float) * float(spacing)
    for k, s in enumerate(shifts):
        tag = names[k] if k < len(names) else names[k // len(names) - 1] + names[k % len(names)]
        for ch0 in base:
            ch = ch0.clone()
            ch.name = tag if len(base) == 1 else "%s%s" % (tag, ch0.name)
            for res in ch:
                for at in res:
                    at.pos = gemmi.Position(at.pos.x + s[0], at.pos.y + s[1], at.pos.z + s[2])
            st[0].add_chain(ch)
    st.setup_entities()
    return _model_of_structure(st, model.source, "%d copies of %s" % (copies, model.source)), \
        shifts


def read_trajectory(path: str, **kw) -> tuple[AtomicModel, np.ndarray]:
    """Read every model of a multi-model file: (first model, frames (F, M, 3)).

    All models must hold the same atoms in the same order (checked on atom ids).
    """
    path = str(path)
    st = _read_structure(path)
    first = read_model(path, 0, **kw)
    frames = [first.coords]
    for k in range(1, len(st)):
        m = read_model(path, k, **kw)
        if m.n_atoms != first.n_atoms or np.any(m.atom_ids != first.atom_ids):
            fail(path, "model %d does not hold the same atoms as model 0" % (k + 1))
        frames.append(m.coords)
    return first, np.stack(frames)


def _select_structure(st, idx):
    """A copy of the one-model structure ``st`` keeping the atoms at flat indices ``idx``."""
    if st is None:
        return None
    keep = np.zeros(st[0].count_atom_sites(), dtype=bool)
    keep[np.asarray(idx)] = True
    st = st.clone()
    k = 0
    flags = []
    for ch in st[0]:
        for res in ch:
            for at in res:
                flags.append(keep[k])
                k += 1
    k = len(flags)
    for ch in reversed(list(st[0])):
        for res in reversed(list(ch)):
            for ia in range(len(res) - 1, -1, -1):
                k -= 1
                if not flags[k]:
                    del res[ia]
    st.remove_empty_chains()
    for ch in st[0]:
        for ir in range(len(ch) - 1, -1, -1):
            if len(ch[ir]) == 0:
                del ch[ir]
    return st


def set_positions(model_obj: gemmi.Model, coords: np.ndarray) -> None:
    k = 0
    for ch in model_obj:
        for res in ch:
            for at in res:
                at.pos = gemmi.Position(*coords[k])
                k += 1
    if k != len(coords):
        raise ValueError("%d coordinates for %d atoms" % (len(coords), k))


def _write_structure(st, path):
    path = str(path)
    lower = path.lower()
    if not lower.endswith((".cif", ".mmcif", ".pdb", ".ent")):
        raise NmaemError("%s: unknown model format (use .pdb or .cif)" % path)
    # gemmi makes the text; the bytes go through atomic_open (checked, synced)
    if lower.endswith((".cif", ".mmcif")):
        st.setup_entities()
        text = st.make_mmcif_document().as_string()
    else:
        text = st.make_pdb_string()
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_model(path: str, model: AtomicModel, coords: Optional[np.ndarray] = None) -> None:
    """Write ``model`` (optionally at other coordinates) as PDB or mmCIF, by extension."""
    write_models(path, model, [model.coords if coords is None else coords])


def write_models(path: str, model: AtomicModel, coords_list: Sequence[np.ndarray]) -> None:
    """Write several conformations of ``model`` as the models of one PDB/mmCIF file."""
    base = model._structure
    if base is None:
        raise ValueError("model has no structure to write from")
    st = base.clone()
    while len(st) > 0:
        del st[0]
    for k, coords in enumerate(coords_list):
        st.add_model(base[0].clone())
        m = st[len(st) - 1]
        m.num = k + 1
        set_positions(m, np.asarray(coords, dtype=np.float64))
    _write_structure(st, path)


def form_factor_table(elements: Sequence[str]) -> tuple[list, np.ndarray, np.ndarray,
                                                         np.ndarray]:
    """Electron form factors (International Tables C 4.3.2.2, 5 Gaussians) per element.

    Returns ``(names, a, b, index)``: the unique element names (E,), ``a`` and ``b``
    (E, 5) float64 with f_e(s) = sum_k a_k exp(-b_k s^2), s = q/2 = sin(theta)/lambda,
    and ``index`` (M,) mapping each atom to its row.
    """
    names, index = np.unique(np.asarray(elements), return_inverse=True)
    a = np.zeros((len(names), 5))
    b = np.zeros((len(names), 5))
    for i, n in enumerate(names):
        el = gemmi.Element(str(n))
        if el.atomic_number == 0:
            raise NmaemError("unknown element %r: no electron form factor" % str(n))
        a[i] = el.c4322.a
        b[i] = el.c4322.b
    return names, a, b, index


def kabsch(mobile: np.ndarray, target: np.ndarray,
           weights: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rotation R and translation t with R @ mobile_i + t ~ target_i."""
    P = np.asarray(mobile, dtype=np.float64)
    Q = np.asarray(target, dtype=np.float64)
    w = np.ones(len(P)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    pc = w @ P
    qc = w @ Q
    H = (P - pc).T @ ((Q - qc) * w[:, None])
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(Vt.T @ U.T))
    D = np.diag([1.0, 1.0, d])
    R = Vt.T @ D @ U.T
    return R, qc - R @ pc


def superpose(mobile: np.ndarray, target: np.ndarray,
              weights: Optional[np.ndarray] = None) -> np.ndarray:
    """``mobile`` moved onto ``target`` (Kabsch)."""
    R, t = kabsch(mobile, target, weights)
    return np.asarray(mobile, dtype=np.float64) @ R.T + t


def rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square deviation of two (M, 3) arrays, no superposition."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.sqrt((d * d).sum() / len(d)))


def match_atoms(model_a: AtomicModel, model_b: AtomicModel, path_a: Optional[str] = None,
                path_b: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of the atoms the two models share.

    Atoms match by chain, residue number, insertion code and atom name (not residue
    name, so a point mutation still matches its backbone). Raises :class:`NmaemError`
    when the models share no atom.
    """
    def keys(m):
        return ["%s:%d:%s:%s" % t for t in zip(m.chain, m.resnum, m.icode, m.atom_name)]

    kb = {k: i for i, k in enumerate(keys(model_b))}
    ia, ib = [], []
    for i, k in enumerate(keys(model_a)):
        j = kb.get(k)
        if j is not None:
            ia.append(i)
            ib.append(j)
    if not ia:
        raise NmaemError("%s and %s share no atoms (matched by chain, residue number, "
                         "insertion code and atom name)"
                         % (path_a or model_a.source or "model A",
                            path_b or model_b.source or "model B"))
    return np.array(ia), np.array(ib)
