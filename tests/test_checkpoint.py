"""Weights files: atomic writes, the safetensors round trip, metadata and its one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cnnkit.checkpoint import (
    META_KEY,
    WeightsMeta,
    load_model,
    load_weights,
    read_meta,
    resolve_weights,
    save_weights,
)
from cnnkit.cli.app import app
from cnnkit.errors import WeightsError
from cnnkit.fs import atomic_write
from cnnkit.models.base import Architecture, NoOptions
from cnnkit.protocols import Recipe
from cnnkit.registry import MODELS


def make_meta(**changes: Any) -> WeightsMeta:
    fields: dict[str, Any] = dict(
        model="lenet_bn", in_channels=1, num_classes=10, input_size=28, classes=[f"c{i}" for i in range(10)]
    )
    return WeightsMeta(**(fields | changes))


def trained_lenet_bn() -> nn.Module:
    """A lenet_bn whose BatchNorm statistics differ from a fresh model's (so buffers must travel)."""
    torch.manual_seed(0)
    model = MODELS.get("lenet_bn").build(1, 10)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 1, 28, 28) * 3)
    return model.eval()


# -- atomic_write --------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [ValueError("disk on fire"), KeyboardInterrupt()])
def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path: Path, failure: BaseException) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old contents")

    def half_write(tmp: Path) -> None:
        tmp.write_bytes(b"new but incomplete")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(target, half_write)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]  # no temp file left behind


def test_atomic_write_replaces_and_never_creates_folders(tmp_path: Path) -> None:
    target = tmp_path / "run" / "best.safetensors"
    with pytest.raises(FileNotFoundError, match="no such folder") as raised:
        atomic_write(target, lambda tmp: tmp.write_bytes(b"one"))
    assert raised.value.filename == str(target.parent) and not target.parent.exists()
    target.parent.mkdir()  # the caller that owns the folder makes it
    atomic_write(target, lambda tmp: tmp.write_bytes(b"one"))
    atomic_write(target, lambda tmp: tmp.write_bytes(b"two"))
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["best.safetensors"]


_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from safetensors.torch import save
    from cnnkit.fs import atomic_write
    target = sys.argv[1]
    direct = len(sys.argv) > 2  # the unsafe way, to show the test can tell the difference

    def write_slowly(path, payload):
        # 16 MB in 1 MB pieces with a pause between: a kill nearly always lands mid-write.
        with open(path, "wb") as handle:
            for start in range(0, len(payload), 1 << 20):
                handle.write(payload[start : start + (1 << 20)])
                handle.flush()
                time.sleep(0.002)

    step = 0
    payload = save({"x": torch.full((4_000_000,), 1.0)}, metadata={"step": "1"})
    while True:
        step += 1
        if direct:
            # Rewriting one payload: the file is complete only between two writes.
            write_slowly(target, payload)
        else:
            payload = save({"x": torch.full((4_000_000,), float(step))}, metadata={"step": str(step)})
            atomic_write(target, lambda tmp: write_slowly(tmp, payload))
        print(step, flush=True)
    """
)


def _kill_while_writing(tmp_path: Path, target: Path, delays: tuple[float, ...], *extra: str) -> list[str]:
    """Kill the writer after each delay; the problems found reading the target afterwards."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    problems = []
    for delay in delays:
        child = subprocess.Popen([sys.executable, str(script), str(target), *extra], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        child.stdout.readline()  # at least one complete write happened
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        try:
            tensors = load_file(str(target))
            with safe_open(str(target), framework="pt") as handle:
                step = float(handle.metadata()["step"])
        except Exception as exc:  # noqa: BLE001 - any failure to read is what we count
            problems.append(f"after {delay}s: {exc}")
            continue
        # The file is one whole write: every element carries the step its metadata names.
        if not torch.equal(tensors["x"], torch.full((4_000_000,), step)):
            problems.append(f"after {delay}s: mixed contents")
    return problems


@pytest.mark.slow
def test_sigkill_while_writing_never_leaves_a_broken_file(tmp_path: Path) -> None:
    target = tmp_path / "big.safetensors"
    assert _kill_while_writing(tmp_path, target, (0.05, 0.13, 0.31)) == []
    # The same kills against plain writes do break the file: the check above has teeth.
    assert _kill_while_writing(tmp_path, tmp_path / "direct.safetensors", (0.07, 0.19), "direct")


# -- save / load -----------------------------------------------------------------------------------


def test_round_trip_gives_the_same_outputs_and_metadata(tmp_path: Path) -> None:
    model = trained_lenet_bn()
    meta = make_meta(dataset="fashion-mnist", mean=[0.286], std=[0.353], epoch=3, metrics={"test_acc": 0.875})
    save_weights(tmp_path / "best.safetensors", model, meta)

    loaded, loaded_meta = load_weights(tmp_path / "best.safetensors")
    x = torch.rand(5, 1, 28, 28)
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))
    assert loaded_meta == meta
    assert read_meta(tmp_path) == meta  # without building the model
    # A run directory resolves to its best weights.
    assert torch.equal(load_model(tmp_path)(x), model(x))


def test_saved_tensors_are_plain_contiguous_safetensors(tmp_path: Path) -> None:
    model = trained_lenet_bn()
    save_weights(tmp_path / "w.safetensors", model, make_meta())
    stored = load_file(str(tmp_path / "w.safetensors"))
    assert stored.keys() == model.state_dict().keys()
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in stored.values())
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()[META_KEY])["model"] == "lenet_bn"


def test_tied_tensors_are_stored_once_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Shared(nn.Module):
        def __init__(self, c: int, k: int) -> None:
            super().__init__()
            self.a = nn.Linear(4, k)
            self.b = nn.Linear(4, k)
            self.b.weight = self.a.weight  # tied

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.flatten(1)[:, :4]
            return self.a(h) + self.b(h)

    spec = Architecture("shared", "tied weights", "-", Recipe(), NoOptions, lambda c, k, o: Shared(c, k))
    real_get = MODELS.get
    monkeypatch.setattr(MODELS, "get", lambda name: spec if name == "shared" else real_get(name))
    model = Shared(1, 3)
    save_weights(tmp_path / "w.safetensors", model, make_meta(model="shared", num_classes=3, classes=["a", "b", "c"]))

    assert len(load_file(str(tmp_path / "w.safetensors"))) == 3  # a.weight once, both biases
    loaded, _ = load_weights(tmp_path / "w.safetensors")
    assert loaded.a.weight is loaded.b.weight
    x = torch.rand(2, 1, 2, 2)
    assert torch.equal(loaded(x), model.eval()(x))


def test_newer_metadata_keys_are_ignored(tmp_path: Path) -> None:
    payload = make_meta().model_dump() | {"added_in_cnnkit_9": {"anything": 1}}
    meta = WeightsMeta.model_validate(payload)
    assert meta.model == "lenet_bn" and not hasattr(meta, "added_in_cnnkit_9")


def test_resolve_weights_prefers_best_then_last(tmp_path: Path) -> None:
    (tmp_path / "last.safetensors").write_bytes(b"x")
    assert resolve_weights(tmp_path) == tmp_path / "last.safetensors"
    (tmp_path / "best.safetensors").write_bytes(b"x")
    assert resolve_weights(tmp_path) == tmp_path / "best.safetensors"
    assert resolve_weights(tmp_path / "last.safetensors") == tmp_path / "last.safetensors"
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(WeightsError, match="neither best.safetensors nor last.safetensors"):
        resolve_weights(empty)


# -- errors, through the CLI -------------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its one-line error must contain)."""
    zero = tmp_path / "zero.safetensors"
    zero.write_bytes(b"")
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(os.urandom(4096))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    unknown = tmp_path / "unknown.safetensors"
    save_weights(unknown, trained_lenet_bn(), make_meta(model="lenet_bm"))
    wrong_arch = tmp_path / "wrong-arch.safetensors"
    save_weights(wrong_arch, MODELS.get("lenet").build(1, 10), make_meta())  # says lenet_bn
    truncated = tmp_path / "truncated.safetensors"
    save_weights(truncated, trained_lenet_bn(), make_meta())
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    corrupt_meta = tmp_path / "corrupt-meta.safetensors"
    save_file({"w": torch.zeros(3)}, str(corrupt_meta), metadata={META_KEY: '{"model": "lenet"'})
    return {
        "missing": (tmp_path / "missing.safetensors", "do not exist"),
        "zero-byte": (zero, "is empty"),
        "random bytes": (noise, "not a readable safetensors file"),
        "no cnnkit metadata": (foreign, "carry no cnnkit metadata"),
        "unknown model": (unknown, "model 'lenet_bm', which is not registered here (similar: lenet_bn"),
        "other architecture": (wrong_arch, "do not fit model 'lenet_bn'"),
        "truncated": (truncated, "not a readable safetensors file"),
        "corrupt metadata": (corrupt_meta, "corrupt cnnkit metadata"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "zero-byte", "random bytes", "no cnnkit metadata", "unknown model", "other architecture",
     "truncated", "corrupt metadata"],
)  # fmt: skip
def test_bad_weights_exit_4_with_one_line(tmp_path: Path, runner: Any, case: str) -> None:
    path, phrase = _bad_files(tmp_path)[case]
    result = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 4, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnkit: error: weights "), result.stderr
    assert phrase in lines[0]
    assert str(path) in lines[0]
    assert not (tmp_path / "out.safetensors").exists()


def test_channel_mismatch_names_the_shapes(tmp_path: Path) -> None:
    save_weights(tmp_path / "w.safetensors", MODELS.get("lenet_bn").build(3, 10), make_meta(in_channels=1))
    with pytest.raises(WeightsError, match=r"0\.weight \(6, 3, 5, 5\) vs \(6, 1, 5, 5\)"):
        load_weights(tmp_path / "w.safetensors")
