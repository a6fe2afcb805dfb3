"""kvlab's version, in a module of its own so that the files kvlab writes can record it
without importing the package's front door (which imports capture)."""

__version__ = "0.1.0"
