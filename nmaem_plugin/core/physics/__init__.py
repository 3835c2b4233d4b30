"""Layer 2, physics: image formation and its statistics (atomic models and form factors, tensor
poses, CTF, Fourier grid, the renderer and its routes within a memory budget, noise models, the
whitened likelihood, the fit check of a reference against particles). Imports ``base``, ``io``
and ``physics`` only."""
