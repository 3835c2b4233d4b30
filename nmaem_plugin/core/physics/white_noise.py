"""White Gaussian noise at a signal-to-noise ratio (the paper's noise; ``nmaem simulate``)."""
from typing import Optional

import torch

__all__ = ["noise_sigma", "add_noise"]


def noise_sigma(clean: torch.Tensor, snr_db: float) -> float:
    """White-noise standard deviation for an SNR in dB over a batch of clean images.

    SNR = 10 log10(mean_i var(clean_i) / sigma^2), var over the pixels of each image.
    """
    var = torch.as_tensor(clean).reshape(len(clean), -1).var(dim=1, unbiased=False).mean()
    return float(torch.sqrt(var / 10.0 ** (snr_db / 10.0)))


def add_noise(images: torch.Tensor, sigma: float,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``images`` plus white Gaussian noise of standard deviation ``sigma``."""
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype,
                        device=images.device)
    return images + sigma * noise
