"""cnnkit-efficientnet: the cnnkit contract, torchvision's parameter counts, the recipes and the options.

Large variants are counted on the ``meta`` device; real forwards run at 32 px so every test is quick.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torchvision.models as tv
from cnnkit_efficientnet import models
from cnnkit_efficientnet.models import EFFICIENTNET_B0, VARIANTS, EfficientNetOptions
from torch import nn
from torchvision.ops import StochasticDepth

import cnnkit
from cnnkit.errors import UsageError
from cnnkit.testing import check_model_spec

NAMES = [f"efficientnet_{v}" for v in VARIANTS]
SPECS = {spec.name: spec for spec in (getattr(models, name.upper()) for name in NAMES)}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small CPU forwards gain nothing from more threads, and on a busy machine OpenMP spinning costs a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def count_on_meta(build: Callable[[], nn.Module], side: int = 224) -> int:
    """Parameters of the model built on the meta device, after checking it maps a 3-channel input to logits."""
    with torch.device("meta"):
        model = build().eval()
        logits = model(torch.empty(1, 3, side, side))
    assert logits.ndim == 2 and logits.shape[0] == 1
    return sum(p.numel() for p in model.parameters())


def test_contract() -> None:
    # The variants share one builder, so one real contract check covers its code; 32 px keeps the
    # real forward and backward quick. Every variant is built on the meta device below.
    check_model_spec(EFFICIENTNET_B0, input_size=32)


@pytest.mark.parametrize("name", NAMES)
def test_every_variant_builds_on_meta_at_its_own_resolution(name: str) -> None:
    spec = SPECS[name]
    side = spec.recipe.input_size
    with torch.device("meta"):
        model = spec.build(1, 7).eval()
        assert model(torch.empty(2, 1, side, side)).shape == (2, 7)
    assert all(t.device.type == "meta" for t in model.state_dict().values())


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "efficientnet_b7" else n for n in NAMES]
)
def test_parameters_equal_torchvision(name: str) -> None:
    ours = count_on_meta(lambda: SPECS[name].build(3, 1000), side=SPECS[name].recipe.input_size)
    theirs = count_on_meta(lambda: getattr(tv, name)(weights=None))
    assert ours == theirs


def test_parameters_of_b0_and_b1() -> None:
    assert count_on_meta(lambda: SPECS["efficientnet_b0"].build(3, 1000)) == 5_288_548
    assert count_on_meta(lambda: SPECS["efficientnet_b1"].build(3, 1000)) == 7_794_184


def test_registered_through_entry_points() -> None:
    assert cnnkit.list_models("efficientnet*") == NAMES
    spec = cnnkit.get_model("efficientnet_b3")
    assert spec is SPECS["efficientnet_b3"]
    from cnnkit.registry import MODELS

    assert MODELS.entry("efficientnet_b0").distribution == "cnnkit-efficientnet"


def test_recipes_carry_each_variants_resolution_and_the_seeds_adamw() -> None:
    sizes = [SPECS[n].recipe.input_size for n in NAMES]
    assert sizes == [224, 240, 260, 300, 380, 456, 528, 600]
    for spec in SPECS.values():
        recipe = spec.recipe
        assert (recipe.optimizer, recipe.schedule, recipe.label_smoothing) == ("adamw", "cosine", 0.1)
        # No batch augmentation and 4x the seed's rate: what measured better on COIL-20 (bench/results/coil20.md).
        assert recipe.augment == "none" and recipe.normalize and recipe.warmup > 0
        assert recipe.lr == pytest.approx(4e-3 * recipe.batch_size / 128)
        seed = recipe.named("d2l")
        assert (seed.optimizer, seed.lr) == ("adamw", 1e-3)
        assert spec.paper.startswith("Tan & Le") and "2019" in spec.paper


def dropout_of(model: nn.Module) -> float:
    return next(m.p for m in model.modules() if isinstance(m, nn.Dropout))


@pytest.mark.slow
def test_dropout_defaults_to_torchvisions_per_variant_and_can_be_set() -> None:
    with torch.device("meta"):
        defaults = [dropout_of(SPECS[n].build(1, 10)) for n in NAMES]
        assert defaults == [0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5]
        assert dropout_of(EFFICIENTNET_B0.build(1, 10, dropout=0.35)) == 0.35
        assert dropout_of(EFFICIENTNET_B0.build(1, 10, dropout="0")) == 0.0  # as -o dropout=0 passes it


def test_stochastic_depth_rises_to_the_option() -> None:
    with torch.device("meta"):
        model = EFFICIENTNET_B0.build(1, 10, stochastic_depth_prob=0.4)
    probs = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert probs[0] == 0.0 and probs == sorted(probs)
    assert probs[-1] == pytest.approx(0.4 * (len(probs) - 1) / len(probs))


def test_bad_option_values_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="dropout"):
        EFFICIENTNET_B0.build(1, 10, dropout=1.5)
    with pytest.raises(UsageError, match="stochastic_depth_prob"):
        EFFICIENTNET_B0.build(1, 10, stochastic_depth_prob=-0.1)
    assert EfficientNetOptions().dropout is None


def test_any_channels_and_odd_input_sizes() -> None:
    torch.manual_seed(0)
    model = EFFICIENTNET_B0.build(in_channels=1, num_classes=5).eval()
    stem = model.features[0][0]
    assert isinstance(stem, nn.Conv2d) and stem.weight.shape == (32, 1, 3, 3)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 33, 47)).shape == (1, 5)
        assert EFFICIENTNET_B0.build(4, 3).eval()(torch.randn(1, 4, 16, 16)).shape == (1, 3)


def test_its_head_is_the_classifier_and_torchvision_s_weights_load_as_they_are(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The spec says where its head is (so --freeze backbone and --head-lr-mult work), and since the
    model is torchvision's own EfficientNet, a torchvision state dict loads key for key."""
    from cnnkit.protocols import model_head

    assert all(model_head(spec) == "classifier" for spec in SPECS.values())
    torch.manual_seed(0)
    reference = tv.efficientnet_b0(weights=None).eval()
    file = tmp_path / "b0.pth"
    torch.save(reference.state_dict(), file)
    ours = cnnkit.build_model("efficientnet_b0", 3, 1000, weights=str(file)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(images) - reference(images)).abs().max().item() <= 1e-5
    tuned = cnnkit.build_model("efficientnet_b0", 1, 5, weights=str(file))
    assert tuned.classifier[1].out_features == 5 and tuned.features[0][0].in_channels == 1
