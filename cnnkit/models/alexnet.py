"""AlexNet, as the d2l book builds it for Fashion-MNIST.

Krizhevsky, Sutskever, Hinton: "ImageNet Classification with Deep Convolutional Neural Networks",
NeurIPS 2012. The layout follows d2l section 8.1: a 96-256-384-384-256 convolutional trunk with an
11x11 stride-4 stem (padding 1), three 3x3 stride-2 max pools, then a 4096-4096 fully connected
classifier with dropout. At d2l's 224 px input the trunk ends in a 5x5 map; adaptive average
pooling to 5x5 (an identity there) lets any large enough input reach the same 6400 features.

``-o layout=torchvision`` builds torchvision's AlexNet instead (the "one weird trick" variant:
64-192-384-256-256 channels, stem padding 2, 6x6 pooling, 9216 features), the layout that can hold
torchvision's weights (``--init-from torchvision:alexnet``); d2l's cannot.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cnnkit.models.base import Architecture, fc_classifier, init_relu_cnn, sgd_recipe

__all__ = ["AlexNetOptions", "ALEXNET"]

# layout -> (out_channels, kernel, stride, padding, max pool after it) of each convolution, and the
# trunk's map side at 224 px (what the adaptive pooling keeps)
_LAYOUTS: dict[str, tuple[list[tuple[int, int, int, int, bool]], int]] = {
    "d2l": ([(96, 11, 4, 1, True), (256, 5, 1, 2, True), (384, 3, 1, 1, False), (384, 3, 1, 1, False),
             (256, 3, 1, 1, True)], 5),
    "torchvision": ([(64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False), (256, 3, 1, 1, False),
                     (256, 3, 1, 1, True)], 6),
}  # fmt: skip
_HIDDEN = 4096


class AlexNetOptions(BaseModel):
    """AlexNet hyperparameters (``-o key=value``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout probability after each hidden linear layer.")
    layout: Literal["d2l", "torchvision"] = Field(
        "d2l", description="d2l's 96-256-384-384-256 trunk, or torchvision's 64-192-384-256-256 (holds its weights)."
    )


def _alexnet(in_channels: int, num_classes: int, options: AlexNetOptions) -> nn.Sequential:
    convs, side = _LAYOUTS[options.layout]
    layers: list[nn.Module] = []
    channels = in_channels
    for out_channels, kernel, stride, padding, pool in convs:
        layers += [nn.Conv2d(channels, out_channels, kernel, stride, padding), nn.ReLU(inplace=True)]
        if pool:
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
        channels = out_channels
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(*layers))
    model.add_module("avgpool", nn.AdaptiveAvgPool2d(side))
    features = channels * side * side
    model.add_module("classifier", fc_classifier(features, num_classes, options.dropout, _HIDDEN))
    # torchvision's AlexNet keeps PyTorch's defaults; VGG's scheme lets lr 0.01 SGD move at once.
    return init_relu_cnn(model)


ALEXNET = Architecture(
    name="alexnet",
    summary="AlexNet (d2l 8.1): 96-256-384-384-256 convs, 4096-4096 FC with dropout (-o layout=torchvision: its trunk); 224 px",
    paper="Krizhevsky, Sutskever & Hinton, ImageNet Classification with Deep CNNs, NeurIPS 2012",
    recipe=sgd_recipe(224, lr=0.01, seed_lr=0.01),
    options=AlexNetOptions,
    builder=_alexnet,
    head="classifier",
)
