"""GoogLeNet (Inception v1), as the d2l book builds it for 96 px Fashion-MNIST.

Szegedy et al.: "Going Deeper with Convolutions", CVPR 2015. The layout follows d2l section 8.4:
five stages ``b1``..``b5`` of nine Inception blocks with the paper's channel counts, no auxiliary
classifiers and no batch normalisation; ``b5`` ends in global average pooling, so the linear
``head`` sees 1024 features at any input size. The paper's 40% dropout before the classifier is
an option (off by default, as in d2l).

``-o layout=torchvision`` builds torchvision's GoogLeNet instead, the layout that can hold its
weights (``--init-from torchvision:googlenet``): batch norm (eps 0.001) after every convolution,
which then has no bias; a 3x3 convolution where the paper's 5x5 branch is (torchvision's known
deviation); ceil-mode max pools, the one before ``b5`` 2x2. Its auxiliary classifiers are left
out (torchvision uses them only in training), as is the input transform of its ImageNet weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cnnkit.models.base import Architecture, init_relu_cnn, sgd_recipe

__all__ = ["GoogLeNetOptions", "Inception", "GOOGLENET"]

# Inception channels: (1x1, (3x3 reduce, 3x3), (5x5 reduce, 5x5), pool projection), per stage.
_InceptionCfg = tuple[int, tuple[int, int], tuple[int, int], int]
_B3: list[_InceptionCfg] = [
    (64, (96, 128), (16, 32), 32),
    (128, (128, 192), (32, 96), 64),
]
_B4: list[_InceptionCfg] = [
    (192, (96, 208), (16, 48), 64),
    (160, (112, 224), (24, 64), 64),
    (128, (128, 256), (24, 64), 64),
    (112, (144, 288), (32, 64), 64),
    (256, (160, 320), (32, 128), 128),
]
_B5: list[_InceptionCfg] = [
    (256, (160, 320), (32, 128), 128),
    (384, (192, 384), (48, 128), 128),
]


class GoogLeNetOptions(BaseModel):
    """GoogLeNet hyperparameters (``-o key=value``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout probability before the classifier (the paper uses 0.4; d2l none)."
    )
    layout: Literal["d2l", "torchvision"] = Field(
        "d2l", description="d2l's (no batch norm), or torchvision's (BN, 3x3 in the 5x5 branch; holds its weights)."
    )


_Layout = Literal["d2l", "torchvision"]


def _conv_relu(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding: int = 0, layout: _Layout = "d2l"
) -> nn.Sequential:
    if layout == "d2l":
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, padding), nn.ReLU(inplace=True))
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(out_channels, eps=0.001), nn.ReLU(inplace=True),
    )  # fmt: skip


def _max_pool(kernel: int, stride: int, layout: _Layout) -> nn.MaxPool2d:
    if layout == "d2l":
        return nn.MaxPool2d(kernel, stride=stride, padding=1)
    return nn.MaxPool2d(kernel, stride=stride, ceil_mode=True)


class Inception(nn.Module):
    """Four parallel paths (1x1; 1x1-3x3; 1x1-5x5, 3x3 in torchvision's layout; 3x3 max pool-1x1)
    concatenated on channels."""

    def __init__(self, in_channels: int, cfg: _InceptionCfg, layout: _Layout = "d2l") -> None:
        super().__init__()
        c1, (c2_reduce, c2), (c3_reduce, c3), c4 = cfg
        wide = 5 if layout == "d2l" else 3
        self.branch1 = _conv_relu(in_channels, c1, 1, layout=layout)
        self.branch2 = nn.Sequential(
            _conv_relu(in_channels, c2_reduce, 1, layout=layout), _conv_relu(c2_reduce, c2, 3, padding=1, layout=layout)
        )
        self.branch3 = nn.Sequential(
            _conv_relu(in_channels, c3_reduce, 1, layout=layout),
            _conv_relu(c3_reduce, c3, wide, padding=wide // 2, layout=layout),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=layout == "torchvision"),
            _conv_relu(in_channels, c4, 1, layout=layout),
        )
        self.out_channels = c1 + c2 + c3 + c4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


def _inception_stage(in_channels: int, cfgs: list[_InceptionCfg], layout: _Layout) -> tuple[list[nn.Module], int]:
    blocks: list[nn.Module] = []
    for cfg in cfgs:
        block = Inception(in_channels, cfg, layout)
        blocks.append(block)
        in_channels = block.out_channels
    return blocks, in_channels


def _googlenet(in_channels: int, num_classes: int, options: GoogLeNetOptions) -> nn.Sequential:
    layout = options.layout
    b3, c3 = _inception_stage(192, _B3, layout)
    b4, c4 = _inception_stage(c3, _B4, layout)
    b5, c5 = _inception_stage(c4, _B5, layout)
    model = nn.Sequential()
    model.add_module(
        "b1", nn.Sequential(_conv_relu(in_channels, 64, 7, stride=2, padding=3, layout=layout), _max_pool(3, 2, layout))
    )
    model.add_module(
        "b2",
        nn.Sequential(
            _conv_relu(64, 64, 1, layout=layout), _conv_relu(64, 192, 3, padding=1, layout=layout),
            _max_pool(3, 2, layout),
        ),  # fmt: skip
    )
    model.add_module("b3", nn.Sequential(*b3, _max_pool(3, 2, layout)))
    # torchvision pools 2x2 before its last stage; d2l 3x3 as everywhere else.
    model.add_module("b4", nn.Sequential(*b4, _max_pool(3 if layout == "d2l" else 2, 2, layout)))
    model.add_module("b5", nn.Sequential(*b5, nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("head", nn.Sequential(nn.Dropout(options.dropout), nn.Linear(c5, num_classes)))
    # Without batch norm the 22 ReLU layers need He initialisation to pass a signal at the start
    # (torchvision's 0.01 Gaussian assumes its BN variant). Fan-in mode: in fan-out mode the
    # 1x1 reductions (e.g. 480 -> 16 channels) get weights far too large and activations grow
    # ~20x by b5; the classifier starts near zero.
    return init_relu_cnn(model, mode="fan_in")


GOOGLENET = Architecture(
    name="googlenet",
    summary="GoogLeNet / Inception v1 (d2l 8.4): 9 Inception blocks in b1..b5, no aux heads, no BN (-o layout=torchvision: its BN variant); 96 px",
    paper="Szegedy et al., Going Deeper with Convolutions, CVPR 2015",
    recipe=sgd_recipe(96, lr=0.01, seed_lr=0.01),
    options=GoogLeNetOptions,
    builder=_googlenet,
    head="head",
)
