"""CPU inference latency per image: PyTorch against ONNX Runtime on the graph ``cnnkit export --format onnx``
writes, and that float32 graph against its int8 form (``--quantize int8``) for trained runs.

    python bench/onnx_latency.py                           # resnet18 at 96 px and lenet_bn at 28 px, 1 thread
    python bench/onnx_latency.py --threads 2 --repeats 11
    python bench/onnx_latency.py googlenet:96 densenet:96  # MODEL:SIDE, 1 channel, 10 classes
    python bench/onnx_latency.py --int8 runs/a runs/b      # + float32 vs int8 of trained runs
    python bench/onnx_latency.py --int8 runs/a --only-int8
    python bench/onnx_latency.py --int8 runs/a --only-int8 --full-range   # + full-range int8 weights

First table: each model gets random weights (latency does not depend on their values), is
exported in memory exactly as the CLI exports it (:func:`cnnkit.onnx_export.model_to_onnx`), and
both runtimes run the same float32 batches of 1 and 32 images: PyTorch in eval mode under
``torch.inference_mode``, ONNX Runtime with its default (full) graph optimisation on the CPU
provider, both limited to ``--threads`` threads. After a warm-up, repeats of the two runtimes are
interleaved (so a busy machine slows both alike) and the median is reported, in milliseconds per
image; the ratio is PyTorch's time over ONNX Runtime's (above 1: ONNX Runtime is faster).

Second table (``--int8 RUN...``, trained run directories or weights files): each run is exported
twice through the CLI's own functions, to the files ``cnnkit export RUN --out F.onnx`` and
``cnnkit export RUN --out F.onnx --quantize int8`` write (calibrated on 256 of the run's training
images); the table gives each file's size, its top-1 on the run's test split (as the int8
export measures it, which ``cnnkit eval F.onnx`` reproduces), and its ONNX Runtime latency at
batches of 1 and 64 test images, the two files' repeats interleaved as above. The load average is
printed before and after: on a shared machine the absolute times move with it, the ratios less.
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
INT8_BATCHES = (1, 64)
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


def _int8_flags() -> str:
    """The CPU's 8-bit dot-product extensions (int8 kernels are faster, and do not saturate, with VNNI)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return ""
    found = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"; {', '.join(found)}" if found else ""


def _session(source: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def bench_int8(run: str, threads: int, repeats: int, full_range: bool = False) -> list[dict[str, Any]]:
    """float32 and int8 files of one trained run: size, test top-1, ms/image at each of INT8_BATCHES
    (``full_range``: also an int8 file with full-range weights, which the CLI no longer writes)."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from cnnkit.checkpoint import read_meta, resolve_weights
    from cnnkit.onnx_eval import recorded_splits
    from cnnkit.onnx_export import export_onnx
    from cnnkit.onnx_quantize import export_int8
    from cnnkit.onnx_runtime import INPUT_NAME, OUTPUT_NAME
    from cnnkit.prediction import prepare_batch

    weights = resolve_weights(run)
    meta = read_meta(weights)
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as folder:
        float_file, int8_file = Path(folder) / "float32.onnx", Path(folder) / "int8.onnx"
        export_onnx(weights, float_file)
        files = {"float32": float_file, "int8": int8_file}
        int8 = export_int8(weights, int8_file)
        top1 = {"float32": int8.float_top1, "int8": int8.int8_top1}
        if full_range:
            files["int8, 8-bit weights"] = Path(folder) / "int8-full.onnx"
            top1["int8, 8-bit weights"] = export_int8(weights, files["int8, 8-bit weights"], weight_bits=8).int8_top1
        sessions = {name: _session(str(file), threads) for name, file in files.items()}
        sizes = {name: file.stat().st_size for name, file in files.items()}
    test = recorded_splits(weights, meta).test.images
    times: dict[tuple[str, int], float] = {}
    for batch in INT8_BATCHES:
        x = prepare_batch(list(test[:batch].numpy()), meta.input_size, meta.mean, meta.std)
        runs = {name: (lambda s=session, x=x: s.run([OUTPUT_NAME], {INPUT_NAME: x})) for name, session in sessions.items()}
        counts = {name: _iterations(call) for name, call in runs.items()}
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, call in runs.items():
                samples[name].append(_timed(call, counts[name]))
        for name in runs:
            times[name, batch] = statistics.median(samples[name]) / batch * 1e3
        assert np.isfinite(times["int8", batch])
    return [
        {"model": meta.model, "side": meta.input_size, "precision": name, "mb": sizes[name] / 1e6, "top1": top1[name],
         "dataset": meta.dataset, "ms": [times[name, b] for b in INT8_BATCHES]}
        for name in files
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT_MODELS, help="MODEL:SIDE (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="threads for each runtime (default: 1)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats per case (default: 7)")
    parser.add_argument("--int8", nargs="+", default=[], metavar="RUN", help="trained runs: float32 vs int8 graphs")
    parser.add_argument("--only-int8", action="store_true", help="skip the PyTorch vs ONNX Runtime table")
    parser.add_argument("--full-range", action="store_true",
                        help="also int8 with full-range (8-bit) weights, against the 7-bit ones the CLI writes")  # fmt: skip
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"PyTorch {torch.__version__} vs ONNX Runtime {ort.__version__} (CPUExecutionProvider), "
        f"{args.threads} thread(s) each, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}"
        f"{_int8_flags()}), load average {load:.1f}; median of {args.repeats} interleaved repeats; "
        f"random weights: 1 channel, {CLASSES} classes"
    )
    if not args.only_int8:
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
    if args.int8:
        print()
        columns = " | ".join(f"ms/image at batch {b}" for b in INT8_BATCHES)
        print(f"| model | input | graph | file MB | test top-1 | {columns} |")
        print("|---" * (5 + len(INT8_BATCHES)) + "|")
        for run in args.int8:
            for row in bench_int8(run, args.threads, args.repeats, args.full_range):
                times = " | ".join(f"{ms:.3f}" for ms in row["ms"])
                print(
                    f"| `{row['model']}` | {row['side']} px | {row['precision']} | {row['mb']:.2f} | "
                    f"{row['top1']:.4f} | {times} |",
                    flush=True,
                )
    after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    print(f"load average {after:.1f} at the end")


if __name__ == "__main__":
    main()
