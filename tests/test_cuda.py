"""The CUDA paths: mixed precision, channels-last, checkpoints across devices, resume, compile, out of
memory, device names.

Tests marked ``cuda`` need a GPU and skip with a reason where there is none; ``make gpu-check`` runs
them on one (``pytest -m cuda``). The unmarked tests are their CPU counterparts (out-of-memory
handling, device errors on a one-GPU machine, faked) and always run.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cnnkit.checkpoint import load_weights
from cnnkit.cli.app import app
from cnnkit.device import resolve_device
from cnnkit.errors import UsageError
from cnnkit.gpu import is_out_of_memory, out_of_memory_as_usage_error, out_of_memory_error
from cnnkit.testing import write_fashion_mnist_folder as write_idx_folder

HAS_CUDA = torch.cuda.is_available()
TIMING = {"examples_per_s", "epoch_seconds"}
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 24.50 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
    "2.06 GiB is free. Including non-PyTorch memory, this process has 77.11 GiB memory in use."
)


def on_cuda(test: Callable[..., Any]) -> Callable[..., Any]:
    """Marked ``cuda``; skipped with a reason where there is no GPU, so CI stays green."""
    reason = "needs a CUDA GPU and this machine has none (make gpu-check runs it on one)"
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason=reason)(test))




@pytest.fixture
def idx_data(tmp_path: Path) -> Path:
    return write_idx_folder(tmp_path / "fmnist")


def tiny(data: Path, out: Path, *extra: str, model: str = "lenet_bn", size: int = 16) -> list[str]:
    return ["train", model, "--data", str(data), "--input-size", str(size), "--batch-size", "32", "--out", str(out),
            "-q", *extra]  # fmt: skip


def metrics(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv without the timing columns (which differ between any two runs)."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]


def cnnkit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real program in its own process: a fresh CUDA context, real stderr, memory freed on exit."""
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # before CUDA starts, as determinism needs
    return subprocess.run(
        [sys.executable, "-m", "cnnkit", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("cnnkit: error:")]


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """No TF32 in matmuls and convolutions: fp32 results comparable to 1e-4 (restored afterwards;
    the backend flags are properties that monkeypatch cannot undo)."""
    was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was


# -- out of memory: CPU counterparts (always run) ---------------------------------------------------


def test_out_of_memory_error_names_the_batch_and_halves_it() -> None:
    error = out_of_memory_error(torch.cuda.OutOfMemoryError(CUDA_OOM), batch_size=4096, model="vgg11", device="cpu")
    message = error.format_message()
    assert isinstance(error, UsageError) and error.exit_code == 2 and "\n" not in message
    assert message.startswith("out of memory on cpu training vgg11 with batch size 4096")
    assert "tried to allocate 24.50 GiB of 79.19 GiB" in message
    assert message.endswith("use a smaller --batch-size, e.g. --batch-size 2048")


def test_out_of_memory_with_batch_one_suggests_a_smaller_input() -> None:
    message = out_of_memory_error(RuntimeError(CUDA_OOM), batch_size=1, model="vgg16").format_message()
    assert "with batch size 1" in message and "--input-size" in message and "--batch-size 0" not in message


def test_out_of_memory_without_a_device_reads_the_gpu_from_the_message() -> None:
    message = out_of_memory_error(torch.cuda.OutOfMemoryError(CUDA_OOM), batch_size=None).format_message()
    assert message.startswith("out of memory on cuda:0") and message.endswith("use a smaller --batch-size")


def test_only_out_of_memory_errors_are_converted() -> None:
    cpu_oom = RuntimeError(
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes. Error code 12"
    )
    assert is_out_of_memory(cpu_oom) and is_out_of_memory(torch.cuda.OutOfMemoryError(CUDA_OOM))
    with pytest.raises(UsageError, match=r"tried to allocate 1024\.00 GiB; use a smaller --batch-size, e\.g\. --batch-size 64") as caught:  # noqa: E501
        with out_of_memory_as_usage_error(batch_size=128, model="alexnet", device="cpu"):
            raise cpu_oom
    assert caught.value.__cause__ is cpu_oom  # --debug still shows where it ran out
    bug = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")
    assert not is_out_of_memory(bug)
    with pytest.raises(RuntimeError) as passed:
        with out_of_memory_as_usage_error(batch_size=128, model="alexnet", device="cpu"):
            raise bug
    assert passed.value is bug  # a bug keeps its traceback


@pytest.mark.slow
def test_out_of_memory_while_training_is_one_line_exit_2(
    runner: CliRunner, idx_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    def exhausted(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", exhausted)
    out = tmp_path / "run"
    result = runner.invoke(app, [*tiny(idx_data, out, "--epochs", "1"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert error_lines(result.stderr) == result.stderr.strip().splitlines()  # one line, nothing else
    [line] = error_lines(result.stderr)
    assert line.startswith("cnnkit: error: out of memory on cpu training lenet_bn with batch size 32")
    assert line.endswith("use a smaller --batch-size, e.g. --batch-size 16")
    assert not (out / "best.safetensors").exists()


# -- device names: CPU counterpart of a one-GPU machine (always runs) -------------------------------


@pytest.fixture
def one_fake_gpu(monkeypatch: pytest.MonkeyPatch) -> str:
    """This process believes it has one GPU (only the device queries; nothing runs on it)."""
    name = "Test GPU 80GB"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return name


def test_cuda_index_past_the_last_gpu_names_the_gpus(one_fake_gpu: str) -> None:
    assert resolve_device("cuda") == torch.device("cuda", 0) == resolve_device("cuda:0")
    with pytest.raises(UsageError) as caught:
        resolve_device("cuda:1")
    message = caught.value.format_message()
    assert message.startswith("--device cuda:1: no such GPU (this machine has 1)")
    assert message.endswith(f"use one of: cpu, cuda:0 ({one_fake_gpu})")


def test_train_on_a_missing_gpu_index_exits_2_naming_the_devices(
    runner: CliRunner, idx_data: Path, tmp_path: Path, one_fake_gpu: str
) -> None:
    runs = tmp_path / "runs"
    args = ["train", "lenet_bn", "--data", str(idx_data), "--runs-dir", str(runs), "--device", "cuda:1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == error_lines(result.stderr)
    assert f"cuda:0 ({one_fake_gpu})" in result.stderr and "Traceback" not in result.output
    assert not runs.exists()  # nothing written for a device that is not there


# -- on a GPU ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def training_output_dtypes() -> Iterator[set[torch.dtype]]:
    """The dtypes of every Linear layer's output while the model trains (what autocast chose)."""
    seen: set[torch.dtype] = set()

    def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(module, torch.nn.Linear) and module.training:
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


@on_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_is_finite_and_close_to_fp32(
    runner: CliRunner, idx_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    if precision == "fp16":  # what a GPU without bf16 gets: fp16 with a GradScaler
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    scalers: list[bool] = []
    original_scale = torch.amp.GradScaler.scale

    def spy_scale(self: torch.amp.GradScaler, outputs: Any) -> Any:
        scalers.append(self.is_enabled())
        return original_scale(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", spy_scale)
    args = ["--epochs", "2", "--device", "cuda"]
    with training_output_dtypes() as full_dtypes:
        assert runner.invoke(app, [*tiny(idx_data, tmp_path / "fp32", *args), "--no-amp"]).exit_code == 0
    full_scaled = list(scalers)
    scalers.clear()
    with training_output_dtypes() as mixed_dtypes:
        result = runner.invoke(app, [*tiny(idx_data, tmp_path / precision, *args), "--amp"])
    assert result.exit_code == 0, result.output

    assert full_dtypes == {torch.float32} and not any(full_scaled)
    assert mixed_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float16}
    assert scalers and all(scalers) == (precision == "fp16")  # the scaler runs exactly when fp16 needs it
    full, mixed = metrics(tmp_path / "fp32"), metrics(tmp_path / precision)
    assert len(full) == len(mixed) == 2
    for a, b in zip(full, mixed, strict=True):
        assert all(math.isfinite(v) for v in b.values())
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.1, abs=0.05)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=0.2, abs=0.1)


@on_cuda
@pytest.mark.parametrize(
    ("model", "size", "options"),
    [("lenet_bn", 28, {}), ("resnet18", 96, {}), ("googlenet", 96, {}), ("densenet", 96, {}),
     ("vgg11", 224, {"width": 0.25})],
)  # fmt: skip
def test_channels_last_and_contiguous_give_the_same_logits(
    model: str, size: int, options: dict[str, Any], exact_fp32: None
) -> None:
    import cnnkit

    torch.manual_seed(0)
    net = cnnkit.build_model(model, in_channels=1, num_classes=10, **options).cuda().eval()
    images = torch.rand(4, 1, size, size, device="cuda")
    with torch.no_grad():
        contiguous = net(images)
        net.to(memory_format=torch.channels_last)
        channels_last = net(images.contiguous(memory_format=torch.channels_last))
    scale = float(contiguous.abs().max()) + 1
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-4, atol=1e-4 * scale)


def _logits(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    device = next(net.parameters()).device
    with torch.no_grad():
        return net.eval()(images.to(device)).cpu()


@on_cuda
def test_weights_saved_on_cuda_load_on_cpu_with_equal_logits_and_back(
    runner: CliRunner, idx_data: Path, tmp_path: Path, exact_fp32: None
) -> None:
    images = torch.rand(8, 1, 16, 16)
    for trained_on, other in (("cuda", "cpu"), ("cpu", "cuda")):
        out = tmp_path / trained_on
        result = runner.invoke(app, [*tiny(idx_data, out, "--epochs", "1"), "--device", trained_on])
        assert result.exit_code == 0, result.output
        home, _ = load_weights(out / "best.safetensors", device=trained_on)
        away, meta = load_weights(out / "best.safetensors", device=other)
        assert {t.device.type for t in away.state_dict().values()} == {other}
        assert meta.input_size == 16 and meta.num_classes == 10
        expected = _logits(home, images)
        torch.testing.assert_close(_logits(away, images), expected, rtol=1e-4, atol=1e-4 * (float(expected.abs().max()) + 1))


@on_cuda
def test_resume_on_cuda_continues_the_same_rng_stream(idx_data: Path, tmp_path: Path) -> None:
    # Dropout on the GPU draws from the CUDA generator: a resume that did not restore it would
    # draw other masks in epoch 2 and end elsewhere. A constant schedule, so that a 1-epoch run
    # extended to 2 has the learning rates of a 2-epoch run.
    common = ("-o", "dropout=0.5", "--schedule", "constant", "--device", "cuda", "--deterministic")
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out, epochs in ((whole, "2"), (split, "1")):
        proc = cnnkit(*tiny(idx_data, out, *common, "--epochs", epochs, model="googlenet", size=32))
        assert proc.returncode == 0, proc.stderr
    proc = cnnkit("train", "--resume", str(split), "--epochs", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert metrics(split) == metrics(whole) and len(metrics(whole)) == 2
    a, b = load_file(whole / "last.safetensors"), load_file(split / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@on_cuda
@pytest.mark.parametrize(("model", "size", "options"), [("lenet_bn", 28, []), ("vgg11", 32, ["-o", "width=0.0625"])])
def test_deterministic_training_on_cuda_works_with_adaptive_pooling(
    idx_data: Path, tmp_path: Path, model: str, size: int, options: list[str]
) -> None:
    # LeNet (to 5x5), VGG (7x7) and AlexNet (6x6) end their features with AdaptiveAvgPool2d, whose
    # CUDA backward has no deterministic kernel (only a 1x1 output is computed as a mean, which
    # is): --deterministic, documented as bit-identical reruns, must still train them.
    args = tiny(idx_data, tmp_path / "run", *options, "--device", "cuda", "--deterministic", "--epochs", "1",
                model=model, size=size)  # fmt: skip
    proc = cnnkit(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


@on_cuda
def test_compile_trains_one_epoch_on_cuda(idx_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = cnnkit(*tiny(idx_data, out, "--compile", "--device", "cuda", "--epochs", "1"), timeout=420)
    assert proc.returncode == 0, proc.stderr
    [row] = metrics(out)
    assert all(math.isfinite(v) for v in row.values())
    net, _ = load_weights(out / "best.safetensors")  # saved without torch.compile's wrapper prefix
    assert _logits(net, torch.rand(2, 1, 16, 16)).shape == (2, 10)


@on_cuda
def test_out_of_memory_on_cuda_is_one_line_suggesting_a_smaller_batch(tmp_path: Path) -> None:
    # ResNet-18 at 448 px keeps about 200 MB of activations per image for the backward pass (bf16):
    # 8192 images need more than a terabyte, far more than any single GPU has.
    data = write_idx_folder(tmp_path / "big", train=8192, test=64)
    out = tmp_path / "run"
    args = ["train", "resnet18", "--data", str(data), "--input-size", "448", "--batch-size", "8192",
            "--epochs", "1", "--device", "cuda", "--out", str(out), "-q"]  # fmt: skip
    proc = cnnkit(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert "out of memory on cuda:0" in line and "resnet18 with batch size 8192" in line
    assert line.endswith("use a smaller --batch-size, e.g. --batch-size 4096")
    assert not (out / "best.safetensors").exists()


@on_cuda
def test_cuda_index_past_the_last_gpu_is_exit_2_naming_the_gpus(
    runner: CliRunner, idx_data: Path, tmp_path: Path
) -> None:
    count = torch.cuda.device_count()
    result = runner.invoke(app, [*tiny(idx_data, tmp_path / "run"), "--device", f"cuda:{count}"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert f"no such GPU (this machine has {count})" in line
    assert f"cuda:0 ({torch.cuda.get_device_name(0)})" in line
    assert not (tmp_path / "run").exists()
