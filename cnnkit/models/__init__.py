"""Built-in architectures, one family per module; each is registered in pyproject.toml."""

from cnnkit.models.base import Architecture, NoOptions, sgd_recipe

__all__ = ["Architecture", "NoOptions", "sgd_recipe"]
