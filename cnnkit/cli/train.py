"""``cnnkit train [MODEL]``: train a registered model; ``--resume RUN_DIR`` continues a run.

Every option defaults to None, meaning "not given": only given options override the config file,
which overrides the model's recipe (see :mod:`cnnkit.config`).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cnnkit.cli._common import guarded, parse_key_values

app = typer.Typer()


class RecipeName(str, Enum):
    default = "default"
    d2l = "d2l"


class OptimizerName(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    onecycle = "onecycle"


_HYPER = "Hyperparameters (default: the model's recipe)"
_RUN = "Run"


@app.command("train")
@guarded
def train_command(
    model: Annotated[str | None, typer.Argument(help="Registered model ('cnnkit list models').", show_default=False)] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML or JSON file of config keys.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Registered dataset [fashion-mnist].")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Folder holding the dataset's files.")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Dataset split rule (same as -d split=S).")] = None,
    channels: Annotated[
        int | None, typer.Option("--channels", help="Image folders: 1 (grayscale) or 3 (RGB) (same as -d channels=N).")
    ] = None,
    dataset_option: Annotated[
        list[str] | None, typer.Option("-d", "--dataset-option", help="Dataset option key=value.")
    ] = None,
    recipe: Annotated[
        RecipeName | None, typer.Option("--recipe", help="default (cnnkit's) or d2l (the seed's) [default].")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", "-e", help="Epochs.", rich_help_panel=_HYPER)] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", help="Examples per step.", rich_help_panel=_HYPER)
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=_HYPER)] = None,
    optimizer: Annotated[
        OptimizerName | None, typer.Option("--optimizer", help="sgd or adamw.", rich_help_panel=_HYPER)
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option("--weight-decay", help="Weight decay.", rich_help_panel=_HYPER)
    ] = None,
    schedule: Annotated[
        Schedule | None, typer.Option("--schedule", help="constant, cosine or onecycle.", rich_help_panel=_HYPER)
    ] = None,
    label_smoothing: Annotated[
        float | None, typer.Option("--label-smoothing", help="Label smoothing.", rich_help_panel=_HYPER)
    ] = None,
    augment: Annotated[
        bool | None,
        typer.Option("--augment/--no-augment", help="Random crop + flip of batches.", rich_help_panel=_HYPER),
    ] = None,
    input_size: Annotated[
        int | None, typer.Option("--input-size", help="Square input side in pixels.", rich_help_panel=_HYPER)
    ] = None,
    model_option: Annotated[
        list[str] | None, typer.Option("-o", "--model-option", help="Model option key=value (e.g. width=0.25).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed [0].", rich_help_panel=_RUN)] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option("--deterministic", help="Deterministic algorithms: bit-identical reruns.", rich_help_panel=_RUN),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps [auto].", rich_help_panel=_RUN)
    ] = None,
    amp: Annotated[
        bool | None, typer.Option("--amp/--no-amp", help="Mixed precision [on for CUDA].", rich_help_panel=_RUN)
    ] = None,
    channels_last: Annotated[
        bool | None,
        typer.Option("--channels-last/--no-channels-last", help="channels_last [on for CUDA].", rich_help_panel=_RUN),
    ] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile", help="torch.compile the model.", rich_help_panel=_RUN)
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option("--patience", help="Stop after N epochs without better test acc.", rich_help_panel=_RUN),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory [runs/<model>-<dataset>/<N>].", rich_help_panel=_RUN)
    ] = None,
    runs_dir: Annotated[
        Path | None, typer.Option("--runs-dir", help="Parent of numbered runs [runs].", rich_help_panel=_RUN)
    ] = None,
    tensorboard: Annotated[
        bool | None, typer.Option("--tensorboard", help="Also log to TensorBoard.", rich_help_panel=_RUN)
    ] = None,
    quiet: Annotated[bool | None, typer.Option("--quiet", "-q", help="No progress output.", rich_help_panel=_RUN)] = None,
    resume_dir: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this directory.", rich_help_panel=_RUN)
    ] = None,
) -> None:
    """Train MODEL on a dataset (Fashion-MNIST by default) and save the run: `cnnkit train lenet_bn`."""
    from cnnkit.errors import UsageError

    given: dict[str, Any] = {
        "model": model, "dataset": dataset, "data": str(data) if data else None,
        "recipe": recipe.value if recipe else None, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "optimizer": optimizer.value if optimizer else None, "weight_decay": weight_decay,
        "schedule": schedule.value if schedule else None, "label_smoothing": label_smoothing,
        "augment": augment, "input_size": input_size, "seed": seed, "deterministic": deterministic,
        "device": device, "amp": amp, "channels_last": channels_last, "compile": compile,
        "patience": patience, "out": str(out) if out else None, "runs_dir": str(runs_dir) if runs_dir else None,
        "tensorboard": tensorboard, "quiet": quiet,
    }  # fmt: skip
    given = {key: value for key, value in given.items() if value is not None}
    dataset_options = parse_key_values(dataset_option, flag="-d")
    if split is not None:
        dataset_options["split"] = split
    if channels is not None:
        dataset_options["channels"] = str(channels)
    if dataset_options:
        given["dataset_options"] = dataset_options
    model_options = parse_key_values(model_option, flag="-o")
    if model_options:
        given["model_options"] = model_options

    if resume_dir is not None:
        from cnnkit.training.run import resume

        if config is not None:
            raise UsageError("--resume continues a run with its own config; drop --config")
        resume(resume_dir, given)
        return

    from cnnkit.config import resolve_config
    from cnnkit.training.run import train

    train(resolve_config(config, given))
