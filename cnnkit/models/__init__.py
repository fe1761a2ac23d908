"""Built-in architectures, one family per module; each is registered in pyproject.toml."""

from cnnkit.models.base import Architecture, NoOptions

__all__ = ["Architecture", "NoOptions"]
