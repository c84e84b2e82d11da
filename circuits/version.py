"""The package's version, in a module of its own so that writers of files can record it
without importing the package (pyproject.toml's ``version`` says the same)."""

__version__ = "0.1.0"
