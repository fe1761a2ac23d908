"""docs/plugins.md is the plugin author's whole contract: every public protocol member is in it, and
its three worked examples, installed as a real distribution, train end to end."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import cnnkit.protocols as protocols
from cnnkit.cli.app import app
from cnnkit.registry import DATASETS, MODELS, TRAINERS
from cnnkit.testing import check_dataset_spec, check_model_spec

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
PROTOCOLS = ("ModelSpec", "DatasetSpec", "Trainer", "TrainingRun", "Batches")


def documented(name: str) -> bool:
    """``name`` appears inside backticks (alone, as a call, or as ``run.name``)."""
    return re.search(rf"`[^`\n]*\b{re.escape(name)}\b[^`\n]*`", DOCS) is not None


def protocol_members(class_name: str) -> list[str]:
    tree = ast.parse(Path(protocols.__file__).read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    names = []
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
        elif isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            names.append(node.name)
    return names


def undocumented_in_code(class_name: str) -> list[str]:
    """Protocol members with no docstring in cnnkit/protocols.py (an attribute's is the string after it)."""
    tree = ast.parse(Path(protocols.__file__).read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    missing = []
    for i, node in enumerate(cls.body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            after = cls.body[i + 1] if i + 1 < len(cls.body) else None
            if not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)):
                missing.append(node.target.id)
        elif isinstance(node, ast.FunctionDef) and not ast.get_docstring(node):
            missing.append(node.name)
    return missing


@pytest.mark.parametrize("class_name", PROTOCOLS)
def test_every_protocol_member_is_documented_in_code_and_docs(class_name: str) -> None:
    members = protocol_members(class_name)
    assert members, class_name
    assert undocumented_in_code(class_name) == []
    assert [m for m in members if not documented(m)] == []


@pytest.mark.parametrize("model", ["Recipe", "DatasetSplits", "ImageTensors", "RunResult"])
def test_every_field_of_the_data_types_is_documented(model: str) -> None:
    if model == "Recipe":
        fields = list(protocols.Recipe.model_fields)
    elif model == "RunResult":
        fields = list(protocols.RunResult.__dataclass_fields__)
    else:
        fields = list(getattr(protocols, model).__dataclass_fields__)
    assert [f for f in fields if not documented(f)] == []


def test_the_driver_s_run_is_the_trainer_facing_run_and_documented_as_run_members() -> None:
    from cnnkit.training.context import Run

    members = protocol_members("TrainingRun")
    assert {"resumed", "first_epoch", "build_optimizer", "lr_schedule", "start", "epochs"} <= set(members)
    for name in members:
        assert hasattr(Run, name) or name in Run.__dataclass_fields__, name
        assert documented(f"run.{name}"), name


def test_the_plugin_contract_imports_nothing_of_cnnkit() -> None:
    tree = ast.parse(Path(protocols.__file__).read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert [name for name in imported if name.startswith("cnnkit")] == []


def code_block(marker: str) -> str:
    for block in re.findall(r"```python\n(.*?)```", DOCS, flags=re.S):
        if block.startswith(marker):
            return block
    raise AssertionError(f"no python block starting with {marker!r} in docs/plugins.md")


@pytest.fixture
def docs_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The three examples of docs/plugins.md, installed as the distribution cnnkit-myplugin."""
    package = tmp_path / "site" / "cnnkit_myplugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("models", "data", "trainer"):
        (package / f"{name}.py").write_text(code_block(f"# cnnkit_myplugin/{name}.py"))
    info = tmp_path / "site" / "cnnkit_myplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cnnkit-myplugin\nVersion: 0.1\n")
    toml = re.search(r"```toml\n# pyproject.toml of your distribution\n(.*?)```", DOCS, flags=re.S)
    assert toml is not None
    groups = tomllib.loads(toml.group(1))["project"]["entry-points"]
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in names.items()) for group, names in groups.items())
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for registry in (MODELS, DATASETS, TRAINERS):
        registry.refresh()
    yield tmp_path
    for module in [m for m in sys.modules if m.startswith("cnnkit_myplugin")]:
        del sys.modules[module]
    monkeypatch.undo()
    for registry in (MODELS, DATASETS, TRAINERS):
        registry.refresh()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow
def test_the_worked_examples_install_and_train_end_to_end(runner, docs_plugin: Path) -> None:  # type: ignore[no-untyped-def]
    check_model_spec(MODELS.get("mynet"), input_size=16)
    check_dataset_spec(DATASETS.get("stripes"), size=64)
    out = docs_plugin / "run"
    result = runner.invoke(app, [
        "train", "mynet", "--dataset", "stripes", "-d", "size=96", "--trainer", "plain", "-t", "clip=1.0",
        "--epochs", "2", "--batch-size", "16", "--input-size", "16", "--device", "cpu", "--out", str(out), "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "best.safetensors").is_file() and len((out / "metrics.csv").read_text().splitlines()) == 3
    refused = runner.invoke(app, ["train", "mynet", "--dataset", "stripes", "--data", "x", "--trainer", "plain"])
    assert refused.exit_code == 2 and "drop --data" in refused.output


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow
def test_the_worked_trainer_s_own_state_survives_an_interruption_and_resume(docs_plugin: Path) -> None:
    """The docs' trainer keeps an EMA of the weights in its own state_dict: a run interrupted after
    epoch 2 and resumed ends with exactly the EMA (and weights) of the run that was never stopped."""
    from safetensors.torch import load_file

    from cnnkit.config import resolve_config
    from cnnkit.errors import InterruptedRun
    from cnnkit.training.events import Events
    from cnnkit.training.run import resume, train
    from cnnkit.training.state import load_state

    def config(out: Path):  # type: ignore[no-untyped-def]
        return resolve_config(overrides={
            "model": "mynet", "dataset": "stripes", "dataset_options": {"size": 96}, "trainer": "plain",
            "epochs": 3, "batch_size": 16, "input_size": 16, "device": "cpu", "out": str(out), "quiet": True,
            "deterministic": True,
        })  # fmt: skip

    whole = docs_plugin / "whole"
    train(config(whole))

    def ctrl_c_in_epoch_3(run) -> None:  # type: ignore[no-untyped-def]
        if run.epoch == 3:
            raise KeyboardInterrupt

    cut = docs_plugin / "cut"
    with pytest.raises(InterruptedRun):
        train(config(cut), handlers=[(Events.EPOCH_STARTED, ctrl_c_in_epoch_3)])
    saved = load_state(cut / "state.safetensors")
    assert saved.epoch == 2 and set(saved.trainer) == {"average"} and saved.trainer["average"]

    seen: list[tuple[bool, int]] = []
    resume(cut, handlers=[(Events.STARTED, lambda run: seen.append((run.resumed, run.first_epoch)))])
    assert seen == [(True, 3)]
    want, got = load_state(whole / "state.safetensors"), load_state(cut / "state.safetensors")
    assert got.epoch == want.epoch == 3
    for name, tensor in want.trainer["average"].items():
        assert torch.equal(got.trainer["average"][name], tensor), name
    # The average moved in epoch 3, so the equality above is not of two unchanged tensors.
    assert not torch.equal(saved.trainer["average"][name], tensor)
    weights_want, weights_got = load_file(str(whole / "last.safetensors")), load_file(str(cut / "last.safetensors"))
    assert all(torch.equal(weights_got[k], v) for k, v in weights_want.items())


@pytest.mark.usefixtures("one_thread")
def test_eval_of_weights_whose_plugin_is_gone_names_the_distribution(runner, docs_plugin: Path) -> None:  # type: ignore[no-untyped-def]
    runs = {}
    for model, size in (("mynet", "16"), ("lenet", "28")):
        runs[model] = out = docs_plugin / model
        result = runner.invoke(app, [
            "train", model, "--dataset", "stripes", "-d", "size=64", "--epochs", "1", "--batch-size", "16",
            "--input-size", size, "--device", "cpu", "--out", str(out), "-q",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
    sys.path.remove(str(docs_plugin / "site"))  # the plugin uninstalled
    for module in [m for m in sys.modules if m.startswith("cnnkit_myplugin")]:
        del sys.modules[module]
    for registry in (MODELS, DATASETS, TRAINERS):
        registry.refresh()
    gone_model = runner.invoke(app, ["eval", str(runs["mynet"]), "--device", "cpu"])
    assert gone_model.exit_code == 4, gone_model.output
    assert "model 'mynet' of cnnkit-myplugin 0.1, which is not installed here" in gone_model.output
    gone_dataset = runner.invoke(app, ["eval", str(runs["lenet"]), "--device", "cpu"])
    assert gone_dataset.exit_code == 2, gone_dataset.output
    assert (
        "trained on dataset 'stripes' of cnnkit-myplugin 0.1, which is not installed here; install it "
        "(pip install 'cnnkit-myplugin==0.1'), or pass --dataset"
    ) in " ".join(gone_dataset.output.split())
