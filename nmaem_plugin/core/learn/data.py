"""Particle images and metadata for the network: the dataset, its loader, per-epoch order.

Images are read through :class:`stacks.ImageStack` one batch at a time, checked (a
non-finite pixel is a one-line error naming the particle file and the image) and
downsampled by Fourier cropping to ``box`` (pixel size apix0 * box0 / box).
"""
from typing import TYPE_CHECKING, Iterable, Sequence, Tuple, Union

import numpy as np
import torch

from ..base.errors import fail
from ..physics.ctf import CTFParams

if TYPE_CHECKING:
    from ..io.table import ParticleTable

__all__ = ["ParticleImages", "make_loader", "ParticleMetadata", "epoch_order"]


class ParticleImages(torch.utils.data.Dataset):
    """Images of a particle table, one *batch* per item: ``ds[rows] -> (rows, images)``.

    ``rows`` is an integer array; images (n, box, box) float32 are read (``ImageStack``)
    and Fourier-cropped to ``box``. The stack is opened lazily in each process, so the
    dataset can be sent to DataLoader workers.
    """

    def __init__(self, table: "ParticleTable", box: int):
        self.table = table
        self.box = int(box)
        self._stack = None

    def __len__(self):
        return self.table.n

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_stack"] = None
        return state

    def __getitem__(self, rows):
        from ..physics.fourier import fourier_crop
        from ..io.stacks import ImageStack
        if self._stack is None:
            self._stack = ImageStack(self.table, check=False)
        rows = np.asarray(rows, dtype=np.int64)
        raw = self._stack.read(rows)
        if not np.all(np.isfinite(raw)):       # name the image, not a symptom downstream
            bad = np.flatnonzero(~np.all(np.isfinite(raw.reshape(len(rows), -1)), axis=1))
            k = int(bad[0])
            row = int(rows[k])
            t = self.table
            fail(t.path, "image of particle %d (%d@%s) holds non-finite pixels (NaN or inf)%s"
                 % (row + 1, int(t.stack_index[row]) + 1, t.stack_paths[row],
                    "; %d of the %d images read with it too" % (len(bad) - 1, len(rows))
                    if len(bad) > 1 else ""))
        images = torch.from_numpy(raw)
        if images.shape[-1] != self.box:
            images = fourier_crop(images, self.box).contiguous()
        return torch.from_numpy(rows), images


def make_loader(dataset: ParticleImages, batches: Iterable[Sequence[int]], num_workers: int,
                pin: bool) -> torch.utils.data.DataLoader:
    """A DataLoader over ``batches`` (lists of rows) of ``dataset``, one batch per item;
    a one-line error for a number of workers no machine should start
    (``choices.workers_problem``: every caller meets it, a run's stored setting too)."""
    from ..base.choices import workers_problem
    from ..base.errors import NmaemError
    if workers_problem(num_workers):
        raise NmaemError(workers_problem(num_workers))
    return torch.utils.data.DataLoader(dataset, sampler=batches, batch_size=None,
                                       num_workers=int(num_workers), pin_memory=pin)


class ParticleMetadata:
    """Per-particle poses, base shifts (-origin) and CTF parameters as device tensors."""

    def __init__(self, table: "ParticleTable", device: Union[str, torch.device]):
        def t(a):
            return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)
        self.rotations = t(table.rotation_matrices())
        self.base_shift = t(-table.origin_or_zero())
        self.ctf = CTFParams.from_table(table, device, torch.float32)
        self.optics_group = torch.as_tensor(np.asarray(table.optics_group, dtype=np.int64),
                                            device=device)

    def batch(self, rows: Union[np.ndarray, torch.Tensor, slice]
              ) -> Tuple[torch.Tensor, torch.Tensor, CTFParams]:
        """Rotations (B, 3, 3), base shifts (B, 2) and the CTF parameters of ``rows``."""
        return self.rotations[rows], self.base_shift[rows], self.ctf[rows]


def epoch_order(rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The training rows in the order of 0-based ``epoch``: a permutation seeded with
    (seed, epoch), so that a resumed run sees the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(int(seed) * 1000003 + int(epoch))
    return rows[torch.randperm(len(rows), generator=g).numpy()]
