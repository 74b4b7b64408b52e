"""The ``vaelab`` command, the top room: a thin layer of flags and printing over the library."""

from vaelab.cli.app import main, run

__all__ = ["main", "run"]
