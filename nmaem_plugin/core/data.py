"""Particle images and metadata for the network: the dataset, its loader, per-epoch order.

Images are read through :class:`stacks.ImageStack` one batch at a time and
downsampled by Fourier cropping to ``box`` (pixel size apix0 * box0 / box).
"""
import numpy as np
import torch

__all__ = ["ParticleImages", "make_loader", "ParticleMetadata", "epoch_order"]


class ParticleImages(torch.utils.data.Dataset):
    """Images of a particle table, one *batch* per item: ``ds[rows] -> (rows, images)``.

    ``rows`` is an integer array; images (n, box, box) float32 are read (``ImageStack``)
    and Fourier-cropped to ``box``. The stack is opened lazily in each process, so the
    dataset can be sent to DataLoader workers.
    """

    def __init__(self, table, box):
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
        from .imaging import fourier_crop
        from .stacks import ImageStack
        if self._stack is None:
            self._stack = ImageStack(self.table, check=False)
        rows = np.asarray(rows, dtype=np.int64)
        images = torch.from_numpy(self._stack.read(rows))
        if images.shape[-1] != self.box:
            images = fourier_crop(images, self.box).contiguous()
        return torch.from_numpy(rows), images


def make_loader(dataset, batches, num_workers, pin):
    """A DataLoader over ``batches`` (lists of rows) of ``dataset``, one batch per item."""
    return torch.utils.data.DataLoader(dataset, sampler=batches, batch_size=None,
                                       num_workers=int(num_workers), pin_memory=pin)


class ParticleMetadata:
    """Per-particle poses, base shifts (-origin) and CTF parameters as device tensors."""

    def __init__(self, table, device):
        def t(a):
            return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)
        self.rotations = t(table.rotation_matrices())
        self.base_shift = t(-table.origin_or_zero())
        self.ctf = dict(defocus_u=t(table.defocus_u), defocus_v=t(table.defocus_v),
                        defocus_angle=t(table.defocus_angle), voltage=t(table.voltage),
                        cs=t(table.cs), amp_contrast=t(table.amp_contrast),
                        phase_shift=t(table.phase_shift), bfactor=t(table.ctf_bfactor))
        self.optics_group = torch.as_tensor(np.asarray(table.optics_group, dtype=np.int64),
                                            device=device)

    def batch(self, rows):
        return (self.rotations[rows], self.base_shift[rows],
                {k: v[rows] for k, v in self.ctf.items()})


def epoch_order(rows, seed, epoch):
    """The training rows in the order of 0-based ``epoch``: a permutation seeded with
    (seed, epoch), so that a resumed run sees the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(int(seed) * 1000003 + int(epoch))
    return rows[torch.randperm(len(rows), generator=g).numpy()]
