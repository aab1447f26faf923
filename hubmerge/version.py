"""hubmerge's version, in a module of its own so that provenance and the CLI read it without importing the package."""

__version__ = "0.1.0"
