"""Tests: ``core/`` holds unit tests of ``core`` (unittest, no Scipion imports), ``scipion/``
the Scipion-side tests (plugin, convert, protocols with BaseTest, viewers).

Run them all with ``make test`` or ``python -m scipion tests nmaem_plugin``
(``nmaem_plugin.load_tests`` discovers both folders; ``NMAEM_TEST_PATTERN`` selects files).
"""
import os as _os

# The suite fixes the number of threads of every command it runs (OMP_NUM_THREADS, which
# core.base.threads takes over its load-dependent rule) and of its own process, to the usable
# physical cores (torch's own default): tests that compare two runs bit for bit need both on
# the same number of threads, whatever else the machine is doing. A developer's own
# OMP_NUM_THREADS is kept.
if not _os.environ.get("OMP_NUM_THREADS"):
    from nmaem_plugin.core.base.threads import physical_cores as _physical, usable_cores as _usable
    _cpus = _usable()
    _os.environ["OMP_NUM_THREADS"] = str(_physical(_cpus) or len(_cpus))
