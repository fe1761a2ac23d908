"""ResNet-18 and ResNet-50: torchvision's residual networks, for any number of input channels.

He, Zhang, Ren, Sun: "Deep Residual Learning for Image Recognition", CVPR 2016. d2l section 8.6
builds the same ResNet-18 (its convolutions keep a bias before batch norm; torchvision's, used
here, do not). The network is torchvision's own ``ResNet`` (basic blocks for 18 layers,
bottlenecks for 50), so its top-level children are torchvision's ``conv1 bn1 relu maxpool
layer1..layer4 avgpool fc``; only the stem convolution is rebuilt to take ``in_channels``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from cnnkit.models.base import Architecture, sgd_recipe

__all__ = ["ResNetOptions", "RESNET18", "RESNET50"]

# variant -> (residual block, blocks per stage)
_CONFIGS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNetOptions(BaseModel):
    """ResNet hyperparameters (``-o key=value``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    zero_init_residual: bool = Field(
        False, description="Start each residual branch's last BatchNorm at zero, so blocks begin as identities."
    )


def _resnet(variant: str, in_channels: int, num_classes: int, options: ResNetOptions) -> ResNet:
    block, layers = _CONFIGS[variant]
    model = ResNet(block, layers, num_classes=num_classes, zero_init_residual=options.zero_init_residual)
    if in_channels != 3:
        # torchvision's stem is fixed at RGB; rebuild it with the same shape and initialisation.
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


RESNET18 = Architecture(
    name="resnet18",
    summary="ResNet-18 (d2l 8.6, torchvision layout): basic residual blocks [2,2,2,2]; 96 px",
    paper="He, Zhang, Ren & Sun, Deep Residual Learning for Image Recognition, CVPR 2016",
    recipe=sgd_recipe(96, lr=0.1, seed_lr=0.01),
    options=ResNetOptions,
    builder=lambda c, k, o: _resnet("resnet18", c, k, o),
    head="fc",
)

RESNET50 = Architecture(
    name="resnet50",
    summary="ResNet-50 (torchvision): bottleneck residual blocks [3,4,6,3]; 96 px",
    paper="He, Zhang, Ren & Sun, Deep Residual Learning for Image Recognition, CVPR 2016",
    recipe=sgd_recipe(96, lr=0.1, seed_lr=0.01),
    options=ResNetOptions,
    builder=lambda c, k, o: _resnet("resnet50", c, k, o),
    head="fc",
)
