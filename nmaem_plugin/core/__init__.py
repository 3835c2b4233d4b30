"""The science of nmaem: numpy, torch, gemmi, prody, pykeops; never pyworkflow or pwem. One
folder per layer, lowest first: ``base``, ``io``, ``physics``, ``modes``, ``sim``, ``learn``,
``inference``, ``analysis``, ``report``, ``cli``; a module imports its own folder and the folders
below it only (docs/architecture.md, tests/core/test_layers.py). This file imports nothing."""
