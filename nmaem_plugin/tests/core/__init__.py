"""Unit tests of ``nmaem_plugin.core`` and of the package layout: no Scipion imports here."""
