"""Accuracy of a model under a recipe, selected honestly: val per epoch, test of the final and the best-by-val weights.

    python bench/accuracy.py lenet_bn --recipe default --epochs 10 --seeds 3 --target 0.89
    python bench/accuracy.py lenet --recipe d2l

Trains with cnnkit's own run driver (exactly what ``cnnkit train`` runs) into a temporary folder, or
into ``--out DIR/seed<N>`` to keep the runs (their ``metrics.csv`` grows epoch by epoch, so a run
stopped early still shows how far it got), and prints one line per seed, then the median test
accuracy of the final epoch (what d2l reports) and of the best epoch by validation, and the median
time until validation reached the target. Test chooses nothing. ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _write_json(path: str, figures: dict[str, Any]) -> None:
    """``figures`` as JSON at ``path``, atomically (a reader never sees half a file)."""
    from cnnkit.fs import atomic_write

    text = json.dumps(figures, indent=2) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, train each seed, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="registered model, e.g. lenet_bn")
    parser.add_argument("--recipe", default="default", choices=["default", "d2l"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1; the median is reported")
    parser.add_argument("--target", type=float, default=None, help="validation accuracy to time (e.g. 0.89)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data", default=None, help="dataset folder (default: its search path / $CNNKIT_DATA)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="model option, e.g. -o width=0.25")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config key, e.g. --set lr=0.05 --set label_smoothing=0.1")  # fmt: skip
    parser.add_argument("--out", default=None, help="keep the runs in OUT/seed<N> (default: a temporary folder)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)

    import torch

    from cnnkit.cli._common import parse_key_values
    from cnnkit.config import describe_config, resolve_config
    from cnnkit.data import load_dataset
    from cnnkit.training.run import train, typed_options

    extra = parse_key_values(args.set, flag="--set")  # as `cnnkit train -o` parses: one line for a bad pair
    base = {"model": args.model, "recipe": args.recipe, "epochs": args.epochs, "dataset": args.dataset,
            "device": args.device, "quiet": True, **extra}  # fmt: skip
    if args.options:
        base["model_options"] = parse_key_values(args.options, flag="-o")
    if args.data:
        base["data"] = args.data
    config = typed_options(resolve_config(overrides=base))
    print(describe_config(config), f"· torch {torch.__version__} · {torch.get_num_threads()} threads", flush=True)
    data = load_dataset(config.dataset, config.data, input_size=config.input_size, **config.dataset_options)

    finals: list[float] = []
    bests: list[float] = []
    to_target: list[float] = []
    seeds: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        with contextlib.ExitStack() as stack:
            folder = args.out or stack.enter_context(tempfile.TemporaryDirectory())
            run_config = config.model_copy(update={"seed": seed, "out": str(Path(folder) / f"seed{seed}")})
            started = time.perf_counter()
            result = train(run_config, data=data)
            wall = time.perf_counter() - started
            tested = json.loads((result.run_dir / "test.json").read_text(encoding="utf-8"))
        accs = [row["val_acc"] for row in result.history]
        final_test = tested["final"]["test_acc"]
        best_test = tested.get("best", tested["final"])["test_acc"]
        elapsed = 0.0
        reached: float | None = None
        for row in result.history:
            # Training time plus the epoch's evaluation (wall per epoch is spread evenly).
            elapsed += wall / len(result.history)
            if args.target is not None and reached is None and row["val_acc"] >= args.target:
                reached = elapsed
        finals.append(final_test)
        bests.append(best_test)
        if reached is not None:
            to_target.append(reached)
        seeds.append({"seed": seed, "val_acc": accs, "final_test": final_test, "best_epoch": result.best_epoch,
                      "best_val": result.best_acc, "best_test": best_test, "examples_per_s": result.examples_per_s,
                      "seconds": wall, "to_target": reached})  # fmt: skip
        target = f"  val target {args.target} at {reached:.0f}s" if reached is not None else ""
        print(
            f"seed {seed}: val acc per epoch {' '.join(f'{a:.4f}' for a in accs)}  final test {final_test:.4f}  "
            f"best by val: epoch {result.best_epoch}, test {best_test:.4f}  {result.examples_per_s:.0f} ex/s  "
            f"{wall:.0f}s{target}",
            flush=True,
        )
    line = (
        f"{args.model} {args.recipe}: median test acc over {len(finals)} seed(s): final epoch "
        f"{statistics.median(finals):.4f}, best epoch by val {statistics.median(bests):.4f}"
    )
    if args.target is not None:
        line += (
            f"; median time to {args.target}: {statistics.median(to_target):.0f}s ({len(to_target)}/{len(finals)} reached)"
            if to_target
            else f"; {args.target} not reached"
        )
    print(line, flush=True)
    if args.json:
        # The --set overrides too: a recorded figure names everything that made it.
        figures = {"model": args.model, "options": args.options, "set": args.set, "recipe": args.recipe, "epochs": args.epochs,
                   "target": args.target, "median_final_test": statistics.median(finals),
                   "median_best_test": statistics.median(bests), "seeds": seeds}  # fmt: skip
        _write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
