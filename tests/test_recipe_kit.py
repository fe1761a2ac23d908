"""The recipe kit in the standard trainer: EMA, gradient accumulation and clipping, class weights,
mixing, bit-exact resume with every knob on, old config files, and every bad value in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cnnkit.checkpoint import load_weights
from cnnkit.cli.app import app
from cnnkit.config import read_config_file, resolve_config
from cnnkit.data.batches import BatchLoader
from cnnkit.errors import DataError, InterruptedRun
from cnnkit.protocols import ImageTensors
from cnnkit.training.context import Run
from cnnkit.training.events import Events
from cnnkit.training.losses import balanced_class_weights
from cnnkit.training.run import train
from cnnkit.training.state import load_state
from tests.helpers import train_args
from tests.test_train import fit, tiny_config, tiny_splits, without_timing

pytestmark = pytest.mark.usefixtures("one_thread")

EVERY_KNOB: dict[str, Any] = {
    "augment": "trivial", "random_erasing": 0.25, "mixup": 0.2, "cutmix": 1.0, "ema": 0.9, "accum_steps": 2,
    "clip_grad": 1.0, "class_weights": "balanced", "deterministic": True,
}  # fmt: skip


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def test_ema_weights_are_evaluated_and_saved_and_the_trained_ones_resume(tmp_path: Path) -> None:
    result = fit(tiny_config(tmp_path, epochs=2, ema=0.5))
    run_dir = Path(result.run_dir)
    last, meta = load_weights(run_dir / "last.safetensors")
    assert meta.ema == 0.5
    state = load_state(run_dir / "state.safetensors")
    trained = state.model
    averaged = state.trainer["ema"]["weights"]
    saved = tensors(run_dir / "last.safetensors")
    assert all(torch.equal(saved[k].float(), averaged[k].float()) for k in saved)  # last is the average
    assert any(not torch.equal(trained[k], averaged[k]) for k in saved if trained[k].is_floating_point())
    # The end-of-run test measured the average, not the trained weights.
    model, _ = load_weights(run_dir / "last.safetensors")
    test = tiny_splits().test
    loader = BatchLoader(test, batch_size=64, image_size=16, mean=meta.mean, std=meta.std)
    with torch.no_grad():
        correct = sum(int((model.eval()(x).argmax(1) == y).sum()) for x, y in loader)
    report = json.loads((run_dir / "test.json").read_text())
    assert report["final"]["test_acc"] == pytest.approx(correct / len(test))
    model.load_state_dict(trained)
    with torch.no_grad():
        loss = sum(float(torch.nn.functional.cross_entropy(model.eval()(x), y, reduction="sum")) for x, y in loader)
    assert report["final"]["test_loss"] != pytest.approx(loss / len(test))  # (the trained weights' loss)


def test_without_ema_last_holds_the_trained_weights(tmp_path: Path) -> None:
    result = fit(tiny_config(tmp_path, epochs=1))
    _, meta = load_weights(Path(result.run_dir) / "last.safetensors")
    state = load_state(Path(result.run_dir) / "state.safetensors")
    saved = tensors(Path(result.run_dir) / "last.safetensors")
    assert meta.ema is None and all(torch.equal(saved[k], state.model[k]) for k in saved)


def test_accumulating_two_half_batches_is_one_whole_batch_step(tmp_path: Path) -> None:
    # LeNet has no BatchNorm and no dropout: the mean gradient over two halves is the whole batch's.
    common = {"model": "lenet", "epochs": 1, "optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "schedule": "constant",
              "warmup": 0.0, "val_fraction": 0, "deterministic": True}  # fmt: skip
    whole = fit(tiny_config(tmp_path, "whole", batch_size=64, **common))
    halves = fit(tiny_config(tmp_path, "halves", batch_size=32, accum_steps=2, **common))
    a, b = tensors(Path(whole.run_dir) / "last.safetensors"), tensors(Path(halves.run_dir) / "last.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    steps = [load_state(Path(r.run_dir) / "state.safetensors").step for r in (whole, halves)]
    assert steps == [3, 3]  # 192 images: 3 optimisation steps either way (the schedule counts steps)


def test_clipping_bounds_the_step_size(tmp_path: Path) -> None:
    # One SGD step of lr 1 on the whole split: the weights move by exactly the clipped gradient.
    common = {"model": "lenet", "epochs": 1, "optimizer": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0,
              "schedule": "constant", "warmup": 0.0, "val_fraction": 0, "batch_size": 192}  # fmt: skip
    initial: dict[str, torch.Tensor] = {}

    def capture(run: Run) -> None:
        initial.update({k: v.detach().clone() for k, v in run.model.state_dict().items()})

    moved = {}
    for name, clip in (("clipped", 1e-3), ("free", 0.0)):
        result = fit(tiny_config(tmp_path, name, clip_grad=clip, **common), [(Events.STARTED, capture)])
        final = tensors(Path(result.run_dir) / "last.safetensors")
        moved[name] = float(torch.sqrt(sum(((final[k] - initial[k]) ** 2).sum() for k in final)))
    assert moved["clipped"] == pytest.approx(1e-3, rel=1e-3) and moved["free"] > 0.01


def test_balanced_class_weights_are_inverse_frequencies_and_an_empty_class_is_named() -> None:
    weights = balanced_class_weights(torch.tensor([0, 0, 0, 1]), ("a", "b"))
    assert torch.allclose(weights, torch.tensor([4 / 6, 4 / 2]))
    with pytest.raises(DataError, match="class 'c' has no training image.*--class-weights none"):
        balanced_class_weights(torch.tensor([0, 1, 1]), ("a", "b", "c"))


def test_class_weights_change_the_training_of_an_imbalanced_split(tmp_path: Path) -> None:
    splits = tiny_splits()
    keep = (splits.train.labels != 0) | (torch.arange(len(splits.train)) < 16)  # class 'nw': 4 of 48 images
    splits.train = ImageTensors(splits.train.images[keep], splits.train.labels[keep])
    runs = {}
    for name, weights in (("plain", "none"), ("balanced", "balanced")):
        runs[name] = train(tiny_config(tmp_path, name, epochs=1, deterministic=True, class_weights=weights), data=splits)
    assert without_timing(runs["plain"].history) != without_timing(runs["balanced"].history)
    empty = tiny_splits()
    empty.train = ImageTensors(empty.train.images[empty.train.labels != 2], empty.train.labels[empty.train.labels != 2])
    with pytest.raises(DataError, match="class 'sw' has no training image"):
        train(tiny_config(tmp_path, "empty", epochs=1, class_weights="balanced"), data=empty)


def test_mixing_trains_with_probability_labels(tmp_path: Path) -> None:
    result = fit(tiny_config(tmp_path, epochs=1, mixup=0.4, cutmix=1.0, augment="randaugment"))
    row = result.history[-1]
    assert 0 <= row["train_acc"] <= 1 and row["train_loss"] > 0 and "val_acc" in row


@pytest.mark.slow
def test_resume_with_every_knob_on_is_bit_exact(tmp_path: Path) -> None:
    whole = fit(tiny_config(tmp_path, "whole", epochs=3, **EVERY_KNOB))

    def stop_after_one(run: Run) -> None:
        if run.epoch == 1:
            raise KeyboardInterrupt

    config = tiny_config(tmp_path, "split", epochs=3, **EVERY_KNOB)
    with pytest.raises(InterruptedRun):
        fit(config, [(Events.EPOCH_COMPLETED, stop_after_one)])
    resumed = fit(config, again=True)
    assert without_timing(resumed.history) == without_timing(whole.history)
    for name in ("last.safetensors", "best.safetensors"):
        a, b = tensors(tmp_path / "whole" / name), tensors(tmp_path / "split" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_state(tmp_path / "whole" / "state.safetensors"), load_state(tmp_path / "split" / "state.safetensors")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_old_config_files_with_augment_true_or_false_still_load(tmp_path: Path) -> None:
    for value, mode in (("true", "crop-flip"), ("false", "none")):
        file = tmp_path / f"{value}.toml"
        file.write_text(f'model = "lenet"\naugment = {value}\n')
        assert resolve_config(file).augment == mode
    old = tmp_path / "config.json"
    old.write_text('{"config": {"model": "lenet", "augment": true}, "environment": {}}')
    assert read_config_file(old)["augment"] is True and resolve_config(old).augment == "crop-flip"


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--ema", "1", "ema = 1.0: Input should be less than 1 (valid: 0 <= ema < 1)"),
        ("--mixup", "-0.2", "mixup = -0.2: Input should be greater than or equal to 0 (valid: 0 <= mixup)"),
        ("--cutmix", "-1", "(valid: 0 <= cutmix)"),
        ("--accum-steps", "0", "accum_steps = 0: Input should be greater than or equal to 1 (valid: 1 <= accum_steps)"),
        ("--randaugment-magnitude", "31", "(valid: 0 <= randaugment_magnitude <= 30)"),
        ("--random-erasing", "1.5", "(valid: 0 <= random_erasing <= 1)"),
        ("--augment", "autoaugment", "Input should be 'none', 'crop-flip', 'trivial' or 'randaugment'"),
        ("--class-weights", "inverse", "Input should be 'none' or 'balanced'"),
    ],
)
def test_each_bad_value_is_one_line_with_the_valid_range(
    runner: CliRunner, idx_data: Path, flag: str, value: str, says: str
) -> None:
    result = runner.invoke(app, train_args(idx_data, flag, value))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], result.output
    assert "Traceback" not in result.output


def test_cutmix_on_one_pixel_inputs_is_one_line(runner: CliRunner, idx_data: Path) -> None:
    result = runner.invoke(app, [*train_args(idx_data, "--cutmix", "1"), "--input-size", "1"])
    assert result.exit_code == 2 and "cutmix needs images of at least 2 x 2 px" in result.output
