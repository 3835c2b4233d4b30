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


def run_main(*args, env=None):
    """``nmaem ARGS`` in this process (``cli.main.main``): (exit status, stdout, stderr).
    ``env``: environment variables set for the call (``NMAEM_FAULT``...). An exception
    that main lets through (a traceback for the user) propagates to the test."""
    import contextlib
    import io
    from nmaem_plugin.core.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue(), err.getvalue()


def error_line(err):
    """The ``nmaem: error:`` lines of a stderr text."""
    return [ln for ln in err.splitlines() if ln.startswith("nmaem: error: ")]
