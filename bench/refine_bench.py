"""Time and peak memory of geometry refinement (core/refine.py) on adenylate kinase and on
copies of it tiled in space (chains renamed), at the open -> closed normal-mode amplitudes.

    python bench/refine_bench.py --copies 1            # 1,656 heavy atoms
    python bench/refine_bench.py --copies 30 --max-iterations 100   # 49,680 heavy atoms

Prints one JSON line: atoms, seconds, iterations, peak resident memory (MB), validation.
"""
import argparse
import json
import resource
import string
import time

import numpy as np

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.structure import read_model, superpose, AtomicModel
from nmaem_plugin.core.modes import compute_modes
from nmaem_plugin.core.refine import refine_coords
from nmaem_plugin.core.validation import reference_geometry, validate


def tiled(model, copies, spacing=80.0):
    st = model._structure.clone()
    base = st[0][0].clone()
    names = string.ascii_uppercase + string.ascii_lowercase + string.digits
    n = int(np.ceil(copies ** (1 / 3)))
    shifts = []
    for k in range(1, copies):
        s = spacing * np.array([k % n, (k // n) % n, k // (n * n)], dtype=float)
        ch = base.clone()
        ch.name = names[k]
        for res in ch:
            for at in res:
                at.pos = at.pos + __import__("gemmi").Position(*s)
        st[0].add_chain(ch)
        shifts.append(s)
    from nmaem_plugin.core.structure import _arrays_from_structure
    X, el, rows = _arrays_from_structure(st, "tiled")
    return AtomicModel(X, el, np.array([r[4] for r in rows]), np.array([r[5] for r in rows]),
                       np.array([r[6] for r in rows]), np.array([r[7] for r in rows]),
                       np.array([r[8] for r in rows]), np.array([r[9] for r in rows]),
                       np.array([r[10] for r in rows]), "tiled", st), [np.zeros(3)] + shifts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--max-iterations", type=int, default=2000)
    ap.add_argument("--solvent", default="obc")
    ap.add_argument("--platform", default=None)
    a = ap.parse_args()
    ref = read_model(DATA_DIR + "/ak_open_4ake.pdb")
    closed = read_model(DATA_DIR + "/ak_closed_1ake.pdb")
    nm = compute_modes(ref, 16, device="cpu")
    U = nm.modes.astype(np.float64)
    T = superpose(closed.coords, ref.coords)
    z = np.tensordot(U, T - ref.coords, axes=([1, 2], [0, 1]))
    dX = np.tensordot(z, U, axes=(0, 0))
    model, shifts = tiled(ref, a.copies) if a.copies > 1 else (ref, [np.zeros(3)])
    plain = model.coords + np.tile(dX, (a.copies, 1))
    true = np.concatenate([T + s for s in shifts])
    t = time.time()
    r = refine_coords(model, plain, max_iterations=a.max_iterations, solvent=a.solvent,
                      platform=a.platform, log=print)
    sec = time.time() - t
    v = validate(r.coords, reference_geometry(model), plain=plain,
                 true=true if a.copies == 1 else None)
    v.pop("ramachandran_outlier_residues")
    print(json.dumps(dict(heavy_atoms=model.n_atoms, seconds=round(sec, 1),
                          peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                            / 1024), refinement=r.info, validation=v)))


if __name__ == "__main__":
    main()
