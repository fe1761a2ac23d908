"""Entry-point registry: discovery from metadata, lazy loading, broken plugins, clashes, switches."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from cnnkit.errors import PluginLoadError, UnknownNameError, UsageError
from cnnkit.protocols import ModelSpec
from cnnkit.registry import MODELS, Registry


def make_distribution(root: Path, dist: str, entries: dict[str, str], modules: dict[str, str]) -> Path:
    """A fake installed distribution: ``<dist>-1.0.dist-info/entry_points.txt`` plus its modules."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[cnnkit.models]\n{lines}\n")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    return root


GOOD_PLUGIN = """
    from cnnkit.models.base import Architecture, NoOptions
    from cnnkit.protocols import Recipe
    from torch import nn
    TINY = Architecture(
        name="tinynet", summary="a tiny test net", paper="none", recipe=Recipe(input_size=8),
        options=NoOptions, builder=lambda c, k, o: nn.Sequential(nn.Flatten(), nn.LazyLinear(k)),
    )
"""


@pytest.fixture
def fresh_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Registry[ModelSpec]:
    """The real models registry, rescanned with ``tmp_path`` on sys.path and restored afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    MODELS.refresh()
    yield MODELS
    for mod in [m for m in sys.modules if m.startswith("fakeplug")]:
        del sys.modules[mod]
    monkeypatch.undo()
    MODELS.refresh()


def test_builtins_come_from_entry_points() -> None:
    entries = MODELS.entries()
    assert entries["lenet"].distribution == "cnnkit"
    assert entries["lenet"].target == "cnnkit.models.lenet:LENET"
    assert entries["lenet"].builtin


def test_listing_imports_no_plugin_code(fresh_models: Registry[ModelSpec], tmp_path: Path) -> None:
    make_distribution(tmp_path, "fake-plugin", {"tinynet": "fakeplug_good:TINY"}, {"fakeplug_good": GOOD_PLUGIN})
    fresh_models.refresh()
    assert "tinynet" in fresh_models.names()
    assert fresh_models.entry("tinynet").distribution == "fake-plugin"
    assert "fakeplug_good" not in sys.modules  # listed from metadata alone
    spec = fresh_models.get("tinynet")
    assert "fakeplug_good" in sys.modules
    assert spec.name == "tinynet" and isinstance(spec, ModelSpec)


def test_fnmatch_patterns() -> None:
    assert MODELS.names("lenet*") == ["lenet", "lenet_bn"]
    assert MODELS.names("*_BN") == ["lenet_bn"]
    assert MODELS.names("nothing*") == []


def test_unknown_name_suggests_and_points_to_list() -> None:
    with pytest.raises(UnknownNameError) as info:
        MODELS.get("lenett")
    message = info.value.format_message()
    assert "lenet" in message and "cnnkit list models" in message
    assert info.value.exit_code == 2


@pytest.mark.slow
def test_broken_plugin_is_one_line_warning(
    fresh_models: Registry[ModelSpec], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_distribution(
        tmp_path, "broken-plugin", {"brokennet": "fakeplug_broken:SPEC"},
        {"fakeplug_broken": "import a_module_that_does_not_exist\n"},
    )  # fmt: skip
    fresh_models.refresh()
    assert "brokennet" in fresh_models.names()  # metadata is fine, code is not
    with pytest.raises(PluginLoadError, match="broken-plugin.*ModuleNotFoundError"):
        fresh_models.get("brokennet")
    loaded = fresh_models.load_all()
    assert "brokennet" not in loaded and "lenet" in loaded
    about_it = [line for line in capsys.readouterr().err.splitlines() if "brokennet" in line]
    assert len(about_it) == 1
    assert about_it[0].startswith("cnnkit: warning:") and "broken-plugin" in about_it[0]


def test_not_a_model_spec_is_rejected(fresh_models: Registry[ModelSpec], tmp_path: Path) -> None:
    make_distribution(tmp_path, "odd-plugin", {"oddnet": "fakeplug_odd:THING"}, {"fakeplug_odd": "THING = 42\n"})
    fresh_models.refresh()
    with pytest.raises(PluginLoadError, match="is not a ModelSpec"):
        fresh_models.get("oddnet")


def test_clash_warns_and_builtin_wins(
    fresh_models: Registry[ModelSpec], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_distribution(tmp_path, "shadow-plugin", {"lenet": "fakeplug_shadow:TINY"}, {"fakeplug_shadow": GOOD_PLUGIN})
    fresh_models.refresh()
    assert fresh_models.entry("lenet").distribution == "cnnkit"
    err = capsys.readouterr().err
    assert "registered by both 'cnnkit' and 'shadow-plugin'" in err
    assert fresh_models.get("shadow-plugin:lenet").name == "tinynet"


def test_disable_autoload_keeps_builtins_only(
    fresh_models: Registry[ModelSpec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_distribution(tmp_path, "fake-plugin", {"tinynet": "fakeplug_good:TINY"}, {"fakeplug_good": GOOD_PLUGIN})
    monkeypatch.setenv("CNNKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    fresh_models.refresh()
    assert "tinynet" not in fresh_models.names() and "lenet" in fresh_models.names()
    monkeypatch.setenv("CNNKIT_PLUGINS", "fake-plugin")
    fresh_models.refresh()
    assert "tinynet" in fresh_models.names()


def test_a_disabled_plugin_is_named_in_the_unknown_name_error(
    fresh_models: Registry[ModelSpec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_distribution(tmp_path, "fake-plugin", {"tinynet": "fakeplug_good:TINY"}, {"fakeplug_good": GOOD_PLUGIN})
    monkeypatch.setenv("CNNKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    fresh_models.refresh()
    assert "tinynet" not in fresh_models.names()
    with pytest.raises(UsageError) as caught:
        fresh_models.get("tinynet")
    message = caught.value.format_message()
    assert "installed but disabled" in message and "CNNKIT_PLUGINS=fake-plugin" in message
    monkeypatch.setenv("CNNKIT_PLUGINS", "fake-plugin")
    fresh_models.refresh()
    assert fresh_models.get("tinynet").name == "tinynet"


def test_a_class_entry_gives_a_fresh_object_each_time() -> None:
    from cnnkit.registry import TRAINERS

    first, second = TRAINERS.get("standard"), TRAINERS.get("standard")
    assert first is not second and type(first) is type(second)
