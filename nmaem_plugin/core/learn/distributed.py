"""Devices and data-parallel training: device choice, out-of-memory detection, the process
group (DDP through torchrun), the batches of each rank, and the torchrun launcher."""
import math
import os
import subprocess
import sys
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..base.errors import NmaemError, fail
from ..base.threads import THREAD_VARIABLES, usable_cores

__all__ = ["resolve_device", "use_fast_kernels", "is_oom", "ProcessGroup", "rank_batches",
           "launch_distributed"]


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``torch.device`` of a --device value (None, "", "auto": CUDA when present)."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise NmaemError("unknown device %r (cpu, cuda, cuda:N)" % device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NmaemError("--device %s: no CUDA device is available" % device)
    return dev


def use_fast_kernels(device: torch.device, encoder: Optional[torch.nn.Module] = None) -> None:
    """On CUDA: the encoder's tensors in channels-last layout (cuDNN's batch norm and
    convolutions then skip their NCHW kernels and layout conversions: 1.45x faster training
    steps on an H200, docs/benchmarks.md), and cuDNN times its convolution algorithms on the
    first batch of each shape and keeps the fastest (``cudnn.benchmark``; training and
    inference feed the encoder batches of one shape). Results then vary in the last bits
    between runs on a GPU (docs/training.md); nothing changes on the CPU."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if encoder is not None:
        encoder.to(memory_format=torch.channels_last)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA or host)."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or \
            isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg
                                              or "can't allocate memory" in msg
                                              or "Cannot allocate memory" in msg)


def rank_batches(order: np.ndarray, batch: int, rank: int,
                 world: int) -> tuple[list[np.ndarray], int]:
    """This rank's batches of ``order``: padded to a multiple of ``world`` by wrapping, dealt
    round-robin; each rank gets the same number of batches of ``batch // world`` images.
    A last batch of one image is dropped (batch norm needs two)."""
    local = max(1, int(batch) // world)
    n = int(math.ceil(len(order) / world)) * world
    if n > len(order):
        order = np.concatenate([order, order[:n - len(order)]])
    mine = order[rank::world]
    out = [mine[i:i + local] for i in range(0, len(mine), local)]
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out, local


class ProcessGroup:
    """Process group facts: rank, world size, and reductions that are no-ops alone."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1

    def init(self, device: torch.device) -> None:
        if self.active:
            import torch.distributed as dist
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)

    def sum(self, values: Sequence[float], device: torch.device) -> list:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.active:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def launch_distributed(run_dir: str, nproc: int, gpus: Optional[Sequence[int]] = None,
                       log: Callable[[str], object] = print) -> None:
    """Train ``run_dir`` with ``nproc`` processes through torchrun (DDP); blocks.

    ``gpus`` (list of ints) become CUDA_VISIBLE_DEVICES, one process per GPU. Errors of the
    worker processes come back as one NmaemError.
    """
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    # the command's threads (base.threads: the rule sets OMP_NUM_THREADS) shared out
    total = int(env.get("OMP_NUM_THREADS") or len(usable_cores()))
    for name in THREAD_VARIABLES:
        env[name] = str(max(1, total // int(nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(int(nproc)), "-m", "nmaem_plugin", "train",
           "-o", os.path.abspath(run_dir), "--worker"]
    log("train: launching %d processes: %s" % (nproc, " ".join(cmd)))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    error = None
    try:
        for line in proc.stderr:
            if line.startswith("nmaem: error: "):
                error = error or line[len("nmaem: error: "):].strip()
                continue
            if error is None:
                sys.stderr.write(line)
                sys.stderr.flush()
        rc = proc.wait()
    except BaseException:      # interrupted (Ctrl-C, SIGTERM): stop the workers first,
        proc.terminate()       # so that nothing writes the run after its lock is released
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if error:
        raise NmaemError(error)
    if rc != 0:
        fail(run_dir, "training processes failed (exit status %d); see the messages above"
             % rc)
