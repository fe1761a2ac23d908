"""VGG-11 and VGG-16: stacks of 3x3 convolutions in five max-pooled blocks.

Simonyan, Zisserman: "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015. The blocks follow d2l section 8.2 (``vgg_block``) and torchvision's configurations A
(VGG-11) and D (VGG-16), including torchvision's batch-norm variant (BatchNorm after each
convolution). ``width`` scales the convolution channels the way d2l trains its VGG-11/4 on
Fashion-MNIST, keeping the 4096-4096 classifier. Adaptive average pooling to 7x7 (an identity at
224 px) makes any input of at least 32 px reach the classifier with the same feature count.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cnnkit.models.base import Architecture, fc_classifier, init_relu_cnn, sgd_recipe

__all__ = ["VGGOptions", "VGG11", "VGG16"]

# variant -> (convolutions, output channels) of each of the five blocks
_CONFIGS: dict[str, tuple[tuple[int, int], ...]] = {
    "vgg11": ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)),
    "vgg16": ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
}
_POOLED_SIDE = 7  # the last block's map side at 224 px
_HIDDEN = 4096


class VGGOptions(BaseModel):
    """VGG hyperparameters (``-o key=value``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: float = Field(
        1.0, gt=0, description="Multiplier on every convolution's channels (d2l's VGG-11/4 is 0.25)."
    )
    batch_norm: bool = Field(False, description="BatchNorm after each convolution (torchvision's *_bn variants).")
    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout probability after each hidden linear layer.")


def _vgg_block(in_channels: int, out_channels: int, num_convs: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def _vgg(variant: str, in_channels: int, num_classes: int, options: VGGOptions) -> nn.Sequential:
    model = nn.Sequential()
    channels = in_channels
    for index, (num_convs, base_channels) in enumerate(_CONFIGS[variant], start=1):
        out_channels = max(1, round(base_channels * options.width))
        model.add_module(f"block{index}", _vgg_block(channels, out_channels, num_convs, options.batch_norm))
        channels = out_channels
    model.add_module("avgpool", nn.AdaptiveAvgPool2d(_POOLED_SIDE))
    features = channels * _POOLED_SIDE * _POOLED_SIDE
    model.add_module("classifier", fc_classifier(features, num_classes, options.dropout, _HIDDEN))
    return init_relu_cnn(model)


VGG11 = Architecture(
    name="vgg11",
    summary="VGG-11 (d2l 8.2): 8 3x3 convs in 5 blocks, 4096-4096 FC; -o width=0.25 is d2l's; 224 px",
    paper="Simonyan & Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition, ICLR 2015",
    recipe=sgd_recipe(224, lr=0.01, seed_lr=0.01),
    options=VGGOptions,
    builder=lambda c, k, o: _vgg("vgg11", c, k, o),
    head="classifier",
)

VGG16 = Architecture(
    name="vgg16",
    summary="VGG-16: 13 3x3 convs in 5 blocks, 4096-4096 FC; -o batch_norm=true for VGG-16-BN; 224 px",
    paper="Simonyan & Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition, ICLR 2015",
    recipe=sgd_recipe(224, lr=0.01, seed_lr=0.01),
    options=VGGOptions,
    builder=lambda c, k, o: _vgg("vgg16", c, k, o),
    head="classifier",
)
