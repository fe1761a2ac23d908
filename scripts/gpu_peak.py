"""The peak an MFU estimate is taken against: the GPU's datasheet bf16 figure, and a measured one.

    python scripts/gpu_peak.py --device cuda --json peak.json      # bf16 matmuls of 8192 x 8192
    python scripts/gpu_peak.py --device cpu --dtype float32 --size 512

``datasheet_flops`` is NVIDIA's dense (no sparsity) bf16 tensor-core figure for the GPU, matched by
name (``None`` for a GPU not in the table, and on a CPU); ``measured_flops`` is what square matmuls
of ``--size`` in ``--dtype`` reach here (median of 5 timings of at least 0.2 s each), the practical
ceiling. scripts/gpu_check.py computes MFU = images/s x 3 x forward FLOPs per image / peak.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

# NVIDIA datasheets, dense bf16 TFLOP/s (the "with sparsity" figures halved), most specific first.
DATASHEET_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"\bB200\b", 2250.0),
    (r"\bH200 NVL\b", 835.0),
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100 PCIe\b", 756.0),
    (r"\bH100\b", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bA30\b", 165.0),
    (r"\bA10\b", 125.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 4090\b", 165.2),
]


def datasheet_tflops(name: str) -> float | None:
    return next((tflops for pattern, tflops in DATASHEET_BF16_TFLOPS if re.search(pattern, name)), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)

    import torch

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    a = torch.randn(args.size, args.size, device=device, dtype=dtype)
    b = torch.randn(args.size, args.size, device=device, dtype=dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm-up: cuBLAS heuristics, clocks
        a @ b
    sync()
    timings = []
    for _ in range(5):
        count, started = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            if count % 4 == 0:
                sync()
                if time.perf_counter() - started >= 0.2:
                    break
        timings.append(2 * args.size**3 * count / (time.perf_counter() - started))
    measured = statistics.median(timings)
    sheet = datasheet_tflops(name) if cuda else None
    figures = {
        "device": str(device), "name": name, "dtype": args.dtype, "size": args.size, "measured_flops": measured,
        "datasheet_flops": sheet * 1e12 if sheet else None,
    }  # fmt: skip
    print(f"{name}: {args.dtype} matmul {args.size}^2 {measured / 1e12:.1f} TFLOP/s measured; datasheet bf16 dense "
          + (f"{sheet:.0f} TFLOP/s" if sheet else "unknown"))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
