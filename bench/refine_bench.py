"""Time and peak memory of geometry refinement (core/analysis/refine.py) on adenylate kinase and on
copies of it tiled in space (chains renamed), at the open -> closed normal-mode amplitudes.

    python bench/refine_bench.py --copies 1            # 1,656 heavy atoms
    python bench/refine_bench.py --copies 30 --max-iterations 100   # 49,680 heavy atoms

Prints one JSON line: atoms, seconds, iterations, peak resident memory (MB), validation.
"""
import argparse
import json
import resource
import time

import numpy as np

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.physics.structure import read_model, superpose, tile_model
from nmaem_plugin.core.modes.compute import compute_modes
from nmaem_plugin.core.analysis.refine import refine_coords
from nmaem_plugin.core.analysis.validation import reference_geometry, validate


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
    model, shifts = tile_model(ref, a.copies) if a.copies > 1 else (ref, [np.zeros(3)])
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
