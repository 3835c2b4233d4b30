"""Layer 8, report: the figures (matplotlib, imported lazily; used by ``nmaem report`` and the
Scipion viewers) and ``nmaem report`` itself. Imports the layers below (``base`` to
``analysis``) and ``report``."""
