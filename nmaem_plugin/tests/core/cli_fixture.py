"""What the command-line tests share: running ``nmaem`` in a child process, file md5s,
and building a fixture from a list of ``nmaem`` steps."""
import hashlib
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
