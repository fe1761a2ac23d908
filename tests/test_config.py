"""TrainConfig: recipe < file < command line, and one-line errors for bad keys and values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnkit.cli.app import app
from cnnkit.config import RECIPE_KEYS, TrainConfig, describe_config, read_config_file, recipe_values, resolve_config
from cnnkit.errors import UsageError
from cnnkit.registry import MODELS


def test_every_field_is_documented() -> None:
    missing = [name for name, field in TrainConfig.model_fields.items() if not field.description]
    assert missing == []


def test_d2l_recipe_is_the_seeds() -> None:
    config = resolve_config(overrides={"model": "lenet", "recipe": "d2l"})
    assert (config.optimizer, config.momentum, config.schedule, config.weight_decay) == ("sgd", 0.0, "constant", 0.0)
    assert (config.augment, config.normalize, config.init, config.label_smoothing) == ("none", False, "xavier", 0.0)
    recipe = MODELS.get("lenet").recipe
    assert (config.lr, config.batch_size, config.input_size, config.epochs) == (
        recipe.seed_lr, recipe.batch_size, recipe.input_size, 10,
    )  # fmt: skip


@pytest.mark.slow
def test_default_recipe_differs_from_d2l_for_every_builtin() -> None:
    for model in MODELS.names():
        default, d2l = recipe_values(model, "default"), recipe_values(model, "d2l")
        assert set(RECIPE_KEYS) <= set(default) and set(RECIPE_KEYS) <= set(d2l)
        assert default["normalize"] and not d2l["normalize"]


def test_precedence_recipe_then_file_then_command_line(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text(
        'model = "vgg11"\nlr = 0.05\nepochs = 3\nschedule = "cosine"\n[model_options]\nwidth = 0.25\ndropout = 0.3\n'
    )
    config = resolve_config(file, {"epochs": 7, "model_options": {"dropout": "0.1"}})
    recipe = recipe_values("vgg11")
    assert config.model == "vgg11"
    assert config.lr == 0.05 and config.schedule == "cosine"  # from the file, over the recipe
    assert config.epochs == 7  # the command line over the file
    assert config.batch_size == recipe["batch_size"] and config.input_size == recipe["input_size"]  # recipe
    assert config.model_options == {"width": 0.25, "dropout": "0.1"}  # merged key by key


def test_command_line_recipe_applies_under_the_file(tmp_path: Path) -> None:
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"model": "lenet_bn", "lr": 0.3}))
    config = resolve_config(file, {"recipe": "d2l"})
    assert config.recipe == "d2l" and config.lr == 0.3 and config.optimizer == "sgd" and config.momentum == 0


def test_a_runs_config_json_is_a_valid_config_file(tmp_path: Path) -> None:
    config = resolve_config(overrides={"model": "lenet", "epochs": 2, "out": "somewhere"})
    record = {"config": config.model_dump(mode="json"), "environment": {"torch": "x"}}
    file = tmp_path / "config.json"
    file.write_text(json.dumps(record))
    values = read_config_file(file)
    assert values["epochs"] == 2 and "out" not in values  # reusing a run's config never overwrites it


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model = 'lenet'\nbatchsize = 64\n", ["unknown key 'batchsize'", "did you mean batch_size", "valid keys:", "batch_size"]),
        ("model = 'lenet'\nlr = -1\n", ["lr = -1", "greater than 0"]),
        ("model = 'lenet'\noptimizer = 'adam'\n", ["optimizer = 'adam'", "sgd", "adamw"]),
        ("model = 'lenet'\nrecipe = 'fast'\n", ["recipe = 'fast'", "default or d2l"]),
        ("model = 'lenet'\nepochs = \n", ["not valid TOML"]),
    ],
)
def test_bad_file_is_one_line_naming_the_file_and_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    file = tmp_path / "run.toml"
    file.write_text(text)
    with pytest.raises(UsageError) as caught:
        resolve_config(file, {})
    message = caught.value.format_message()
    assert "\n" not in message and str(file) in message
    for part in expected:
        assert part in message


def test_bad_command_line_value_and_missing_model() -> None:
    with pytest.raises(UsageError, match="batch_size = 0"):
        resolve_config(overrides={"model": "lenet", "batch_size": 0})
    with pytest.raises(UsageError, match="no model given"):
        resolve_config(overrides={"epochs": 2})
    with pytest.raises(UsageError, match="unknown model 'lenett'"):
        resolve_config(overrides={"model": "lenett"})


def test_describe_config_is_one_line() -> None:
    line = describe_config(resolve_config(overrides={"model": "lenet_bn"}))
    assert "\n" not in line and "lenet_bn" in line and "recipe default" in line and "onecycle" in line


def test_cli_bad_config_key_exits_2_with_one_line(runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    file = tmp_path / "run.toml"
    file.write_text("model = 'lenet'\nepoch = 3\n")
    result = runner.invoke(app, ["train", "--config", str(file)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown key 'epoch'" in lines[0] and "did you mean epochs" in lines[0]
    assert "Traceback" not in result.output


def test_cli_bad_option_value_exits_2(runner) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["train", "lenet", "--label-smoothing", "1.5"])
    assert result.exit_code == 2 and "label_smoothing = 1.5" in result.output


FANCY_PLUGIN = """
    from cnnkit.models import Architecture, NoOptions
    from cnnkit.protocols import Recipe
    from torch import nn
    FANCY = Architecture(
        name="fancy", summary="a plugin net with its own recipe", paper="none",
        recipe=Recipe(input_size=40, batch_size=48, epochs=7, optimizer="sgd", lr=0.3, momentum=0.8, nesterov=True,
                      weight_decay=1e-4, schedule="onecycle", warmup=0.5, label_smoothing=0.05, augment=True,
                      normalize=False, init="xavier", seed_lr=0.002, seed_optimizer="adamw",
                      per_dataset={"coil20": {"input_size": 64, "lr": 0.05, "batch_size": 16}}),
        options=NoOptions, builder=lambda c, k, o: nn.Sequential(nn.Flatten(), nn.LazyLinear(k)),
    )
"""


@pytest.fixture
def fancy_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    import sys

    from test_registry import make_distribution

    make_distribution(tmp_path, "cnnkit-fancy", {"fancy": "fakeplug_fancy:FANCY"}, {"fakeplug_fancy": FANCY_PLUGIN})
    monkeypatch.syspath_prepend(str(tmp_path))
    MODELS.refresh()
    yield MODELS.get("fancy")
    sys.modules.pop("fakeplug_fancy", None)
    monkeypatch.undo()
    MODELS.refresh()


def test_a_plugin_models_recipe_is_used_as_written(fancy_plugin) -> None:  # type: ignore[no-untyped-def]
    config = resolve_config(overrides={"model": "fancy"})
    for key in RECIPE_KEYS:
        assert getattr(config, key) == getattr(fancy_plugin.recipe, key), key


def test_d2l_recipe_of_a_plugin_honours_its_seed_optimizer(fancy_plugin) -> None:  # type: ignore[no-untyped-def]
    config = resolve_config(overrides={"model": "fancy", "recipe": "d2l"})
    assert (config.optimizer, config.lr, config.batch_size, config.input_size, config.epochs) == ("adamw", 0.002, 48, 40, 7)
    assert (config.schedule, config.weight_decay, config.augment, config.normalize) == ("constant", 0.0, "none", False)


def test_a_recipes_per_dataset_changes_apply_on_that_dataset_only(fancy_plugin) -> None:  # type: ignore[no-untyped-def]
    coil = resolve_config(overrides={"model": "fancy", "dataset": "coil20"})
    assert (coil.input_size, coil.lr, coil.batch_size) == (64, 0.05, 16)
    assert (coil.momentum, coil.epochs, coil.init) == (0.8, 7, "xavier")  # the rest as the spec writes it
    fashion = resolve_config(overrides={"model": "fancy"})
    assert (fashion.input_size, fashion.lr, fashion.batch_size) == (40, 0.3, 48)


def test_a_file_and_the_command_line_override_the_per_dataset_changes(  # type: ignore[no-untyped-def]
    fancy_plugin, tmp_path: Path
) -> None:
    file = tmp_path / "run.toml"
    file.write_text('model = "fancy"\ndataset = "coil20"\nlr = 0.01\n')
    config = resolve_config(file, {"batch_size": 8})
    assert (config.lr, config.batch_size, config.input_size) == (0.01, 8, 64)


def test_the_derived_recipes_start_from_the_dataset_changes(fancy_plugin) -> None:  # type: ignore[no-untyped-def]
    d2l = resolve_config(overrides={"model": "fancy", "dataset": "coil20", "recipe": "d2l"})
    assert (d2l.input_size, d2l.batch_size, d2l.lr, d2l.optimizer) == (64, 16, 0.002, "adamw")  # seed_lr kept
    finetune = resolve_config(overrides={"model": "fancy", "dataset": "coil20", "recipe": "finetune"})
    assert finetune.lr == pytest.approx(0.005) and finetune.input_size == 64


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"coil20": {"lr": -1}}, "lr"), ({"coil20": {"learning_rate": 0.1}}, "learning_rate")],
)
def test_a_bad_per_dataset_change_fails_where_the_spec_is_built(changes, message: str) -> None:  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    from cnnkit.protocols import Recipe

    with pytest.raises(ValidationError, match=message):
        Recipe(per_dataset=changes)


def test_lenet_trains_coil20_with_its_own_recipe() -> None:
    """The COIL-20 recipe measured in bench/results/coil20.md: larger images and a batch that gives
    COIL-20's 1,200 training images more than ten steps an epoch."""
    spec = MODELS.get("lenet").recipe
    coil = resolve_config(overrides={"model": "lenet", "dataset": "coil20"})
    for key, value in spec.per_dataset["coil20"].items():
        assert getattr(coil, key) == value, key
    assert coil.input_size > spec.input_size and coil.batch_size < spec.batch_size
    fashion = resolve_config(overrides={"model": "lenet"})
    assert (fashion.input_size, fashion.lr) == (spec.input_size, spec.lr)


@pytest.mark.parametrize("name", MODELS.names())
def test_builtin_recipes_come_from_their_specs(name: str) -> None:
    spec = MODELS.get(name)
    default = resolve_config(overrides={"model": name})
    d2l = resolve_config(overrides={"model": name, "recipe": "d2l"})
    recipe = spec.recipe.on(default.dataset)  # with its changes for the default dataset, if any
    for key in RECIPE_KEYS:
        assert getattr(default, key) == getattr(recipe, key), key
    assert (d2l.lr, d2l.optimizer, d2l.init) == (recipe.seed_lr or recipe.lr, recipe.seed_optimizer, "xavier")
    assert d2l.input_size == (recipe.seed_input_size or recipe.input_size)


def test_list_models_long_shows_a_recipes_dataset_changes() -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["list", "models", "lenet", "--long"])
    assert result.exit_code == 0 and "recipe on coil20: input_size=48" in result.stdout
    result = CliRunner().invoke(app, ["list", "models", "lenet", "--long", "--format", "json"])
    assert json.loads(result.stdout)[0]["per_dataset"]["coil20"]["input_size"] == 48


def test_bn_lenet_trains_fashion_mnist_upsampled_and_d2l_keeps_28_px() -> None:
    """bench/results/recipe-screen-lenet_bn.md: 56 px measured better on Fashion-MNIST; the seed's
    recipe is d2l's, at the native 28 px, on any dataset."""
    fashion = resolve_config(overrides={"model": "lenet_bn"})
    assert fashion.input_size == 56
    assert resolve_config(overrides={"model": "lenet_bn", "dataset": "coil20"}).input_size == 28
    assert resolve_config(overrides={"model": "lenet_bn", "recipe": "d2l"}).input_size == 28
    assert resolve_config(overrides={"model": "lenet_bn", "input_size": 28}).input_size == 28
