"""The run directory: the one module that knows its file names, numbers runs, creates, reads and
discards them.

A run directory holds::

    config.json          the resolved config and the environment it ran in (``RunDir.write_record``)
    metrics.csv          one row per completed epoch
    curves.png           loss and accuracy per epoch
    log.txt              the append-only log
    split_<split>.txt    folder datasets: the files of each split
    split_sizes.json     their sizes in bytes (so a resumed run knows a swapped image)
    best.safetensors     the best epoch's weights
    last.safetensors     the last completed epoch's weights
    state.safetensors    the resume point (model, optimiser, trainer and RNG state)
    test.json            test metrics of the final and the best weights, measured at the end
    tb/                  TensorBoard event files (``--tensorboard``)

Everything else (the driver, the handlers, resume, eval, export, ``--nproc``) asks this module for
paths and records instead of spelling names or parsing JSON itself. The format on disk is stable:
a run written by an older cnnkit reads the same.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnkit.errors import UsageError
from cnnkit.fs import write_text

if TYPE_CHECKING:
    from cnnkit.config import TrainConfig

__all__ = ["RunDir", "BEST_NAME", "LAST_NAME", "STATE_NAME", "CONFIG_NAME"]

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"
CURVES_NAME = "curves.png"
LOG_NAME = "log.txt"
BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"
STATE_NAME = "state.safetensors"
TENSORBOARD_NAME = "tb"
SPLIT_SIZES_NAME = "split_sizes.json"
TEST_REPORT_NAME = "test.json"


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


@dataclass(frozen=True)
class RunDir:
    """One run's folder (which need not exist yet)."""

    path: Path

    # -- where things are ------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def curves(self) -> Path:
        return self.path / CURVES_NAME

    @property
    def log(self) -> Path:
        return self.path / LOG_NAME

    @property
    def best(self) -> Path:
        return self.path / BEST_NAME

    @property
    def last(self) -> Path:
        return self.path / LAST_NAME

    @property
    def state(self) -> Path:
        return self.path / STATE_NAME

    @property
    def test_report(self) -> Path:
        return self.path / TEST_REPORT_NAME

    def write_test_report(self, report: Mapping[str, Any]) -> None:
        write_text(self.test_report, json.dumps(report, indent=2) + "\n")

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_NAME

    def split_file(self, split: str) -> Path:
        """``split_<split>.txt``: the files of that split of a folder dataset, one per line."""
        return self.path / f"split_{split}.txt"

    def __str__(self) -> str:
        return str(self.path)

    # -- what it holds ---------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """True once the run has written its config.json."""
        return self.config.is_file()

    def holds_resume_point(self) -> bool:
        return self.state.is_file()

    def read_record(self) -> dict[str, Any]:
        """config.json as written: ``{"config": {...}, "environment": {...}}``.

        UsageError (exit 2) when it is missing or is not a cnnkit run record."""
        if not self.config.is_file():
            raise UsageError(f"{self.path}: no {CONFIG_NAME} there; pass the folder of a cnnkit run")
        try:
            record = json.loads(self.config.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
                raise ValueError("no 'config' table")
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"{self.config} is not a cnnkit run config ({type(exc).__name__}); restore it, or start a new run"
            ) from exc
        return record

    def read_config(self) -> TrainConfig:
        """The config the run was trained with."""
        from pydantic import ValidationError

        from cnnkit.config import TrainConfig

        values = dict(self.read_record()["config"])
        if "val_fraction" not in values:
            # A run from before validation splits trained on all of train and chose on test:
            # it continues as it was (no val split; test every epoch, as its metrics.csv has it).
            values.update(val_fraction=0.0, test_every_epoch=True)
        try:
            return TrainConfig.model_validate(values)
        except ValidationError as exc:
            raise UsageError(f"{self.config} is not a cnnkit run config ({exc.error_count()} invalid keys)") from exc

    def environment(self) -> dict[str, Any]:
        """The ``environment`` config.json recorded (empty when absent or unreadable)."""
        try:
            environment = self.read_record().get("environment", {})
        except UsageError:
            return {}
        return environment if isinstance(environment, dict) else {}

    def recorded_data_folder(self) -> Path | None:
        """``--data`` as the run was given it, else the folder its dataset was found in; None: unknown."""
        try:
            record = self.read_record()
        except UsageError:
            return None
        folder = record["config"].get("data") or (record.get("environment") or {}).get("dataset_source")
        return Path(folder) if isinstance(folder, str) and folder else None

    def read_split_files(self) -> dict[str, list[str]]:
        """The split files the run saved (``{"train": [...], "test": [...]}``; empty when none)."""
        found: dict[str, list[str]] = {}
        for file in sorted(self.path.glob("split_*.txt")):
            found[file.stem.removeprefix("split_")] = file.read_text(encoding="utf-8").splitlines()
        return found

    # -- writing ---------------------------------------------------------------------------------
    def write_record(
        self, config: Mapping[str, Any], environment: Mapping[str, Any], resumes: list[dict[str, Any]] | None = None
    ) -> None:
        """config.json, atomically (``resumes``: each re-plan of the schedule, when there were any)."""
        record: dict[str, Any] = {"config": dict(config), "environment": dict(environment)}
        if resumes:
            record["resumes"] = resumes
        write_text(self.config, json.dumps(record, indent=2) + "\n")

    def write_split_files(self, split_files: Mapping[str, list[str]], source: Path | None = None) -> None:
        """split_<split>.txt per split and, when the files are under ``source``, their sizes."""
        for split, files in split_files.items():
            write_text(self.split_file(split), "".join(f"{name}\n" for name in files))
        if source is not None and split_files:
            sizes: dict[str, list[int | None]] = {}
            for split, files in split_files.items():
                sizes[split] = [_size(source / name) for name in files]
            write_text(self.path / SPLIT_SIZES_NAME, json.dumps({"format": 1, "sizes": sizes}) + "\n")

    def check_split_sizes(self, source: Path) -> None:
        """DataError (exit 3) naming the first recorded file whose size is not the one recorded
        (an image swapped for another under the same name); nothing to check for older runs."""
        from cnnkit.errors import DataError

        try:
            recorded = json.loads((self.path / SPLIT_SIZES_NAME).read_text(encoding="utf-8"))["sizes"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        for split, files in self.read_split_files().items():
            for name, then in zip(files, recorded.get(split, []), strict=False):
                now = _size(source / name)
                if then is not None and now != then:
                    raise DataError(
                        f"{source / name} changed since {self.path} was trained ({then} bytes then, {now} now); "
                        "resume with the images it was trained on, or start a new run"
                    )

    def remove_stale_temporaries(self) -> None:
        """A killed run can leave hidden temp files of unfinished writes; they are never read."""
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def create(self) -> bool:
        """Make the folder (and its parents); True when it did not exist before."""
        fresh = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        return fresh

    def discard(self) -> None:
        """Remove the folder and everything in it (a run that saved nothing)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def check_fresh(self) -> None:
        """``--out`` must not already hold a run."""
        if self.holds_run():
            raise UsageError(
                f"--out {self.path} already holds a run; continue it with --resume {self.path} or pick another --out"
            )

    # -- numbering -------------------------------------------------------------------------------
    @staticmethod
    def family(runs_dir: str | Path, model: str, dataset: str) -> Path:
        """``runs_dir/<model>-<dataset>``: where the numbered runs of that pair live."""
        return Path(runs_dir) / f"{model.replace(':', '-')}-{dataset}"

    @classmethod
    def next_numbered(cls, runs_dir: str | Path, model: str, dataset: str) -> RunDir:
        """``runs_dir/<model>-<dataset>/<N>`` for the next free N, created (safe against parallel runs)."""
        parent = cls.family(runs_dir, model, dataset)
        parent.mkdir(parents=True, exist_ok=True)
        number = max((int(p.name) for p in parent.iterdir() if p.name.isdigit()), default=0) + 1
        while True:
            try:
                (parent / str(number)).mkdir()
                return cls(parent / str(number))
            except FileExistsError:  # another run took it between the listing and the mkdir
                number += 1

    @classmethod
    def numbered(cls, runs_dir: str | Path, model: str, dataset: str) -> Iterator[RunDir]:
        """The numbered runs of ``model`` on ``dataset``, newest first."""
        parent = cls.family(runs_dir, model, dataset)
        if not parent.is_dir():
            return
        for folder in sorted((p for p in parent.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name)):
            yield cls(folder)

    @classmethod
    def find(
        cls, runs_dir: str | Path, model: str, dataset: str, where: Callable[[dict[str, Any]], bool]
    ) -> RunDir | None:
        """The newest numbered run whose config.json record satisfies ``where``."""
        for run_dir in cls.numbered(runs_dir, model, dataset):
            with contextlib.suppress(UsageError, KeyError, TypeError, AttributeError):
                if where(run_dir.read_record()):
                    return run_dir
        return None
