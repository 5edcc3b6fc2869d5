"""Plugins used by the tests, loaded as files through [plugins] modules (like a plugins directory)."""
