"""``cnnkit summary`` and cnnkit.summary: shapes, totals, MACs, memory, errors, all on the meta device."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from cnnkit.cli.app import app
from cnnkit.errors import UsageError
from cnnkit.models.base import Architecture, NoOptions
from cnnkit.protocols import Recipe
from cnnkit.registry import MODELS
from cnnkit.summary import (
    human_bytes,
    human_count,
    parse_input_shape,
    smallest_input_size,
    summarize,
)

TOO_SMALL = re.compile(
    r"^cnnkit: error: input (\d+)x(\d+)x(\d+) is too small for (\S+): the feature map vanished at "
    r"(\S+) \((\w+)\); the smallest input is (\d+)x(\d+)x(\d+)$"
)


def _one_error_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _meta_model(name: str, in_channels: int = 1, num_classes: int = 10, **options: Any) -> nn.Module:
    with torch.device("meta"):
        return MODELS.get(name).build(in_channels, num_classes, **options).eval()


# ---------------------------------------------------------------------------------------------
# Shapes and layers
# ---------------------------------------------------------------------------------------------
GOOGLENET_96 = {
    "b1": (1, 64, 24, 24),
    "b2": (1, 192, 12, 12),
    "b3": (1, 480, 6, 6),
    "b4": (1, 832, 3, 3),
    "b5": (1, 1024),
    "head": (1, 10),
}


def test_googlenet_top_level_shapes_are_d2ls() -> None:
    summary = summarize("googlenet", (1, 96, 96))
    assert {row.name: row.output_shape for row in summary.layers} == GOOGLENET_96
    assert [row.name for row in summary.layers] == list(GOOGLENET_96)
    assert summary.output_shape == (1, 10)


def test_googlenet_table_on_the_command_line(runner: CliRunner) -> None:
    result = runner.invoke(app, ["summary", "googlenet", "--input", "1x96x96"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for name, shape in GOOGLENET_96.items():
        row = next(line for line in lines if re.match(rf"^\W*{name}\s", line))
        assert "(" + ", ".join(map(str, shape)) + ")" in row
    for label in ("Total params", "Trainable params", "FLOPs (2 x MACs)", "Parameter memory", "Activation memory"):
        assert label in result.stdout
    assert "5,977,530 (5.98 M)" in result.stdout  # d2l's GoogLeNet for 10 classes
    assert re.search(r"\d+\.\d\d MMACs", result.stdout) and "MiB" in result.stdout


def test_defaults_are_the_recipe_size_one_channel_ten_classes() -> None:
    summary = summarize("googlenet")
    assert (summary.input_shape, summary.num_classes, summary.batch) == ((1, 96, 96), 10, 1)
    assert summarize("lenet").input_shape == (1, 28, 28)


# ---------------------------------------------------------------------------------------------
# Totals
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lenet", "lenet_bn", "googlenet", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_parameter_totals_match_a_real_model(name: str) -> None:
    torch.manual_seed(0)
    real = MODELS.get(name).build(1, 10)  # on the CPU, with real weights
    summary = summarize(name, (1, 64, 64))
    assert summary.total_params == sum(p.numel() for p in real.parameters())
    assert summary.trainable_params == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert summary.param_bytes == sum(p.numel() * p.element_size() for p in real.parameters())
    assert summary.buffer_bytes == sum(b.numel() * b.element_size() for b in real.buffers())


def test_lenet_figures_by_hand() -> None:
    summary = summarize("lenet", (1, 28, 28))
    # conv 6x28x28 outputs x 25 taps, conv 16x10x10 x 6 channels x 25 taps; linear 400-120-84-10
    assert summary.macs_by_kind["conv"] == 6 * 28 * 28 * 25 + 16 * 10 * 10 * 6 * 25
    assert summary.macs_by_kind["linear"] == 400 * 120 + 120 * 84 + 84 * 10
    assert summary.flops == 2 * summary.macs
    # Leaf outputs in float32; Flatten returns a view and adds no memory.
    elements = 2 * 6 * 28 * 28 + 6 * 14 * 14 + 2 * 16 * 10 * 10 + 2 * 16 * 5 * 5 + 2 * 120 + 2 * 84 + 10
    assert summary.activation_bytes == 4 * elements


def test_torchvision_sized_vgg16_is_summarised_without_weights() -> None:
    """138 M parameters would be 553 MB of real memory; on meta they cost nothing."""

    @dataclass
    class RecordingSpec:
        inner: Architecture[Any]
        built: list[nn.Module] = field(default_factory=list)
        name: str = "vgg16"
        summary: str = ""
        paper: str = ""
        recipe: Recipe = Recipe()
        options: type[BaseModel] = NoOptions

        def build(self, in_channels: int = 1, num_classes: int = 10, **options: Any) -> nn.Module:
            model = self.inner.build(in_channels, num_classes, **options)
            self.built.append(model)
            return model

    spec = RecordingSpec(MODELS.get("vgg16"), options=MODELS.get("vgg16").options)
    summary = summarize(spec, (3, 224, 224), num_classes=1000)
    assert summary.total_params == 138_357_544  # torchvision's VGG-16
    assert 15.4e9 < summary.macs_by_kind["conv"] + summary.macs_by_kind["linear"] < 15.5e9
    assert spec.built and all(p.is_meta for model in spec.built for p in model.parameters())


_DYNAMO_CHECK = """
import sys, torch, torch._refs, torch._refs.nn.functional as F
from cnnkit.summary import summarize

def cached():  # torch's meta kernels whose dynamo wrapper has cached its disabled version
    found = []
    for f in [*vars(torch._refs).values(), *vars(F).values()]:
        while callable(f):
            found += [f] if "__dynamo_disable" in getattr(f, "__dict__", {}) else []
            f = getattr(f, "__wrapped__", None)
    return found

assert summarize("googlenet", (1, 96, 96)).layers[3].output_shape == (1, 832, 3, 3)
print("skipped", "torch._dynamo" not in sys.modules, len(cached()))
import torch._dynamo  # the real module, not the stand-in
x = torch.empty(2, 3, device="meta")
assert torch.cat([torch.relu(x), x + x]).shape == (4, 3)
print("real", torch._dynamo.__file__.endswith("__init__.py"), all(f.__dynamo_disable is not f for f in cached()))
"""


@pytest.mark.slow
def test_meta_pass_skips_the_dynamo_import_and_leaves_torch_as_it_was() -> None:
    proc = subprocess.run([sys.executable, "-c", _DYNAMO_CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["skipped", "True", "0", "real", "True", "True"]


def test_batch_scales_macs_and_activations_not_parameters() -> None:
    one, four = summarize("lenet_bn", batch=1), summarize("lenet_bn", batch=4)
    assert four.macs == 4 * one.macs and four.activation_bytes == 4 * one.activation_bytes
    assert four.total_params == one.total_params and four.param_bytes == one.param_bytes
    assert four.output_shape == (4, 10) and all(r.output_shape[0] == 4 for r in four.layers)


@pytest.mark.parametrize(
    ("name", "side"), [("lenet", 28), ("resnet18", 96), ("googlenet", 96), ("densenet", 96), ("nin", 224)]
)
def test_conv_and_linear_macs_match_torch_flop_counter(name: str, side: int) -> None:
    summary = summarize(name, (1, side, side), batch=2)
    model = _meta_model(name)
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(2, 1, side, side, device="meta"))
    ours = 2 * (summary.macs_by_kind["conv"] + summary.macs_by_kind["linear"])
    assert abs(ours - counter.get_total_flops()) <= 0.01 * counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------
def test_json_is_one_object_with_the_schema(runner: CliRunner) -> None:
    result = runner.invoke(
        app, ["summary", "lenet_bn", "--input", "1x32x32", "--classes", "7", "--batch", "3", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"model", "input", "classes", "batch", "options", "total_params", "trainable_params", "macs", "flops",
            "param_bytes", "activation_bytes", "layers"} <= set(data)  # fmt: skip
    assert (data["model"], data["input"], data["classes"], data["batch"], data["options"]) == (
        "lenet_bn", [1, 32, 32], 7, 3, {}
    )
    assert data["flops"] == 2 * data["macs"] > 0
    assert data["param_bytes"] == 4 * data["total_params"] and data["activation_bytes"] > 0
    for layer in data["layers"]:
        assert set(layer) == {"name", "type", "output_shape", "params", "macs"}
    assert data["layers"][-1]["output_shape"] == [3, 7]
    assert sum(layer["params"] for layer in data["layers"]) == data["total_params"]


def test_options_pass_through_and_change_the_totals(runner: CliRunner) -> None:
    full = json.loads(runner.invoke(app, ["summary", "vgg11", "-f", "json"]).stdout)
    result = runner.invoke(app, ["summary", "vgg11", "-o", "width=0.25", "-f", "json"])
    assert result.exit_code == 0, result.output
    quarter = json.loads(result.stdout)
    assert quarter["options"]["width"] == 0.25 and full["options"]["width"] == 1.0
    assert quarter["total_params"] == sum(p.numel() for p in _meta_model("vgg11", width=0.25).parameters())
    assert quarter["total_params"] < full["total_params"] and quarter["macs"] < full["macs"] / 10


def test_bad_option_is_one_line_exit_2(runner: CliRunner) -> None:
    result = runner.invoke(app, ["summary", "vgg11", "-o", "widht=0.25"])
    assert result.exit_code == 2
    assert "widht" in _one_error_line(result) and "width" in result.stderr


# ---------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------
def test_depth_selects_the_rows() -> None:
    model = _meta_model("googlenet")
    leaves = [name for name, m in model.named_modules() if name and next(m.children(), None) is None]
    by_depth = {d: summarize("googlenet", depth=d) for d in (0, 1, 2, 99)}

    assert [r.name for r in by_depth[1].layers] == list(GOOGLENET_96)
    two = [r.name for r in by_depth[2].layers]
    assert "b1.0" in two and "b3.0" in two and "head.1" in two and "b3" not in two
    assert all(name.count(".") <= 1 for name in two)
    assert [r.name for r in by_depth[0].layers] == leaves == [r.name for r in by_depth[99].layers]
    assert by_depth[2].layers[two.index("b3.0")].type == "Inception"
    for summary in by_depth.values():  # every depth partitions the whole model
        assert sum(r.params for r in summary.layers) == summary.total_params
        assert sum(r.macs for r in summary.layers) == summary.macs


def test_flat_model_lists_its_leaves_at_any_depth(runner: CliRunner) -> None:
    names = [[r.name for r in summarize("lenet", depth=d).layers] for d in (1, 3, 0)]
    assert names[0] == names[1] == names[2] == [str(i) for i in range(13)]
    result = runner.invoke(app, ["summary", "lenet", "--depth", "-1"])
    assert result.exit_code == 2 and "--depth" in _one_error_line(result)


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------
def test_parse_input_shape() -> None:
    assert parse_input_shape("1x96x96") == (1, 96, 96)
    assert parse_input_shape(" 3X224x224 ") == (3, 224, 224)


@pytest.mark.parametrize("text", ["96x96", "1x0x28", "abc", "1x28x28x3", "1.5x28x28", ""])
def test_malformed_input_is_one_line_exit_2(runner: CliRunner, text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_input_shape(text)
    assert info.value.exit_code == 2
    result = runner.invoke(app, ["summary", "lenet", f"--input={text}"])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert f"'{text}'" in line and "CxHxW" in line and "e.g. --input 1x28x28" in line


@pytest.mark.parametrize("argv", [["--classes", "0"], ["--batch", "0"]])
def test_nonpositive_counts_are_usage_errors(runner: CliRunner, argv: list[str]) -> None:
    result = runner.invoke(app, ["summary", "lenet", *argv])
    assert result.exit_code == 2 and argv[0] in _one_error_line(result)


# ---------------------------------------------------------------------------------------------
# Too small
# ---------------------------------------------------------------------------------------------
def test_lenet_smallest_input_really_is_the_smallest_on_the_cpu() -> None:
    """Checked with real tensors, independently of the meta-device machinery."""
    for name, expected in (("lenet", 12), ("lenet_bn", 16)):
        spec = MODELS.get(name)
        assert smallest_input_size(spec) == expected
        model = spec.build(1, 10).eval()
        with torch.no_grad():
            assert model(torch.zeros(2, 1, expected, expected)).shape == (2, 10)
            with pytest.raises(RuntimeError):
                model(torch.zeros(2, 1, expected - 1, expected - 1))


@pytest.mark.parametrize(
    ("name", "channels"),
    [("lenet", 1), ("vgg11", 1), ("alexnet", 3), ("nin", 1), pytest.param("densenet", 1, marks=pytest.mark.slow)],
)
def test_too_small_input_names_the_layer_and_the_smallest_size(runner: CliRunner, name: str, channels: int) -> None:
    smallest = smallest_input_size(MODELS.get(name), in_channels=channels)
    assert smallest > 1
    given = f"{channels}x{smallest - 1}x{smallest - 1}"
    result = runner.invoke(app, ["summary", name, "--input", given])
    assert result.exit_code == 2
    match = TOO_SMALL.match(_one_error_line(result))
    assert match, result.stderr
    assert "x".join(match.group(1, 2, 3)) == given and match.group(4) == name
    assert match.group(7, 8, 9) == (str(channels), str(smallest), str(smallest))
    layer, layer_type = match.group(5, 6)
    assert type(dict(_meta_model(name, channels).named_modules())[layer]).__name__ == layer_type
    # The reported size works; one pixel less fails.
    assert summarize(name, (channels, smallest, smallest)).output_shape == (1, 10)
    with pytest.raises(UsageError):
        summarize(name, (channels, smallest - 1, smallest - 1))


def test_vanishing_map_is_pinned_to_the_pool_that_emptied_it() -> None:
    """Adaptive pooling accepts an empty map on meta; the error must name where it emptied."""
    with pytest.raises(UsageError, match=r"vanished at 5 \(AvgPool2d\); the smallest input is 1x12x12"):
        summarize("lenet", (1, 11, 11))
    with pytest.raises(UsageError, match=r"vanished at 3 \(Conv2d\)"):
        summarize("lenet", (1, 8, 8))


def test_an_emptied_map_is_caught_where_it_emptied_even_if_torch_carries_on() -> None:
    """Cropping 4 px to nothing raises no error: adaptive pooling turns the empty map into 1x1."""
    spec = Architecture(
        name="cropnet", summary="", paper="", recipe=Recipe(input_size=28), options=NoOptions,
        builder=lambda c, k, o: nn.Sequential(nn.ZeroPad2d(-2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, k)),
    )  # fmt: skip
    assert smallest_input_size(spec) == 5
    with pytest.raises(UsageError, match=r"vanished at 0 \(ZeroPad2d\); the smallest input is 1x5x5"):
        summarize(spec, (1, 4, 4))


def _fixed_size_spec() -> Architecture[NoOptions]:
    """A classifier whose linear layer only fits a 28 px input (no adaptive pooling)."""
    return Architecture(
        name="fixednet",
        summary="",
        paper="",
        recipe=Recipe(input_size=28),
        options=NoOptions,
        builder=lambda c, k, o: nn.Sequential(nn.Conv2d(c, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, k)),
    )


def test_an_input_that_does_not_fit_a_fixed_classifier_says_which_layer() -> None:
    spec = _fixed_size_spec()
    assert smallest_input_size(spec) == 28
    with pytest.raises(UsageError, match=r"input 1x40x40 does not fit fixednet: 2 \(Linear\) failed"):
        summarize(spec, (1, 40, 40))
    # Smaller inputs fail at the same linear layer: no map vanished, so the message says so.
    too_small = r"too small for fixednet: the forward pass failed at 2 \(Linear\); the smallest input is 1x28x28"
    with pytest.raises(UsageError, match=too_small):
        summarize(spec, (1, 10, 10))


def test_a_model_no_size_fits_is_a_usage_error() -> None:
    spec = Architecture(
        name="nofit", summary="", paper="", recipe=Recipe(input_size=28), options=NoOptions,
        builder=lambda c, k, o: nn.Sequential(nn.Flatten(), nn.Linear(5, k)),
    )  # fmt: skip
    with pytest.raises(UsageError, match=r"model 'nofit' accepts no square input up to 1x1024x1024"):
        smallest_input_size(spec)


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------
def test_human_units() -> None:
    assert human_count(5_977_530) == "5.98 M"
    assert human_count(1_530_000_000, "MACs") == "1.53 GMACs"
    assert human_count(840) == "840"
    assert human_bytes(23_910_120) == "22.80 MiB"
    assert human_bytes(512) == "512 B"
