"""What the command-line tests share: running ``nmaem`` in a child process, file md5s,
and building a fixture from a list of ``nmaem`` steps."""
import hashlib
import os
import subprocess
import sys

NMAEM = [sys.executable, "-m", "nmaem_plugin"]


def nmaem(*args, timeout=600):
    """Run ``nmaem ARGS`` (a child process); the CompletedProcess, text output."""
    return subprocess.run(NMAEM + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout)


def md5(path):
    with open(path, "rb") as fh:
        return hashlib.md5(fh.read()).hexdigest()


def run_steps(steps):
    """Run each ``nmaem`` argument tuple of ``steps``; RuntimeError at the first failure."""
    for args in steps:
        p = nmaem(*args)
        if p.returncode != 0:
            raise RuntimeError("nmaem %s failed: %s" % (args[0], p.stderr))


def tiny_chain(tmp, train_args):
    """simulate (12 clean particles, 32 px) -> modes (2) -> train (``train_args``) -> infer
    in the folder ``tmp``; {name: path} of tmp, sim, star, ref, modes, run and latent."""
    from nmaem_plugin import DATA_DIR
    F = dict(tmp=tmp, sim=os.path.join(tmp, "sim"), modes=os.path.join(tmp, "modes.npz"),
             run=os.path.join(tmp, "run"), latent=os.path.join(tmp, "latent.npz"))
    F["star"] = os.path.join(F["sim"], "particles.star")
    F["ref"] = os.path.join(F["sim"], "reference.pdb")
    run_steps([("simulate", "--ref", os.path.join(DATA_DIR, "ak_open_4ake.pdb"), "--target",
                os.path.join(DATA_DIR, "ak_closed_1ake.pdb"), "--frames", "3", "--n", "12",
                "--box", "32", "--apix", "3", "--no-noise", "--device", "cpu", "-o", F["sim"]),
               ("modes", F["ref"], "--n-modes", "2", "--device", "cpu", "-o", F["modes"]),
               ("train", "--particles", F["star"], "--ref", F["ref"], "--modes", F["modes"],
                "-o", F["run"]) + tuple(train_args),
               ("infer", "--particles", F["star"], "--model", F["run"], "-o", F["latent"],
                "--device", "cpu")])
    return F
