"""Batch-norm statistics of the final weights ("precise BN") and the automatic batch size.

Why: batch norm normalises with the statistics of the current batch while training, and with
its running averages (momentum 0.1) in eval mode (validation, ``nmaem infer``). The running
averages trail the weights: after a few hundred optimisation steps (a few thousand particles
at batch 256) they still describe earlier networks, and the eval-mode encoder can be worse
than the undeformed reference while the same weights with batch statistics are good
(docs/training.md, "Batch-norm statistics").

:func:`recompute_bn_stats` therefore replaces the running statistics, after every epoch and
before validation and checkpointing, by exact averages over a pass of up to
``BN_IMAGES`` training images in train mode, without gradients (``momentum=None``: PyTorch's
cumulative average over the batches of the pass). The sample is drawn from a generator
seeded with (seed, epoch), so a resumed run recomputes exactly the same statistics. Only the
encoder runs (no decoder), forward only: the cost is about one third of a training pass over
``min(N_train, BN_IMAGES)`` images.

:func:`auto_batch` chooses the batch from the number of training images, so that small
datasets still get enough optimisation steps per epoch.
"""
import contextlib
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from .data import ParticleImages

__all__ = ["BN_IMAGES", "bn_sample", "recompute_bn_stats", "auto_batch", "resolve_batch",
           "AUTO_BATCH_MAX", "AUTO_BATCH_MIN", "AUTO_BATCH_STEPS"]

BN_IMAGES = 4096          # images of the recomputation pass (all, when fewer are trained on)
AUTO_BATCH_MAX = 256      # the paper's batch: datasets of >= AUTO_BATCH_STEPS * 256 images
AUTO_BATCH_MIN = 16
AUTO_BATCH_STEPS = 64     # optimisation steps per epoch that --batch auto aims at


def auto_batch(n_train: int) -> int:
    """``--batch auto``: min(256, max(16, n_train // 64)), i.e. at least 64 optimisation
    steps per epoch until the batch reaches the paper's 256 (16,384 training images and
    more keep 256); never below 16 (batch statistics of fewer images are too noisy)."""
    return int(min(AUTO_BATCH_MAX, max(AUTO_BATCH_MIN, int(n_train) // AUTO_BATCH_STEPS)))


def resolve_batch(batch: Union[int, str, None], n_train: int) -> int:
    """The integer batch of a ``--batch`` value: ``'auto'`` (or None) -> :func:`auto_batch`,
    an integer (or its string) -> itself."""
    from ..io.trainconfig import is_auto_batch
    if is_auto_batch(batch):
        return auto_batch(n_train)
    try:
        return int(batch)
    except (TypeError, ValueError):
        from ..base.errors import NmaemError
        raise NmaemError("--batch must be an integer or auto (got %r)" % (batch,))


def bn_sample(rows: np.ndarray, seed: int, epoch: int,
              n_images: int = BN_IMAGES) -> np.ndarray:
    """The training rows of the recomputation pass of 0-based ``epoch``: all of ``rows`` when
    there are at most ``n_images``, otherwise ``n_images`` of them drawn without replacement
    by a generator seeded with (seed, epoch) (independent of the global random state), in
    that random order."""
    rows = np.asarray(rows)
    g = torch.Generator().manual_seed(int(seed) * 1000003 + int(epoch) + 7919)
    order = torch.randperm(len(rows), generator=g).numpy()
    return rows[order[:int(n_images)]]


def _bn_layers(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def recompute_bn_stats(encoder: torch.nn.Module, read_batches: Iterable[torch.Tensor],
                       autocast: Optional[Callable] = None) -> int:
    """Set the running mean and variance of every batch-norm layer of ``encoder`` to the
    average, over the batches yielded by ``read_batches`` (an iterable of image tensors
    (B, box, box) already on the encoder's device), of the batch statistics that training
    mode uses. No gradients, no weight change; the encoder is left in train mode.

    ``autocast``: a device type (``'cuda'``/``'cpu'``) to run under bfloat16 autocast, as
    training does with ``--bf16``. Returns the number of images used (0: nothing changed).
    """
    layers = _bn_layers(encoder)
    if not layers:
        return 0
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None                 # cumulative average over the pass
    was_training = encoder.training
    encoder.train()
    n = 0
    ctx = (torch.autocast(device_type=autocast, dtype=torch.bfloat16) if autocast
           else contextlib.nullcontext())
    try:
        with torch.no_grad(), ctx:
            for images in read_batches:
                if images.shape[0] < 2:   # batch norm needs two images
                    continue
                encoder.features(images)
                n += int(images.shape[0])
    except BaseException:
        for m, mom, mean, var, nbt in saved:
            m.momentum = mom
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(nbt)
        raise
    for m, mom, mean, var, nbt in saved:
        m.momentum = mom
        if n == 0:                        # no batch: keep the old statistics
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        m.num_batches_tracked.copy_(nbt)  # the step count of training, unchanged
    encoder.train(was_training)
    return n


def recompute_from_dataset(encoder: torch.nn.Module, dataset: "ParticleImages", rows: np.ndarray, batch: int,
                           seed: int, epoch: int, device: Union[str, torch.device],
                           loader: Callable, autocast: Optional[Callable] = None,
                           n_images: int = BN_IMAGES) -> int:
    """:func:`recompute_bn_stats` over :func:`bn_sample` (rows of ``dataset``, a
    ``train.ParticleImages``) in batches of ``batch`` images read by ``loader(dataset,
    batches)`` (an iterable of (rows, images)). Returns the number of images used."""
    sample = bn_sample(rows, seed, epoch, n_images)
    batch = max(2, int(batch))
    batches = [sample[i:i + batch] for i in range(0, len(sample), batch)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    images = (im.to(device, non_blocking=True) for _, im in loader(dataset, batches))
    return recompute_bn_stats(encoder, images, autocast=autocast)
