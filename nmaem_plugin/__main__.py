"""``python -m nmaem_plugin``: the same as the ``nmaem`` command."""
import sys

from nmaem_plugin.core.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
