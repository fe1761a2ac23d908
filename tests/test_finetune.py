"""Fine-tuning runs: --init-from a cnnkit run (same or other class count), what config.json and the
weights record, --freeze backbone / --freeze-epochs, --head-lr-mult, and --recipe finetune."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import quadrants, tiny_config, tiny_splits

import cnnkit
from cnnkit.checkpoint import load_weights, read_meta
from cnnkit.config import resolve_config
from cnnkit.protocols import FINETUNE_LR_FACTOR, FINETUNE_WARMUP, DatasetSplits
from cnnkit.training.events import Events
from cnnkit.training.optim import build_optimizer
from cnnkit.training.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshots(store: dict[Any, dict[str, torch.Tensor]]) -> list[tuple[Events, Any]]:
    """Handlers keeping a copy of the model's tensors at the start and after every epoch."""

    def keep(key: Any) -> Any:
        return lambda run: store.__setitem__(key(run), {k: v.detach().clone() for k, v in run.model.state_dict().items()})

    return [(Events.STARTED, keep(lambda run: "start")), (Events.EPOCH_COMPLETED, keep(lambda run: run.epoch))]


def two_class_splits() -> DatasetSplits:
    return DatasetSplits("two", quadrants(96, 2, classes=2), quadrants(32, 3, classes=2), ("a", "b"), Path("."),
                         (0.45,), (0.3,))  # fmt: skip


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A one-epoch lenet_bn run on the four-class tiny splits."""
    return train(tiny_config(tmp_path, "source", epochs=1), data=tiny_splits()).run_dir


def test_a_run_starts_from_another_run_s_weights_and_records_where_they_came_from(tmp_path: Path, source: Path) -> None:
    seen: dict[Any, dict[str, torch.Tensor]] = {}
    config = tiny_config(tmp_path, "tuned", epochs=1, init_from=str(source), recipe="finetune")
    result = train(config, data=tiny_splits(), handlers=snapshots(seen))
    best = source / "best.safetensors"
    original = load_weights(best)[0].state_dict()
    assert all(torch.equal(seen["start"][k], v) for k, v in original.items())
    record = json.loads((result.run_dir / "config.json").read_text(encoding="utf-8"))
    sha = hashlib.sha256(best.read_bytes()).hexdigest()
    assert record["config"]["init_from"] == str(source.resolve())
    init = record["environment"]["init_from"]
    assert (init["path"], init["sha256"], init["format"]) == (str(best.resolve()), sha, "cnnkit")
    assert init["notes"][0].startswith("initial weights: cnnkit lenet_bn (")
    meta = read_meta(result.run_dir / "last.safetensors")
    assert meta.init_from == {"source": str(source.resolve()), "path": str(best.resolve()), "sha256": sha,
                              "format": "cnnkit"}  # fmt: skip


def test_another_class_count_replaces_only_the_head(tmp_path: Path, source: Path, capsys: Any) -> None:
    seen: dict[Any, dict[str, torch.Tensor]] = {}
    config = tiny_config(tmp_path, "two", epochs=1, init_from=str(source), quiet=False)
    train(config, data=two_class_splits(), handlers=snapshots(seen))
    out = capsys.readouterr().out
    assert "classifier 16 replaced: 4 -> 2 classes (freshly initialised)" in out
    original = load_weights(source / "best.safetensors")[0].state_dict()
    torch.manual_seed(config.seed)
    fresh = cnnkit.build_model("lenet_bn", 1, 2).state_dict()
    for key, value in seen["start"].items():
        expected = fresh[key] if key.startswith("16.") else original[key]
        assert torch.equal(value, expected), key


def test_freeze_backbone_trains_the_head_alone_then_everything(tmp_path: Path, source: Path, capsys: Any) -> None:
    seen: dict[Any, dict[str, torch.Tensor]] = {}
    config = tiny_config(tmp_path, "frozen", epochs=2, init_from=str(source), freeze="backbone", freeze_epochs=1,
                         quiet=False)  # fmt: skip
    train(config, data=two_class_splits(), handlers=snapshots(seen))
    out = capsys.readouterr().out
    assert "backbone frozen: training head '16' only (170 of " in out
    assert "4 frozen BatchNorm layers kept in eval mode" in out
    assert "epoch 2: backbone unfrozen, the whole model trains" in out
    start, first, second = seen["start"], seen[1], seen[2]
    backbone = [k for k in start if not k.startswith("16.")]
    # Epoch 1: every backbone tensor as loaded, BatchNorm statistics included; the head moved.
    assert all(torch.equal(first[k], start[k]) for k in backbone)
    assert not torch.equal(first["16.weight"], start["16.weight"])
    # Epoch 2: unfrozen, the backbone trains (and its BatchNorm statistics move) too.
    assert not torch.equal(second["0.weight"], first["0.weight"])
    assert not torch.equal(second["1.running_mean"], first["1.running_mean"])


def test_a_resumed_run_past_the_frozen_epochs_starts_unfrozen(tmp_path: Path, source: Path) -> None:
    from cnnkit.training.run import resume

    config = tiny_config(tmp_path, "later", epochs=1, init_from=str(source), freeze="backbone", freeze_epochs=1)
    train(config, data=two_class_splits())
    seen: dict[Any, dict[str, torch.Tensor]] = {}
    resume(config.out or "", {"epochs": 2, "quiet": True}, data=two_class_splits(), handlers=snapshots(seen))
    assert not torch.equal(seen[2]["0.weight"], seen["start"]["0.weight"])


def test_head_lr_mult_gives_the_head_that_multiple_of_the_rate() -> None:
    config = resolve_config(overrides={"model": "lenet_bn", "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0,
                                       "head_lr_mult": 10.0})  # fmt: skip
    model = cnnkit.build_model("lenet_bn", 1, 4)
    optimizer = build_optimizer(model, config)
    assert len(optimizer.param_groups) == 4
    for group in optimizer.param_groups:
        group["lr"] = 0.01
    model(torch.randn(8, 1, 28, 28)).logsumexp(1).mean().backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        rate = 0.1 if name.startswith("16.") else 0.01
        assert p.grad is not None
        assert torch.allclose(before[name] - p.detach(), rate * p.grad, atol=1e-7), name
    assert all(group["lr"] == 0.01 for group in optimizer.param_groups)  # restored after the step


@pytest.mark.parametrize("name", cnnkit.list_models())
def test_the_finetune_recipe_is_derived_from_each_spec(name: str) -> None:
    default, tuned = (resolve_config(overrides={"model": name, "recipe": r}) for r in ("default", "finetune"))
    assert tuned.lr == pytest.approx(default.lr * FINETUNE_LR_FACTOR)
    assert (tuned.warmup, tuned.init) == (FINETUNE_WARMUP, "default")
    same = {k for k in ("epochs", "batch_size", "input_size", "optimizer", "momentum", "weight_decay", "schedule",
                        "label_smoothing", "augment", "normalize")}  # fmt: skip
    assert {k: getattr(tuned, k) for k in same} == {k: getattr(default, k) for k in same}


def test_every_builtin_says_where_its_head_is_and_it_maps_to_the_classes() -> None:
    from cnnkit.protocols import model_head

    for name in cnnkit.list_models():
        spec = cnnkit.get_model(name)
        head = model_head(spec)
        assert head is not None, name
        with torch.device("meta"):
            model = spec.build(1, 7)
        last = [p for p in model.get_submodule(head).parameters()][-1]
        assert last.shape[0] == 7, name
