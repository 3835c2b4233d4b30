"""The renderer's memory: the working-memory budget of a device and the chunk sizes (images and
atoms at a time) that keep a batch's rendering, its backward pass and its Jacobian within it."""
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["Chunks", "gemm_chunks", "jvp_chunks", "available_memory", "default_memory_budget",
           "parse_memory_budget", "Device"]

Device = Union[str, torch.device]


GIB = 1024 ** 3
MIN_BUDGET = 64 * 1024 ** 2          # below this the renderer would crawl
MAX_CHUNK_ATOMS = 16384              # more atoms per chunk buys no speed (measured)


def available_memory(device: Device) -> int:
    """Bytes free now on ``device``: MemAvailable of /proc/meminfo on the CPU (the total
    when unreadable), the free memory of a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 * GIB


def default_memory_budget(device: Device) -> int:
    """The renderer's working-memory budget when none is given: a quarter of the available
    RAM on the CPU, half of the free memory of a GPU (the rest is for the encoder, the
    images and the other processes), never less than ``MIN_BUDGET``."""
    device = torch.device(device)
    share = 0.5 if device.type == "cuda" else 0.25
    return max(MIN_BUDGET, int(share * available_memory(device)))


def parse_memory_budget(value: Union[float, str, None]) -> Optional[int]:
    """``--memory-budget`` in GiB (a number; None or "auto": the device's default) -> bytes."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    gib = float(value)
    if not gib > 0:
        raise ValueError("the memory budget must be a positive number of GiB, not %r" % value)
    return max(1, int(gib * GIB))


@dataclass(frozen=True)
class Chunks:
    """How one batch is rendered within a memory budget: images ``batch`` at a time, atoms
    ``atoms`` at a time (per element), ``work`` bytes of working memory at most; ``keep``:
    the whole batch's cos/sin tables are kept for the backward pass (they fit the budget)
    instead of being recomputed chunk by chunk."""
    route: str
    batch: int
    atoms: int
    work: int
    keep: bool = False

    def describe(self) -> str:
        return ("%s route, %d image%s x %d atoms per chunk%s, working memory <= %.2f GiB"
                % (self.route, self.batch, "" if self.batch == 1 else "s", self.atoms,
                   " (tables kept for the backward pass)" if self.keep else "",
                   self.work / GIB))


def gemm_chunks(n_images: int, n_atoms: int, box: int, budget: int, itemsize: int = 4) -> Chunks:
    """Chunk sizes of the matrix-product route for ``n_images`` images of ``box`` px.

    Per atom and image the route holds two cos/sin tables of ``box`` values each (forward)
    and, in the backward pass, the two recomputed tables, their gradient and two half-size
    temporaries: 5 box values in all. Per image it holds the quarter-plane products, their
    gradient and one more product of the same size: 3 box^2 values. When the tables of the
    whole batch fit with room for one more pair (4 box values per atom and image), they are
    computed once and kept (``keep``: no recomputation). Otherwise chunks are the largest
    that fit ``budget`` bytes (at most ``MAX_CHUNK_ATOMS`` atoms; fewer images per chunk when
    each image would get fewer than 256 atoms).
    """
    per_atom = 5 * box * itemsize
    per_image = 3 * box * box * itemsize
    B, M = max(1, int(n_images)), max(1, int(n_atoms))
    whole = B * (per_image + 4 * box * itemsize * M)
    if whole <= budget:
        return Chunks("gemm", B, M, int(whole), keep=True)
    b, m = _chunk_sizes(B, M, per_image, per_atom, budget, MAX_CHUNK_ATOMS)
    return Chunks("gemm", b, m, int(b * (per_image + m * per_atom)))


def _chunk_sizes(B, M, per_image, per_atom, budget, max_atoms):
    """(images, atoms) per chunk: the most atoms (up to ``max_atoms``) that fit ``budget``
    bytes next to ``per_image`` bytes per image, the images halved while each would get
    fewer than 256 atoms; at least one of each."""
    b = B
    while b > 1 and budget - b * per_image < b * per_atom * min(M, 256):
        b = (b + 1) // 2
    m = max(1, min(M, max_atoms, (budget - b * per_image) // (b * per_atom)))
    return int(b), int(m)


JVP_GROUP = 8           # weighted sums per matrix product of Renderer.render_ft_jvp
MAX_JVP_ATOMS = 16384   # atoms per chunk of Renderer.render_ft_jvp
JVP_WORK = 4 * 1024 ** 2    # bytes of one weighted table on a CPU (a larger one is slower)
JVP_WORK_GPU = 256 * 1024 ** 2     # on a GPU: few large products (launches cost, not caches)


def jvp_chunks(n_images: int, n_atoms: int, n_tangents: int, box: int, budget: int,
               itemsize: int = 4, work: int = JVP_WORK) -> Chunks:
    """Chunk sizes of :meth:`Renderer.render_ft_jvp` for ``n_images`` images of ``box`` px
    and ``n_tangents`` (T) tangents, within ``budget`` bytes.

    Per atom and image it holds the two cos/sin tables (2 box values) and the 2T tangent
    weights with their einsum's temporary (4T values). Per image it holds the quarter-plane
    sums of the structure factor and of its 2T weighted versions, one group's product
    (``JVP_GROUP`` = g weights) and the assembly's temporaries (at most 6 box^2):
    (7 + 2T + g) box^2 values. The right table weighted by one group takes at most
    ``work`` bytes more (or one image's). The outputs (F and J, complex) are not
    counted. The largest chunks that fit, as :func:`gemm_chunks` (at most
    ``MAX_JVP_ATOMS`` atoms); the tables are never kept (there is no backward pass).
    """
    T = max(0, int(n_tangents))
    g = min(JVP_GROUP, 2 * T)
    per_atom = (2 * box + 4 * T) * itemsize
    per_image = (7 + 2 * T + g) * box * box * itemsize
    B, M = max(1, int(n_images)), max(1, int(n_atoms))
    b, m = _chunk_sizes(B, M, per_image, per_atom, max(1, budget - work), MAX_JVP_ATOMS)
    return Chunks("gemm", b, m, int(b * (per_image + m * per_atom) + work))
