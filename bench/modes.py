"""Benchmark of ``nmaem modes`` (not a test): time and peak memory.

Cases: the bundled adenylate kinase (1656 atoms, 214 CA nodes, dense solver) and synthetic
models made of copies of it on a cubic grid (35 A apart, so that neighbouring copies touch
and the network is connected), with a CG selection of evenly spaced CA atoms, one node per
20 atoms (5,000 nodes for 100,000 atoms, sparse solver). Each case runs in its own process
so that its peak resident memory (ru_maxrss) is its own.

The lattices (``--lattices``, A): 90 copies of adenylate kinase (``structure.tile_model``,
149,040 atoms, 19,260 CA nodes) written as mmCIF, and the command itself, ``nmaem modes
lattice.cif --threads N``, timed ``--repeats`` times as a child process (wall time, its peak
resident memory); 36 A packs the copies so that they all touch (a compact complex), 40 A is
the lattice of issue 15. ``--code DIR`` runs the command of another checkout (PYTHONPATH=DIR),
for a before/after comparison on the same machine.

    KEOPS_CACHE_FOLDER=.keops_cache python bench/modes.py [--sizes 25000 50000 100000]
    python bench/modes.py --sizes --lattices 36 40 --repeats 3 --threads 1
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
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


def run_lattice(spacing, copies, repeats, threads, code, n_modes):
    """Write the lattice as mmCIF and time ``nmaem modes`` on it ``repeats`` times (child
    processes; this process waits for nothing else, so RUSAGE_CHILDREN's peak is theirs)."""
    from nmaem_plugin import DATA_DIR
    from nmaem_plugin.core.physics.structure import read_model, tile_model, write_models
    tmp = tempfile.mkdtemp(prefix="bench_modes_")
    cif = os.path.join(tmp, "ak%d_%g.cif" % (copies, spacing))
    model, _ = tile_model(read_model(os.path.join(DATA_DIR, "ak_open_4ake.pdb")), copies,
                          spacing=spacing)
    write_models(cif, model, [model.coords])
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.path.abspath(code)
    cmd = [sys.executable, "-m", "nmaem_plugin", "modes", cif, "-o",
           os.path.join(tmp, "modes.npz"), "--n-modes", str(n_modes), "--force"]
    if threads:
        cmd += ["--threads", str(threads)]
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)        # an older checkout has no --threads: see below
    times, eig, lines = [], [], []
    for _ in range(repeats):
        t0 = time.time()
        p = subprocess.run(cmd if not code else _without_threads(cmd, code), env=env,
                           capture_output=True, text=True, cwd=tmp)   # not a checkout's root
        times.append(time.time() - t0)
        if p.returncode != 0:
            raise SystemExit("nmaem modes failed: %s" % p.stderr.strip()[-500:])
        lines = p.stdout.splitlines()
        solver = [l for l in lines if l.startswith("eigensolver:")][0]
        eig.append(float(solver.rsplit(",", 1)[1].strip().rstrip("s").strip()))
    nodes = [l for l in lines if l.startswith("coarse graining:")][0].split(",")[1].split()[0]
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return {"case": "lattice %g A" % spacing, "atoms": int(model.n_atoms), "nodes": int(nodes),
            "solver": solver.split("(", 1)[1].split(";")[0],
            "total_min_s": round(min(times), 1), "total_median_s": round(statistics.median(times), 1),
            "eig_min_s": round(min(eig), 1), "eig_median_s": round(statistics.median(eig), 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "threads_line": lines[0] if lines and lines[0].startswith("threads:") else "",
            "loadavg": open("/proc/loadavg").read().split()[:3]}


def _without_threads(cmd, code):
    """The command for an older checkout that has no --threads option (the environment
    variables set the threads then)."""
    if os.path.exists(os.path.join(code, "nmaem_plugin", "core", "base", "threads.py")):
        return cmd
    return [c for i, c in enumerate(cmd) if c != "--threads" and (i == 0 or cmd[i - 1] != "--threads")]


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
    ap.add_argument("--lattices", type=float, nargs="*", default=[36.0, 40.0],
                    help="spacings (A) of the 90-copy lattices timed through the command")
    ap.add_argument("--copies", type=int, default=90, help="copies in a lattice (90)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per lattice (3)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of the lattice runs (1; 0: the command's own rule)")
    ap.add_argument("--code", default=None, metavar="DIR",
                    help="run the lattices with the nmaem of another checkout")
    ap.add_argument("--n-modes", type=int, default=16)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--lattice", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.n_modes)))
        return
    if args.lattice:
        print(json.dumps(run_lattice(args.lattice, args.copies, args.repeats, args.threads,
                                     args.code, args.n_modes)))
        return
    os.environ.setdefault("KEOPS_CACHE_FOLDER", os.path.join(HERE, "..", ".keops_cache"))
    print("machine: %s; torch threads: default" % machine())
    cases = (["bundled"] + [str(s) for s in args.sizes]) if args.sizes or not args.lattices \
        else []
    if cases:
        print("%-8s %7s %6s %7s %8s %8s %8s %8s %10s %9s" % (
            "case", "atoms", "nodes", "solver", "total_s", "hess_s", "eig_s", "interp_s",
            "peak_MiB", "|UtU-I|"))
    for case in cases:
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
    if args.lattices:
        print("\n`nmaem modes` on %d copies, %d runs each (%s threads), load average before: %s"
              % (args.copies, args.repeats, args.threads or "the rule's",
                 " ".join(open("/proc/loadavg").read().split()[:3])))
        print("%-14s %7s %6s %-60s %14s %14s %9s %s" % (
            "case", "atoms", "nodes", "eigensolver", "total min/med", "eig min/med",
            "peak_MiB", "load after"))
    for spacing in args.lattices:
        cmd = [sys.executable, __file__, "--lattice", str(spacing), "--copies",
               str(args.copies), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--n-modes", str(args.n_modes)] + (["--code", args.code] if args.code else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        if p.returncode != 0 or not lines:
            print("lattice %g failed: %s" % (spacing, (p.stderr.strip().splitlines() or ["?"])[-1]))
            continue
        r = json.loads(lines[-1])
        print("%-14s %7d %6d %-60s %6.1f/%6.1f %6.1f/%6.1f %9d %s" % (
            r["case"], r["atoms"], r["nodes"], r["solver"][:60], r["total_min_s"],
            r["total_median_s"], r["eig_min_s"], r["eig_median_s"], r["peak_rss_mib"],
            " ".join(r["loadavg"])), flush=True)
        if r["threads_line"]:
            print("    " + r["threads_line"])


if __name__ == "__main__":
    main()
