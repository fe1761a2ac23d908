"""Fine-tuning against training from scratch: Fashion-MNIST weights, reused on COIL-20 (pose-block).

    python bench/finetune.py                                  # both parts, 3 seeds, 5 epochs each
    python bench/finetune.py --parts lenet_bn                 # BN-LeNet at 28 px only
    python bench/finetune.py --parts resnet18 --seeds 1 --source-epochs 1 --source-limit 20000
    python bench/finetune.py --source-only --parts resnet18   # only train (and cache) the source run
    python bench/finetune.py --table                          # train nothing; rewrite the report

Each part first trains a source model with cnnkit's own run driver (what ``cnnkit train`` runs) on
Fashion-MNIST at the part's side (``--source-limit N``: a seeded subset of N training images), with
the model's default recipe for ``--source-epochs``. That run is kept under ``--work`` and reused by
later invocations with the same settings. Then, per seed, on COIL-20's ``pose-block`` split
(poses 60-71 of every object held out: viewpoints never seen in training), at the same side:

- ``finetune``: ``--init-from`` the source run and ``--recipe finetune`` (the 10-class head is
  replaced by a 20-class one, nothing frozen), for ``--epochs``;
- ``scratch``: the same model from its own initialisation with ``--recipe default``, for ``--epochs``;
- ``init-default`` (only when asked for with ``--arms``): ``--init-from`` the source run with
  ``--recipe default``: the same start as ``finetune`` at the default recipe's rate and warm-up, to
  tell the weights' share from the recipe's.

Both at batch 32 (COIL-20 has 1,200 training images). Every finished run is appended to
``--record`` (JSON lines) and skipped when asked for again; the report (median and each seed's
final-epoch test accuracy, wall time, the load average from ``os.getloadavg`` around each run)
goes to ``--report``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from coil20 import append_record, read_record  # noqa: E402  (the JSON-lines record, one owner)

# part -> (model, side, batch of the COIL-20 runs)
PARTS: dict[str, tuple[str, int, int]] = {"lenet_bn": ("lenet_bn", 28, 32), "resnet18": ("resnet18", 64, 32)}
ARMS = ("finetune", "scratch", "init-default")


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def subset(data: Any, limit: int | None, seed: int = 0) -> Any:
    """The first ``limit`` images of a seeded permutation of the training split (all when None)."""
    import dataclasses

    import torch

    from cnnkit.protocols import ImageTensors

    if limit is None or limit >= len(data.train):
        return data
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:limit]
    train = ImageTensors(data.train.images[order], data.train.labels[order])
    return dataclasses.replace(data, train=train)


def source_run(part: str, args: argparse.Namespace) -> Path:
    """The Fashion-MNIST run of ``part``'s model (trained once, then reused)."""
    from cnnkit.config import resolve_config
    from cnnkit.data import load_dataset
    from cnnkit.rundir import RunDir
    from cnnkit.training.run import train

    model, side, _ = PARTS[part]
    limit = f"-{args.source_limit}" if args.source_limit else ""
    folder = args.work / f"{part}-fashion-mnist-{side}px-{args.source_epochs}ep{limit}"
    if RunDir(folder).holds_run() and (folder / "bench-source.json").is_file():  # finished, not half-trained
        print(f"{part}: source run {folder} reused", flush=True)
        return folder
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    data = subset(load_dataset("fashion-mnist", args.fashion_data, input_size=side), args.source_limit)
    config = resolve_config(overrides={
        "model": model, "epochs": args.source_epochs, "input_size": side, "device": "cpu", "quiet": True,
        "out": str(folder), "seed": 0,
    })  # fmt: skip
    started, load = time.perf_counter(), _load()
    result = train(config, data=data)
    seconds = time.perf_counter() - started
    tested = json.loads((result.run_dir / "test.json").read_text(encoding="utf-8"))
    note = {
        "part": part, "arm": "source", "model": model, "input_size": side, "epochs": args.source_epochs,
        "train_examples": len(data.train), "val_acc": [r["val_acc"] for r in result.history],
        "test_acc": tested["final"]["test_acc"], "seconds": round(seconds, 1), "load_before": load,
        "load_after": _load(),
    }  # fmt: skip
    (folder / "bench-source.json").write_text(json.dumps(note), encoding="utf-8")
    print(f"{part}: source run {folder}: test acc {note['test_acc']:.3f} after {seconds:.0f} s", flush=True)
    return folder


def coil_run(part: str, arm: str, seed: int, source: Path, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One COIL-20 pose-block run: fine-tuned from ``source`` or from scratch."""
    import torch

    from cnnkit.config import describe_config, resolve_config
    from cnnkit.training.run import train

    model, side, batch = PARTS[part]
    overrides: dict[str, Any] = {
        "model": model, "dataset": "coil20", "dataset_options": {"split": "pose-block"}, "epochs": args.epochs,
        "input_size": side, "batch_size": batch, "seed": seed, "device": "cpu", "quiet": True,
        "recipe": "finetune" if arm == "finetune" else "default",
    }  # fmt: skip
    if arm != "scratch":
        overrides["init_from"] = str(source)
    config = resolve_config(overrides=overrides)
    with tempfile.TemporaryDirectory() as folder:
        config = config.model_copy(update={"out": str(Path(folder) / "run")})
        started, load = time.perf_counter(), _load()
        result = train(config, data=data)
        seconds = time.perf_counter() - started
        tested = json.loads((result.run_dir / "test.json").read_text(encoding="utf-8"))
    return {
        "part": part, "arm": arm, "model": model, "seed": seed, "epochs": args.epochs, "input_size": side,
        "batch_size": batch, "source": source.name, "config": describe_config(config),
        "val_acc": [round(float(r["val_acc"]), 4) for r in result.history], "final": tested["final"]["test_acc"],
        "seconds": round(seconds, 1), "load_before": load, "load_after": _load(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "train_examples": len(data.train), "test_examples": len(data.test),
    }  # fmt: skip


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["part"], row["arm"], row["seed"], row["epochs"], row["source"])


def report(rows: list[dict[str, Any]], work: Path, command: str, notes: list[str]) -> str:
    """The text of bench/results/finetune.txt: one line per (part, source, arm) and the runs."""
    lines = [
        f"# bench/finetune.py: fine-tuned vs from scratch on COIL-20 pose-block (last: {command})",
        f"# {os.cpu_count()} CPUs; load average (1 min) from os.getloadavg around each run; final-epoch test accuracy",
        *[f"# {note}" for note in notes],
        "",
    ]
    sources: dict[str, dict[str, Any]] = {}
    for row in rows:
        note = work / row["source"] / "bench-source.json"
        if row["source"] not in sources and note.is_file():
            sources[row["source"]] = json.loads(note.read_text(encoding="utf-8"))
    for name, note in sources.items():
        lines.append(
            f"source {name}: {note['model']} on Fashion-MNIST at {note['input_size']} px, {note['epochs']} epochs on "
            f"{note['train_examples']:,} images less the 10% held out for validation (default recipe): test acc {note['test_acc']:.3f}, "
            f"{note['seconds']:.0f} s, load {note['load_before']} -> {note['load_after']}"
        )
    lines += ["", f"{'part':9} {'arm':12} {'epochs':>6} {'seeds':>5}  {'median':>6}  each seed's test acc     "
                  "val acc after epoch 1 (median)  s/run  load"]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["part"], row["source"], row["epochs"], row["arm"]), []).append(row)
    for (part, _, epochs, arm), runs in sorted(groups.items()):
        runs.sort(key=lambda r: r["seed"])
        finals = [r["final"] for r in runs]
        loads = [v for r in runs for v in (r["load_before"], r["load_after"])]
        lines.append(
            f"{part:9} {arm:12} {epochs:>6} {len(runs):>5}  {statistics.median(finals):.3f}  "
            f"{' '.join(f'{f:.3f}' for f in finals):24} {statistics.median(r['val_acc'][0] for r in runs):>30.3f}  "
            f"{statistics.median(r['seconds'] for r in runs):>5.0f}  "
            f"{min(loads):.1f}-{max(loads):.1f}"
        )
    lines += ["", "runs (val acc per epoch):"]
    for row in rows:
        lines.append(
            f"  {row['part']} {row['arm']} seed {row['seed']}: {row['config']} · val {' '.join(f'{a:.3f}' for a in row['val_acc'])}"
            f" · test {row['final']:.3f} · {row['seconds']:.0f} s · {row['threads']} thread(s)"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated (default: {','.join(PARTS)})")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 of the COIL-20 runs (default 3)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each COIL-20 run (default 5)")
    parser.add_argument("--arms", default="finetune,scratch", help="comma-separated: finetune, scratch, init-default")
    parser.add_argument("--source-epochs", type=int, default=2, help="epochs of the Fashion-MNIST run (default 2)")
    parser.add_argument("--source-limit", type=int, default=None, help="train the source on N images (default all)")
    parser.add_argument("--source-only", action="store_true", help="only train (and cache) the source runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--data", default=None, help="the COIL-20 folder (default: $CNNKIT_DATA/coil-20)")
    parser.add_argument("--fashion-data", default=None, help="the Fashion-MNIST folder (default: its search path)")
    parser.add_argument("--work", type=Path, default=Path("runs") / "bench-finetune", help="where source runs are kept")
    parser.add_argument("--record", type=Path, default=HERE / "results" / "finetune-runs.jsonl")
    parser.add_argument("--report", type=Path, default=HERE / "results" / "finetune.txt")
    parser.add_argument("--table", action="store_true", help="train nothing; rewrite the report from the record")
    parser.add_argument("--note", action="append", default=[], help="a line to add under the report's header")
    args = parser.parse_args(argv)
    words = list(argv if argv is not None else sys.argv[1:])
    for i in [i for i, w in enumerate(words) if w == "--note"][::-1]:
        del words[i : i + 2]  # the notes go under the header themselves
    command = " ".join(["python bench/finetune.py", *words])

    if not args.table:
        import torch

        from cnnkit.data import load_dataset

        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"torch {torch.__version__} · {torch.get_num_threads()} threads · load {_load()}", flush=True)
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        bad = [p for p in parts if p not in PARTS] + [a for a in arms if a not in ARMS]
        if bad:
            parser.error(f"unknown part(s) or arm(s): {', '.join(bad)}")
        done = {_key(r) for r in read_record(args.record)}
        for part in parts:
            source = source_run(part, args)
            if args.source_only:
                continue
            data = load_dataset("coil20", args.data, split="pose-block", input_size=PARTS[part][1])
            for seed in range(args.seeds):
                for arm in arms:
                    if (part, arm, seed, args.epochs, source.name) in done:
                        print(f"{part} {arm} seed {seed}: already recorded, skipped", flush=True)
                        continue
                    row = coil_run(part, arm, seed, source, data, args)
                    append_record(args.record, row)
                    print(f"{part} {arm} seed {seed}: val {row['val_acc']} test {row['final']:.3f} "
                          f"{row['seconds']:.0f} s load {row['load_before']}->{row['load_after']}", flush=True)  # fmt: skip
    if args.source_only:
        return 0
    from cnnkit.fs import atomic_write

    text = report(read_record(args.record), args.work, command, args.note)
    print(text, end="")
    atomic_write(args.report, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
