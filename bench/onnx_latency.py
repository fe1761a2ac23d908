"""CPU inference latency per image: PyTorch against ONNX Runtime on the graph ``cnnkit export --format onnx`` writes.

    python bench/onnx_latency.py                           # resnet18 at 96 px and lenet_bn at 28 px, 1 thread
    python bench/onnx_latency.py --threads 2 --repeats 11
    python bench/onnx_latency.py googlenet:96 densenet:96  # MODEL:SIDE, 1 channel, 10 classes

Each model gets random weights (latency does not depend on their values), is exported in memory
exactly as the CLI exports it (:func:`cnnkit.onnx_export.model_to_onnx`), and both runtimes run
the same float32 batches of 1 and 32 images: PyTorch in eval mode under ``torch.inference_mode``,
ONNX Runtime with its default (full) graph optimisation on the CPU provider, both limited to
``--threads`` threads. After a warm-up, repeats of the two runtimes are interleaved (so a busy
machine slows both alike) and the median is reported, in milliseconds per image; the ratio is
PyTorch's time over ONNX Runtime's (above 1: ONNX Runtime is faster).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

DEFAULT_MODELS = ["resnet18:96", "lenet_bn:28"]
BATCHES = (1, 32)
CLASSES = 10


def _timed(run: Callable[[], Any], iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        run()
    return (time.perf_counter() - start) / iterations


def _iterations(run: Callable[[], Any], target_s: float = 0.2) -> int:
    """Calls per repeat so that a repeat lasts about ``target_s`` (one call at least)."""
    once = _timed(run, 1)
    return max(1, round(target_s / max(once, 1e-6)))


def bench_model(name: str, side: int, threads: int, repeats: int) -> list[dict[str, Any]]:
    import numpy as np
    import onnxruntime as ort
    import torch

    import cnnkit
    from cnnkit.checkpoint import WeightsMeta
    from cnnkit.onnx_export import model_to_onnx
    from cnnkit.onnx_runtime import INPUT_NAME, OUTPUT_NAME

    torch.manual_seed(0)
    model = cnnkit.build_model(name, 1, CLASSES).eval()
    meta = WeightsMeta(
        model=name, in_channels=1, num_classes=CLASSES, input_size=side, classes=[str(i) for i in range(CLASSES)]
    )
    graph = model_to_onnx(model, meta)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    rows = []
    for batch in BATCHES:
        x = np.random.default_rng(batch).standard_normal((batch, 1, side, side)).astype(np.float32)
        x_torch = torch.from_numpy(x)

        def run_torch(x_torch: torch.Tensor = x_torch) -> Any:
            with torch.inference_mode():
                return model(x_torch)

        def run_ort(x: np.ndarray = x) -> Any:
            return session.run([OUTPUT_NAME], {INPUT_NAME: x})

        # Warm-up (first-call allocations, oneDNN primitive creation), and the same answer from both.
        with torch.inference_mode():
            expected = model(x_torch).numpy()
        (got,) = run_ort()
        max_diff = float(np.abs(got - expected).max())
        n_torch, n_ort = _iterations(run_torch), _iterations(run_ort)
        torch_times, ort_times = [], []
        for _ in range(repeats):
            torch_times.append(_timed(run_torch, n_torch))
            ort_times.append(_timed(run_ort, n_ort))
        torch_ms = statistics.median(torch_times) / batch * 1e3
        ort_ms = statistics.median(ort_times) / batch * 1e3
        rows.append(
            {"model": name, "side": side, "batch": batch, "torch_ms": torch_ms, "ort_ms": ort_ms,
             "ratio": torch_ms / ort_ms, "max_abs_diff": max_diff}
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT_MODELS, help="MODEL:SIDE (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="threads for each runtime (default: 1)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats per case (default: 7)")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"PyTorch {torch.__version__} vs ONNX Runtime {ort.__version__} (CPUExecutionProvider), "
        f"{args.threads} thread(s) each, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average {load:.1f}; median of {args.repeats} interleaved repeats; 1 channel, {CLASSES} classes"
    )
    print()
    print("| model | input | batch | PyTorch ms/image | ONNX Runtime ms/image | ratio | max abs logit diff |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.models:
        name, _, side = spec.partition(":")
        for row in bench_model(name, int(side or 28), args.threads, args.repeats):
            print(
                f"| `{row['model']}` | {row['side']} px | {row['batch']} | {row['torch_ms']:.3f} | "
                f"{row['ort_ms']:.3f} | {row['ratio']:.2f}x | {row['max_abs_diff']:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
