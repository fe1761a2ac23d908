"""Which PyTorch exporter writes the graph: ``torch.export`` (``dynamo=True``) always for the
networks cnnkit ships (``tests/test_onnx.py`` checks each one's ``exporter`` metadata), the
TorchScript-based one only as the fallback for a model ``torch.export`` cannot capture, said in a
warning and in the metadata."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cnnkit.checkpoint import WeightsMeta
from cnnkit.cli.app import app
from tests.test_onnx import CLASSES, assert_close_logits, make_weights, props_of

pytestmark = pytest.mark.usefixtures("one_thread", "onnx_extra")


@pytest.fixture
def onnx_extra() -> None:
    from tests.test_onnx import skip_without_extra

    skip_without_extra()


class SignFlip(nn.Module):
    """A network with Python control flow on a tensor's value, which torch.export refuses to guess."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, len(CLASSES), 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).flatten(1)
        if y.sum() > -1e9:  # data-dependent: always true here, which tracing freezes
            return y
        return -y


META = WeightsMeta(model="signflip", in_channels=1, num_classes=len(CLASSES), input_size=8, classes=CLASSES)


def test_a_model_torch_export_cannot_capture_falls_back_to_torchscript() -> None:
    from cnnkit.onnx_export import export_graph
    from cnnkit.onnx_runtime import open_graph

    model = SignFlip().eval()

    graph = export_graph(model, META)

    assert graph.exporter == "TorchScript"
    assert graph.fallback is not None and graph.fallback.startswith("torch.export could not capture the model (")
    assert "data-dependent" in graph.fallback and "\x1b" not in graph.fallback
    opened = open_graph(graph.data, "signflip.onnx")
    props = opened.session.get_modelmeta().custom_metadata_map
    assert props["exporter"].startswith("TorchScript (torch.onnx.export dynamo=False)")
    assert "the fallback, as torch.export could not capture the model" in props["exporter"]
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        assert_close_logits(opened.logits(x), model(torch.from_numpy(x)).numpy())


def test_torch_export_alone_names_what_it_could_not_capture() -> None:
    from cnnkit.errors import UsageError
    from cnnkit.onnx_export import export_graph

    with pytest.raises(UsageError) as caught:
        export_graph(SignFlip().eval(), META, exporter="torch.export")
    message = caught.value.message
    assert message.startswith("model 'signflip' at 1x8x8 cannot be exported to ONNX (") and "data-dependent" in message
    assert "\n" not in message


def test_torchscript_when_asked_is_no_fallback(tmp_path: Path) -> None:
    """The deprecated exporter still writes the same graph contract (LeNet-BN at 32 px: the 6->5
    pooling as two MatMuls), with no fallback noted."""
    import onnx

    from cnnkit.onnx_export import export_graph
    from cnnkit.onnx_runtime import open_graph

    model, meta, _ = make_weights(tmp_path, "lenet_bn", side=32)
    graph = export_graph(model, meta, exporter="torchscript")
    assert graph.exporter == "TorchScript" and graph.fallback is None
    proto = onnx.load_from_string(graph.data)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert [n.op_type for n in proto.graph.node].count("MatMul") == 2
    x = np.random.default_rng(2).standard_normal((4, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        assert_close_logits(open_graph(graph.data, "lenet_bn.onnx").logits(x), model(torch.from_numpy(x)).numpy())


def test_a_pytorch_without_the_torch_export_exporter_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnnkit.onnx_export import export_graph

    real = torch.onnx.export
    calls: list[bool] = []

    def old_export(model: Any, args: Any, f: Any = None, *, dynamo: bool = False, **options: Any) -> Any:
        calls.append(dynamo)
        return real(model, args, f, dynamo=dynamo, **options)

    monkeypatch.setattr(torch.onnx, "export", old_export)  # PyTorch 2.4's: no dynamic_shapes
    assert "dynamic_shapes" not in inspect.signature(torch.onnx.export).parameters
    model, meta, _ = make_weights(tmp_path, "lenet")

    graph = export_graph(model, meta)

    assert calls == [False] and graph.exporter == "TorchScript"
    assert graph.fallback is not None and "has no torch.export-based ONNX exporter (2.5 and later have)" in graph.fallback


def test_the_cli_warns_when_the_fallback_wrote_the_graph(
    tmp_path: Path, runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cnnkit.onnx_export as onnx_export

    def cannot_capture(model: nn.Module, example: torch.Tensor) -> Any:
        raise torch.onnx.errors.OnnxExporterError("Failed to export the model with torch.export.") from RuntimeError(
            "\x1b[96mCould not guard on data-dependent expression\x1b[0m u0 > 0\nmore lines"
        )

    monkeypatch.setattr(onnx_export, "_torch_export", cannot_capture)
    _, _, weights = make_weights(tmp_path, "lenet")
    out = tmp_path / "lenet.onnx"

    result = runner.invoke(app, ["export", str(weights), "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert "checked with onnxruntime" in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        "cnnkit: warning: lenet: torch.export could not capture the model (Could not guard on data-dependent "
        "expression u0 > 0); PyTorch's TorchScript exporter wrote the graph instead, which records only the "
        "branches its example input took"
    )
    assert props_of(out)["exporter"].startswith("TorchScript")
    assert json.loads(props_of(out)["classes"]) == CLASSES
