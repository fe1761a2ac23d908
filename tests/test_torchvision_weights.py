"""torchvision's weights in cnnkit's models: for every family cnnkit shares with torchvision, a
state dict of torchvision's own model (seeded random weights standing in for downloaded ones,
batch-norm statistics and biases randomised too, so that no mapping error hides behind a default
value) loaded through ``--init-from`` gives torchvision's logits on the same input within 1e-5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import cnnkit
from cnnkit.errors import UsageError, WeightsError
from cnnkit.models.torchvision_weights import FAMILIES, torchvision_layout

# (cnnkit model, options, torchvision model, input side); slow: over a few seconds on two CPU cores
# (building the 4096-wide classifiers of AlexNet and VGG dominates; one VGG stays in the fast set)
CASES: list[Any] = [
    pytest.param("alexnet", {"layout": "torchvision"}, "alexnet", 64, marks=pytest.mark.slow),
    pytest.param("vgg11", {}, "vgg11", 32, marks=pytest.mark.slow),
    ("vgg11", {"batch_norm": True}, "vgg11_bn", 32),
    pytest.param("vgg16", {}, "vgg16", 32, marks=pytest.mark.slow),
    pytest.param("vgg16", {"batch_norm": True}, "vgg16_bn", 32, marks=pytest.mark.slow),
    ("googlenet", {"layout": "torchvision"}, "googlenet", 64),
    ("resnet18", {}, "resnet18", 64),
    pytest.param("resnet50", {}, "resnet50", 64, marks=pytest.mark.slow),
    pytest.param("densenet121", {}, "densenet121", 64, marks=pytest.mark.slow),
]


def torchvision_model(name: str, seed: int = 0) -> nn.Module:
    """torchvision's ``name`` with seeded random weights, BN statistics and biases (eval mode)."""
    torch.manual_seed(seed)
    extra = {"init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **extra)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
            elif isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize(("model", "options", "tv_name", "side"), CASES)
def test_torchvision_weights_give_torchvision_s_logits(
    model: str, options: dict[str, Any], tv_name: str, side: int, tmp_path: Path, one_thread: None
) -> None:
    reference = torchvision_model(tv_name)
    file = tmp_path / f"{tv_name}.pth"
    torch.save(reference.state_dict(), file)
    ours = cnnkit.build_model(model, 3, 1000, weights=str(file), **options).eval()
    images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    assert expected.abs().max() > 1e-3  # a real signal, not all zeros
    assert (got - expected).abs().max().item() <= 1e-5


def test_every_family_cnnkit_shares_with_torchvision_is_tested() -> None:
    tested = {case.values[0] if hasattr(case, "values") else case[0] for case in CASES}
    assert tested == set(FAMILIES) == {"alexnet", "vgg11", "vgg16", "googlenet", "resnet18", "resnet50", "densenet121"}


def test_a_safetensors_state_dict_loads_the_same_as_a_pth(tmp_path: Path, one_thread: None) -> None:
    reference = torchvision_model("resnet18")
    file = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(file))
    ours = cnnkit.build_model("resnet18", 3, 1000, weights=str(file)).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(images) - reference(images)).abs().max().item() <= 1e-5


def test_the_d2l_layouts_cannot_hold_torchvision_s_weights_and_say_which_option_can() -> None:
    for model in ("alexnet", "googlenet"):
        spec = cnnkit.get_model(model)
        reason = torchvision_layout(model, spec.options())
        assert isinstance(reason, str) and "-o layout=torchvision" in reason
    with pytest.raises(UsageError, match="layout=torchvision"):
        cnnkit.build_model("alexnet", 3, 10, weights="torchvision:alexnet")


def test_the_older_densenet_key_spelling_maps_too() -> None:
    layout = torchvision_layout("densenet121", cnnkit.get_model("densenet121").options())
    assert layout is not None and not isinstance(layout, str)
    assert layout.rename("features.denseblock2.denselayer3.norm.1.weight") == "block2.layers.2.0.weight"
    assert layout.rename("features.denseblock2.denselayer3.conv2.weight") == "block2.layers.2.5.weight"


def test_another_class_count_replaces_the_head_and_gray_sums_the_rgb_kernels(tmp_path: Path, capsys: Any, one_thread: None) -> None:
    reference = torchvision_model("resnet18")
    file = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), file)
    torch.manual_seed(5)
    fresh = cnnkit.build_model("resnet18", 1, 10)
    torch.manual_seed(5)
    ours = cnnkit.build_model("resnet18", 1, 10, weights=str(file))
    err = capsys.readouterr().err
    assert "classifier fc replaced: 1000 -> 10 classes" in err
    assert "first convolution conv1 adapted: 3 -> 1 input channels (the kernels summed" in err
    assert torch.equal(ours.fc.weight, fresh.fc.weight) and torch.equal(ours.fc.bias, fresh.fc.bias)
    assert torch.allclose(ours.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(ours.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # A gray image repeated on three channels gives the RGB model's features exactly.
    gray = torch.randn(2, 1, 64, 64)
    ours.eval()
    with torch.no_grad():
        trunk = nn.Sequential(*list(ours.children())[:-1])
        theirs = nn.Sequential(*list(reference.children())[:-1])
        assert torch.allclose(trunk(gray), theirs(gray.repeat(1, 3, 1, 1)), atol=1e-5)


def test_gray_weights_into_rgb_repeat_the_kernel_scaled_by_a_third(tmp_path: Path, capsys: Any, one_thread: None) -> None:
    gray = cnnkit.build_model("resnet18", 1, 10)
    file = tmp_path / "gray.pth"
    torch.save(gray.state_dict(), file)
    rgb = cnnkit.build_model("resnet18", 3, 10, weights=str(file))
    assert "1 -> 3 input channels (the kernels repeated, scaled by 1/3)" in capsys.readouterr().err
    assert torch.allclose(rgb.conv1.weight, gray.conv1.weight.repeat(1, 3, 1, 1) / 3)
    image = torch.randn(1, 1, 64, 64)
    gray.eval(), rgb.eval()
    with torch.no_grad():  # the same gray image on three channels: the same logits
        assert torch.allclose(rgb(image.repeat(1, 3, 1, 1)), gray(image), atol=1e-5)


@pytest.mark.slow
def test_another_architecture_s_file_names_the_first_mismatching_keys(tmp_path: Path, one_thread: None) -> None:
    file = tmp_path / "resnet50.pth"
    theirs = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(theirs, file)
    ours = cnnkit.build_model("resnet18", 3, 1000).state_dict()
    extra = [k for k in theirs if k not in ours]
    with pytest.raises(WeightsError) as caught:
        cnnkit.build_model("resnet18", 3, 1000, weights=str(file))
    message = caught.value.format_message()
    assert caught.value.exit_code == 4 and "\n" not in message
    assert "does not fit model 'resnet18'" in message
    assert f"unexpected {len(extra)}: {', '.join(extra[:3])} (+{len(extra) - 3} more)" in message
    assert "shape file vs model" in message


def test_torchvision_name_of_another_model_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="takes torchvision:vgg16_bn"):
        cnnkit.build_model("vgg16", 3, 10, weights="torchvision:vgg16", batch_norm=True)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["alexnet", "googlenet"])
def test_the_torchvision_layouts_honour_the_model_contract(model: str, one_thread: None) -> None:
    from cnnkit.testing import check_model_spec

    check_model_spec(cnnkit.get_model(model), input_size=64, options={"layout": "torchvision"})
