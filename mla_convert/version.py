"""The toolkit's version (recorded in every converted config); the package root re-exports it."""

__version__ = "0.1.0"
