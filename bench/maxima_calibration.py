"""How often does ``density_maxima`` find the right number of maxima?

Random samples with a known number of modes (150 draws per case): unimodal samples should
give one maximum, trimodal ones three. Counts are printed for the default settings and
for variants (no significance test, other prominence), so that docs/analysis.md can state
what the defaults do.

    python bench/maxima_calibration.py [--draws 150]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nmaem_plugin.core.analysis.kde import density_maxima  # noqa: E402
from nmaem_plugin.core.sim.simulate import sample_frames  # noqa: E402

UNIMODAL = {
    "normal n=200": lambda r: r.normal(0, 1, 200),
    "normal n=1000": lambda r: r.normal(0, 1, 1000),
    "normal n=20000": lambda r: r.normal(0, 1, 20000),
    "gamma(4) n=500": lambda r: r.gamma(4.0, 1.0, 500),
    "gamma(2) n=5000": lambda r: r.gamma(2.0, 1.0, 5000),
    "t5 n=1000": lambda r: r.standard_t(5, 1000),
    "uniform n=3000": lambda r: r.uniform(0, 10, 3000),
}


def _mix(r, means, sds, weights, n):
    k = r.choice(len(means), size=n, p=weights)
    return np.asarray(means)[k] + np.asarray(sds)[k] * r.normal(size=n)


TRIMODAL = {
    # the simulator's frame distributions (50 frames), each particle's frame + N(0, 1.5)
    "discontinuous frames n=3000": lambda r: sample_frames(3000, 50, "discontinuous", r)
    + r.normal(0, 1.5, 3000),
    "continuous frames n=3000": lambda r: sample_frames(3000, 50, "continuous", r)
    + r.normal(0, 1.5, 3000),
    "populations 60/30/10 % n=3000": lambda r: _mix(r, [0, 5, 10], [1, 1, 1],
                                                     [0.6, 0.3, 0.1], 3000),
    "gaps 4 and 8 sd n=3000": lambda r: _mix(r, [0, 4, 12], [1, 1, 1], [1 / 3] * 3, 3000),
}

SETTINGS = {
    "defaults (isj, height 0.1, prominence 0.1, significance 3)": {},
    "no significance test": dict(min_significance=0.0),
    "significance 2": dict(min_significance=2.0),
    "prominence 0.15, no significance test": dict(min_prominence=0.15, min_significance=0.0),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=150)
    args = ap.parse_args(argv)
    cases = [(name, f, 1) for name, f in UNIMODAL.items()] + \
        [(name, f, 3) for name, f in TRIMODAL.items()]
    print("| case | modes | " + " | ".join(SETTINGS) + " |")
    print("|---|---|" + "---|" * len(SETTINGS))
    totals = {s: [0, 0, 0, 0] for s in SETTINGS}      # right uni, n uni, right tri, n tri
    for name, f, modes in cases:
        right = dict.fromkeys(SETTINGS, 0)
        for draw in range(args.draws):
            x = f(np.random.default_rng(1000 * draw + 17))
            for s, kw in SETTINGS.items():
                right[s] += len(density_maxima(x, **kw)) == modes
        for s in SETTINGS:
            t = totals[s]
            t[0 if modes == 1 else 2] += right[s]
            t[1 if modes == 1 else 3] += args.draws
        print("| %s | %d | %s |" % (name, modes, " | ".join(
            "%d/%d" % (right[s], args.draws) for s in SETTINGS)), flush=True)
    print("| **all unimodal** | 1 | %s |" % " | ".join("%d/%d" % tuple(totals[s][:2])
                                                     for s in SETTINGS))
    print("| **all trimodal** | 3 | %s |" % " | ".join("%d/%d" % tuple(totals[s][2:])
                                                     for s in SETTINGS))


if __name__ == "__main__":
    main()
