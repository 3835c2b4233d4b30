"""Layer 6, inference: the latent variables of particles from a trained run (amortised
inference, the per-particle fit; the population / EM model goes here). Imports the layers
below (``base`` to ``learn``) and ``inference``."""
