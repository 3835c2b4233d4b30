"""Layer 0, base: what every layer uses (errors and the one-line ``fail``, atomic writes,
progress lines, the option lists read by the command line and the protocols, a matplotlib figure
without pyplot saved atomically). It imports nothing of core outside ``base``."""
