"""Tests: unit tests of ``core`` (unittest) and Scipion protocol tests (BaseTest).

Run them all with ``make test`` or ``python -m scipion tests nmaem_plugin``.
"""
