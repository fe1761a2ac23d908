"""``cnnkit plugins`` and ``cnnkit plugins check``, with fake distributions installed through dist-info
folders on sys.path; and the installed cnnkit-efficientnet plugin driven through the whole CLI."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from cnnkit.checkpoint import WeightsMeta, read_meta, save_weights
from cnnkit.cli.app import app
from cnnkit.registry import DATASETS, MODELS, TRAINERS

PREFIX = "fakeplugins_"


def install(root: Path, dist: str, groups: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
    """A fake installed distribution: ``<dist>-1.0.dist-info`` with entry points in ``groups``
    (``cnnkit.models`` etc. -> name -> ``module:object``) plus its modules."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    sections = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) for group, entries in groups.items()]
    (info / "entry_points.txt").write_text("\n".join(sections))
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A folder on sys.path for fake distributions; every registry rescans, and is restored afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for module in [m for m in sys.modules if m.startswith(PREFIX)]:
        del sys.modules[module]
    monkeypatch.undo()
    for registry in (MODELS, DATASETS, TRAINERS):
        registry.refresh()


def rescan() -> None:
    for registry in (MODELS, DATASETS, TRAINERS):
        registry.refresh()


TINY_NET = """
    from torch import nn
    from cnnkit.models import Architecture, NoOptions
    from cnnkit.protocols import Recipe

    def _net(c, k, o):
        return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, k))

    TINY = Architecture(name="tinynet", summary="a tiny test net", paper="none (a test)",
                        recipe=Recipe(input_size=8), options=NoOptions, builder=_net)
    # Always three outputs, whatever num_classes asks for: breaks the (N, num_classes) contract.
    WRONG = Architecture(name="wrongnet", summary="a net with a fixed head", paper="none (a test)",
                         recipe=Recipe(input_size=8), options=NoOptions,
                         builder=lambda c, k, o: _net(c, 3, o))
"""

DATASET_AND_TRAINERS = """
    from pydantic import BaseModel, ConfigDict, Field
    from cnnkit.errors import DataError

    class _Opts(BaseModel):
        model_config = ConfigDict(extra="forbid")
        seed: int = Field(0, description="Seed.")

    class _Loose(BaseModel):
        seed: int = Field(0, description="Seed.")

    class Tiles:
        name = "tiles"
        summary = "tiles that are never on disk"
        classes = ("a", "b")
        channels = 1
        image_size = (8, 8)
        options = _Opts
        def locate(self, data=None):
            raise DataError("no tiles here")
        def load(self, data=None, **options):
            raise DataError("no tiles here")

    TILES = Tiles()

    class GoodTrainer:
        name = "goodloop"
        summary = "a trainer that does nothing"
        options = _Opts
        def fit(self, model, data, config, run):
            return run.result()

    class LooseTrainer(GoodTrainer):
        name = "looseloop"
        options = _Loose

    class NoFitTrainer:
        name = "nofit"
        summary = "a trainer that forgot fit"
        options = _Opts

    class HalfStateTrainer(GoodTrainer):
        name = "halfstate"
        def state_dict(self):
            return {}
"""


def good_plugin(site: Path) -> None:
    install(site, "fake-plugin", {"cnnkit.models": {"tinynet": f"{PREFIX}net:TINY"}}, {f"{PREFIX}net": TINY_NET})


# -- cnnkit plugins -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_healthy_set_lists_each_distribution_with_its_names(runner: Any, site: Path) -> None:
    good_plugin(site)
    rescan()
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "cnnkit 0.1.0  ok"  # cnnkit itself first
    assert lines[1].split()[0] == "models" and "lenet_bn," in lines[1].split()
    assert "fake-plugin 1.0  ok" in lines
    assert lines[lines.index("fake-plugin 1.0  ok") + 1].split() == ["models", "tinynet"]
    assert f"{PREFIX}net" in sys.modules  # the survey imports what it reports on


def test_json_has_versions_names_status_and_clashes(runner: Any, site: Path) -> None:
    good_plugin(site)
    rescan()
    result = runner.invoke(app, ["plugins", "--format", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    by_name = {d["distribution"]: d for d in document["distributions"]}
    assert by_name["cnnkit"]["status"] == "ok" and "lenet" in by_name["cnnkit"]["entries"]["models"]
    assert "coil20" in by_name["cnnkit"]["entries"]["datasets"]
    assert by_name["cnnkit"]["entries"]["trainers"] == ["standard"]
    assert by_name["fake-plugin"] == {
        "distribution": "fake-plugin", "version": "1.0", "status": "ok", "reason": None,
        "entries": {"models": ["tinynet"]}, "failed": [],
    }  # fmt: skip
    assert document["clashes"] == []


def test_broken_plugin_is_failed_with_its_reason_and_the_rest_stay_ok(runner: Any, site: Path) -> None:
    good_plugin(site)
    install(site, "broken-plugin", {"cnnkit.models": {"brokennet": f"{PREFIX}broken:SPEC"}},
            {f"{PREFIX}broken": "import a_module_that_does_not_exist\n"})  # fmt: skip
    rescan()
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    assert (
        "broken-plugin 1.0  failed: model 'brokennet': ModuleNotFoundError: "
        "No module named 'a_module_that_does_not_exist'"
    ) in result.stdout.splitlines()
    assert "fake-plugin 1.0  ok" in result.stdout and "cnnkit 0.1.0  ok" in result.stdout
    document = json.loads(runner.invoke(app, ["plugins", "-f", "json"]).stdout)
    broken = next(d for d in document["distributions"] if d["distribution"] == "broken-plugin")
    assert broken["status"] == "failed" and broken["failed"] == ["models:brokennet"]


def test_not_a_model_spec_is_failed_with_the_protocol_named(runner: Any, site: Path) -> None:
    install(site, "odd-plugin", {"cnnkit.models": {"oddnet": f"{PREFIX}odd:THING"}}, {f"{PREFIX}odd": "THING = 42\n"})
    rescan()
    result = runner.invoke(app, ["plugins"])
    line = next(line for line in result.stdout.splitlines() if line.startswith("odd-plugin"))
    assert line.startswith("odd-plugin 1.0  failed: model 'oddnet': ") and "is not a ModelSpec" in line


def test_clash_shows_which_registration_wins(runner: Any, site: Path) -> None:
    install(site, "shadow-plugin", {"cnnkit.models": {"lenet": f"{PREFIX}net:TINY"}}, {f"{PREFIX}net": TINY_NET})
    rescan()
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    assert (
        "clash: model 'lenet' is registered by cnnkit and shadow-plugin; cnnkit's is used "
        "('shadow-plugin:lenet' picks the other)"
    ) in result.stdout.splitlines()
    assert "shadow-plugin 1.0  ok" in result.stdout  # the losing registration still loads
    document = json.loads(runner.invoke(app, ["plugins", "--format", "json"]).stdout)
    assert document["clashes"] == [
        {"group": "models", "name": "lenet", "winner": "cnnkit", "loser": "shadow-plugin", "use": "shadow-plugin:lenet"}
    ]


def test_switches_disable_and_allow_a_distribution(runner: Any, site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good_plugin(site)
    monkeypatch.setenv("CNNKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    rescan()
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    assert (
        "fake-plugin 1.0  disabled: CNNKIT_DISABLE_PLUGIN_AUTOLOAD is set; allow it with CNNKIT_PLUGINS=fake-plugin"
    ) in result.stdout.splitlines()
    assert "cnnkit 0.1.0  ok" in result.stdout  # built-ins are never switched off
    assert f"{PREFIX}net" not in sys.modules  # a disabled distribution is not imported

    monkeypatch.setenv("CNNKIT_PLUGINS", "fake-plugin")
    rescan()
    assert "fake-plugin 1.0  ok" in runner.invoke(app, ["plugins"]).stdout.splitlines()


# -- cnnkit plugins check -------------------------------------------------------------------------------
def test_check_passes_a_good_distribution(runner: Any, site: Path) -> None:
    good_plugin(site)
    rescan()
    result = runner.invoke(app, ["plugins", "check", "fake-plugin"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("pass  model tinynet  (") and "a training step at 8 px" in lines[0]
    assert lines[-1] == "fake-plugin: all 1 entries pass"


def test_check_fails_a_wrong_spec_and_checks_the_rest(runner: Any, site: Path) -> None:
    install(
        site, "mixed-plugin",
        {
            "cnnkit.models": {"tinynet": f"{PREFIX}net:TINY", "wrongnet": f"{PREFIX}net:WRONG"},
            "cnnkit.datasets": {"tiles": f"{PREFIX}more:TILES"},
            "cnnkit.trainers": {"goodloop": f"{PREFIX}more:GoodTrainer", "looseloop": f"{PREFIX}more:LooseTrainer"},
        },
        {f"{PREFIX}net": TINY_NET, f"{PREFIX}more": DATASET_AND_TRAINERS},
    )  # fmt: skip
    rescan()
    result = runner.invoke(app, ["plugins", "check", "mixed-plugin"])
    assert result.exit_code == 1, result.output
    lines = {line.split("  (")[0]: line for line in result.stdout.splitlines()}
    assert "pass  model tinynet" in lines
    assert "expected (N, num_classes) = (2, 10)" in lines["FAIL  model wrongnet"]
    assert "attributes hold (no data found here" in lines["pass  dataset tiles"]
    assert "pass  trainer goodloop" in lines
    assert "must reject unknown keys" in lines["FAIL  trainer looseloop"]
    assert result.stderr.strip().splitlines() == [
        "cnnkit: error: 2 of 5 entries of 'mixed-plugin' failed their contract checks: wrongnet, looseloop"
    ]


def test_check_prints_why_an_entry_does_not_fit_its_protocol(runner: Any, site: Path) -> None:
    install(
        site, "odd-trainers",
        {"cnnkit.trainers": {"nofit": f"{PREFIX}more:NoFitTrainer", "halfstate": f"{PREFIX}more:HalfStateTrainer"}},
        {f"{PREFIX}more": DATASET_AND_TRAINERS},
    )  # fmt: skip
    rescan()
    result = runner.invoke(app, ["plugins", "check", "odd-trainers"])
    assert result.exit_code == 1, result.output
    lines = {line.split("  (")[0]: line for line in result.stdout.splitlines()}
    assert "has no fit(model, data, config, run) method" in lines["FAIL  trainer nofit"]
    assert "is not a Trainer" not in lines["FAIL  trainer nofit"]
    assert "has state_dict() but no load_state_dict()" in lines["FAIL  trainer halfstate"]
    listed = runner.invoke(app, ["plugins"])
    assert "is not a Trainer (it has no fit)" in listed.output


def test_check_unknown_distribution_names_those_that_exist(runner: Any, site: Path) -> None:
    good_plugin(site)
    rescan()
    result = runner.invoke(app, ["plugins", "check", "no-such-plugin"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "cnnkit: error: no installed distribution 'no-such-plugin' registers cnnkit entries; "
        "those that do: " + ", ".join(sorted({e.distribution for e in MODELS.entries().values()}))
    )
    assert "fake-plugin" in result.stderr and "Traceback" not in result.stderr


def test_check_disabled_distribution_says_how_to_allow_it(
    runner: Any, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good_plugin(site)
    monkeypatch.setenv("CNNKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    rescan()
    result = runner.invoke(app, ["plugins", "check", "fake_plugin"])  # any spelling of the name
    assert result.exit_code == 2
    assert "CNNKIT_PLUGINS=fake-plugin" in result.stderr


# -- weights of a plugin model that is not installed -----------------------------------------------------
def test_weights_of_a_missing_plugin_model_name_the_distribution(runner: Any, tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    meta = WeightsMeta(
        model="fancynet_s", in_channels=1, num_classes=2, input_size=2, classes=["a", "b"],
        model_distribution="cnnkit-fancy", model_distribution_version="2.1.0",
    )  # fmt: skip
    save_weights(tmp_path / "fancy.safetensors", model, meta)
    image = tmp_path / "x.png"
    Image.new("L", (2, 2)).save(image)
    result = runner.invoke(app, ["predict", str(tmp_path / "fancy.safetensors"), str(image)])
    assert result.exit_code == 4
    assert result.stderr.strip().splitlines() == [
        f"cnnkit: error: weights {tmp_path / 'fancy.safetensors'} were saved from model 'fancynet_s' of "
        "cnnkit-fancy 2.1.0, which is not installed here; install cnnkit-fancy (pip install cnnkit-fancy)"
    ]


# -- the installed cnnkit-efficientnet plugin, through the CLI ---------------------------------------------
@pytest.fixture
def efficientnet() -> None:
    pytest.importorskip("cnnkit_efficientnet", reason="make install installs plugins/cnnkit-efficientnet")


def test_plugin_model_is_listed_and_summarised(runner: Any, efficientnet: None) -> None:
    listed = runner.invoke(app, ["list", "models", "efficientnet*"])
    assert listed.exit_code == 0, listed.output
    assert "efficientnet_b0  [cnnkit-efficientnet 0.1.0]" in listed.stdout.splitlines()
    result = runner.invoke(app, ["summary", "efficientnet_b0", "--input", "3x224x224", "--classes", "1000"])
    assert result.exit_code == 0, result.output
    assert "5,288,548" in result.stdout


def make_coil20(folder: Path, objects: int = 2, poses: int = 4, side: int = 12) -> Path:
    """A tiny COIL-20 look-alike: obj{N}__{k}.png, each object a different brightness."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for obj in range(1, objects + 1):
        for pose in range(poses):
            pixels = (torch.rand(side, side, generator=generator) * 60 + 80 * obj).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy(), mode="L").save(folder / f"obj{obj}__{pose}.png")
    return folder


@pytest.mark.slow
def test_plugin_model_trains_exports_loads_and_predicts(
    runner: Any, efficientnet: None, tmp_path: Path, one_thread: None
) -> None:
    data = make_coil20(tmp_path / "coil")
    run_dir = tmp_path / "run"
    trained = runner.invoke(app, [
        "train", "efficientnet_b0", "--dataset", "coil20", "--data", str(data), "--epochs", "1",
        "--input-size", "16", "--batch-size", "6", "--device", "cpu", "--augment", "none", "--out", str(run_dir), "-q",
    ])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    meta = read_meta(run_dir)
    assert (meta.model, meta.input_size, meta.in_channels, meta.num_classes) == ("efficientnet_b0", 16, 1, 20)
    assert (meta.model_distribution, meta.model_distribution_version) == ("cnnkit-efficientnet", "0.1.0")
    config = json.loads((run_dir / "config.json").read_text())
    assert "cnnkit-efficientnet 0.1.0" in config["environment"]["plugins"]

    exported = tmp_path / "effnet.safetensors"
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    import cnnkit

    model = cnnkit.load_model(exported)
    assert type(model).__name__ == "EfficientNet" and not model.training
    predicted = runner.invoke(app, ["predict", str(exported), str(data / "obj2__3.png"), "--top", "2", "-f", "json"])
    assert predicted.exit_code == 0, predicted.output
    [prediction] = json.loads(predicted.stdout)
    assert len(prediction["top"]) == 2

    evaluated = runner.invoke(app, ["eval", str(run_dir)])
    assert evaluated.exit_code == 0, evaluated.output


# -- the checks that need neither data nor training ---------------------------------------------------
def test_builtin_trainers_and_datasets_pass_the_no_data_checks() -> None:
    from cnnkit.testing import check_dataset_attributes, check_trainer

    for name in TRAINERS.names():
        check_trainer(TRAINERS.get(name))
    for name in DATASETS.names():
        check_dataset_attributes(DATASETS.get(name))


def test_check_trainer_names_what_is_wrong() -> None:
    from pydantic import BaseModel, ConfigDict

    from cnnkit.testing import check_trainer

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class TwoArgumentFit:
        name, summary, options = "old", "fit without the run", Options

        def fit(self, model: Any, data: Any) -> None: ...

    with pytest.raises(AssertionError, match=r"trainer 'old': fit\(model, data\) must take \(model, data, config, run\)"):
        check_trainer(TwoArgumentFit())  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="pass an instance"):
        check_trainer(TwoArgumentFit)  # type: ignore[arg-type]
    unnamed = TwoArgumentFit()
    unnamed.name = ""
    with pytest.raises(AssertionError, match="'name' must be a non-empty str"):
        check_trainer(unnamed)  # type: ignore[arg-type]
