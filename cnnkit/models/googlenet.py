"""GoogLeNet (Inception v1), as the d2l book builds it for 96 px Fashion-MNIST.

Szegedy et al.: "Going Deeper with Convolutions", CVPR 2015. The layout follows d2l section 8.4:
five stages ``b1``..``b5`` of nine Inception blocks with the paper's channel counts, no auxiliary
classifiers and no batch normalisation; ``b5`` ends in global average pooling, so the linear
``head`` sees 1024 features at any input size. The paper's 40% dropout before the classifier is
an option (off by default, as in d2l).
"""

from __future__ import annotations

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


def _conv_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, padding), nn.ReLU(inplace=True))


class Inception(nn.Module):
    """Four parallel paths (1x1; 1x1-3x3; 1x1-5x5; 3x3 max pool-1x1) concatenated on channels."""

    def __init__(self, in_channels: int, cfg: _InceptionCfg) -> None:
        super().__init__()
        c1, (c2_reduce, c2), (c3_reduce, c3), c4 = cfg
        self.branch1 = _conv_relu(in_channels, c1, 1)
        self.branch2 = nn.Sequential(_conv_relu(in_channels, c2_reduce, 1), _conv_relu(c2_reduce, c2, 3, padding=1))
        self.branch3 = nn.Sequential(_conv_relu(in_channels, c3_reduce, 1), _conv_relu(c3_reduce, c3, 5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _conv_relu(in_channels, c4, 1))
        self.out_channels = c1 + c2 + c3 + c4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


def _inception_stage(in_channels: int, cfgs: list[_InceptionCfg]) -> tuple[list[nn.Module], int]:
    blocks: list[nn.Module] = []
    for cfg in cfgs:
        block = Inception(in_channels, cfg)
        blocks.append(block)
        in_channels = block.out_channels
    return blocks, in_channels


def _googlenet(in_channels: int, num_classes: int, options: GoogLeNetOptions) -> nn.Sequential:
    b3, c3 = _inception_stage(192, _B3)
    b4, c4 = _inception_stage(c3, _B4)
    b5, c5 = _inception_stage(c4, _B5)
    model = nn.Sequential()
    model.add_module(
        "b1", nn.Sequential(_conv_relu(in_channels, 64, 7, stride=2, padding=3), nn.MaxPool2d(3, stride=2, padding=1))
    )
    model.add_module(
        "b2",
        nn.Sequential(
            _conv_relu(64, 64, 1), _conv_relu(64, 192, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1)
        ),
    )
    model.add_module("b3", nn.Sequential(*b3, nn.MaxPool2d(3, stride=2, padding=1)))
    model.add_module("b4", nn.Sequential(*b4, nn.MaxPool2d(3, stride=2, padding=1)))
    model.add_module("b5", nn.Sequential(*b5, nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("head", nn.Sequential(nn.Dropout(options.dropout), nn.Linear(c5, num_classes)))
    # Without batch norm the 22 ReLU layers need He initialisation to pass a signal at the start
    # (torchvision's 0.01 Gaussian assumes its BN variant). Fan-in mode: in fan-out mode the
    # 1x1 reductions (e.g. 480 -> 16 channels) get weights far too large and activations grow
    # ~20x by b5; the classifier starts near zero.
    return init_relu_cnn(model, mode="fan_in")


GOOGLENET = Architecture(
    name="googlenet",
    summary="GoogLeNet / Inception v1 (d2l 8.4): 9 Inception blocks in b1..b5, no aux heads, no BN; 96 px",
    paper="Szegedy et al., Going Deeper with Convolutions, CVPR 2015",
    recipe=sgd_recipe(96, lr=0.01, seed_lr=0.01),
    options=GoogLeNetOptions,
    builder=_googlenet,
)
