"""``cnnkit export --format onnx`` and ``cnnkit predict FILE.onnx``, checked against ONNX Runtime.

Every built-in model (and the EfficientNet plugin's B0 when installed) gets random weights and
BatchNorm statistics, is saved as ``.safetensors``, exported through the CLI (which checks it) at
a small input by ``torch.export`` (none needs the TorchScript fallback), and its ``.onnx`` file is
then compared with PyTorch: logits at batches of 1 and 8, metadata, and the predictions for image
files. The CLI's ``predict`` is compared on both files for LeNet-BN. ``torch.export`` takes 1-3 s
for LeNet-BN here and several seconds for the larger networks, so only LeNet-BN's export is in the
fast set. Tests that need the ``onnx`` extra skip with a reason without it (``make test`` installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import cnnkit
from cnnkit.checkpoint import WeightsMeta, read_meta, save_weights
from cnnkit.cli.app import app
from cnnkit.data.batches import to_float
from cnnkit.evaluate import load_images, prepare_images
from cnnkit.onnx_runtime import METADATA_KEYS
from cnnkit.prediction import decode_images, prepare_batch, rank
from cnnkit.summary import smallest_input_size

CLASSES = ["cat", "dog", "owl", "eel", "yak"]
TOLERANCE = 1e-4
BUILTIN = {ep.name for ep in entry_points(group="cnnkit.models") if ep.value.startswith("cnnkit.")}
MODELS = [name for name in cnnkit.list_models() if name in BUILTIN]
# Convolutions at a quarter width: the same graph with fewer channels.
OPTIONS: dict[str, dict[str, Any]] = {"vgg11": {"width": 0.25}, "vgg16": {"width": 0.25}}
# One torch thread: on a busy two-core machine OpenMP's spinning made these forwards 20x slower.
pytestmark = pytest.mark.usefixtures("one_thread")


def skip_without_extra() -> None:
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason=f"the onnx extra is not installed (pip install 'cnnkit[onnx]'): no {module}")


@pytest.fixture
def onnx_extra() -> None:
    skip_without_extra()


EXPORT_OUTPUT: dict[Path, str] = {}
"""What the CLI printed for each file the ``exported`` fixture wrote."""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a lenet_bn .onnx file beside its .safetensors, an image for it): exported once, through the
    CLI with an explicit --format onnx and --no-check, for the tests that only read them
    (torch.export takes a second or two)."""
    skip_without_extra()
    folder = tmp_path_factory.mktemp("exported")
    _, meta, weights = make_weights(folder, "lenet_bn")
    out = folder / "lenet_bn.onnx"
    result = CliRunner().invoke(app, ["export", str(weights), "--format", "onnx", "--out", str(out), "--no-check"])
    assert result.exit_code == 0, result.output
    EXPORT_OUTPUT[out] = result.output
    return out, write_images(folder, 1, meta.input_size, count=1)[0]


def side_for(name: str, model: nn.Module, channels: int) -> int:
    """A small side that still exercises the model: 32 px (its recipe's if smaller), else its smallest input.

    AlexNet (65 px) and VGG (32 px) then pool a 1x1 map to 5x5 or 7x7, which only the matrix form
    of adaptive pooling exports.
    """
    spec = cnnkit.get_model(name)
    if spec.recipe.input_size <= 32:
        return spec.recipe.input_size
    try:  # one real forward at 32 px is cheaper than the bisection below
        with torch.no_grad():
            model(torch.zeros(1, channels, 32, 32))
        return 32
    except (RuntimeError, ValueError):
        return smallest_input_size(spec, channels, len(CLASSES), OPTIONS.get(name))


def randomise(model: nn.Module) -> nn.Module:
    """Random weights and BatchNorm statistics, as a trained net has, so that logits differ between classes.

    (Fresh initialisations can give all-zero or ~1e-13 logits, against which any comparison passes;
    statistics calibrated on a few random images instead make deep nets ill-conditioned at 32 px.)
    """
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                if isinstance(module, nn.Conv2d):  # (the large linear layers keep theirs: time)
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.uniform_(module.bias, -0.1, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.2, 0.2)
                nn.init.uniform_(module.running_mean, -0.2, 0.2)
                nn.init.uniform_(module.running_var, 0.5, 2.0)
    return model.eval()


def make_weights(
    folder: Path, name: str, channels: int = 1, side: int | None = None, options: dict[str, Any] | None = None
) -> tuple[nn.Module, WeightsMeta, Path]:
    options = OPTIONS.get(name, {}) if options is None else options
    model = randomise(cnnkit.build_model(name, channels, len(CLASSES), **options))
    side = side or side_for(name, model, channels)
    meta = WeightsMeta(
        model=name, model_options=options, in_channels=channels, num_classes=len(CLASSES), input_size=side,
        classes=CLASSES, mean=[0.45, 0.4, 0.35][:channels], std=[0.25, 0.3, 0.2][:channels], epoch=3,
    )  # fmt: skip
    path = folder / f"{name}.safetensors"
    save_weights(path, model, meta)
    return model, meta, path


def write_images(folder: Path, channels: int, side: int, count: int = 2) -> list[Path]:
    """PNG files of another size than the model's input (so predict resizes them), grey or colour."""
    rng = np.random.default_rng(7)
    shape = (side + 9, side + 4) if channels == 1 else (side + 9, side + 4, 3)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def props_of(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def assert_close_logits(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    limit = TOLERANCE * max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(got - expected).max()) <= limit


def export_and_compare(tmp_path: Path, runner: Any, name: str, channels: int) -> None:
    """Export through the CLI; logits, metadata and predictions of the .onnx file against PyTorch's."""
    from cnnkit.onnx_runtime import load_onnx

    model, meta, weights = make_weights(tmp_path, name, channels)
    out = tmp_path / f"{name}.onnx"
    side = meta.input_size

    result = runner.invoke(app, ["export", str(weights), "--out", str(out)])  # --format inferred from .onnx

    assert result.exit_code == 0, result.output
    assert f"wrote {out} ({name}, ONNX opset 18" in result.stdout
    assert "checked with onnxruntime" in result.stdout and "max abs logit difference" in result.stdout
    assert "warning" not in result.stderr  # no fallback

    # Opened the way predict opens it: NCHW float input with a dynamic batch axis.
    exported = load_onnx(out, device="cpu")
    (graph_input,) = exported.session.get_inputs()
    assert graph_input.shape == ["batch", channels, side, side] and graph_input.type == "tensor(float)"

    # ONNX Runtime against PyTorch (eval mode) on batches of other sizes than the traced one (2).
    x = np.random.default_rng(3).standard_normal((8, channels, side, side)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert expected.std() > 1e-2, "degenerate logits would make the comparison meaningless"
    assert_close_logits(exported.logits(x), expected)
    assert_close_logits(exported.logits(x[:1]), expected[:1])

    # Metadata: what a client needs to prepare images, and the whole weights metadata.
    props = exported.session.get_modelmeta().custom_metadata_map
    assert props["model"] == name and json.loads(props["classes"]) == CLASSES
    assert int(props["in_channels"]) == channels and int(props["input_size"]) == side
    assert json.loads(props["mean"]) == pytest.approx(meta.mean) and json.loads(props["std"]) == pytest.approx(meta.std)
    assert props["cnnkit_version"] == cnnkit.__version__
    assert WeightsMeta.model_validate_json(props["cnnkit"]) == read_meta(weights)
    assert props["exporter"].startswith("torch.export (torch.onnx.export dynamo=True)"), props["exporter"]
    assert "fallback" not in props["exporter"]

    # predict: the same ranking from both files (image files of another size, so resized).
    images = write_images(tmp_path, channels, side)
    from_onnx = exported.predict(images, top=len(CLASSES))
    # PyTorch's side as predict_files computes it, on the model in memory (not loaded a third time).
    batch = prepare_batch(decode_images(images, channels), side, meta.mean, meta.std)
    with torch.no_grad():
        from_torch = rank(images, model(torch.from_numpy(batch)).numpy(), CLASSES, len(CLASSES))
    assert_same_predictions([p.to_dict() for p in from_onnx], [p.to_dict() for p in from_torch])


def assert_same_predictions(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a["image"] == b["image"]
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-5)


# -- every model ------------------------------------------------------------------------------------


# torch.export takes 1-3 s for LeNet-BN and 2-13 s for the others here (AlexNet's and VGG's
# 4096-unit classifiers also make 170-190 MB files): only LeNet-BN is in the fast set; `make test`
# runs them all.
FAST = {"lenet_bn"}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_every_builtin_model_exports_and_matches(tmp_path: Path, runner: Any, onnx_extra: None, name: str) -> None:
    export_and_compare(tmp_path, runner, name, channels=3 if MODELS.index(name) % 2 else 1)


@pytest.mark.slow
def test_efficientnet_plugin_exports_and_matches(tmp_path: Path, runner: Any, onnx_extra: None) -> None:
    pytest.importorskip("cnnkit_efficientnet", reason="the cnnkit-efficientnet plugin is not installed")
    export_and_compare(tmp_path, runner, "efficientnet_b0", channels=3)


def test_builtins_are_all_covered() -> None:
    assert {"lenet", "lenet_bn", "alexnet", "vgg11", "vgg16", "nin", "googlenet", "resnet18", "resnet50",
            "densenet", "densenet121"} <= set(MODELS)  # fmt: skip


def test_cli_predict_gives_the_same_from_both_files(tmp_path: Path, runner: Any, onnx_extra: None) -> None:
    import onnx

    _, meta, weights = make_weights(tmp_path, "lenet_bn", channels=3)
    out = tmp_path / "lenet_bn.onnx"
    assert runner.invoke(app, ["export", str(weights), "--format", "onnx", "--out", str(out)]).exit_code == 0
    proto = onnx.load(str(out))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert {p.key for p in proto.metadata_props} == set(METADATA_KEYS)
    images = [str(p) for p in write_images(tmp_path, 3, meta.input_size, count=3)]

    from_onnx = runner.invoke(app, ["predict", str(out), *images, "--top", "3", "-f", "json"])
    from_torch = runner.invoke(app, ["predict", str(weights), *images, "--top", "3", "-f", "json"])

    assert from_onnx.exit_code == 0, from_onnx.output
    assert from_torch.exit_code == 0, from_torch.output
    assert_same_predictions(json.loads(from_onnx.stdout), json.loads(from_torch.stdout))
    table = runner.invoke(app, ["predict", str(out), images[0], "-k", "2"])
    assert table.exit_code == 0 and table.stdout.splitlines()[0] == images[0] and len(table.stdout.splitlines()) == 3


# -- adaptive pooling the exporter cannot express -----------------------------------------------------


@pytest.mark.parametrize(("size_in", "size_out"), [(6, 5), (1, 7), (3, 7), (13, 4), (8, 4)])
def test_matrix_pooling_equals_adaptive_pooling(size_in: int, size_out: int) -> None:
    from cnnkit.onnx_pooling import exportable_pooling

    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.AdaptiveAvgPool2d(size_out), nn.Flatten())
    x = torch.randn(4, 2, size_in, size_in + 1)
    with torch.no_grad():
        expected = model(x)
        with exportable_pooling(model, x):
            swapped = not isinstance(model[1], nn.AdaptiveAvgPool2d)
            got = model(x)
    assert swapped == (size_in % size_out != 0 or (size_in + 1) % size_out != 0)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert isinstance(model[1], nn.AdaptiveAvgPool2d)  # put back afterwards


def test_lenet_bn_off_its_recipe_size_exports(tmp_path: Path, onnx_extra: None) -> None:
    """At 32 px LeNet pools a 6x6 map to 5x5 (overlapping windows): not expressible as ONNX AveragePool."""
    import onnx

    from cnnkit.onnx_export import export_onnx
    from cnnkit.onnx_runtime import load_onnx

    model, meta, weights = make_weights(tmp_path, "lenet_bn", side=32)
    exported = export_onnx(weights, tmp_path / "lenet.onnx")
    assert exported.check is not None and exported.check.passed
    x = np.random.default_rng(1).standard_normal((5, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert_close_logits(load_onnx(exported.path).logits(x), expected)
    # The 6->5 pooling is the two averaging matrices (the linear layers are Gemm nodes).
    ops = [node.op_type for node in onnx.load(str(exported.path)).graph.node]
    assert ops.count("MatMul") == 2


# -- predict without torch ---------------------------------------------------------------------------


def test_predict_from_onnx_does_not_import_torch(tmp_path: Path, exported: tuple[Path, Path]) -> None:
    out, _ = exported
    images = [str(p) for p in write_images(tmp_path, 1, 28)]
    argv = ["predict", str(out), *images, "-k", "2", "-f", "json"]
    code = (
        "import sys; from typer.testing import CliRunner; from cnnkit.cli.app import app; "
        f"r = CliRunner().invoke(app, {argv!r}); assert r.exit_code == 0, r.output; "
        "print(r.stdout); print('torch' in sys.modules)"
    )

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)

    assert proc.returncode == 0, proc.stderr
    *output, imported = proc.stdout.strip().splitlines()
    assert imported == "False"
    predictions = json.loads("\n".join(output))
    assert [p["image"] for p in predictions] == images and all(len(p["top"]) == 2 for p in predictions)


# -- preprocessing: one implementation, equal to the torch path ---------------------------------------


@pytest.mark.parametrize(
    ("channels", "height", "width", "size"),
    [(1, 28, 28, 28), (1, 40, 52, 28), (3, 10, 13, 28), (3, 128, 128, 96), (1, 7, 200, 64), (3, 96, 96, 32)],
)
@pytest.mark.parametrize("normalise", [True, False])
def test_numpy_preprocessing_equals_torch_interpolation(
    channels: int, height: int, width: int, size: int, normalise: bool
) -> None:
    rng = np.random.default_rng(height * width)
    images = [rng.integers(0, 256, (channels, height, width), dtype=np.uint8) for _ in range(3)]
    mean, std = ([0.2, 0.5, 0.7][:channels], [0.3, 0.25, 0.2][:channels]) if normalise else (None, None)

    got = prepare_batch(images, size, mean, std)

    x = torch.from_numpy(np.stack(images)).float() / 255
    if (height, width) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if normalise:
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    assert got.dtype == np.float32 and got.shape == (3, channels, size, size)
    # 1e-5 of the 0..1 range (a 400th of a grey level), in normalised units.
    atol = 1e-5 / min(std) if std is not None else 1e-5
    np.testing.assert_allclose(got, x.numpy(), atol=atol, rtol=0)
    # The float path evaluation and training use (antialiased only when shrinking) agrees too.
    batches = to_float(torch.from_numpy(np.stack(images)), size)
    if normalise:
        batches = (batches - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    np.testing.assert_allclose(got, batches.numpy(), atol=atol, rtol=0)
    # And the torch-facing wrapper is the same function.
    torch.testing.assert_close(prepare_images([torch.from_numpy(i) for i in images], size, mean, std),
                               torch.from_numpy(got), atol=0, rtol=0)  # fmt: skip


def test_decoding_matches_torchvision(tmp_path: Path) -> None:
    from torchvision.transforms.functional import pil_to_tensor

    path = tmp_path / "colour.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(path)
    (rgb,), (grey,) = load_images([path], 3), load_images([path], 1)
    with Image.open(path) as image:
        assert torch.equal(rgb, pil_to_tensor(image.convert("RGB")))
        assert torch.equal(grey, pil_to_tensor(image.convert("L")))
    assert rgb.shape == (3, 9, 11) and grey.shape == (1, 9, 11) and grey.dtype == torch.uint8


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["garbage", "empty", "truncated", "foreign", "missing"])
def test_corrupt_onnx_exits_4_with_one_line(tmp_path: Path, runner: Any, exported: tuple[Path, Path], case: str) -> None:
    import onnx

    good, image = exported
    bad = tmp_path / "bad.onnx"
    if case == "garbage":
        bad.write_bytes(b"\x08\x07garbage" * 40)
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "foreign":  # a valid graph without cnnkit's metadata
        proto = onnx.load(str(good))
        del proto.metadata_props[:]
        onnx.save(proto, str(bad))

    result = runner.invoke(app, ["predict", str(bad), str(image)])

    assert result.exit_code == 4, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnkit: error: ") and str(bad) in lines[0]
    if case == "foreign":
        assert "carries no cnnkit metadata" in lines[0]


def test_predict_onnx_on_an_unavailable_device_exits_2(runner: Any, exported: tuple[Path, Path]) -> None:
    good, image = exported
    result = runner.invoke(app, ["predict", str(good), str(image), "--device", "mps"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "--device mps is not available to ONNX Runtime here" in line and "CPUExecutionProvider" in line


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime", "onnxscript"])
def test_missing_extra_is_one_line_naming_the_package(
    tmp_path: Path, runner: Any, exported: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    good, image = exported
    weights = good.with_suffix(".safetensors")
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError

    if missing != "onnxruntime":
        results = [runner.invoke(app, ["export", str(weights), "--out", str(tmp_path / "new.onnx")])]
    else:
        results = [
            runner.invoke(app, ["export", str(weights), "--out", str(tmp_path / "new.onnx"), "--check"]),
            runner.invoke(app, ["predict", str(good), str(image)]),
        ]

    for result in results:
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.strip().splitlines()
        assert f"needs the '{missing}' package" in line and "pip install 'cnnkit[onnx]'" in line
    assert not (tmp_path / "new.onnx").exists()


@pytest.mark.slow  # an export of its own
def test_without_onnxruntime_export_warns_and_skips_the_check(
    tmp_path: Path, runner: Any, onnx_extra: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, weights = make_weights(tmp_path, "lenet_bn")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "m.onnx"

    result = runner.invoke(app, ["export", str(weights), "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert "checked with" not in result.stdout
    assert "not checked in ONNX Runtime: onnxruntime is not installed" in result.stderr
    assert props_of(out)["model"] == "lenet_bn"


@pytest.mark.slow  # two exports through torch.export
def test_a_mismatch_is_exit_4_and_writes_nothing(
    tmp_path: Path, runner: Any, onnx_extra: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cnnkit.onnx_export as onnx_export

    _, meta, weights = make_weights(tmp_path, "lenet_bn")
    other = randomise(cnnkit.build_model("lenet_bn", 1, len(CLASSES)))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    real = onnx_export.export_graph
    # The graph of another network under the same metadata: what a broken exporter would produce.
    monkeypatch.setattr(onnx_export, "export_graph", lambda model, meta, exporter="auto": real(other, meta, exporter))
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")

    result = runner.invoke(app, ["export", str(weights), "--out", str(out), "--force"])

    assert result.exit_code == 4, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "ONNX Runtime's logits" in line and "differ from PyTorch's" in line and "was not written" in line
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet_bn.safetensors", "m.onnx"]  # no temp file left
    # --no-check writes it all the same.
    assert runner.invoke(app, ["export", str(weights), "--out", str(out), "--force", "--no-check"]).exit_code == 0
    assert props_of(out)["model"] == "lenet_bn"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "onnx", "--out", "m.safetensors"], "does not suit --format onnx"),
        (["--format", "onnx", "--out", "m.bin"], "must end in .onnx"),
        (["--out", "m.onnx", "--half"], "--half applies to --format safetensors only"),
        (["--out", "m.safetensors", "--no-check"], "--no-check applies to --format onnx only"),
        (["--out", "m.safetensors", "--tolerance", "1e-3"], "--tolerance applies to --format onnx only"),
        (["--out", "m.onnx", "--tolerance", "0"], "--tolerance must be > 0"),
    ],
)
def test_export_option_errors_exit_2(
    tmp_path: Path, runner: Any, onnx_extra: None, args: list[str], message: str
) -> None:
    _, _, weights = make_weights(tmp_path, "lenet")
    args = [a if not a.startswith("m.") else str(tmp_path / a) for a in args]
    result = runner.invoke(app, ["export", str(weights), *args])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.safetensors"]


def test_explicit_format_and_no_check(exported: tuple[Path, Path]) -> None:
    out, _ = exported
    assert EXPORT_OUTPUT[out].startswith(f"wrote {out} (lenet_bn, ONNX opset 18") and "checked" not in EXPORT_OUTPUT[out]
    assert json.loads(props_of(out)["classes"]) == CLASSES
