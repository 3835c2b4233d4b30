"""How many threads an ``nmaem`` command uses: one rule for every command.

OpenMP and BLAS threads wait for each other at every barrier, spinning; on a core that another
process holds, a thread runs only when the scheduler lets it, and all its peers spin meanwhile.
Two threads on a two-core machine where another job held one core made ``nmaem modes`` 9x
slower than one thread, and training 6x slower (docs/benchmarks.md). So the rule
(``thread_rule``), in order:

1. ``--threads N`` when given;
2. else ``OMP_NUM_THREADS`` when the environment sets it (the user's or a launcher's choice);
3. else the cores this process may use (``os.sched_getaffinity``, a cgroup CPU quota, never
   more than the physical cores among them: hyper-threads share one core's arithmetic units),
   minus the cores other processes keep busy: their load is the smaller of the 1-minute load
   average and the processes runnable right now (``/proc/loadavg``, this one excluded; the
   smaller, so that a job that has just ended does not count), and a core counts as busy from
   a quarter of a core's load on, because a thread too many costs far more than one too few.

``use_threads`` sets ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS``
(read by OpenMP, KeOps, numpy's and MUMPS's OpenBLAS when they load: the command line applies
the rule before it imports any of them) and torch's intra-op threads when torch is loaded.
``nmaem train --nproc P`` gives each of its P processes threads // P of them.
"""
import math
import os
import sys
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional, Set, Tuple

from .errors import NmaemError

__all__ = ["thread_rule", "choose_threads", "use_threads", "usable_cores",
           "physical_cores", "cgroup_cpu_limit", "other_load", "BUSY_FRACTION",
           "THREAD_VARIABLES"]

# a core counts as taken by other processes from this much of their load on
BUSY_FRACTION = 0.25
# the environment variables that the thread libraries read when they load
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def thread_rule(requested: Optional[int], environment: Optional[str], usable: int,
                physical: Optional[int], load: Optional[float],
                quota: Optional[float] = None) -> Tuple[int, str]:
    """(threads, why) from the inputs of the rule (module docstring): ``requested`` (the
    --threads option or None), ``environment`` (the text of OMP_NUM_THREADS or None),
    ``usable`` (cores in the affinity mask), ``physical`` (physical cores among them, None if
    unknown), ``load`` (runnable processes other than this one, None if unknown), ``quota``
    (cores allowed by a cgroup CPU quota, None if none)."""
    if requested is not None:
        if int(requested) < 1:
            raise NmaemError("--threads must be at least 1, not %d" % int(requested))
        return int(requested), "asked (--threads)"
    if environment is not None and str(environment).strip():
        try:
            n = int(str(environment).strip().split(",")[0])
        except ValueError:
            raise NmaemError("OMP_NUM_THREADS=%r is not a number of threads" % environment)
        if n >= 1:
            return n, "OMP_NUM_THREADS=%d in the environment" % n
    cores = max(1, int(usable))
    what = ["%d core%s usable" % (cores, "" if cores == 1 else "s")]
    if physical is not None and 1 <= physical < cores:
        cores = int(physical)
        what.append("%d physical" % cores)
    if quota is not None and quota > 0 and math.ceil(quota) < cores:
        cores = max(1, int(math.ceil(quota)))
        what.append("CPU quota %.3g" % quota)
    busy = 0
    if load is not None and load > 0:
        busy = max(0, math.ceil(load - BUSY_FRACTION))
        what.append("other processes' load %.2f" % load)
    n = max(1, min(cores, cores - busy))
    return n, ", ".join(what)


def usable_cores() -> Set[int]:
    """The CPUs this process may run on (its affinity mask; all CPUs where there is none)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: Set[int], sysfs: str = "/sys/devices/system/cpu") -> Optional[int]:
    """Distinct physical cores (package, core id) among ``cpus``, read from ``sysfs``; None
    when the topology cannot be read."""
    cores = set()
    for cpu in cpus:
        topo = os.path.join(sysfs, "cpu%d" % cpu, "topology")
        try:
            with open(os.path.join(topo, "physical_package_id")) as fh:
                package = fh.read().strip()
            with open(os.path.join(topo, "core_id")) as fh:
                core = fh.read().strip()
        except OSError:
            return None
        cores.add((package, core))
    return len(cores) or None


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> Optional[float]:
    """Cores allowed by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``); None when there is no quota or it cannot be read."""
    try:
        with open(os.path.join(root, "cpu.max")) as fh:
            quota, period = fh.read().split()[:2]
        return None if quota == "max" else float(quota) / float(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as fh:
            quota = float(fh.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as fh:
            period = float(fh.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def other_load(loadavg: str = "/proc/loadavg", own: int = 1) -> Optional[float]:
    """The load of other processes: min(1-minute load average, runnable now - ``own``), from
    ``loadavg`` (Linux's format: '0.52 0.40 0.31 2/115 4341'); None when it cannot be read."""
    try:
        with open(loadavg) as fh:
            fields = fh.read().split()
        one_minute = float(fields[0])
        running = int(fields[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, min(one_minute, float(running - own)))


def choose_threads(requested: Optional[int] = None,
                   environ: Optional[Mapping[str, str]] = None) -> Tuple[int, str]:
    """``thread_rule`` on this machine: (threads, why)."""
    environ = os.environ if environ is None else environ
    cpus = usable_cores()
    return thread_rule(requested, environ.get("OMP_NUM_THREADS"), len(cpus),
                       physical_cores(cpus), other_load(), cgroup_cpu_limit())


@contextmanager
def use_threads(n: int) -> Iterator[None]:
    """Use ``n`` threads inside the block: the environment variables of ``THREAD_VARIABLES``
    (read by the libraries that load inside it, and by child processes) and torch's intra-op
    threads when torch is loaded; both are put back on exit (a command run in-process, as the
    tests do, leaves its caller as it was)."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    for name in THREAD_VARIABLES:
        os.environ[name] = str(int(n))
    if torch is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(torch_threads or _default_torch_threads())


def _default_torch_threads():
    """torch's own default when it was loaded inside ``use_threads``: the usable physical
    cores."""
    cpus = usable_cores()
    return physical_cores(cpus) or len(cpus)
