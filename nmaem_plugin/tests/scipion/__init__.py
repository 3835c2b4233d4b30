"""Scipion-side tests: plugin discovery, convert, protocols (BaseTest) and viewers."""
