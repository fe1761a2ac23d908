"""cnnkit-efficientnet: EfficientNet-B0 to B7 for cnnkit, registered in the ``cnnkit.models`` group.

Importing this package is cheap; the models live in :mod:`cnnkit_efficientnet.models`, which cnnkit
imports the first time one of them is used.
"""

__version__ = "0.1.0"
