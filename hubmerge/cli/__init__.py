"""The ``hubmerge`` command line (:mod:`.app`) and everything it prints (:mod:`.render`)."""

from hubmerge.cli.app import app, main

__all__ = ["app", "main"]
