"""Layer 9, cli: the ``nmaem`` command (``main``: the parser, errors and signals; one module per
subcommand with its parser and runner; ``options``: argument types they share). May import every
layer; nothing imports it but ``nmaem_plugin.__main__``, the console script and tests."""
