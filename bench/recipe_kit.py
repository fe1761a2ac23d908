"""The recipe kit measured: what each technique buys on Fashion-MNIST, and what it costs in speed.

    python bench/recipe_kit.py ablation --model lenet_bn --seeds 3 --jobs 2   # 10 epochs per run
    python bench/recipe_kit.py table                                       # the markdown table
    python bench/recipe_kit.py speed --model lenet_bn --repeats 3 --baseline ../before-kit
    python bench/recipe_kit.py compare --baseline ../before-kit       # all off: this tree vs that one

``ablation`` trains the model's default recipe with every knob of the kit off ("base"; label
smoothing too) and, per row, the base with one technique turned on (or a named combination), each for the given seeds, with cnnkit's own run driver (what
``cnnkit train`` runs): 10 epochs, validation carved from train, test measured once at the end on
the final weights (the figure d2l reports) and on the best-by-validation ones. Every finished run
is appended to ``bench/results/recipe-kit-runs.jsonl`` (an interrupted ablation resumes where it
stopped; ``--fresh`` starts over); ``table`` writes ``bench/results/recipe-kit.md`` from it.

``speed`` times one training epoch of each row (val off, so only the loop counts; interleaved
repeats, median examples/s of the trainer's own clock) and prints each row's ratio to the row with
every knob off.

``loader`` times the training loader alone (its batches, no model), each row in this tree and in
``--baseline TREE`` (an earlier checkout of cnnkit with the kit, e.g. the previous commit), in fresh
interleaved processes: what a change to the augmentation code saves per batch, without the model's
step and its noise around it. ``--same-process`` holds both trees' loaders in one process per row
and alternates their epochs, for differences smaller than the noise between processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# What a reader of the table must know that the runs' own records do not say.
NOTES = {
    "lenet": "Run when LeNet's default recipe had AdamW at lr 0.01 ('base'); the default is now 0.05, screened "
    "after this table (0.04: 0.9046, 0.05: 0.9069), which bench/results/accuracy-lenet-default.json measures.",
}
RUNS = RESULTS / "recipe-kit-runs.jsonl"
TABLE = RESULTS / "recipe-kit.md"

OFF: dict[str, Any] = {"augment": "none", "random_erasing": 0.0, "mixup": 0.0, "cutmix": 0.0, "ema": 0.0,
                       "accum_steps": 1, "clip_grad": 0.0, "class_weights": "none", "label_smoothing": 0.0}  # fmt: skip
ROWS: dict[str, dict[str, Any]] = {
    "base": {},
    "crop-flip": {"augment": "crop-flip"},
    "trivial": {"augment": "trivial"},
    "randaugment": {"augment": "randaugment"},
    "random_erasing 0.25": {"random_erasing": 0.25},
    "mixup 0.2": {"mixup": 0.2},
    "cutmix 1.0": {"cutmix": 1.0},
    "ema 0.999": {"ema": 0.999},
    "label_smoothing 0.1": {"label_smoothing": 0.1},
    "clip_grad 1.0": {"clip_grad": 1.0},
    "accum_steps 2": {"accum_steps": 2},
}
COMBINATIONS: dict[str, dict[str, Any]] = {
    "crop-flip + erasing + ema": {"augment": "crop-flip", "random_erasing": 0.25, "ema": 0.999},
    "erasing + ema + ls": {"random_erasing": 0.25, "ema": 0.999, "label_smoothing": 0.1},
}
# Not the kit: the recipe's own knobs, for choosing a default recipe the same way.
RECIPE_ROWS: dict[str, dict[str, Any]] = {
    "batch 64": {"batch_size": 64},
    "lr x0.5": {"lr_scale": 0.5},
    "lr x2": {"lr_scale": 2.0},
    "batch 64 + ema": {"batch_size": 64, "ema": 0.999},
    "batch 64 + lr x2": {"batch_size": 64, "lr_scale": 2.0},
    "lr x4": {"lr_scale": 4.0},
    "batch 32 + lr x2": {"batch_size": 32, "lr_scale": 2.0},
}
EVERYTHING: dict[str, Any] = {"augment": "trivial", "random_erasing": 0.25, "mixup": 0.2, "cutmix": 1.0, "ema": 0.999,
                              "accum_steps": 2, "clip_grad": 1.0, "class_weights": "balanced"}  # fmt: skip


def _done(path: Path) -> set[tuple[str, str, int]]:
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {(row["model"], row["row"], row["seed"]) for row in rows}


def _one_run(model: str, row: str, changes: dict[str, Any], seed: int, epochs: int, threads: int) -> dict[str, Any]:
    """Train one (row, seed) in this process and return its figures."""
    import torch

    torch.set_num_threads(threads)
    from cnnkit.config import resolve_config
    from cnnkit.training.run import train

    changes = dict(changes)
    scale = changes.pop("lr_scale", None)
    if scale is not None:  # a multiple of the recipe's own rate
        changes["lr"] = resolve_config(overrides={"model": model}).lr * scale
    with tempfile.TemporaryDirectory() as folder:
        config = resolve_config(overrides={"model": model, "epochs": epochs, "seed": seed, "quiet": True,
                                           "device": "cpu", "out": str(Path(folder) / "run"), **changes})  # fmt: skip
        started = time.perf_counter()
        result = train(config)
        wall = time.perf_counter() - started
        tested = json.loads((result.run_dir / "test.json").read_text(encoding="utf-8"))
    return {"model": model, "row": row, "changes": changes, "seed": seed, "epochs": epochs,
            "final_test": tested["final"]["test_acc"], "best_test": tested.get("best", tested["final"])["test_acc"],
            "best_epoch": result.best_epoch, "final_val": result.history[-1]["val_acc"],
            "examples_per_s": result.examples_per_s, "seconds": wall, "threads": threads,
            "load": os.getloadavg()[0]}  # fmt: skip


def ablation(args: argparse.Namespace) -> int:
    every = {**ROWS, **COMBINATIONS, **RECIPE_ROWS}
    rows = {**ROWS, **COMBINATIONS} if not args.rows else {name: every[name] for name in args.rows}
    if args.fresh and RUNS.exists():
        RUNS.unlink()
    done = _done(RUNS)
    todo = [(name, seed) for seed in range(args.seeds) for name in rows if (args.model, name, seed) not in done]
    print(f"{len(todo)} runs to go ({len(done)} done), {args.jobs} at a time, {args.threads} thread(s) each", flush=True)
    running: list[tuple[subprocess.Popen[str], str, int]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            name, seed = todo.pop(0)
            spec = json.dumps({"model": args.model, "row": name, "changes": {**OFF, **rows[name]}, "seed": seed,
                               "epochs": args.epochs, "threads": args.threads})  # fmt: skip
            proc = subprocess.Popen([sys.executable, __file__, "_one", spec], stdout=subprocess.PIPE, text=True)
            running.append((proc, name, seed))
        time.sleep(1.0)
        for entry in list(running):
            proc, name, seed = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            out = (proc.stdout.read() if proc.stdout else "").strip().splitlines()
            if proc.returncode != 0 or not out:
                print(f"{name} seed {seed}: failed (exit {proc.returncode})", flush=True)
                continue
            figures = json.loads(out[-1])
            with RUNS.open("a", encoding="utf-8") as log:
                log.write(json.dumps(figures) + "\n")
            print(f"{name:28s} seed {seed}: final test {figures['final_test']:.4f}  best-by-val test "
                  f"{figures['best_test']:.4f}  {figures['examples_per_s']:.0f} ex/s  {figures['seconds']:.0f}s  "
                  f"load {figures['load']:.1f}", flush=True)  # fmt: skip
    return table(args)


def table(args: argparse.Namespace) -> int:
    runs = [json.loads(line) for line in RUNS.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = ["# Recipe kit ablation (bench/recipe_kit.py)", "",
             "Fashion-MNIST, 10 epochs, each model's default recipe ('base') with one change per row; 10% of train "
             "held out for validation; test accuracy of the final weights and of the best epoch by validation, "
             "median (min-max) over the seeds. On this machine's CPU (2 cores, shared).", ""]  # fmt: skip
    for model in sorted({run["model"] for run in runs}):
        mine = [run for run in runs if run["model"] == model]
        base = [run["final_test"] for run in mine if run["row"] == "base"]
        base_median = statistics.median(base) if base else None
        lines += [f"## {model}", "", *([NOTES[model], ""] if model in NOTES else []),
                  "| row | seeds | final test | vs base | best-by-val test |", "|---|---|---|---|---|"]  # fmt: skip
        for name in dict.fromkeys(run["row"] for run in mine):
            finals = [run["final_test"] for run in mine if run["row"] == name]
            bests = [run["best_test"] for run in mine if run["row"] == name]
            delta = f"{statistics.median(finals) - base_median:+.4f}" if base_median is not None else "-"
            lines.append(f"| {name} | {len(finals)} | {statistics.median(finals):.4f} ({min(finals):.4f}-{max(finals):.4f}) "
                         f"| {delta} | {statistics.median(bests):.4f} |")  # fmt: skip
        lines.append("")
    loads = [run["load"] for run in runs]
    lines.append(f"Load average during the runs: {min(loads):.1f}-{max(loads):.1f} on 2 cores, one thread per run "
                 "(speed: recipe-kit-speed-*.md).")  # fmt: skip
    text = "\n".join(lines) + "\n"
    TABLE.write_text(text, encoding="utf-8")
    print(text)
    return 0


_SPEED_WORKER = """
import json, sys, tempfile, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from cnnkit.config import resolve_config
from cnnkit.data import load_dataset
from cnnkit.protocols import ImageTensors
from cnnkit.training.run import train
px = spec["input_size"]
data = load_dataset("fashion-mnist", None, input_size=px)  # as a run loads it (28 px, resized per batch)
n = spec["examples"]
data.train = ImageTensors(data.train.images[:n].clone(), data.train.labels[:n].clone())
rates = []
with tempfile.TemporaryDirectory() as folder:
    for epoch in range(spec["epochs"]):
        config = resolve_config(overrides={"model": spec["model"], "epochs": 1, "quiet": True, "device": "cpu",
                                           "val_fraction": 0, "out": f"{folder}/{epoch}", "input_size": px,
                                           **spec["changes"]})
        rates.append(train(config, data=data).examples_per_s)
print(json.dumps(max(rates[1:] or rates)))
"""


def speed(args: argparse.Namespace) -> int:
    """Each row in a fresh process (``--baseline TREE``: also all-off in another checkout, e.g. the
    commit before the kit), interleaved over the repeats; the median of the repeats' examples/s."""
    rows: dict[str, tuple[str | None, dict[str, Any]]] = {
        "all off": (None, dict(OFF)),
        **{name: (None, {**OFF, **changes}) for name, changes in ROWS.items() if changes},
        "class_weights balanced": (None, {**OFF, "class_weights": "balanced"}),
        "every knob on": (None, {**OFF, **EVERYTHING}),
    }
    if args.baseline:
        # The checkout before the kit knows augment only as true/false.
        rows["all off, before the kit"] = (args.baseline, {"augment": False, "label_smoothing": 0.0})
    if args.rows is not None:
        unknown = sorted(set(args.rows) - set(rows))
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(rows)}")
        rows = {name: row for name, row in rows.items() if name == "all off" or name in args.rows}
    rates: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    for repeat in range(args.repeats):
        # Interleaved, so that drift in the machine's speed hits every row, and each repeat starts
        # one row later, so that no row always runs first (all off did, and read faster than an
        # identical all-off row of another tree by a tenth).
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            tree, changes = rows[name]
            spec = json.dumps({"model": args.model, "changes": changes, "examples": args.examples,
                               "threads": args.threads, "epochs": 2, "input_size": args.input_size})  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(tree or Path(__file__).resolve().parent.parent)}
            done = subprocess.run([sys.executable, "-c", _SPEED_WORKER, spec], capture_output=True, text=True,
                                  env=env, check=True)  # fmt: skip
            rates[name].append(float(done.stdout.strip().splitlines()[-1]))
            print(f"{name:28s} {rates[name][-1]:8.0f} ex/s", flush=True)
    # Each repeat's ratio to the all-off run of the same repeat, then the median: the machine's
    # speed drifts by a quarter over minutes here, and neighbouring runs drift together.
    paired = {name: [v / off for v, off in zip(values, rates["all off"], strict=True)] for name, values in rates.items()}
    lines = [f"# Recipe kit speed: {args.model}, Fashion-MNIST {args.input_size} px ({args.examples} training images), CPU, "
             f"{args.threads} thread(s)", "",
             f"Each row: a fresh process trains two one-epoch runs and keeps the faster (the first warms up); "
             f"median over {args.repeats} interleaved repeats, each starting one row later; the trainer's own clock (training only); 'vs all "
             f"off': the median over the repeats of the row's rate over the same repeat's all-off rate, and their "
             f"range (the machine's noise: rows that change nothing differ by as much). Load "
             f"average at the end: {os.getloadavg()[0]:.1f} on 2 cores.", "",
             "| row | examples/s | vs all off | range over the repeats |", "|---|---|---|---|"]  # fmt: skip
    for name, values in rates.items():
        ratio = paired[name]
        lines.append(f"| {name} | {statistics.median(values):.0f} | {statistics.median(ratio):.2f}x | "
                     f"{min(ratio):.2f}-{max(ratio):.2f}x |")
    text = "\n".join(lines) + "\n"
    # A subset is printed only unless --out names a file: the committed table has every row.
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    elif args.rows is None:
        size = "" if args.input_size == 28 else f"-{args.input_size}px"
        (RESULTS / f"recipe-kit-speed-{args.model}{size}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


def compare(args: argparse.Namespace) -> int:
    """All knobs off here against all off in ``--baseline`` (the checkout before the kit): is the
    plain loop any slower? Interleaved fresh processes, three one-epoch runs each (the best kept)."""
    rows = {"all off, this tree": (str(Path(__file__).resolve().parent.parent), dict(OFF)),
            "all off, before the kit": (args.baseline, {"augment": False, "label_smoothing": 0.0})}  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, (tree, changes) in rows.items():
            spec = json.dumps({"model": args.model, "changes": changes, "examples": args.examples,
                               "threads": args.threads, "epochs": 3, "input_size": 28})  # fmt: skip
            done = subprocess.run([sys.executable, "-c", _SPEED_WORKER, spec], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": tree}, check=True)  # fmt: skip
            rates[name].append(float(done.stdout.strip().splitlines()[-1]))
        print({name: round(values[-1]) for name, values in rates.items()}, flush=True)
    now, before = (statistics.median(values) for values in rates.values())
    text = (f"\n## All off against the commit before the kit ({args.repeats} interleaved repeats, load "
            f"{os.getloadavg()[0]:.1f})\n\n| row | examples/s (median) | each repeat |\n|---|---|---|\n"
            + "".join(f"| {name} | {statistics.median(values):.0f} | {', '.join(f'{v:.0f}' for v in values)} |\n"
                      for name, values in rates.items())
            + f"\nRatio: {now / before:.2f}x.\n")  # fmt: skip
    with (RESULTS / f"recipe-kit-speed-{args.model}.md").open("a", encoding="utf-8") as out:
        out.write(text)
    print(text)
    return 0


_LOADER_WORKER = """
import json, statistics, sys, time, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from cnnkit.allocator import keep_freed_memory
keep_freed_memory()  # as a CPU training run does
from cnnkit.config import resolve_config
from cnnkit.data import load_dataset
from cnnkit.data.augment import Augmentation
from cnnkit.data.batches import BatchLoader
from cnnkit.protocols import ImageTensors
data = load_dataset("fashion-mnist", None, input_size=28)
n = spec["examples"]
split = ImageTensors(data.train.images[:n].clone(), data.train.labels[:n].clone())
config = resolve_config(overrides={"model": spec["model"], "device": "cpu", **spec["changes"]})
# The training loader exactly as the run driver builds it (cnnkit.training.context).
loader = BatchLoader(split, batch_size=config.batch_size, image_size=28, mean=data.mean, std=data.std, shuffle=True,
                     augmentation=Augmentation.from_config(config, len(data.classes)), seed=config.seed)
times = []
for epoch in range(spec["epochs"]):
    started, batches = time.perf_counter(), 0
    for _ in loader.epoch(epoch):
        batches += 1
    times.append((time.perf_counter() - started) / batches * 1000)
print(json.dumps([statistics.median(times[1:]), config.batch_size]))  # the first epoch imports and warms up
"""

_PAIRED_WORKER = """
import importlib.util, json, statistics, sys, time, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from cnnkit.allocator import keep_freed_memory
keep_freed_memory()
from cnnkit.config import resolve_config
from cnnkit.data import load_dataset
from cnnkit.data import augment, batches
from cnnkit.protocols import ImageTensors
def baseline(name):  # the baseline tree's module, under a private name, beside this tree's
    found = importlib.util.spec_from_file_location("baseline_" + name, spec["baseline"] + "/cnnkit/data/" + name + ".py")
    module = importlib.util.module_from_spec(found)
    sys.modules[found.name] = module
    found.loader.exec_module(module)
    return module
old_augment, old_batches = baseline("augment"), baseline("batches")
data = load_dataset("fashion-mnist", None, input_size=28)
n = spec["examples"]
split = ImageTensors(data.train.images[:n].clone(), data.train.labels[:n].clone())
config = resolve_config(overrides={"model": spec["model"], "device": "cpu", **spec["changes"]})
loaders = {
    tree: loader_class(split, batch_size=config.batch_size, image_size=28, mean=data.mean, std=data.std, shuffle=True,
                       augmentation=plan.from_config(config, len(data.classes)), seed=config.seed)
    for tree, loader_class, plan in (("this tree", batches.BatchLoader, augment.Augmentation),
                                     ("baseline", old_batches.BatchLoader, old_augment.Augmentation))
}
times = {tree: [] for tree in loaders}
for epoch in range(spec["epochs"]):
    for tree in (list(loaders) if epoch % 2 else list(loaders)[::-1]):  # neither always first
        started, count = time.perf_counter(), 0
        for _ in loaders[tree].epoch(epoch):
            count += 1
        times[tree].append((time.perf_counter() - started) / count * 1000)
print(json.dumps({tree: statistics.median(values[2:]) for tree, values in times.items()}))
"""

LOADER_ROWS = ("all off", "crop-flip", "trivial", "randaugment", "random_erasing 0.25", "mixup 0.2", "cutmix 1.0",
               "every knob on")  # fmt: skip


def loader(args: argparse.Namespace) -> int:
    """ms per training batch of the loader alone, this tree against ``--baseline``, per row."""
    if args.same_process:
        return _loader_paired(args)
    changes = _loader_changes()
    trees = {"this tree": str(Path(__file__).resolve().parent.parent), "baseline": args.baseline}
    times: dict[tuple[str, str], list[float]] = {(row, tree): [] for row in LOADER_ROWS for tree in trees}
    batch = 0
    for repeat in range(args.repeats):
        for row in LOADER_ROWS:
            # Alternated, so that neither tree always runs first.
            for tree in list(trees) if repeat % 2 == 0 else list(trees)[::-1]:
                spec = json.dumps({"model": args.model, "changes": changes[row], "examples": args.examples,
                                   "threads": args.threads, "epochs": 4})  # fmt: skip
                done = subprocess.run([sys.executable, "-c", _LOADER_WORKER, spec], capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": trees[tree]}, check=True)  # fmt: skip
                ms, batch = json.loads(done.stdout.strip().splitlines()[-1])
                times[row, tree].append(float(ms))
            print(f"{row:22s} " + "  ".join(f"{tree} {times[row, tree][-1]:.3f}" for tree in trees), flush=True)
    baseline = subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip() or args.baseline  # fmt: skip
    lines = [f"# Recipe kit loader: {args.model}'s training batches alone, Fashion-MNIST 28 px ({args.examples} "
             f"images), CPU, {args.threads} thread(s)", "",
             f"Each cell: ms per batch of {batch} images (a fresh process iterates the training "
             f"loader for 4 epochs, the median of the last 3), median over {args.repeats} interleaved repeats; "
             f"'baseline' is commit {baseline}. Load average at the end: {os.getloadavg()[0]:.1f} on 2 cores.", "",
             "| row | this tree | baseline | saved per batch |", "|---|---|---|---|"]  # fmt: skip
    for row in LOADER_ROWS:
        now, before = statistics.median(times[row, "this tree"]), statistics.median(times[row, "baseline"])
        lines.append(f"| {row} | {now:.3f} | {before:.3f} | {before - now:+.3f} ms |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"recipe-kit-loader-{args.model}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


def _loader_paired(args: argparse.Namespace) -> int:
    """``loader --same-process``: each row in one process holding both trees' loaders (the
    baseline's ``augment.py`` and ``batches.py``, the rest of cnnkit this tree's), their epochs
    alternated; the median over the epochs after the first two. Fresh processes differ by +-30% here,
    wider than most of what a change to these two files saves; epochs of one process by a few %."""
    changes = _loader_changes()
    results = {}
    for row in LOADER_ROWS:
        spec = json.dumps({"model": args.model, "changes": changes[row], "examples": args.examples,
                           "threads": args.threads, "epochs": 2 + 2 * args.repeats, "baseline": args.baseline})  # fmt: skip
        done = subprocess.run([sys.executable, "-c", _PAIRED_WORKER, spec], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                              check=True)  # fmt: skip
        results[row] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{row:22s} {results[row]}", flush=True)
    baseline = subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip() or args.baseline  # fmt: skip
    lines = ["", f"## In one process ({args.repeats} epochs each, alternated; baseline {baseline}'s augment.py and "
             f"batches.py; load {os.getloadavg()[0]:.1f})", "",
             "| row | this tree | baseline | saved per batch |", "|---|---|---|---|"]  # fmt: skip
    for row, result in results.items():
        lines.append(f"| {row} | {result['this tree']:.3f} | {result['baseline']:.3f} | "
                     f"{result['baseline'] - result['this tree']:+.3f} ms |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    with (RESULTS / f"recipe-kit-loader-{args.model}.md").open("a", encoding="utf-8") as out:
        out.write(text)
    print(text)
    return 0


def _timing(parser: argparse.ArgumentParser, repeats: int) -> argparse.ArgumentParser:
    """The options every timing command takes."""
    parser.add_argument("--model", default="lenet_bn")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--examples", type=int, default=20000, help="training images per epoch")
    return parser


def _loader_changes() -> dict[str, dict[str, Any]]:
    """Each loader row's config changes."""
    return {"all off": dict(OFF), **{name: {**OFF, **ROWS[name]} for name in LOADER_ROWS if name in ROWS},
            "every knob on": {**OFF, **EVERYTHING}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_one"]:  # a worker process of `ablation`
        spec = json.loads(argv[1])
        print(json.dumps(_one_run(spec["model"], spec["row"], spec["changes"], spec["seed"], spec["epochs"],
                                  spec["threads"])))  # fmt: skip
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("ablation")
    run.add_argument("--model", default="lenet_bn")
    run.add_argument("--seeds", type=int, default=3)
    run.add_argument("--epochs", type=int, default=10)
    run.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per run")
    run.add_argument("--rows", nargs="*", default=None, help="only these rows (default: all)")
    run.add_argument("--fresh", action="store_true", help="forget the runs already logged")
    sub.add_parser("table")
    fast = _timing(sub.add_parser("speed"), repeats=3)
    fast.add_argument("--baseline", default=None, metavar="TREE", help="also time all-off in this checkout")
    fast.add_argument("--rows", nargs="*", default=None,
                      help="only these rows and 'all off' (printed, not saved unless --out)")  # fmt: skip
    fast.add_argument("--input-size", type=int, default=28, help="the side images are stored and trained at")
    fast.add_argument("--out", default=None, help="write the table here (default: results/recipe-kit-speed-MODEL[-SIZEpx].md)")
    batches = _timing(sub.add_parser("loader"), repeats=5)
    batches.add_argument("--baseline", required=True, metavar="TREE", help="an earlier checkout of cnnkit with the kit")
    batches.add_argument("--same-process", action="store_true",
                         help="both trees' loaders in one process per row (appended to the table)")
    same = sub.add_parser("compare")
    same.add_argument("--model", default="lenet_bn")
    same.add_argument("--repeats", type=int, default=6)
    same.add_argument("--threads", type=int, default=2)
    same.add_argument("--examples", type=int, default=12000)
    same.add_argument("--baseline", required=True, metavar="TREE", help="the checkout to compare with")
    args = parser.parse_args(argv)
    commands = {"ablation": ablation, "table": table, "speed": speed, "loader": loader, "compare": compare}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
