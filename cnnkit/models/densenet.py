"""DenseNet: every layer in a block sees the concatenation of all earlier layers' outputs.

Huang, Liu, van der Maaten, Weinberger: "Densely Connected Convolutional Networks", CVPR 2017.
``densenet`` is d2l section 8.7's small DenseNet (four blocks of four BN-ReLU-3x3 conv layers,
convolutions with bias, no bottleneck); ``densenet121`` is torchvision's DenseNet-121
(DenseNet-BC: a 1x1 bottleneck to 4x the growth rate before each 3x3 conv, no conv bias, blocks
6-12-24-16). Both share the 7x7 stride-2 stem with 64 channels, transitions that halve the
channels and the resolution, and global average pooling before the linear classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cnnkit.models.base import Architecture, sgd_recipe

__all__ = ["DenseNetOptions", "DenseBlock", "DENSENET", "DENSENET121"]

_STEM_CHANNELS = 64

# variant -> (layers per dense block, bottleneck width as a multiple of the growth rate (0: no
# bottleneck), convolutions carry a bias)
_CONFIGS: dict[str, tuple[tuple[int, ...], int, bool]] = {
    "densenet": ((4, 4, 4, 4), 0, True),
    "densenet121": ((6, 12, 24, 16), 4, False),
}


class DenseNetOptions(BaseModel):
    """DenseNet hyperparameters (``-o key=value``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    growth_rate: int = Field(32, gt=0, description="Channels each dense layer adds to its block's output.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout probability after each dense layer (torchvision's drop_rate)."
    )


def _dense_layer(in_channels: int, growth_rate: int, bottleneck: int, bias: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)]
    if bottleneck:
        width = bottleneck * growth_rate
        layers += [
            nn.Conv2d(in_channels, width, kernel_size=1, bias=bias), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        ]  # fmt: skip
        in_channels = width
    layers.append(nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=bias))
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class DenseBlock(nn.Module):
    """Dense layers whose outputs are concatenated onto their input, one after another."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


def _transition(in_channels: int, out_channels: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias),
        nn.AvgPool2d(kernel_size=2, stride=2),
    )  # fmt: skip


def _densenet(variant: str, in_channels: int, num_classes: int, options: DenseNetOptions) -> nn.Sequential:
    blocks, bottleneck, bias = _CONFIGS[variant]
    growth = options.growth_rate
    model = nn.Sequential()
    model.add_module(
        "stem",
        nn.Sequential(
            nn.Conv2d(in_channels, _STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=bias),
            nn.BatchNorm2d(_STEM_CHANNELS), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ),  # fmt: skip
    )
    channels = _STEM_CHANNELS
    for index, num_layers in enumerate(blocks, start=1):
        layers = [
            _dense_layer(channels + i * growth, growth, bottleneck, bias, options.dropout) for i in range(num_layers)
        ]
        model.add_module(f"block{index}", DenseBlock(layers))
        channels += num_layers * growth
        if index < len(blocks):
            model.add_module(f"transition{index}", _transition(channels, channels // 2, bias))
            channels //= 2
    model.add_module(
        "head",
        nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(channels, num_classes),
        ),  # fmt: skip
    )
    # As torchvision's DenseNet: He (fan-in) convolutions, unit BatchNorm, zero biases.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    return model


DENSENET = Architecture(
    name="densenet",
    summary="DenseNet (d2l 8.7): 4 dense blocks of 4 BN-ReLU-conv layers, growth 32, halving transitions; 96 px",
    paper="Huang, Liu, van der Maaten & Weinberger, Densely Connected Convolutional Networks, CVPR 2017",
    recipe=sgd_recipe(96, lr=0.1, seed_lr=0.01),
    options=DenseNetOptions,
    builder=lambda c, k, o: _densenet("densenet", c, k, o),
    head="head",
)

DENSENET121 = Architecture(
    name="densenet121",
    summary="DenseNet-121 (torchvision, DenseNet-BC): bottleneck dense blocks 6-12-24-16, growth 32; 96 px",
    paper="Huang, Liu, van der Maaten & Weinberger, Densely Connected Convolutional Networks, CVPR 2017",
    recipe=sgd_recipe(96, lr=0.1, seed_lr=0.01),
    options=DenseNetOptions,
    builder=lambda c, k, o: _densenet("densenet121", c, k, o),
    head="head",
)
