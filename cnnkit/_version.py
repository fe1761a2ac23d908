"""The package version, in a module of its own so that any module can read it without importing
``cnnkit`` (whose ``__init__`` reaches the rest of the package)."""

__version__ = "0.1.0"
