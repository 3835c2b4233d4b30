"""Benchmark of ``nmaem modes`` (not a test): time and peak memory.

Cases: the bundled adenylate kinase (1656 atoms, 214 CA nodes, dense solver) and synthetic
models made of copies of it on a cubic grid (35 A apart, so that neighbouring copies touch
and the network is connected), with a CG selection of evenly spaced CA atoms, one node per
20 atoms (5,000 nodes for 100,000 atoms, sparse solver). Each case runs in its own process
so that its peak resident memory (ru_maxrss) is its own.

    KEOPS_CACHE_FOLDER=.keops_cache python bench/modes.py [--sizes 25000 50000 100000]
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NODES_PER_ATOM = 0.05


def synthetic_model(n_atoms, spacing=35.0):
    """Copies of the bundled open AK on a grid, cut to ``n_atoms``; CG: evenly spaced CA."""
    from nmaem_plugin import DATA_DIR
    from nmaem_plugin.core.physics.structure import AtomicModel, read_model
    base = read_model(os.path.join(DATA_DIR, "ak_open_4ake.pdb"))
    copies = -(-n_atoms // base.n_atoms)
    side = int(np.ceil(copies ** (1 / 3)))
    offsets = np.array([(i, j, k) for i in range(side) for j in range(side)
                        for k in range(side)][:copies], dtype=float) * spacing
    x0 = base.coords - base.coords.mean(0)
    rep = lambda a: np.concatenate([a] * copies)[:n_atoms]
    coords = np.concatenate([x0 + o for o in offsets])[:n_atoms]
    chain = np.concatenate([np.array(["C%d" % c] * base.n_atoms) for c in range(copies)])
    model = AtomicModel(coords=coords, elements=rep(base.elements), chain=chain[:n_atoms],
                        resnum=rep(base.resnum), icode=rep(base.icode),
                        resname=rep(base.resname), atom_name=rep(base.atom_name),
                        b_factor=rep(base.b_factor), occupancy=rep(base.occupancy),
                        source="synthetic-%d" % n_atoms)
    ca = np.nonzero(model.atom_name == "CA")[0]
    n_nodes = int(round(NODES_PER_ATOM * n_atoms))
    cg = ca[np.unique(np.linspace(0, len(ca) - 1, n_nodes).round().astype(int))]
    return model, cg


def run_one(case, n_modes):
    from nmaem_plugin import DATA_DIR
    from nmaem_plugin.core.modes.compute import compute_modes
    from nmaem_plugin.core.physics.structure import read_model
    t0 = time.time()
    if case == "bundled":
        model = read_model(os.path.join(DATA_DIR, "ak_open_4ake.pdb"))
        cg = None
    else:
        model, cg = synthetic_model(int(case))
    t_build = time.time() - t0
    t0 = time.time()
    nm = compute_modes(model, n_modes=n_modes, cg_index=cg)
    t = time.time() - t0
    U = nm.modes.reshape(nm.n_modes, -1).astype(np.float64)
    return {"case": case, "atoms": int(model.n_atoms), "nodes": int(nm.info["n_cg"]),
            "solver": nm.info["solver"], "time_s": round(t, 2),
            "hessian_s": round(nm.info["time_hessian_s"], 2),
            "solve_s": round(nm.info["time_solve_s"], 2),
            "interp_s": round(nm.info["time_interpolation_s"], 2),
            "model_build_s": round(t_build, 2),
            "orthonormality": float(np.abs(U @ U.T - np.eye(nm.n_modes)).max()),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def machine():
    name = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "%s, %d cores visible" % (name, os.cpu_count())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[25000, 50000, 100000],
                    help="synthetic model sizes in atoms")
    ap.add_argument("--n-modes", type=int, default=16)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.n_modes)))
        return
    os.environ.setdefault("KEOPS_CACHE_FOLDER", os.path.join(HERE, "..", ".keops_cache"))
    print("machine: %s; torch threads: default" % machine())
    print("%-8s %7s %6s %7s %8s %8s %8s %8s %10s %9s" % (
        "case", "atoms", "nodes", "solver", "total_s", "hess_s", "eig_s", "interp_s",
        "peak_MiB", "|UtU-I|"))
    for case in ["bundled"] + [str(s) for s in args.sizes]:
        # a warm-up run of the bundled case compiles the KeOps kernels outside the timing
        if case == "bundled":
            subprocess.run([sys.executable, __file__, "--one", case, "--n-modes",
                            str(args.n_modes)], capture_output=True, text=True)
        p = subprocess.run([sys.executable, __file__, "--one", case, "--n-modes",
                            str(args.n_modes)], capture_output=True, text=True)
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        if p.returncode != 0 or not lines:
            print("%-8s failed: %s" % (case, (p.stderr.strip().splitlines() or ["?"])[-1]))
            continue
        r = json.loads(lines[-1])
        print("%-8s %7d %6d %7s %8.1f %8.1f %8.1f %8.1f %10.0f %9.1e" % (
            case, r["atoms"], r["nodes"], r["solver"], r["time_s"], r["hessian_s"],
            r["solve_s"], r["interp_s"], r["peak_rss_mib"], r["orthonormality"]), flush=True)


if __name__ == "__main__":
    main()
