"""``bench/coil20.py --set``: overrides parsed like ``cnnkit train -o``, typed by the config, and part
of a recorded row's key and of the table's model column (rows from before ``--set`` unchanged)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from cnnkit.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coil20() -> Any:
    spec = importlib.util.spec_from_file_location("bench_coil20", ROOT / "bench" / "coil20.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(**changes: Any) -> dict[str, Any]:
    row = {"model": "lenet", "split": "pose-block", "seed": 0, "epochs": 10, "input_size": 64, "recipe": "default",
           "batch_size": 32, "final": 0.9, "seconds": 12.0}  # fmt: skip
    return {**row, **changes}


def test_set_values_are_typed_and_canonical(coil20: Any) -> None:
    sets = coil20.parse_sets(["augment=crop-flip", "lr=2e-2", "cutmix=1", "label-smoothing=0.1"], "lenet")
    assert sets == {"augment": "crop-flip", "cutmix": 1.0, "label_smoothing": 0.1, "lr": 0.02}
    assert coil20.parse_sets(["lr=0.02"], "lenet") == coil20.parse_sets(["lr=2e-2"], "lenet")
    assert coil20.parse_sets([], "lenet") == {}


@pytest.mark.parametrize(
    ("pairs", "message"),
    [(["augment"], "not of the form key=value"), (["augment=sideways"], "augment"), (["seed=3"], "--seeds"),
     (["batch_size=64"], "--batch-size"), (["no_such_key=1"], "no_such_key")],
)  # fmt: skip
def test_bad_sets_are_usage_errors(coil20: Any, pairs: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        coil20.parse_sets(pairs, "lenet")


def test_set_is_part_of_the_key_and_old_rows_key_as_none(coil20: Any) -> None:
    old, empty, flip = _row(), _row(set={}), _row(set={"augment": "crop-flip"})
    assert coil20._key(old) == coil20._key(empty)
    assert coil20._key(old) != coil20._key(flip)
    assert coil20._key(_row(set={"lr": 0.02, "ema": 0.999})) == coil20._key(_row(set={"ema": 0.999, "lr": 0.02}))


def test_the_validation_protocol_is_part_of_the_key_and_of_the_table(coil20: Any) -> None:
    """A run with the validation carve is not skipped because one without it (older rows, which
    record no protocol) had the same settings, and the table keeps the two apart."""
    old, carved = _row(), _row(protocol="val")
    assert coil20._key(old) != coil20._key(carved)
    assert coil20._key(carved) == coil20._key(_row(protocol="val", final=0.5))
    lines = coil20.table([old, carved]).splitlines()
    assert len(lines) == 4
    assert sorted(line.split(" | ")[0] for line in lines[2:]) == ["| `lenet`", "| `lenet` (no val carve)"]


def test_table_keeps_rows_with_different_sets_apart(coil20: Any) -> None:
    rows = [_row(seed=s, final=0.9) for s in range(3)]  # recorded before --set
    rows += [_row(seed=s, final=0.95, set={"augment": "crop-flip", "ema": 0.999}, protocol="val") for s in range(3)]
    lines = coil20.table(rows).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| `lenet` (no val carve) | 64 | 32 | 10 | not run |  | **0.900**")
    assert lines[3].startswith("| `lenet` `--set augment=crop-flip` `--set ema=0.999` | 64 | 32 | 10 |")
    assert "**0.950**" in lines[3]


def test_rows_under_a_changed_recipe_are_not_skipped_or_merged(coil20: Any) -> None:
    """The same flags under two recipes (LeNet's rate changed; COIL-20 got its own recipe) are two
    runs: neither is skipped as the other's, and the table labels each with what only it had."""
    then = "recipe default: 10 epochs · batch 32 · adamw lr 0.01 wd 0.01 · 64 px · seed 0"
    now = "recipe default: 10 epochs · batch 32 · adamw lr 0.05 wd 0.01 · 64 px · seed 1"
    old, new = _row(protocol="val", config=then), _row(protocol="val", config=now)
    assert coil20._key(old) != coil20._key({**new, "seed": 0})
    assert coil20.hyperparameters(old) == "10 epochs · batch 32 · adamw lr 0.01 wd 0.01 · 64 px"
    lines = coil20.table([old, new]).splitlines()
    assert len(lines) == 4
    assert "(recipe: adamw lr 0.01 wd 0.01)" in lines[2] + lines[3]
    assert "(recipe: adamw lr 0.05 wd 0.01)" in lines[2] + lines[3]


def test_the_selection_block_gets_a_column_only_when_it_ran(coil20: Any) -> None:
    assert "pose-block-0" not in coil20.table([_row()])
    header = coil20.table([_row(), _row(split="pose-block-0")]).splitlines()[0]
    assert header.count("test acc") == 3 and "`pose-block-0` test acc" in header
