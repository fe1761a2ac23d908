"""``cnnkit train [MODEL]``: train a registered model; ``--resume RUN_DIR`` continues a run.

The options are generated from :class:`cnnkit.config.TrainConfig`: every field is an option
(``batch_size`` -> ``--batch-size``, booleans as ``--flag/--no-flag``), with the field's own
description, so a field added there is settable here, in a config file and documented, without
touching this file. Every option defaults to "not given": only given options override the config
file, which overrides the model's recipe. Values are validated by the same pydantic model, so a
bad ``--lr`` reads exactly like a bad ``lr =`` in a file.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from cnnkit.cli._common import guarded, parse_key_values
from cnnkit.config import TrainConfig
from cnnkit.protocols import HYPERPARAMETER_KEYS

app = typer.Typer()

SHORT_FLAGS = {"epochs": "-e", "batch_size": "-b", "quiet": "-q"}
"""Single-letter aliases of the most used fields."""
PATH_FIELDS = ("data", "out", "runs_dir")
"""Fields given as paths (completed and shown as PATH)."""
OPTION_TABLES = {"model_options": "-o", "dataset_options": "-d", "trainer_options": "-t"}
"""Dict fields, given as repeated ``key=value`` options."""
_HYPER = "Hyperparameters (default: the model's recipe)"
_RUN = "Run"


def _option_type(field: Any) -> tuple[Any, str]:
    """The click-level type of a config field and a note of its choices for the help text."""
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return str, f" One of: {', '.join(map(str, typing.get_args(annotation)))}."
    if annotation in (bool, int, float):
        return annotation, ""
    return str, ""


def _config_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per TrainConfig field, annotated for Typer."""
    params = []
    for name, field in TrainConfig.model_fields.items():
        if name == "model" or name in OPTION_TABLES:
            continue
        kind, choices = _option_type(field)
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}" if kind is bool else flag, *([SHORT_FLAGS[name]] if name in SHORT_FLAGS else [])]
        if name in HYPERPARAMETER_KEYS:
            panel, default = _HYPER, ""
        else:
            default = "" if field.default is None or field.default is False or field.default_factory else f" [default: {field.default}]"
            panel = _RUN
        option = typer.Option(*decls, help=f"{field.description}{choices}{default}", rich_help_panel=panel, show_default=False)
        annotation = Path if name in PATH_FIELDS else kind
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[annotation | None, option])
        )
    return params


def train_command(
    model: Annotated[str | None, typer.Argument(help="Registered model ('cnnkit list models').", show_default=False)] = None,
    *,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML or JSON file of config keys.")] = None,
    resume_dir: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this directory.", rich_help_panel=_RUN)
    ] = None,
    split: Annotated[str | None, typer.Option("--split", help="Dataset split rule (same as -d split=S).")] = None,
    channels: Annotated[
        int | None, typer.Option("--channels", help="Image folders: 1 (grayscale) or 3 (RGB) (same as -d channels=N).")
    ] = None,
    model_option: Annotated[
        list[str] | None, typer.Option("-o", "--model-option", help="Model option key=value (e.g. width=0.25).")
    ] = None,
    dataset_option: Annotated[
        list[str] | None, typer.Option("-d", "--dataset-option", help="Dataset option key=value.")
    ] = None,
    trainer_option: Annotated[
        list[str] | None, typer.Option("-t", "--trainer-option", help="Trainer option key=value ('cnnkit list trainers -l').")
    ] = None,
    **fields: Any,
) -> None:
    """Train MODEL on a dataset (Fashion-MNIST by default) and save the run: `cnnkit train lenet_bn`."""
    from cnnkit.errors import UsageError

    given: dict[str, Any] = {
        key: (str(value) if isinstance(value, Path) else value) for key, value in fields.items() if value is not None
    }
    if model is not None:
        given["model"] = model
    dataset_options = parse_key_values(dataset_option, flag="-d")
    if split is not None:
        dataset_options["split"] = split
    if channels is not None:
        dataset_options["channels"] = str(channels)
    for key, values in (
        ("model_options", parse_key_values(model_option, flag="-o")),
        ("dataset_options", dataset_options),
        ("trainer_options", parse_key_values(trainer_option, flag="-t")),
    ):
        if values:
            given[key] = values

    if resume_dir is not None:
        from cnnkit.training.run import resume

        if config is not None:
            raise UsageError("--resume continues a run with its own config; drop --config")
        if "init_from" in given:
            raise UsageError(
                "--init-from starts a new run from other weights, --resume continues a run from its own; use one of them"
            )
        resume(resume_dir, given)
        return

    from cnnkit.config import resolve_config
    from cnnkit.training.run import train

    train(resolve_config(config, given))


def _with_config_options(command: Any) -> Any:
    """Replace ``**fields`` in the command's signature by the generated per-field options."""
    signature = inspect.signature(command, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = signature.replace(parameters=[*fixed, *_config_parameters()])
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    return command


app.command("train")(_with_config_options(guarded(train_command)))
