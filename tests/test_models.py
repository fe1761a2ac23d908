"""Every registered architecture: builds, trains a step, counts its parameters, validates options.

Parametrized over ``cnnkit.list_models()`` (timm's test_models.py style), so an installed plugin's
models are checked too. Large models are counted on the ``meta`` device; real forwards run at the
smallest input each model accepts.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import cnnkit
from cnnkit.errors import PluginLoadError, UsageError
from cnnkit.models.base import Architecture, NoOptions
from cnnkit.protocols import DatasetSplits, ImageTensors, ModelSpec, Recipe
from cnnkit.summary import smallest_input_size
from cnnkit.testing import check_dataset_spec, check_model_spec
from tests.test_summary import GOOGLENET_96

MODELS = cnnkit.list_models()
# Batches of two at small inputs gain nothing from more threads; on a busy machine their spinning
# makes the deep plugin models (EfficientNet-B7: 55 blocks) many times slower.
pytestmark = pytest.mark.usefixtures("one_thread")
BUILTINS = ["lenet", "lenet_bn", "alexnet", "vgg11", "vgg16", "nin", "googlenet", "resnet18", "resnet50", "densenet", "densenet121"]  # fmt: skip


@cache
def smallest_side(name: str) -> int:
    return smallest_input_size(cnnkit.get_model(name), in_channels=1, num_classes=10)


def count_on_meta(name: str, in_channels: int, side: int, num_classes: int, **options: Any) -> int:
    """Parameters of the model built on the meta device, after checking it maps the input to logits."""
    with torch.device("meta"):
        model = cnnkit.build_model(name, in_channels, num_classes, **options)
        logits = model.eval()(torch.empty(1, in_channels, side, side))
    assert logits.shape == (1, num_classes)
    return sum(p.numel() for p in model.parameters())


def test_every_builtin_is_registered() -> None:
    assert set(BUILTINS) <= set(MODELS)


# The biggest networks take over a second each to build, run and check: `make test` runs them,
# `make test-fast` (-m "not slow") the rest.
BIG = {"alexnet", "vgg11", "vgg16", "densenet121", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6",
       "efficientnet_b7"}  # fmt: skip
BY_SIZE = [pytest.param(name, marks=pytest.mark.slow) if name in BIG else name for name in MODELS]


# -- build, forward, backward --------------------------------------------------------------------
@pytest.mark.parametrize("name", BY_SIZE)
def test_forward_backward_at_smallest_input(name: str) -> None:
    torch.manual_seed(0)
    side = smallest_side(name)
    model = cnnkit.build_model(name, 1, 10).train()
    logits = model(torch.randn(2, 1, side, side))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([3, 7])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads if g is not None)


@pytest.mark.parametrize("name", BY_SIZE)
def test_contract(name: str) -> None:
    # (1 channel, 10 classes) is trained above; the contract check adds RGB input and 7 classes.
    check_model_spec(cnnkit.get_model(name), in_channels=(3,), num_classes=(7,), input_size=smallest_side(name))


# LeNet stays the flat d2l Sequential its checkpoints were written with.
@pytest.mark.parametrize("name", [n for n in MODELS if not n.startswith("lenet")])
def test_top_level_children_are_named(name: str) -> None:
    with torch.device("meta"):
        model = cnnkit.build_model(name)
    names = [child for child, _ in model.named_children()]
    assert names and not any(n.isdigit() for n in names), names


# -- parameter counts (the papers' and torchvision's figures) ------------------------------------
COUNTS = [
    ("lenet", 1, 28, 10, {}, 61_706),
    ("lenet_bn", 1, 28, 10, {}, 44_878),
    ("alexnet", 1, 224, 10, {}, 46_764_746),
    ("vgg11", 1, 224, 10, {}, 128_806_154),
    ("vgg11", 3, 224, 1000, {}, 132_863_336),
    ("vgg11", 1, 224, 10, {"width": 0.25}, 43_093_322),
    ("vgg16", 3, 224, 1000, {}, 138_357_544),
    ("vgg16", 3, 224, 1000, {"batch_norm": True}, 138_365_992),
    ("nin", 1, 224, 10, {}, 1_992_166),
    ("googlenet", 1, 96, 10, {}, 5_977_530),
    ("resnet18", 3, 224, 1000, {}, 11_689_512),
    ("resnet50", 3, 224, 1000, {}, 25_557_032),
    ("densenet", 1, 96, 10, {}, 758_226),
    ("densenet121", 3, 224, 1000, {}, 7_978_856),
]


@pytest.mark.parametrize(
    ("name", "in_channels", "side", "num_classes", "options", "expected"),
    COUNTS,
    ids=[f"{r[0]}-{r[1]}x{r[2]}-{r[3]}{''.join(f'-{k}={v}' for k, v in r[4].items())}" for r in COUNTS],
)
def test_parameter_count(
    name: str, in_channels: int, side: int, num_classes: int, options: dict[str, Any], expected: int
) -> None:
    assert count_on_meta(name, in_channels, side, num_classes, **options) == expected


def test_googlenet_stage_shapes_at_96() -> None:
    with torch.device("meta"):
        model = cnnkit.build_model("googlenet", 1, 10)
        assert isinstance(model, nn.Sequential)
        x, shapes = torch.empty(1, 1, 96, 96), {}
        for child_name, child in model.named_children():
            x = child(x)
            shapes[child_name] = tuple(x.shape)
    assert shapes == GOOGLENET_96  # d2l's printout, the same table the summary test checks


def test_adaptive_pooling_lets_larger_inputs_through() -> None:
    # The classifiers' input size does not depend on the image size (no hard-coded flatten).
    for name, side in [("alexnet", 320), ("vgg11", 256), ("lenet", 64)]:
        assert count_on_meta(name, 1, side, 10) == count_on_meta(name, 1, smallest_side(name), 10)


# -- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_unknown_option_is_a_usage_error_listing_the_valid_ones(name: str) -> None:
    spec = cnnkit.get_model(name)
    with torch.device("meta"), pytest.raises(UsageError) as caught:
        spec.build(1, 10, no_such_option=1)
    message = caught.value.format_message()
    assert "\n" not in message and name in message and "no_such_option" in message
    for field in spec.options.model_fields:
        assert field in message


@pytest.mark.parametrize(
    ("name", "options", "mentions"),
    [
        ("vgg11", {"width": "-1"}, "width"),
        ("vgg11", {"width": "wide"}, "width"),
        ("vgg16", {"batch_norm": "maybe"}, "batch_norm"),
        ("alexnet", {"dropout": 1.5}, "dropout"),
        ("nin", {"dropout": "-0.1"}, "dropout"),
        ("googlenet", {"dropout": "1"}, "dropout"),
        ("resnet18", {"zero_init_residual": "perhaps"}, "zero_init_residual"),
        ("densenet", {"growth_rate": "0"}, "growth_rate"),
        ("densenet121", {"growth_rate": "2.5"}, "growth_rate"),
    ],
)
def test_bad_option_value_is_a_usage_error(name: str, options: dict[str, Any], mentions: str) -> None:
    with torch.device("meta"), pytest.raises(UsageError, match=mentions) as caught:
        cnnkit.build_model(name, 1, 10, **options)
    assert caught.value.exit_code == 2 and "\n" not in caught.value.format_message()


def test_options_given_as_strings_are_coerced() -> None:
    # What `-o width=0.25 -o batch_norm=true` hands over.
    with torch.device("meta"):
        model = cnnkit.build_model("vgg11", 1, 10, width="0.25", batch_norm="true", dropout="0.3")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64, 128, 128, 128, 128]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.3}


def test_options_change_the_network() -> None:
    with torch.device("meta"):
        plain = cnnkit.build_model("densenet", 1, 10)
        wider = cnnkit.build_model("densenet", 1, 10, growth_rate=48)
        dropped = cnnkit.build_model("densenet121", 1, 10, dropout=0.2)
    # d2l's channel walk: 64 +4*32 = 192 -> 96 +128 -> 112 +128 -> 120 +128 = 248 features.
    assert plain.head[-1].in_features == 248
    assert wider.head[-1].in_features == 368  # 64 +192 -> 128 +192 -> 160 +192 -> 176 +192
    assert sum(isinstance(m, nn.Dropout) for m in dropped.modules()) == 6 + 12 + 24 + 16
    zero = cnnkit.build_model("resnet18", 1, 10, zero_init_residual=True)
    assert all(int(torch.count_nonzero(block.bn2.weight)) == 0 for layer in (zero.layer1, zero.layer4) for block in layer)


def test_initialisation_follows_torchvision() -> None:
    torch.manual_seed(0)
    model = cnnkit.build_model("vgg11", 1, 10, width=0.25, batch_norm=True)
    conv = model.block3[0]
    assert int(torch.count_nonzero(conv.bias)) == 0
    # He (fan-out) normal: std sqrt(2 / (out_channels * 3 * 3)).
    assert conv.weight.std().item() == pytest.approx((2 / (conv.out_channels * 9)) ** 0.5, rel=0.1)
    bn = model.block3[1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and int(torch.count_nonzero(bn.bias)) == 0
    assert model.classifier[-1].weight.std().item() == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize("name", ["nin", "googlenet"])
def test_deep_nets_without_batch_norm_keep_their_signal_at_initialisation(name: str) -> None:
    # The BN-free nets are initialised so a unit-variance input neither vanishes nor explodes.
    torch.manual_seed(0)
    spec = cnnkit.get_model(name)
    side = spec.recipe.input_size
    with torch.no_grad():
        logits = spec.build(1, 10).eval()(torch.randn(2, 1, side, side))
    rms = logits.pow(2).mean().sqrt().item()
    assert 0.05 < rms < 10, rms


@pytest.mark.parametrize("name", BUILTINS)
def test_recipes_are_d2l_s(name: str) -> None:
    expected = {
        "lenet": (28, 0.1), "lenet_bn": (28, 0.1), "alexnet": (224, 0.01), "vgg11": (224, 0.01),
        "vgg16": (224, 0.01), "nin": (224, 0.05), "googlenet": (96, 0.01), "resnet18": (96, 0.01),
        "resnet50": (96, 0.01), "densenet": (96, 0.01), "densenet121": (96, 0.01),
    }  # fmt: skip
    seed = cnnkit.get_model(name).recipe.named("d2l")
    assert (seed.input_size, seed.lr, seed.batch_size, seed.epochs, seed.optimizer) == (*expected[name], 128, 10, "sgd")


# -- the contract checks themselves --------------------------------------------------------------
class _Width(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    width: int = Field(4, gt=0, description="Hidden channels.")


def _tiny(c: int, k: int, o: _Width) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, o.width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(o.width, k))


def _spec(**changes: Any) -> Architecture[Any]:
    fields: dict[str, Any] = dict(
        name="tiny", summary="a tiny test net", paper="none", recipe=Recipe(input_size=8), options=_Width, builder=_tiny
    )
    return Architecture(**(fields | changes))


class _Loose(BaseModel):
    width: int = Field(4, description="Hidden channels.")


class _Undocumented(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = 4


class _NaN(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3))) * float("nan")


class _Unused(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(c, k), nn.Linear(c, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x.mean(dim=(2, 3)))


class _PinnedBuffer(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c, k)
        self.register_buffer("scale", torch.ones(1, device="cpu"))  # ignores the meta device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


class _IgnoresOptions:
    """A hand-written spec whose build() swallows unknown options instead of rejecting them."""

    name, summary, paper, recipe, options = "lax", "lax test net", "none", Recipe(input_size=8), NoOptions

    def build(self, in_channels: int = 1, num_classes: int = 10, **options: Any) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))


def test_check_model_spec_passes_a_good_spec_with_options() -> None:
    check_model_spec(_spec(), options={"width": 3})


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        (_spec(summary=""), "'summary' must be a non-empty str"),
        (_spec(recipe={"input_size": 8}), "must be a cnnkit.protocols.Recipe"),
        (_spec(options=dict), "pydantic BaseModel class"),
        (_spec(options=_Loose), 'extra="forbid"'),
        (_spec(options=_Undocumented), "width of _Undocumented have no description"),
        (_spec(builder=lambda c, k, o: _tiny(c, 10, o)), r"shape \(2, 10\), expected .* \(2, 7\)"),
        (_spec(builder=lambda c, k, o: _NaN(c, k)), "non-finite logits"),
        (_spec(builder=lambda c, k, o: _Unused(c, k)), "got no gradient .*spare"),
        (_spec(builder=lambda c, k, o: _PinnedBuffer(c, k)), r"put 1 tensors elsewhere \(first: scale \(cpu\)\)"),
        (_spec(builder=lambda c, k, o: nn.Sequential(nn.Conv2d(c, k, 9), nn.Flatten())), "raised RuntimeError"),
        (_IgnoresOptions(), "accepted the unknown option"),
    ],
    ids=["summary", "recipe", "options-type", "extra", "description", "shape", "nan", "unused", "device", "size", "lax"],
)
def test_check_model_spec_names_the_violation(spec: ModelSpec, complaint: str) -> None:
    with pytest.raises(AssertionError, match=complaint):
        check_model_spec(spec)


@pytest.mark.slow
def test_testing_module_does_not_need_pytest() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['pytest'] = None; import cnnkit.testing"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


class _Tiles:
    """A generated 2-class dataset: dark and bright 6x6 tiles, built to satisfy the contract."""

    name, summary, classes, channels, image_size = "tiles", "dark and bright tiles", ("dark", "bright"), 3, (6, 6)

    class options(BaseModel):  # noqa: N801 -- the protocol names the attribute
        model_config = ConfigDict(extra="forbid")
        count: int = Field(8, gt=0, description="Images per split.")

    def __init__(self, **broken: Any) -> None:
        self.broken = broken

    def locate(self, data: Path | None = None) -> Path:
        return data or Path(".")

    def load(self, data: Path | None = None, **options: Any) -> DatasetSplits:
        try:
            count = self.options(**options).count
        except Exception as exc:
            raise UsageError(f"bad option for dataset 'tiles': {exc}") from exc
        labels = torch.arange(count) % 2
        images = (labels * 200 + 20).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 6, 6).contiguous()
        mean = float(images.float().mean() / 255)
        std = float(images.float().std(correction=0) / 255)
        fields: dict[str, Any] = dict(
            name="tiles", train=ImageTensors(images, labels), test=ImageTensors(images.clone(), labels.clone()),
            classes=self.classes, source=self.locate(data), mean=(mean,) * 3, std=(std,) * 3,
        )  # fmt: skip
        return DatasetSplits(**(fields | self.broken))


def test_check_dataset_spec_passes_a_good_spec() -> None:
    check_dataset_spec(_Tiles(), count=10)


def _split(side: int = 6, labels: tuple[int, ...] = (0, 1, 0, 1), dtype: torch.dtype = torch.uint8) -> ImageTensors:
    return ImageTensors(torch.zeros(len(labels), 3, side, side, dtype=dtype), torch.tensor(labels))


@pytest.mark.parametrize(
    ("broken", "complaint"),
    [
        ({"train": _split(dtype=torch.float32)}, "must be a uint8 tensor"),
        ({"test": _split(labels=(0, 1, 2, 1))}, r"span 0\.\.2, outside 0\.\.1"),
        ({"test": _split(side=5)}, "both splits must share"),
        ({"classes": ("bright", "dark")}, "differ from the spec's"),
        ({"mean": (0.47 * 255,) * 3}, r"mean\[0\] is 119\.8500 but the training images give 0\.4706"),
        ({"std": (0.4,) * 2}, "one float per channel"),
    ],
    ids=["float-images", "label-range", "split-shapes", "classes", "mean-scale", "std-channels"],
)
def test_check_dataset_spec_names_the_violation(broken: dict[str, Any], complaint: str) -> None:
    with pytest.raises(AssertionError, match=complaint):
        check_dataset_spec(_Tiles(**broken))


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["fashion-mnist", pytest.param("coil20", marks=pytest.mark.slow)])
def test_builtin_datasets_meet_the_contract(name: str, real_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNKIT_DATA", str(real_data))
    try:
        spec = cnnkit.get_dataset(name)
    except PluginLoadError as exc:
        pytest.skip(f"dataset module not importable yet: {exc.format_message()}")
    check_dataset_spec(spec)
