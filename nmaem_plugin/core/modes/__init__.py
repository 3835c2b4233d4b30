"""Layer 3, modes: normal modes of an atomic model (coarse graining and the ANM Hessian, the
eigensolver, interpolation onto all atoms, the orthonormal basis, the pipeline, diagnostics
against a target, the modes.npz file). Imports ``base``, ``io``, ``physics`` and ``modes`` only."""
