"""Tests: ``core/`` holds unit tests of ``core`` (unittest, no Scipion imports), ``scipion/``
the Scipion-side tests (plugin, convert, protocols with BaseTest, viewers).

Run them all with ``make test`` or ``python -m scipion tests nmaem_plugin``
(``nmaem_plugin.load_tests`` discovers both folders; ``NMAEM_TEST_PATTERN`` selects files).
"""
