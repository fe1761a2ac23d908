"""torchvision's state dicts in cnnkit's modules: one explicit key mapping per family.

cnnkit's built-ins are laid out as the d2l book builds them (``block1``..``block5``, ``b1``..``b5``,
``stem``, ``head``), torchvision's as its own classes do (``features.N``, ``inception4a``,
``denseblock1.denselayer3``). For each family whose layers torchvision also has, :data:`FAMILIES`
gives, from the model's (typed) options, a :class:`TorchvisionLayout`: which torchvision model's
weights it holds and how each of their keys is called here. The mappings, by family:

- ``resnet18``, ``resnet50``: cnnkit's ResNet *is* torchvision's class: every key is the same.
- ``vgg11``, ``vgg16`` (``-o batch_norm=true``: ``vgg11_bn``, ``vgg16_bn``): ``features.I`` (one flat
  Sequential of conv[, bn], relu, ..., pool) -> ``blockB.J`` (one Sequential per max-pooled block);
  ``classifier.0/3/6`` -> ``classifier.1/4/7`` (cnnkit's classifier starts with a Flatten).
- ``alexnet -o layout=torchvision``: ``features.*`` the same; ``classifier.1/4/6`` -> ``1/4/7``
  (cnnkit's Flatten first, and its dropouts after the hidden layers instead of before: no weights).
- ``googlenet -o layout=torchvision``: ``conv1`` -> ``b1.0``, ``conv2``/``conv3`` -> ``b2.0``/``b2.1``,
  ``inception3a..5b`` -> ``b3.0..b5.1``; inside each unit ``conv``/``bn`` -> ``0``/``1``; ``fc`` ->
  ``head.1``; the auxiliary classifiers ``aux1``/``aux2`` are left out (training only).
- ``densenet121``: ``features.conv0/norm0`` -> ``stem.0/1``; ``features.denseblockB.denselayerL.
  norm1/conv1/norm2/conv2`` -> ``blockB.layers.(L-1).0/2/3/5`` (the checkpoints' older ``norm.1``
  spelling too); ``features.transitionT.norm/conv`` -> ``transitionT.0/2``; ``features.norm5`` ->
  ``head.0``; ``classifier`` -> ``head.4``.

cnnkit's d2l layouts of AlexNet and GoogLeNet cannot hold torchvision's weights at all (other
channel counts; no batch norm, 5x5 branches, other pooling): their entries say so and name the
option that builds the layout that can. The small ``densenet``, ``nin`` and the LeNets have no
torchvision counterpart. A test checks, for every family, that the mapped weights give
torchvision's logits.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DROP", "TorchvisionLayout", "FAMILIES", "torchvision_layout"]

DROP = ""
"""What a mapping returns for a torchvision key cnnkit leaves out on purpose (not an error)."""

Rename = Callable[[str], str | None]
"""torchvision key -> cnnkit key; :data:`DROP` for a key left out on purpose; None: not a key of this family."""


@dataclass(frozen=True)
class TorchvisionLayout:
    """How one cnnkit model (with its options) holds one torchvision model's weights."""

    arch: str
    """torchvision's model name (its builder and weights enum), e.g. ``vgg16_bn``."""
    rename: Rename
    dropped: str = ""
    """What the keys mapped to :data:`DROP` are, for the line that says they were left out."""


def _identity(key: str) -> str | None:
    return key


def _indexed(key: str, prefix: str, table: dict[int, str]) -> str | None:
    """``prefix.I.rest`` -> ``table[I].rest``; None when it is not such a key."""
    match = re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.(.+)", key)
    if match is None or int(match[1]) not in table:
        return None
    return f"{table[int(match[1])]}.{match[2]}"


def _vgg_features(blocks: tuple[tuple[int, int], ...], batch_norm: bool) -> dict[int, str]:
    """torchvision's ``features`` index of every conv (and BN) -> cnnkit's ``blockB.J``."""
    table: dict[int, str] = {}
    index = 0
    step = 3 if batch_norm else 2  # conv[, bn], relu
    for block, (convs, _) in enumerate(blocks, start=1):
        for conv in range(convs):
            table[index] = f"block{block}.{conv * step}"
            if batch_norm:
                table[index + 1] = f"block{block}.{conv * step + 1}"
            index += step
        index += 1  # the block's max pool
    return table


def _vgg(variant: str, options: Any) -> TorchvisionLayout:
    from cnnkit.models.vgg import _CONFIGS

    features = _vgg_features(_CONFIGS[variant], bool(options.batch_norm))
    classifier = {0: "classifier.1", 3: "classifier.4", 6: "classifier.7"}

    def rename(key: str) -> str | None:
        return _indexed(key, "features", features) or _indexed(key, "classifier", classifier)

    return TorchvisionLayout(f"{variant}_bn" if options.batch_norm else variant, rename)


def _alexnet(options: Any) -> TorchvisionLayout | str:
    if options.layout != "torchvision":
        return (
            "cnnkit's alexnet in its d2l layout (96-256-384-384-256 channels) cannot hold torchvision's AlexNet "
            "(64-192-384-256-256); add -o layout=torchvision"
        )
    features = {i: f"features.{i}" for i in (0, 3, 6, 8, 10)}
    classifier = {1: "classifier.1", 4: "classifier.4", 6: "classifier.7"}

    def rename(key: str) -> str | None:
        return _indexed(key, "features", features) or _indexed(key, "classifier", classifier)

    return TorchvisionLayout("alexnet", rename)


_INCEPTIONS = {
    **{f"3{c}": f"b3.{i}" for i, c in enumerate("ab")},
    **{f"4{c}": f"b4.{i}" for i, c in enumerate("abcde")},
    **{f"5{c}": f"b5.{i}" for i, c in enumerate("ab")},
}
_STEM = {"conv1": "b1.0", "conv2": "b2.0", "conv3": "b2.1"}
_UNIT = {"conv": "0", "bn": "1"}  # torchvision's BasicConv2d -> cnnkit's Sequential(conv, bn, relu)


def _googlenet_key(key: str) -> str | None:
    if key.startswith(("aux1.", "aux2.")):
        return DROP
    if key.startswith("fc."):
        return "head.1." + key[3:]
    match = re.fullmatch(r"(conv[123])\.(conv|bn)\.(\w+)", key)
    if match is not None:
        return f"{_STEM[match[1]]}.{_UNIT[match[2]]}.{match[3]}"
    # branch1 is one unit; branch2 and branch3 two; branch4 a max pool, then one.
    match = re.fullmatch(r"inception(\d[a-e])\.(branch1|branch[23]\.[01]|branch4\.1)\.(conv|bn)\.(\w+)", key)
    if match is None or match[1] not in _INCEPTIONS:
        return None
    return f"{_INCEPTIONS[match[1]]}.{match[2]}.{_UNIT[match[3]]}.{match[4]}"


def _googlenet(options: Any) -> TorchvisionLayout | str:
    if options.layout != "torchvision":
        return (
            "cnnkit's googlenet in its d2l layout (no batch norm, 5x5 branches, other pooling) cannot hold "
            "torchvision's GoogLeNet; add -o layout=torchvision"
        )
    return TorchvisionLayout("googlenet", _googlenet_key, dropped="torchvision's auxiliary classifiers aux1, aux2")


_DENSE_LAYER = {"norm1": "0", "conv1": "2", "norm2": "3", "conv2": "5"}
_TRANSITION = {"norm": "0", "conv": "2"}


def _densenet121_key(key: str) -> str | None:
    # The ImageNet checkpoints spell a dense layer's modules norm.1, conv.1, ... (torchvision renames them too).
    key = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", key)
    if key.startswith("classifier."):
        return "head.4." + key[len("classifier."):]
    for old, new in (("features.conv0.", "stem.0."), ("features.norm0.", "stem.1."), ("features.norm5.", "head.0.")):
        if key.startswith(old):
            return new + key[len(old):]
    match = re.fullmatch(r"features\.denseblock(\d)\.denselayer(\d+)\.(norm1|conv1|norm2|conv2)\.(\w+)", key)
    if match is not None:
        return f"block{match[1]}.layers.{int(match[2]) - 1}.{_DENSE_LAYER[match[3]]}.{match[4]}"
    match = re.fullmatch(r"features\.transition(\d)\.(norm|conv)\.(\w+)", key)
    if match is not None:
        return f"transition{match[1]}.{_TRANSITION[match[2]]}.{match[3]}"
    return None


FAMILIES: dict[str, Callable[[Any], TorchvisionLayout | str]] = {
    "alexnet": _alexnet,
    "vgg11": lambda options: _vgg("vgg11", options),
    "vgg16": lambda options: _vgg("vgg16", options),
    "googlenet": _googlenet,
    "resnet18": lambda options: TorchvisionLayout("resnet18", _identity),
    "resnet50": lambda options: TorchvisionLayout("resnet50", _identity),
    "densenet121": lambda options: TorchvisionLayout("densenet121", _densenet121_key),
}
"""cnnkit model name -> (its typed options -> the torchvision layout it holds, or why it holds none)."""


def torchvision_layout(model: str, options: Any) -> TorchvisionLayout | str | None:
    """The torchvision weights cnnkit's ``model`` with ``options`` holds, a reason it holds none
    (a layout option away), or None for a model with no torchvision counterpart (plugins included)."""
    family = FAMILIES.get(model)
    return family(options) if family is not None else None
