"""``TrainConfig``: every knob of a training run in one validated pydantic model.

A run's config is resolved in layers, each overriding the one before only where it says
something:

1. the model spec's recipe (``--recipe default``: as the spec writes it; ``d2l``: the seed's,
   derived from the same spec by :meth:`cnnkit.protocols.Recipe.named`), with the spec's changes
   for the run's dataset (:meth:`cnnkit.protocols.Recipe.on`),
2. a TOML or JSON file (``--config run.toml``; a run's own ``config.json`` works too),
3. the command-line options that were actually given.

A bad key or value in any layer is one :class:`~cnnkit.errors.UsageError` line naming the key,
where it came from and the valid keys. This module imports neither torch nor any model code.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ConfigDict, Field, ValidationError, model_validator

from cnnkit.errors import UsageError, closest
from cnnkit.protocols import HYPERPARAMETER_KEYS, RECIPE_NAMES, Hyperparameters, RecipeName

__all__ = [
    "TrainConfig",
    "RECIPE_KEYS",
    "RESUMABLE_KEYS",
    "recipe_values",
    "read_config_file",
    "resolve_config",
    "describe_config",
    "config_reference",
]


class TrainConfig(Hyperparameters):
    """A fully resolved training run (what ``config.json`` records).

    The hyperparameters (epochs, batch size, optimiser, schedule, ...) are declared once in
    :class:`~cnnkit.protocols.Hyperparameters`, which the model spec's :class:`~cnnkit.protocols.Recipe`
    shares; their values come from the recipe unless a file or the command line says otherwise.
    Every field here is also a ``cnnkit train`` option (the command line is generated from this
    class), a config-file key and a row of ``docs/config.md``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- what to train on what, and how ----------------------------------------------------------
    model: str = Field(description="Registered model name ('cnnkit list models').")
    model_options: dict[str, Any] = Field(
        default_factory=dict, description="Architecture options (-o key=value), e.g. {width = 0.25}."
    )
    dataset: str = Field("fashion-mnist", description="Registered dataset name ('cnnkit list datasets').")
    data: str | None = Field(None, description="Folder holding the dataset's files (default: its search path).")
    dataset_options: dict[str, Any] = Field(
        default_factory=dict, description="Dataset loading options (-d key=value), e.g. {split = 'pose-block'}."
    )
    trainer: str = Field("standard", description="Registered trainer that runs the loop ('cnnkit list trainers').")
    trainer_options: dict[str, Any] = Field(
        default_factory=dict, description="The trainer's own options (-t key=value), e.g. {report_every = 2}."
    )
    recipe: RecipeName = Field(
        "default",
        description="Hyperparameter set: the model's own 'default', the seed's 'd2l', or 'finetune' (default's, "
        "a tenth of its peak lr, half an epoch of warm-up, the model's own init).",
    )  # fmt: skip
    init_from: str | None = Field(
        None,
        description="Start from these weights: a cnnkit run directory or .safetensors file of the same model, a "
        "torchvision state dict (.pth/.pt/.safetensors), or torchvision:NAME from torch hub's cache (never downloaded).",
    )  # fmt: skip
    freeze: Literal["none", "backbone"] = Field(
        "none", description="backbone: train only the model's head (the frozen part's BatchNorm stays in eval mode)."
    )
    freeze_epochs: int | None = Field(
        None, gt=0, description="With --freeze backbone: unfreeze the whole model after this many epochs (None: never)."
    )
    head_lr_mult: float = Field(
        1.0, gt=0, description="The head's learning rate as a multiple of lr (the rest trains at lr); 1: the same."
    )

    # -- reproducibility and hardware ---------------------------------------------------------
    seed: int = Field(0, ge=0, description="Seeds weights, shuffling, augmentation and dropout.")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms: bit-identical reruns.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    amp: bool | None = Field(None, description="Mixed precision (bf16, else fp16 + GradScaler); None: on for CUDA.")
    channels_last: bool | None = Field(None, description="channels_last memory format; None: on for CUDA.")
    compile: bool = Field(False, description="torch.compile the model before training.")

    # -- several processes (torchrun or --nproc); batch_size is the global batch ---------------
    nproc: int | None = Field(
        None, gt=0,
        description="Train with this many processes on this machine, started by torch's elastic launcher "
        "(as torchrun does); batch_size stays the global batch. None: one process, or as torchrun started it.",
    )  # fmt: skip
    sync_bn: bool = Field(
        False, description="Distributed runs: SyncBatchNorm, statistics over the global batch (CUDA only); "
        "off: each process normalises with its own share's statistics.",
    )  # fmt: skip
    dist_timeout: float = Field(
        300.0, gt=0, description="Distributed runs: seconds a process waits for the others before the job fails."
    )

    # -- model selection: on validation, never on test -----------------------------------------------
    val_fraction: float = Field(
        0.1, ge=0, lt=1,
        description="Share of each class of the training split held out (seeded) for validation when the dataset "
        "has no val split of its own; 0: no validation, so no best checkpoint and no --patience.",
    )  # fmt: skip
    monitor: Literal["val_acc", "val_loss"] = Field(
        "val_acc", description="What the best checkpoint and --patience follow (higher val_acc, lower val_loss)."
    )
    test_every_epoch: bool = Field(
        False, description="Also evaluate on test after every epoch (test_* columns; never used to choose anything)."
    )

    # -- the run directory and what hangs off the loop ------------------------------------------
    patience: int | None = Field(
        None, gt=0, description="Stop after this many epochs without a better validation metric (None: never)."
    )
    out: str | None = Field(None, description="Run directory (default: <runs_dir>/<model>-<dataset>/<N>).")
    runs_dir: str = Field("runs", description="Parent folder of numbered run directories.")
    tensorboard: bool = Field(False, description="Also log to TensorBoard (pip install 'cnnkit[tensorboard]').")
    quiet: bool = Field(False, description="No progress output, only the closing lines and errors.")

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        """Knobs that are valid alone but cannot work together."""
        if self.cutmix > 0 and self.input_size < 2:
            raise ValueError(f"cutmix needs images of at least 2 x 2 px, not input_size {self.input_size}; "
                             "use --mixup or a larger --input-size")  # fmt: skip
        return self


RECIPE_KEYS: tuple[str, ...] = HYPERPARAMETER_KEYS
"""The keys a recipe fills (everything a file or the command line may still override)."""

RESUMABLE_KEYS: tuple[str, ...] = (
    "epochs", "device", "quiet", "tensorboard", "patience", "compile", "nproc", "dist_timeout", "test_every_epoch",
    "lr",
)  # fmt: skip
"""What ``--resume`` may change: nothing that would make the continued run differ from the saved one,
but its length (``epochs``: the schedule is re-planned from where it is, never up) and a warm
restart (``lr``: a short warm-up to it, then the annealing to the end)."""


def recipe_values(model: str, recipe: str = "default", dataset: str | None = None) -> dict[str, Any]:
    """The config keys recipe ``recipe`` fills for registered ``model`` on ``dataset``, read from its
    spec (with the spec's ``per_dataset`` changes for that dataset)."""
    from cnnkit.registry import MODELS

    return {**MODELS.get(model).recipe.on(dataset).named(recipe).model_dump(), "recipe": recipe}


def _valid_keys() -> str:
    return ", ".join(TrainConfig.model_fields)


def _problem(err: Mapping[str, Any], source: str) -> str:
    """One readable clause for one pydantic error, naming the key and where it came from."""
    key = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        hint = closest(key, TrainConfig.model_fields)
        did_you_mean = f" (did you mean {', '.join(hint)}?)" if hint else ""
        return f"{source}: unknown key '{key}'{did_you_mean}; valid keys: {_valid_keys()}"
    if err["type"] == "missing":
        return f"{source}: '{key}' is required (name a model: cnnkit train MODEL, or model = '...' in the file)"
    return f"{source}: {key} = {err.get('input')!r}: {err['msg']}{_valid_range(key)}"


def _valid_range(key: str) -> str:
    """`` (valid: 0 <= ema < 1)`` from the field's bounds; empty for a field without any."""
    field = TrainConfig.model_fields.get(key)
    if field is None:
        return ""
    low = high = ""
    for bound in field.metadata:
        for name, left, right in (("ge", "<=", ""), ("gt", "<", ""), ("le", "", "<="), ("lt", "", "<")):
            value = getattr(bound, name, None)
            if value is not None and left:
                low = f"{value:g} {left} "
            elif value is not None:
                high = f" {right} {value:g}"
    return f" (valid: {low}{key}{high})" if low or high else ""


def _validate(values: Mapping[str, Any], source: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(dict(values))
    except ValidationError as exc:
        raise UsageError(_problem(exc.errors()[0], source)) from exc


def _check_keys(values: Mapping[str, Any], source: str) -> None:
    """Unknown keys are reported before anything else (a typo must not read as a missing model)."""
    for key in values:
        if key not in TrainConfig.model_fields:
            raise UsageError(_problem({"loc": (key,), "type": "extra_forbidden"}, source))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys of a ``.toml`` or ``.json`` config file; a run's ``config.json`` yields its ``config``."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {file} does not exist; pass a .toml or .json file")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        elif file.suffix.lower() == ".toml":
            values = tomllib.loads(text)
        else:
            raise UsageError(f"--config {file}: unknown format '{file.suffix}'; use a .toml or .json file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--config {file} is not valid {file.suffix[1:].upper()} ({first}); fix the file") from exc
    if not isinstance(values, dict):
        raise UsageError(f"--config {file} must hold a table of key = value pairs")
    # A run directory's config.json wraps the config with the environment it ran in.
    if isinstance(values.get("config"), dict) and "environment" in values:
        values = dict(values["config"])
        values.pop("out", None)  # reusing a run's config starts a new run, never overwrites it
    _check_keys(values, str(file))
    return values


def resolve_config(
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """recipe < file < overrides: the config a run uses.

    ``overrides`` holds only what was given on the command line (no Nones); ``model_options`` and
    ``dataset_options`` given there are merged key by key into the file's.
    """
    given = dict(overrides or {})
    _check_keys(given, "command line")
    layered = read_config_file(file) if file is not None else {}
    source = str(file) if file is not None else "command line"
    for key in ("model_options", "dataset_options", "trainer_options"):
        if key in given and key in layered:
            if not isinstance(layered[key], dict):
                raise UsageError(f"{source}: {key} must be a table of key = value pairs")
            given[key] = {**layered[key], **given[key]}
    merged = {**layered, **given}

    model = merged.get("model")
    if not model:
        raise UsageError("no model given; name one (cnnkit train MODEL) or set model = '...' in --config")
    recipe = merged.get("recipe", "default")
    if recipe not in RECIPE_NAMES:
        where = "command line" if "recipe" in given else source
        raise UsageError(f"{where}: recipe = {recipe!r} is not a recipe; use {' or '.join(RECIPE_NAMES)}")
    dataset = merged.get("dataset", TrainConfig.model_fields["dataset"].default)
    base = recipe_values(str(model), recipe, dataset if isinstance(dataset, str) else None)
    # Validate the file alone first so that its errors name the file, then the whole.
    if layered:
        _validate({**base, "model": model, **layered}, source)
    return _validate({**base, **merged}, "command line")


def describe_config(config: TrainConfig) -> str:
    """One compact line of the hyperparameters that shape the run."""
    c = config
    opt = f"{c.optimizer} lr {c.lr:g}"
    if c.optimizer == "sgd" and c.momentum:
        opt += f" {'nesterov ' if c.nesterov else ''}momentum {c.momentum:g}"
    if c.weight_decay:
        opt += f" wd {c.weight_decay:g}"
    sched = c.schedule + (f" warmup {c.warmup:g}" if c.warmup else "")
    extras = [f"ls {c.label_smoothing:g}"] if c.label_smoothing else []
    if c.augment != "none":
        extras.append(c.augment if c.augment != "randaugment" else
                      f"randaugment {c.randaugment_ops}x{c.randaugment_magnitude}")  # fmt: skip
    extras += [f"{name} {value:g}" for name, value in (
        ("erasing", c.random_erasing), ("mixup", c.mixup), ("cutmix", c.cutmix), ("ema", c.ema),
        ("clip", c.clip_grad)) if value]  # fmt: skip
    extras += [f"accum {c.accum_steps}"] if c.accum_steps > 1 else []
    extras += ["balanced classes"] if c.class_weights == "balanced" else []
    extras += ["normalize"] if c.normalize else []
    extras += ["xavier init"] if c.init == "xavier" else []
    extras += [f"init from {c.init_from}"] if c.init_from else []
    extras += [f"freeze {c.freeze}" + (f" for {c.freeze_epochs} ep" if c.freeze_epochs else "")] if c.freeze != "none" else []
    extras += [f"head lr x{c.head_lr_mult:g}"] if c.head_lr_mult != 1 else []
    options = "".join(f" {k}={v}" for k, v in {**c.model_options, **c.dataset_options}.items())
    return (
        f"{c.model}{options} on {c.dataset} · recipe {c.recipe}: {c.epochs} epochs · batch {c.batch_size} · "
        f"{opt} · {sched} · {' · '.join(extras) + ' · ' if extras else ''}{c.input_size} px · seed {c.seed}"
        + (" · deterministic" if c.deterministic else "")
    )


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " \\| ".join(f"'{choice}'" for choice in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(annotation))
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def config_reference() -> str:
    """``docs/config.md``: every TrainConfig field with its option, type, default and description."""
    rows = []
    for name, field in TrainConfig.model_fields.items():
        if name == "model":
            option = "MODEL (argument)"
        elif name in ("model_options", "dataset_options", "trainer_options"):
            option = {"model_options": "-o", "dataset_options": "-d", "trainer_options": "-t"}[name] + " key=value"
        else:
            option = "--" + name.replace("_", "-")
        if name in RECIPE_KEYS:
            default = "from the recipe"
        elif field.is_required():
            default = "required"
        else:
            default = repr(field.get_default(call_default_factory=True))
        kind = _type_name(field.annotation)
        rows.append(f"| `{name}` | `{option}` | {kind} | {default} | {field.description} |")
    return "\n".join(
        [
            "# Training config reference",
            "",
            "Generated from `cnnkit.config.TrainConfig` by `make docs`; a test keeps it current. Each key",
            "is a `cnnkit train` option and a key of a `--config` TOML/JSON file. Values come from the",
            "model's recipe, then the file, then the command line.",
            "",
            "| key | option | type | default | meaning |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
