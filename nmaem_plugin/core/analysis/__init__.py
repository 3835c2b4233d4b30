"""Layer 7, analysis: results of a trained run (landscape statistics, what the figures and the
viewers label the landscape with, model thumbnails, export of deformed models, states,
evaluation against a simulation's truth, geometry validation and refinement). Imports the layers
below (``base`` to ``inference``) and ``analysis``."""
