"""The COIL-20 seed project's models on the real COIL-20: test accuracy per split, and wall time.

    python bench/coil20.py                                     # everything: 6 models x 2 splits x 3 seeds
    python bench/coil20.py --models lenet,alexnet --seeds 3 --epochs 10
    python bench/coil20.py --models vgg16 --splits pose-block --seeds 1 --epochs 3
    python bench/coil20.py --models lenet --splits pose-block --set augment=crop-flip --set ema=0.999
    python bench/coil20.py --models lenet --splits pose-block-0,pose-block --input-size recipe
    python bench/coil20.py --table                             # only print the table of what was recorded

Each run trains with cnnkit's own run driver (what ``cnnkit train`` runs), with the model's default
recipe at 64 px (or the smallest side above it the model accepts: AlexNet needs 65), on one of two
splits of the 1,440 images: ``random`` (the seed project's seeded 9:1 split, stratified per object;
the split itself is fixed, the training seed varies) and ``pose-block`` (poses 60-71 of every
object held out: viewpoints never seen in training), or ``pose-block-0`` (poses 0-11 held out: the
block to choose a recipe on without looking at the reported one). ``--input-size recipe`` trains at
the size the model's recipe gives COIL-20 (its ``per_dataset`` changes), with the recipe's batch
unless ``--batch-size`` says otherwise. Every finished run is appended to
``--record`` (JSON lines), so the benchmark can be run in pieces and a run already recorded with
the same settings is skipped; the markdown table of everything recorded (median final-epoch test
accuracy over the seeds, each seed's, and the median wall time of one run) goes to stdout and
``--markdown``. ``--set KEY=VALUE`` (repeatable) overrides any other training-config key of the
recipe (``augment``, ``lr``, ``mixup``, ...: ``cnnkit train``'s names and values); the overrides
are part of each recorded row (``"set"``), of what makes a run "already recorded", and of the
table's model column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

# The seed project's models; VGG-16 with batch norm, as the seed trained it.
MODELS: dict[str, dict[str, Any]] = {
    "lenet": {},
    "alexnet": {},
    "googlenet": {},
    "vgg16": {"batch_norm": True},
    "resnet50": {},
    "efficientnet_b0": {},
}
# The bench's split names -> the coil20 dataset's options. "pose-block-0" holds out poses 0-11
# instead of 60-71: a block to choose a recipe on, so that the reported pose-block is never used to
# choose (the turntable is a circle, so the two blocks are the same task on other viewpoints).
SPLITS: dict[str, dict[str, Any]] = {
    "random": {"split": "random"},
    "pose-block": {"split": "pose-block"},
    "pose-block-0": {"split": "pose-block", "block_start": 0},
}
HERE = Path(__file__).resolve().parent


# What the bench sets itself (each has its own flag, or is the run's identity): not for --set.
OWN_KEYS = {
    "model": "--models", "model_options": "the bench's per-model options", "dataset": "COIL-20",
    "dataset_options": "--splits", "data": "--data", "seed": "--seeds/--first-seed", "epochs": "--epochs",
    "input_size": "--input-size", "recipe": "--recipe", "batch_size": "--batch-size", "device": "the CPU",
    "quiet": "quiet runs", "out": "a temporary folder",
}  # fmt: skip


def _settings(row: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A row's --set overrides as a sorted, hashable tuple (rows from before --set have none)."""
    return tuple(sorted((row.get("set") or {}).items()))


def _protocol(row: dict[str, Any]) -> str:
    """How a row was trained: ``val`` (10% of each object's training images held out), or ``test``
    for rows from before the validation carve (trained on all of them; no ``protocol`` recorded)."""
    return str(row.get("protocol") or "test")


def hyperparameters(row: dict[str, Any]) -> str:
    """What a row trained with, whatever the split and seed: its resolved config line after the
    recipe's name, less the seed. Part of the key because a recipe changes under the same flags
    (LeNet's peak rate went from 0.01 to 0.05, and COIL-20 got a recipe of its own)."""
    tokens = str(row.get("config", "")).split(": ", 1)[-1].split(" · ")
    return " · ".join(t for t in tokens if not t.startswith("seed "))


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    # The protocol is part of the settings: a run with the carve does not repeat one without it.
    return (row["model"], row["split"], row["seed"], row["epochs"], row["input_size"], row["recipe"], row["batch_size"],
            _settings(row), _protocol(row), hyperparameters(row))  # fmt: skip


def parse_sets(pairs: list[str], model: str) -> dict[str, Any]:
    """``["augment=crop-flip", "lr=2e-2"]`` -> ``{"augment": "crop-flip", "lr": 0.02}``: parsed as
    ``cnnkit train -o`` parses (``key=value``), validated and typed by the model's resolved config, so
    equal settings written differently (``lr=2e-2``, ``lr=0.02``; ``cutmix=1``, ``cutmix=1.0``) key alike."""
    from cnnkit.cli._common import parse_key_values
    from cnnkit.config import resolve_config
    from cnnkit.errors import UsageError

    given = parse_key_values(pairs, flag="--set")
    for key in given:
        if key in OWN_KEYS:
            raise UsageError(f"--set {key}=...: the bench sets {key} itself ({OWN_KEYS[key]})")
    config = resolve_config(overrides={"model": model, **given})
    return {key: getattr(config, key) for key in sorted(given)}


def _value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def settings_label(row: dict[str, Any]) -> str:
    """`` `--set k=v` `` per override, for the table's model column ("" when none)."""
    return "".join(f" `--set {k}={_value(v)}`" for k, v in _settings(row))


def read_record(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_record(path: Path, row: dict[str, Any]) -> None:
    from cnnkit.fs import atomic_write

    text = "".join(json.dumps(r) + "\n" for r in [*read_record(path), row])
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def input_side(model: str, options: dict[str, Any], wanted: int) -> int:
    from cnnkit.registry import MODELS as REGISTRY
    from cnnkit.summary import smallest_input_size

    return max(wanted, smallest_input_size(REGISTRY.get(model), in_channels=1, num_classes=20, options=options))


def run_config(
    model: str, split: str, seed: int, epochs: int, side: int, recipe: str, batch_size: int | None,
    sets: dict[str, Any] | None = None,
) -> Any:
    """The TrainConfig of one run: the model's recipe on COIL-20 with the bench's settings."""
    from cnnkit.config import resolve_config

    overrides = {"model": model, "recipe": recipe, "epochs": epochs, "input_size": side, "dataset": "coil20",
                 "dataset_options": dict(SPLITS[split]), "seed": seed, "device": "cpu", "quiet": True}  # fmt: skip
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if MODELS.get(model):
        overrides["model_options"] = dict(MODELS[model])
    overrides.update(sets or {})
    return resolve_config(overrides=overrides)


def run_one(config: Any, split: str, data: Any, sets: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from cnnkit.config import describe_config
    from cnnkit.training.run import train

    model, seed, epochs, side, recipe = config.model, config.seed, config.epochs, config.input_size, config.recipe
    with tempfile.TemporaryDirectory() as folder:
        config = config.model_copy(update={"out": str(Path(folder) / "run")})
        started = time.perf_counter()
        result = train(config, data=data)
        seconds = time.perf_counter() - started
        tested = json.loads((result.run_dir / "test.json").read_text(encoding="utf-8"))
    accs = [float(row["val_acc"]) for row in result.history]
    # "final": the final epoch's test accuracy (what the table reports); "best": the test accuracy
    # of the best epoch by validation. Validation alone chose it.
    return {
        "model": model, "options": MODELS.get(model, {}), "split": split, "seed": seed, "epochs": epochs,
        "input_size": side, "recipe": recipe, "batch_size": config.batch_size, "set": dict(sets or {}),
        "config": describe_config(config),
        "val_acc": accs, "final": tested["final"]["test_acc"], "best": tested.get("best", tested["final"])["test_acc"],
        "best_epoch": result.best_epoch, "protocol": "val", "seconds": round(seconds, 1),
        "examples_per_s": round(result.examples_per_s, 1), "train_examples": len(data.train),
        "test_examples": len(data.test), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    """One line per (model, epochs, input, batch, recipe, --set): each split's median final accuracy and time."""
    groups: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        group = (row["model"], row["epochs"], row["input_size"], row["batch_size"], row["recipe"], _settings(row),
                 _protocol(row), hyperparameters(row))  # fmt: skip
        groups[group][row["split"]].append(row)
    # Groups that share every flag but trained under different recipes (the recipe changed between
    # them) are told apart by the hyperparameters only one of them has.
    twins: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for group in groups:
        twins[group[:-1]].append(group[-1])
    order = {name: i for i, name in enumerate(MODELS)}
    # the reported splits always; the selection block where a row has it
    shown = ["random", "pose-block"] + (["pose-block-0"] if any(r["split"] == "pose-block-0" for r in rows) else [])
    lines = [
        "| model | input | batch | epochs | "
        + " | ".join(f"`{split}` test acc: median (seeds) | time/run" for split in shown) + " |",
        "|---|---|---|---|" + "---|---|" * len(shown),
    ]
    for (model, epochs, side, batch, recipe, sets, protocol, hyper), by_split in sorted(
        groups.items(), key=lambda g: (order.get(g[0][0], 99), g[0])
    ):
        cells = []
        for split in shown:
            runs = sorted(by_split.get(split, []), key=lambda r: r["seed"])
            if not runs:
                cells += ["not run", ""]
                continue
            finals = [r["final"] for r in runs]
            each = ", ".join(f"{f:.3f}" for f in finals)
            cells += [
                f"**{statistics.median(finals):.3f}** ({each})",
                f"{statistics.median(r['seconds'] for r in runs):.0f} s",
            ]
        options = MODELS.get(model) or {}
        label = f"`{model}`" + "".join(f" `-o {k}={str(v).lower()}`" for k, v in options.items())
        label += "" if recipe == "default" else f" (`--recipe {recipe}`)"
        label += settings_label({"set": dict(sets)})
        label += " (no val carve)" if protocol == "test" else ""  # trained on every training image
        others = [h for h in twins[(model, epochs, side, batch, recipe, sets, protocol)] if h != hyper]
        if others:
            theirs = {t for h in others for t in h.split(" · ")}
            label += " (recipe: " + " · ".join(t for t in hyper.split(" · ") if t not in theirs) + ")"
        lines.append(f"| {label} | {side} | {batch} | {epochs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], text: str, notes: list[str]) -> str:
    """The markdown file: what ran where, the table, and each model's resolved hyperparameters."""
    machines = sorted(
        {f"torch {r['torch']}, {r['threads']} CPU thread{'' if r['threads'] == 1 else 's'}" for r in rows}
    )
    configs = {}
    sizes = {r["split"]: f"{r['train_examples']:,} train / {r['test_examples']:,} test images" for r in rows}
    for row in rows:
        configs.setdefault((row["model"], row["recipe"], settings_label(row)), row["config"])
    lines = [
        "# COIL-20: the seed project's models (`bench/coil20.py`)",
        "",
        f"Final-epoch test accuracy on the real COIL-20 (1,440 images, 20 objects x 72 poses), trained on the "
        f"CPU ({'; '.join(machines) or 'nothing recorded'}). `random`: the seed's seeded 9:1 split, stratified per "
        f"object ({sizes.get('random', '?')}, one fixed split); `pose-block`: poses 60-71 of "
        f"every object held out ({sizes.get('pose-block', '?')}). Median over the training seeds, each seed's in brackets; time is the median wall time "
        "of one run (training plus a test pass each epoch).",
        "",
        text,
        "",
        *[line for note in notes for line in (note, "")],
        "Hyperparameters (each model's default recipe at this input size, as its first recorded run resolved them):",
        "",
        *[f"- `{model}`{'' if recipe == 'default' else f' ({recipe})'}{sets}: {config}"
          for (model, recipe, sets), config in configs.items()],
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, train what is not yet recorded, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    parser.add_argument("--splits", default="random,pose-block", help=f"comma-separated: {', '.join(SPLITS)}")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="start at this seed (to add seeds later)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--input-size", default="64",
                        help="square side, raised to a model's smallest; 'recipe': the recipe's size on COIL-20")  # fmt: skip
    parser.add_argument("--recipe", default="default", choices=["default", "d2l"])
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the recipe's)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training-config key of the recipe, e.g. --set augment=crop-flip --set "
                        "ema=0.999 (repeatable; cnnkit train's keys and values)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 avoids oversubscribing a shared machine")  # fmt: skip
    parser.add_argument("--data", default=None, help="the COIL-20 folder (default: $CNNKIT_DATA/coil-20)")
    parser.add_argument("--record", type=Path, default=HERE / "results" / "coil20-runs.jsonl",
                        help="JSON lines of finished runs (read to skip, appended to)")  # fmt: skip
    parser.add_argument("--markdown", default=str(HERE / "results" / "coil20.md"),
                        help="table output ('': print only)")  # fmt: skip
    parser.add_argument("--note", action="append", default=[], help="a paragraph to add under the table")
    parser.add_argument("--table", action="store_true", help="train nothing; print the table of what is recorded")
    args = parser.parse_args(argv)

    if not args.table:
        import torch

        from cnnkit.config import describe_config
        from cnnkit.data import load_dataset
        from cnnkit.registry import MODELS as REGISTRY

        models = [m.strip() for m in args.models.split(",") if m.strip()]
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            parser.error(f"unknown split(s) {', '.join(unknown)}; use {', '.join(SPLITS)}")
        from cnnkit.errors import UsageError

        try:
            sets = {model: parse_sets(args.sets, model) for model in models}
        except UsageError as err:
            parser.error(str(err))
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"torch {torch.__version__} · {torch.get_num_threads()} threads · nice {os.nice(0)}", flush=True)
        done = {_key(r) for r in read_record(args.record)}
        for split in splits:
            data = load_dataset("coil20", args.data, **SPLITS[split])
            for model in models:
                asked = (REGISTRY.get(model).recipe.on("coil20").input_size if args.input_size == "recipe"
                         else int(args.input_size))  # fmt: skip
                side = input_side(model, MODELS.get(model, {}), asked)
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    config = run_config(model, split, seed, args.epochs, side, args.recipe, args.batch_size, sets[model])
                    probe = {"model": model, "split": split, "seed": seed, "epochs": args.epochs,
                             "input_size": side, "recipe": args.recipe, "batch_size": config.batch_size,
                             "set": sets[model], "protocol": "val", "config": describe_config(config)}  # fmt: skip
                    if _key(probe) in done:
                        print(f"{model} {split} seed {seed}: already recorded, skipped", flush=True)
                        continue
                    row = run_one(config, split, data, sets[model])
                    append_record(args.record, row)
                    print(
                        f"{model} {split} seed {seed} ({row['config']}): val acc per epoch "
                        f"{' '.join(f'{a:.3f}' for a in row['val_acc'])}  final test {row['final']:.3f}  "
                        f"{row['seconds']:.0f} s",
                        flush=True,
                    )

    text = table(read_record(args.record))
    print(text)
    if args.markdown:
        from cnnkit.fs import atomic_write

        document = report(read_record(args.record), text, args.note)
        atomic_write(Path(args.markdown), lambda tmp: tmp.write_text(document, encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
