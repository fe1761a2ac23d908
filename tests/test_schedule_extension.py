"""Extending a run re-plans the rest of its learning-rate schedule (cnnkit.training.optim.Resume).

Pure functions of the step, except the last test, which resumes a tiny run through the driver.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cnnkit.config import TrainConfig, resolve_config
from cnnkit.testing import write_fashion_mnist_folder
from cnnkit.training.optim import Resume, describe_plan, lr_schedule

SPE = 47  # steps per epoch
SCHEDULES = ("constant", "cosine", "onecycle")
FLOOR = {"cosine": 0.0, "onecycle": 0.1 / 25e4}


def config(schedule: str, epochs: int = 10, lr: float = 0.1, warmup: float = 1.0) -> TrainConfig:
    warmup = 0.0 if schedule == "onecycle" else warmup  # onecycle: 30% of the run, as the built-ins use it
    return resolve_config(overrides={"model": "lenet_bn", "schedule": schedule, "epochs": epochs, "lr": lr,
                                     "warmup": warmup})  # fmt: skip


def values(schedule: TrainConfig, resumes: list[Resume] = []) -> list[float]:  # noqa: B006 - never mutated
    at = lr_schedule(schedule, SPE, resumes)
    return [at(step) for step in range(schedule.epochs * SPE + 1)]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("done", [10, 4])  # a finished run, and one interrupted after its warm-up
def test_extending_never_rises_and_anneals_to_the_floor(name: str, done: int) -> None:
    before = lr_schedule(config(name), SPE)
    at = done * SPE
    extended = values(config(name, epochs=20), [Resume(at, 20, None, 10, 0.1)])
    assert extended[:at] == [before(step) for step in range(at)]  # the steps already taken
    rest = extended[at:]
    assert rest[0] == before(at) and max(rest) <= before(at)
    if name == "constant":
        assert set(rest) == {0.1}
    else:
        assert all(later <= earlier for earlier, later in zip(rest, rest[1:], strict=False))
        assert rest[-1] == FLOOR[name]
        if done < 10:
            assert rest[len(rest) // 2] > before(10 * SPE)  # it anneals over the new length, not the old


def test_the_jump_of_a_stretched_onecycle_is_gone() -> None:
    # Without a re-plan, a 20-epoch onecycle puts step 470 at ~0.8 of the peak (open_clip #413).
    at = 10 * SPE
    stretched = lr_schedule(config("onecycle", epochs=20), SPE)(at)
    replanned = lr_schedule(config("onecycle", epochs=20), SPE, [Resume(at, 20, None, 10, 0.1)])(at)
    assert stretched > 0.7 * 0.1 and replanned == lr_schedule(config("onecycle"), SPE)(at) < 1e-5


@pytest.mark.parametrize("name", SCHEDULES)
def test_an_unchanged_resume_is_bit_exact(name: str) -> None:
    plain = values(config(name))
    assert values(config(name), [Resume(4 * SPE, 10, None, 10, 0.1)]) == plain
    assert values(config(name), [Resume(4 * SPE, 10, None, 10, 0.1), Resume(7 * SPE, 10, None, 10, 0.1)]) == plain
    assert (
        lr_schedule(config(name), SPE, [Resume(4 * SPE, 10, None, 10, 0.1)]).__name__
        == lr_schedule(config(name), SPE).__name__
    )  # the no-op resume returns the plain schedule itself


def test_no_resumes_is_the_schedule_as_released() -> None:
    # A few values of the 0.1 schedules over 10 x 47 steps, as the function computed them before
    # resumes existed (floats compared exactly).
    import math

    cos, one = lr_schedule(config("cosine"), SPE), lr_schedule(config("onecycle"), SPE)
    assert cos(0) == 0.1 / 47 and cos(47) == 0.1 and cos(100) == 0.1 * 0.5 * (1 + math.cos(math.pi * 53 / 423))
    rise = round(0.3 * 470)
    assert one(0) == 0.1 / 25 and one(300) == 0.1 / 25e4 + (0.1 - 0.1 / 25e4) * 0.5 * (
        1 + math.cos(math.pi * (300 - rise) / (470 - rise)))  # fmt: skip


@pytest.mark.parametrize("name", SCHEDULES)
def test_a_warm_restart_rises_to_the_new_lr_then_anneals(name: str) -> None:
    at, peak = 10 * SPE, 0.05
    before = lr_schedule(config(name), SPE)(at)
    lrs = values(config(name, epochs=20, lr=peak), [Resume(at, 20, peak, 10, 0.1)])
    warm = lrs[at : at + SPE]
    assert warm[-1] == peak and warm[-2] != peak  # reaches the new lr at the last step of one epoch
    if name == "constant":  # from 0.1 down to 0.05 (a 'warm-up' to a lower lr), then 0.05 to the end
        assert all(b < a for a, b in zip([before, *warm], warm, strict=False))
        assert lrs[at + SPE :] == [peak] * (len(lrs) - at - SPE)
    else:
        assert max(lrs[at:]) == peak
        assert all(b > a for a, b in zip([before, *warm], warm, strict=False))  # a linear rise from where it was
        after = lrs[at + SPE :]
        assert all(later <= earlier for earlier, later in zip(after, after[1:], strict=False))
        assert after[-1] == (0.0 if name == "cosine" else peak / 25e4)


def test_a_short_warmup_config_shortens_the_warm_restart() -> None:
    at = 10 * SPE
    lrs = values(config("cosine", epochs=20, lr=0.05, warmup=0.5), [Resume(at, 20, 0.05, 10, 0.1)])
    assert lrs[at + round(0.5 * SPE) - 1] == 0.05 and lrs[at + round(0.5 * SPE) - 2] < 0.05


@pytest.mark.parametrize("name", ["cosine", "onecycle"])
def test_two_resumes_compose(name: str) -> None:
    first = Resume(10 * SPE, 20, None, 10, 0.1)
    second = Resume(15 * SPE, 30, 0.02, 20, 0.1)
    once = lr_schedule(config(name, epochs=20), SPE, [first])
    lrs = values(config(name, epochs=30, lr=0.02), [first, second])
    assert lrs[: 15 * SPE] == [once(step) for step in range(15 * SPE)]
    assert lrs[15 * SPE + SPE - 1] == 0.02 and lrs[-1] == (0.0 if name == "cosine" else 0.02 / 25e4)
    # the second resume warms up from the first one's value at its step
    assert lrs[15 * SPE] == once(15 * SPE) + (0.02 - once(15 * SPE)) * (1 / SPE)

    mid = Resume(4 * SPE, 20, None, 10, 0.1)
    then = Resume(12 * SPE, 25, None, 20, 0.1)
    one = lr_schedule(config(name, epochs=20), SPE, [mid])
    both = values(config(name, epochs=25), [mid, then])
    assert both[12 * SPE] == one(12 * SPE) and max(both[12 * SPE :]) == one(12 * SPE)


def test_a_resume_at_step_zero_starts_the_schedule_over() -> None:
    assert values(config("cosine", epochs=20), [Resume(0, 20, None, 10, 0.1)]) == values(config("cosine", epochs=20))


def test_a_record_that_does_not_fit_the_config_is_an_error() -> None:
    with pytest.raises(ValueError, match="config says 10 epochs"):
        lr_schedule(config("cosine"), SPE, [Resume(10 * SPE, 20, None, 10, 0.1)])
    with pytest.raises(ValueError, match="resume 2"):
        lr_schedule(config("cosine", epochs=30), SPE, [Resume(470, 20, None, 10, 0.1), Resume(700, 30, None, 10, 0.1)])
    with pytest.raises(ValueError):
        Resume(-1, 20, None, 10, 0.1)


def test_resume_round_trips_through_json() -> None:
    resumes = [Resume(4690, 20, None, 10, 0.1), Resume(9380, 30, 0.05, 20, 0.1)]
    text = json.dumps([r.to_dict() for r in resumes])
    assert [Resume.from_dict(d) for d in json.loads(text)] == resumes
    with pytest.raises(ValueError, match="not a recorded resume"):
        Resume.from_dict({"at_step": 3})


def test_the_plan_line_names_the_steps_and_lrs() -> None:
    at = 10 * SPE
    line = describe_plan(config("cosine", epochs=20), SPE, [Resume(at, 20, None, 10, 0.1)])
    assert line.startswith("schedule: from lr 0 at step 470 to 0 at step 940 (cosine, extended from 10 to 20 epochs)")
    assert "--lr" in line and "\n" not in line  # a finished cosine is at 0: the line says how to restart

    mid = describe_plan(config("onecycle", epochs=20), SPE, [Resume(4 * SPE, 20, None, 10, 0.1)])
    start = lr_schedule(config("onecycle"), SPE)(4 * SPE)
    assert (
        mid
        == f"schedule: from lr {start:.3g} at step 188 to {0.1 / 25e4:.3g} at step 940 (onecycle, extended from 10 to 20 epochs)"
    )

    warm = describe_plan(config("cosine", epochs=20, lr=0.05), SPE, [Resume(at, 20, 0.05, 10, 0.1)])
    assert warm == ("schedule: warm restart from lr 0 at step 470 to lr 0.05 over 47 steps, "
                    "then cosine to 0 at step 940 (cosine, extended from 10 to 20 epochs)")  # fmt: skip
    big = describe_plan(config("cosine", epochs=20), 469, [Resume(4690, 20, None, 10, 0.1)])
    assert "step 4,690" in big and "step 9,380" in big
    assert "constant" in describe_plan(config("constant", epochs=20), SPE, [Resume(at, 20, None, 10, 0.1)])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow
def test_resuming_a_finished_onecycle_run_with_more_epochs_does_not_jump(tmp_path: Path) -> None:
    from cnnkit.training.run import resume, train

    data = write_fashion_mnist_folder(tmp_path / "fmnist", train=160, test=40)
    folder = tmp_path / "run"
    run_config = resolve_config(overrides={
        "model": "lenet_bn", "dataset": "fashion-mnist", "data": str(data), "epochs": 2, "batch_size": 32,
        "schedule": "onecycle", "warmup": 0.0, "lr": 0.05, "device": "cpu", "quiet": True, "out": str(folder),
    })  # fmt: skip
    train(run_config)
    resume(folder, {"epochs": 4})
    with (folder / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    last = float(rows[1]["lr"])  # the lr of epoch 2's last step
    assert all(float(row["lr"]) <= last for row in rows[2:])
    record = json.loads((folder / "config.json").read_text())
    assert "Resume" not in json.dumps(record)  # stored as plain dicts
