"""Fault suite: kill -9, full disks, races, damaged runs and unwritable places against ``cnnkit``.

Every case runs the real program (``python -m cnnkit``) in child processes on a tiny generated
Fashion-MNIST-format folder (or image folder), then checks what is on disk afterwards. A trial
"survives" when the program ended the documented way (exit code, one ``cnnkit: error:`` line
naming the path, no traceback) and nothing was lost or left behind:

- **kill -9** at a random moment of ``cnnkit train --deterministic``; then ``cnnkit train --resume``
  (or, when the kill came before the run's config.json existed, the same command again) must
  finish; every ``.safetensors`` in the run opens and fits its metadata, ``metrics.csv`` holds
  one row per epoch, no temp file is left, and the final weights equal an uninterrupted run's,
  bit for bit;
- **disk full / file too large**: ``RLIMIT_FSIZE`` in the child (SIGXFSZ ignored, so a write
  fails with EFBIG as on a full disk) while a checkpoint, an export, the dataset cache, metrics.csv
  or config.json is written, plus a real small tmpfs where this machine lets us mount one: exit 1
  and one line naming the file (the cache only warns), earlier files byte for byte intact, no
  temp files;
- **races**: two ``cnnkit train`` into one runs folder get their own run numbers; two loads
  filling one dataset cache entry both succeed and leave a valid entry;
- **changed ground** for ``--resume``: a truncated or hand-edited state, config or weights file,
  a changed dataset, an option that cannot change: the documented exit code (2, 3 or 4), one
  line, and the run directory byte for byte untouched;
- **unwritable places**: a read-only (immutable) data folder trains and is never written; an
  output path that cannot be created is exit 1 before training starts;
- **many files**: the time and peak memory of the first load of an image folder of tiny files.

    .venv/bin/python bench/faults.py                  # 30 kill trials, 3 of everything else
    .venv/bin/python bench/faults.py --kills 5 --trials 1 --files 2000    # a quick look
    .venv/bin/python bench/faults.py --out bench/results/faults.txt

``tests/test_faults.py`` runs a few trials of each case through the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cnnkit.testing import write_fashion_mnist_folder as write_idx_folder

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
"""Epochs of the runs that are killed (short: most of a trial is process start-up)."""


@dataclass
class Trial:
    """One trial's verdict: survived, or what went wrong."""

    ok: bool
    detail: str = ""


@dataclass
class Case:
    """A row of the table."""

    name: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def survived(self) -> int:
        return sum(t.ok for t in self.trials)


# -- data -----------------------------------------------------------------------------------------------------




def write_image_folder(
    root: Path, classes: tuple[str, ...] = ("a", "b", "c"), per_class: int = 12, side: int = 12
) -> Path:
    """``root/<class>/<i>.png``: grayscale images whose brightness tells the class."""
    import numpy as np
    from PIL import Image

    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((side, side), 40 + 80 * index + (i % 7), np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    return root


# -- running cnnkit ----------------------------------------------------------------------------------------


_LAUNCHER = """
import resource, signal, sys
limit, inject = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk

def squeeze():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

if inject == "metrics":  # the disk fills up just as metrics.csv is written
    from cnnkit.training.handlers import metrics
    original = metrics.MetricsCSV.write
    def write(self, run):
        squeeze()
        original(self, run)
    metrics.MetricsCSV.write = write
elif limit >= 0:
    squeeze()
sys.argv = ["cnnkit", *sys.argv[3:]]
from cnnkit.cli.app import main
main()
"""


class Workspace:
    """A scratch folder with the data, a cache and the environment every child runs in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"
        # 1,280 training examples: epochs long enough (a few tenths of a second) for kills to land
        # inside them, not only in start-up and exit.
        self.data = write_idx_folder(root / "fmnist", train=1280, test=160)
        self.env = {
            **os.environ,
            "CNNKIT_CACHE": str(self.cache),
            "CNNKIT_DISABLE_PLUGIN_AUTOLOAD": "1",
            "CNNKIT_DEBUG": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
        }
        self._counter = 0
        self._one_epoch: Path | None = None
        self._reference: Path | None = None
        self.reference_seconds = 0.0
        self.startup_seconds = 0.0
        """Seconds from the start of the uninterrupted run to its config.json."""
        self.last_save_seconds = 0.0
        """... to its last save (the final state.safetensors)."""

    def fresh(self, stem: str) -> Path:
        """A new, not yet existing path under the workspace."""
        self._counter += 1
        return self.root / f"{stem}-{self._counter}"

    def command(self, args: list[str], limit: int = -1, inject: str = "") -> list[str]:
        return [sys.executable, "-c", _LAUNCHER, str(limit), inject, *map(str, args)]

    def cnnkit(
        self, args: list[str], limit: int = -1, inject: str = "", timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cnnkit ARGS`` to the end (under a file-size limit in bytes when ``limit`` >= 0)."""
        return subprocess.run(
            self.command(args, limit, inject),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def start(self, args: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env
        )

    def train_args(
        self,
        out: Path | None,
        *extra: str,
        data: Path | None = None,
        epochs: int = EPOCHS,
        runs_dir: Path | None = None,
    ) -> list[str]:
        where = ["--out", str(out)] if out is not None else ["--runs-dir", str(runs_dir)]
        return ["train", "lenet_bn", "--data", str(data or self.data), "--input-size", "16", "--batch-size", "32",
                "--device", "cpu", "--deterministic", "--epochs", str(epochs), *where, "-q", *extra]  # fmt: skip

    def reference(self) -> Path:
        """An uninterrupted run (made once): what every killed-and-resumed run must end up equal to."""
        if self._reference is None:
            run = self.root / "reference"
            started, wall = time.monotonic(), time.time()
            process = self.start(self.train_args(run))
            _, stderr = process.communicate(timeout=300)
            self.reference_seconds = time.monotonic() - started
            if process.returncode != 0:
                raise RuntimeError(f"the reference run failed: {stderr}")
            self.startup_seconds = (run / "config.json").stat().st_mtime - wall
            self.last_save_seconds = (run / "state.safetensors").stat().st_mtime - wall
            self._reference = run
        return self._reference

    def one_epoch_run(self) -> Path:
        """A copy of a run that completed 1 of 2 epochs (the template is trained once)."""
        if self._one_epoch is None:
            run = self.root / "one-epoch"
            result = self.cnnkit(self.train_args(run, epochs=1))
            if result.returncode != 0:
                raise RuntimeError(f"the one-epoch run failed: {result.stderr}")
            self._one_epoch = run
        copy = self.fresh("run")
        shutil.copytree(self._one_epoch, copy)
        return copy


# -- checks ------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_files(folder: Path) -> list[str]:
    """Leftover temp files of interrupted atomic writes."""
    return [p.name for p in folder.rglob(".*.tmp")] if folder.exists() else []


def one_error_line(stderr: str, *needles: str) -> str:
    """ "" when stderr is exactly one ``cnnkit: error:`` line (besides warnings) holding every needle."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("cnnkit: error:")]
    if "Traceback" in stderr or len(errors) != 1 or any(not line.startswith("cnnkit: ") for line in lines):
        return f"not one error line: {stderr.strip()[-600:]!r}"
    missing = [n for n in needles if n not in errors[0]]
    return f"error line lacks {missing}: {errors[0]!r}" if missing else ""


def expect(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """ "" when the run exited ``code`` with one error line naming ``needles``, else what differed."""
    if result.returncode != code:
        return f"exit {result.returncode}, expected {code}: {result.stderr.strip()[-600:]!r}"
    return one_error_line(result.stderr, *needles)


def _tensors(path: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def complete_run_problems(run: Path, reference: Path | None, epochs: int = EPOCHS) -> list[str]:
    """What is wrong with a run that should have finished ``epochs`` epochs (empty: nothing)."""
    import torch

    from cnnkit.checkpoint import load_weights
    from cnnkit.rundir import STATE_NAME
    from cnnkit.training.state import load_state

    problems = [f"temp file left: {name}" for name in temp_files(run)]
    try:
        state = load_state(run / STATE_NAME)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return [*problems, f"state: {exc}"]
    if state.epoch != epochs or len(state.history) != epochs:
        problems.append(f"state holds epoch {state.epoch} with {len(state.history)} rows")
    for file in sorted(run.glob("*.safetensors")):
        if file.name == STATE_NAME:
            continue
        try:
            _, meta = load_weights(file)  # strict: the tensors fit the model the metadata describes
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{file.name}: {exc}")
            continue
        wanted = state.best_epoch if file.name == "best.safetensors" else epochs
        if meta.epoch != wanted:
            problems.append(f"{file.name} says epoch {meta.epoch}, expected {wanted}")
    with open(run / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = [int(row["epoch"]) for row in csv.DictReader(handle)]
    if rows != list(range(1, epochs + 1)):
        problems.append(f"metrics.csv epochs {rows}")
    if reference is not None:
        for name in ("best.safetensors", "last.safetensors"):
            ours, theirs = _tensors(run / name), _tensors(reference / name)
            if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):  # type: ignore[arg-type]
                problems.append(f"{name} differs from the uninterrupted run's")
    return problems


# -- 1. kill -9 --------------------------------------------------------------------------------------------


def kill_trial(ws: Workspace, delay: float, anchored: bool) -> Trial:
    """SIGKILL ``cnnkit train`` ``delay`` s after its start (``anchored``: after config.json appeared),
    recover the documented way, and check the finished run against the uninterrupted one."""
    reference = ws.reference()
    run = ws.fresh("killed")
    args = ws.train_args(run)
    process = ws.start(args)
    if anchored:
        deadline = time.monotonic() + 120
        while not (run / "config.json").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    time.sleep(delay)
    process.kill()
    process.communicate(timeout=60)
    had_config = (run / "config.json").exists()
    saved = _saved_epoch(run)
    if process.returncode == 0 or saved == EPOCHS:
        stage = "after the last save"
    else:
        stage = f"state at epoch {saved}" if saved else ("config, no state" if had_config else "no config")
    # A run killed before it wrote config.json holds nothing: the same command starts it again.
    recovery = ws.cnnkit(["train", "--resume", str(run), "-q"] if had_config else args)
    # A run whose last epoch was saved is complete: --resume says so (exit 2) and changes nothing.
    if recovery.returncode != 0 and not (saved == EPOCHS and "already trained" in recovery.stderr):
        return Trial(
            False, f"killed ({stage}) after {delay:.2f}s: recovery exit {recovery.returncode}: {recovery.stderr[-400:]}"
        )
    problems = complete_run_problems(run, reference)
    return Trial(not problems, f"killed ({stage}) after {delay:.2f}s: {'; '.join(problems) or 'ok'}")


def _saved_epoch(run: Path) -> int:
    """The epoch a run's state.safetensors holds (0: none, or unreadable)."""
    from cnnkit.training.state import load_state

    try:
        return load_state(run / "state.safetensors").epoch
    except Exception:  # noqa: BLE001 - a missing or damaged state is "nothing saved"
        return 0


def kill_delays(ws: Workspace, count: int, seed: int = 0) -> list[tuple[float, bool]]:
    """A fifth during start-up (before config.json), a fifth the moment config.json appears (no
    epoch saved yet), the rest from then to a little past the last save of the uninterrupted run
    (training, evaluation and every save in between)."""
    ws.reference()
    chance = random.Random(seed)
    training = max(ws.last_save_seconds - ws.startup_seconds, 0.2) * 1.1
    delays = []
    for i in range(count):
        if i % 5 == 0:
            delays.append((chance.uniform(0.2, max(ws.startup_seconds, 0.3)), False))
        elif i % 5 == 1:  # the moment config.json appears: a run with no epoch saved yet
            delays.append((0.0, True))
        else:
            delays.append((chance.uniform(0.0, training), True))
    return delays


# -- 2. disk full / file too large --------------------------------------------------------------------------


def full_disk_checkpoint(ws: Workspace) -> Trial:
    """Resume a 1-epoch run with files limited to 100 kB: the weights (180 kB) cannot be written."""
    run = ws.one_epoch_run()
    before = snapshot(run)
    cache_before = snapshot(ws.cache)
    result = ws.cnnkit(["train", "--resume", str(run), "--epochs", "2", "-q"], limit=100_000)
    problems = [expect(result, 1, "File too large", str(run))]
    after = snapshot(run)
    problems += [f"{name} changed" for name in ("best.safetensors", "last.safetensors", "state.safetensors")
                 if after.get(name) != before[name]]  # fmt: skip
    problems += [f"temp file left: {n}" for n in temp_files(run) + temp_files(ws.cache)]
    problems += ["the dataset cache changed"] if snapshot(ws.cache) != cache_before else []
    # Nothing lost: with room again, the same resume finishes the run.
    retry = ws.cnnkit(["train", "--resume", str(run), "--epochs", "2", "-q"])
    problems += (
        [f"resume after freeing space: exit {retry.returncode} {retry.stderr[-300:]}"] if retry.returncode else []
    )
    problems = [p for p in problems if p]
    return Trial(not problems, "; ".join(problems) or result.stderr.strip())


def full_disk_export(ws: Workspace) -> Trial:
    """``cnnkit export`` with files limited to 50 kB: exit 1 naming --out; nothing left behind."""
    run = ws.one_epoch_run()
    folder = ws.fresh("exports")
    folder.mkdir()
    out = folder / "model.safetensors"
    result = ws.cnnkit(["export", str(run), "--out", str(out)], limit=50_000)
    problems = [expect(result, 1, "File too large", str(out))]
    problems += [f"left in the output folder: {sorted(os.listdir(folder))}"] if os.listdir(folder) else []
    problems = [p for p in problems if p]
    return Trial(not problems, "; ".join(problems) or result.stderr.strip())


def full_disk_cache(ws: Workspace) -> Trial:
    """A first load whose cache entry (800 kB) exceeds a 600 kB limit: trains anyway, warns once."""
    data = write_idx_folder(ws.fresh("big-data"), train=1000, test=100)
    cache = ws.fresh("cache")
    env_cache = ws.env["CNNKIT_CACHE"]
    ws.env["CNNKIT_CACHE"] = str(cache)
    try:
        run = ws.fresh("run")
        result = ws.cnnkit(ws.train_args(run, data=data, epochs=1), limit=600_000)
    finally:
        ws.env["CNNKIT_CACHE"] = env_cache
    problems = []
    if result.returncode != 0:
        problems.append(f"exit {result.returncode}: {result.stderr[-400:]}")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("cnnkit: warning: could not cache")]
    if len(warnings) != 1 or "File too large" not in warnings[0]:
        problems.append(f"expected one cache warning: {result.stderr.strip()!r}")
    entries = list((cache / "decoded").glob("*")) if (cache / "decoded").exists() else []
    problems += [f"left in the cache: {[p.name for p in entries]}"] if entries else []
    return Trial(not problems, "; ".join(problems) or warnings[0])


def full_disk_metrics(ws: Workspace) -> Trial:
    """The disk fills just as metrics.csv of epoch 2 is written: exit 1 naming it, epoch 1 intact."""
    run = ws.one_epoch_run()
    before = snapshot(run)
    result = ws.cnnkit(["train", "--resume", str(run), "--epochs", "2", "-q"], limit=64, inject="metrics")
    problems = [expect(result, 1, "File too large", str(run / "metrics.csv"))]
    after = snapshot(run)
    problems += [f"{name} changed" for name in ("metrics.csv", "best.safetensors", "last.safetensors", "state.safetensors")
                 if after.get(name) != before[name]]  # fmt: skip
    problems += [f"temp file left: {n}" for n in temp_files(run)]
    problems = [p for p in problems if p]
    return Trial(not problems, "; ".join(problems) or result.stderr.strip())


def full_disk_at_start(ws: Workspace) -> Trial:
    """Files limited to 500 bytes: config.json cannot be written; exit 1, no run directory left."""
    run = ws.fresh("run")
    result = ws.cnnkit(ws.train_args(run), limit=500)
    problems = [expect(result, 1, "File too large", str(run / "config.json"))]
    problems += [f"{run} left behind: {os.listdir(run)}"] if run.exists() else []
    problems = [p for p in problems if p]
    return Trial(not problems, "; ".join(problems) or result.stderr.strip())


@contextlib.contextmanager
def small_tmpfs(kilobytes: int) -> Iterator[Path | None]:
    """A fresh tmpfs of ``kilobytes`` (None where mounting is not allowed), unmounted afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="cnnkit-tmpfs-"))
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(folder)], capture_output=True, check=False
        ).returncode
        == 0
        if shutil.which("mount")
        else False
    )
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            folder.rmdir()


def full_tmpfs(ws: Workspace) -> Trial | None:
    """Train onto a real 600 kB tmpfs (config, curves and the first weights fit, the state does not)."""
    with small_tmpfs(600) as mount:
        if mount is None:
            return None
        run = mount / "run"
        result = ws.cnnkit(ws.train_args(run))
        problems = [expect(result, 1, "No space left on device", str(mount))]
        problems += [f"temp file left: {n}" for n in temp_files(mount)]
        problems = [p for p in problems if p]
        return Trial(not problems, "; ".join(problems) or result.stderr.strip())


# -- 3. races ----------------------------------------------------------------------------------------------


def two_trains_one_runs_folder(ws: Workspace) -> Trial:
    """Two ``cnnkit train`` started together into one --runs-dir: runs 1 and 2, both complete."""
    runs = ws.fresh("runs")
    args = ws.train_args(None, epochs=1, runs_dir=runs)
    processes = [ws.start(args) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    problems = [f"exit {p.returncode}: {e[-300:]}" for p, e in zip(processes, errors, strict=True) if p.returncode]
    folder = runs / "lenet_bn-fashion-mnist"
    numbers = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    if numbers != ["1", "2"]:
        problems.append(f"run folders {numbers}")
    for number in numbers:
        recorded = json.loads((folder / number / "config.json").read_text())["config"]["out"]
        if Path(recorded) != folder / number:
            problems.append(f"run {number} records out {recorded}")
        problems += [f"run {number}: {p}" for p in complete_run_problems(folder / number, None, epochs=1)]
    return Trial(not problems, "; ".join(problems) or "runs 1 and 2")


_LOAD = """
import hashlib, sys
from cnnkit.data import load_dataset
splits = load_dataset("image-folder", sys.argv[1])
digest = hashlib.sha256()
for t in (splits.train.images, splits.train.labels, splits.test.images, splits.test.labels):
    digest.update(t.numpy().tobytes())
print(digest.hexdigest())
"""


def two_loads_one_cache(ws: Workspace) -> Trial:
    """Two processes decode one image folder into an empty cache at once: same tensors, valid entry."""
    data = write_image_folder(ws.fresh("images"), per_class=150)
    cache = ws.fresh("cache")
    env = {**ws.env, "CNNKIT_CACHE": str(cache)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _LOAD, str(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    problems = [
        f"exit {p.returncode}: {err[-300:]}" for p, (_, err) in zip(processes, outputs, strict=True) if p.returncode
    ]
    digests = {out.strip() for out, _ in outputs}
    entries = sorted((cache / "decoded").glob("*")) if (cache / "decoded").exists() else []
    if len(digests) != 1:
        problems.append(f"the two loads differ: {digests}")
    if len(entries) != 1:
        problems.append(f"cache holds {[p.name for p in entries]}")
    else:
        again = subprocess.run(
            [sys.executable, "-c", _LOAD, str(data)], capture_output=True, text=True, env=env, check=False
        )
        if again.stdout.strip() not in digests:
            problems.append("the cache entry does not reproduce the decoded data")
    return Trial(not problems, "; ".join(problems) or "both loads equal, one valid entry")


# -- 4. resume against changed ground ----------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_bytes(path: Path, old: bytes, new: bytes) -> None:
    """A hand edit of the JSON header in place (same length, so the file stays well-formed)."""
    raw = path.read_bytes()
    if old not in raw:
        raise RuntimeError(f"{old!r} not in {path}")
    path.write_bytes(raw.replace(old, new, 1))


def _edit_config(key: str, value: object) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        record = json.loads((run / "config.json").read_text())
        record["config"][key] = value
        (run / "config.json").write_text(json.dumps(record, indent=2))

    return edit


def _fewer_examples(ws: Workspace) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        data = Path(json.loads((run / "config.json").read_text())["config"]["data"])
        write_idx_folder(data, train=300, test=80)  # the same folder now holds other data

    return edit


DAMAGE: dict[str, tuple[Callable[[Workspace], Callable[[Path], None]], int, str, list[str]]] = {
    "truncated state.safetensors": (lambda ws: lambda run: _truncate(run / "state.safetensors"), 4,
                                    "state.safetensors", []),
    "hand-edited state (epoch)": (lambda ws: lambda run: _edit_bytes(run / "state.safetensors", b'\\"epoch\\": 1',
                                                                     b'\\"epoch\\": 7'), 4, "state.safetensors", []),
    "truncated last.safetensors": (lambda ws: lambda run: _truncate(run / "last.safetensors"), 4, "last.safetensors", []),
    "hand-edited last.safetensors (a class)": (lambda ws: lambda run: _edit_bytes(run / "last.safetensors",
                                               b"T-shirt/top", b"T-shirt/tap"), 4, "disagree about the classes", []),
    "truncated best.safetensors": (lambda ws: lambda run: _truncate(run / "best.safetensors"), 4, "best.safetensors", []),
    "truncated config.json": (lambda ws: lambda run: _truncate(run / "config.json"), 2, "config.json", []),
    "config.json edited to another model": (lambda ws: _edit_config("model", "lenet"), 4, "state.safetensors", []),
    "dataset changed (fewer examples)": (_fewer_examples, 3, "changed since", []),
    "another model on the command line": (lambda ws: lambda run: None, 2, "model cannot change", ["lenet"]),
}  # fmt: skip
"""case -> (damage to apply, expected exit code, text the error must hold, extra arguments)."""


def damaged_resume(ws: Workspace, case: str) -> Trial:
    """Damage a 1-epoch run as ``case`` says, resume it: the expected code, one line, nothing written."""
    make_damage, code, needle, extra = DAMAGE[case]
    run = ws.one_epoch_run()
    if case.startswith("dataset changed"):  # this run gets its own data folder to change
        data = write_idx_folder(ws.fresh("own-data"))
        run = ws.fresh("run")
        first = ws.cnnkit(ws.train_args(run, data=data, epochs=1))
        if first.returncode:
            return Trial(False, f"setup: {first.stderr[-300:]}")
    make_damage(ws)(run)
    before = snapshot(run)
    result = ws.cnnkit(["train", *extra, "--resume", str(run), "--epochs", "2", "-q"])
    problems = [expect(result, code, needle)]
    problems += ["the run directory was written"] if snapshot(run) != before else []
    problems = [p for p in problems if p]
    return Trial(not problems, "; ".join(problems) or result.stderr.strip())


def changed_classes(ws: Workspace) -> Trial:
    """An image-folder run whose class folder was renamed before --resume: exit 3, nothing written."""
    data = write_image_folder(ws.fresh("images"))
    run = ws.fresh("run")
    first = ws.cnnkit(["train", "lenet_bn", "--dataset", "image-folder", "--data", str(data), "--input-size", "16",
                       "--epochs", "1", "--device", "cpu", "--out", str(run), "-q"])  # fmt: skip
    if first.returncode:
        return Trial(False, f"setup: {first.stderr[-300:]}")
    (data / "c").rename(data / "z")
    before = snapshot(run)
    result = ws.cnnkit(["train", "--resume", str(run), "--epochs", "2", "-q"])
    problems = [expect(result, 3, "changed since", "classes [a, b, c] then, [a, b, z] now")]
    problems += ["the run directory was written"] if snapshot(run) != before else []
    problems = [p for p in problems if p]
    return Trial(not problems, "; ".join(problems) or result.stderr.strip())


# -- 5. read-only places -----------------------------------------------------------------------------------


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[str]:
    """Make ``folder`` and its files unwritable even for root (chattr +i, else a read-only bind
    mount, else chmod for non-root); yields how, or "" when none of them is possible here."""
    paths = [folder, *sorted(folder.rglob("*"))]
    how = ""
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True,
                                                  check=False).returncode == 0:  # fmt: skip
        how = "chattr +i"
    elif shutil.which("mount") and subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)],
                                                    capture_output=True, check=False).returncode == 0:  # fmt: skip
        how = "read-only bind mount"
    elif os.geteuid() != 0:
        for path in paths:
            path.chmod(0o555 if path.is_dir() else 0o444)
        how = "chmod a-w"
    try:
        yield how
    finally:
        if how == "chattr +i":
            subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True, check=False)
        elif how == "read-only bind mount":
            subprocess.run(["umount", str(folder)], capture_output=True, check=False)
        elif how:
            for path in paths:
                path.chmod(0o755 if path.is_dir() else 0o644)


def read_only_data(ws: Workspace) -> Trial | None:
    """Train from an immutable data folder: it works, and the folder is byte for byte unchanged."""
    data = write_idx_folder(ws.fresh("ro-data"))

    def state() -> tuple[dict[str, bytes], list[tuple[str, int]]]:
        return snapshot(data), sorted((p.name, p.stat().st_mtime_ns) for p in [data, *data.iterdir()])

    before = state()
    with immutable(data) as how:
        if not how:
            return None
        result = ws.cnnkit(ws.train_args(ws.fresh("run"), data=data, epochs=1))
    after = state()
    problems = [f"exit {result.returncode}: {result.stderr[-300:]}"] if result.returncode else []
    problems += ["the data folder changed"] if after != before else []
    return Trial(not problems, "; ".join(problems) or f"trained ({how})")


def unwritable_output(ws: Workspace, kind: str) -> Trial | None:
    """--runs-dir where nothing can be created: exit 1 naming it, before any epoch."""
    if kind == "parent is a file":
        blocker = ws.fresh("file")
        blocker.write_text("not a folder")
        runs, needle = blocker / "runs", str(blocker)
    elif kind == "under /proc":
        if not Path("/proc/self").exists():
            return None
        runs, needle = Path("/proc/cnnkit-runs"), "/proc/cnnkit-runs"
    else:  # an immutable runs folder
        runs = ws.fresh("runs")
        runs.mkdir()
        needle = str(runs)
    args = ws.train_args(None, epochs=1, runs_dir=runs)
    if kind == "immutable folder":
        with immutable(runs) as how:
            if not how:
                return None
            result = ws.cnnkit(args)
    else:
        result = ws.cnnkit(args)
    problems = [expect(result, 1, needle)]
    problems += ["an epoch was trained"] if "epoch" in result.stdout else []
    problems = [p for p in problems if p]
    return Trial(not problems, "; ".join(problems) or result.stderr.strip())


# -- 6. many files -----------------------------------------------------------------------------------------

_FIRST_LOAD = """
import resource, sys, time
started = time.perf_counter()
from cnnkit.data import load_dataset
splits = load_dataset("image-folder", sys.argv[1])
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{len(splits.train) + len(splits.test)} {seconds:.1f} {peak:.0f}")
"""


def many_files(ws: Workspace, count: int) -> str:
    """First load (decode and cache) of ``count`` 8x8 PNGs in 10 classes: "N images in S s, peak M MB"."""
    import numpy as np
    from PIL import Image

    root = ws.fresh("many")
    tile = np.zeros((8, 8), np.uint8)
    for i in range(count):
        folder = root / f"class{i % 10}"
        if i < 10:
            folder.mkdir(parents=True)
        tile[0, 0] = i % 251
        Image.fromarray(tile, mode="L").save(folder / f"{i}.png")
    env = {**ws.env, "CNNKIT_CACHE": str(ws.fresh("cache"))}
    result = subprocess.run([sys.executable, "-c", _FIRST_LOAD, str(root)], capture_output=True, text=True, env=env,
                            check=False, timeout=1800)  # fmt: skip
    if result.returncode:
        return f"failed: {result.stderr[-300:]}"
    images, seconds, peak = result.stdout.split()
    shutil.rmtree(root)
    return f"{int(images):,} images loaded in {seconds} s (decode, split and cache write), peak RSS {peak} MB"


# -- the table ---------------------------------------------------------------------------------------------


def run_all(
    ws: Workspace, kills: int, trials: int, files: int, progress: Callable[[str], None]
) -> tuple[list[Case], list[str]]:
    cases: list[Case] = []
    notes: list[str] = []

    def record(name: str, make: Callable[[], Trial | None], count: int) -> None:
        case = Case(name)
        for _ in range(count):
            trial = make()
            if trial is None:
                notes.append(f"{name}: skipped (not possible on this machine)")
                return
            case.trials.append(trial)
            if not trial.ok:
                notes.append(f"{name}: FAILED: {trial.detail}")
        cases.append(case)
        progress(f"{name}: {case.survived}/{len(case.trials)}")

    kill_case = Case(f"kill -9 during train ({EPOCHS} epochs), then --resume")
    for delay, anchored in kill_delays(ws, kills):
        trial = kill_trial(ws, delay, anchored)
        kill_case.trials.append(trial)
        if not trial.ok:
            notes.append(f"kill: FAILED: {trial.detail}")
    cases.append(kill_case)
    stages: dict[str, int] = {}
    for trial in kill_case.trials:
        stage = trial.detail.split("(", 1)[1].split(")", 1)[0]
        stages[stage] = stages.get(stage, 0) + 1
    notes.append(
        f"kill trials by where the kill landed: {', '.join(f'{k}: {v}' for k, v in sorted(stages.items()))} "
        f"(uninterrupted run: config.json after {ws.startup_seconds:.1f} s, last save after "
        f"{ws.last_save_seconds:.1f} s, exit after {ws.reference_seconds:.1f} s)"
    )
    progress(f"kill: {kill_case.survived}/{len(kill_case.trials)}")
    record("disk full: checkpoint (best/last/state)", lambda: full_disk_checkpoint(ws), trials)
    record("disk full: export --out", lambda: full_disk_export(ws), trials)
    record("disk full: dataset cache (warns, trains)", lambda: full_disk_cache(ws), trials)
    record("disk full: metrics.csv", lambda: full_disk_metrics(ws), trials)
    record("disk full: config.json at start", lambda: full_disk_at_start(ws), trials)
    record("disk full: real 600 kB tmpfs", lambda: full_tmpfs(ws), 1)
    record("two trains into one runs folder", lambda: two_trains_one_runs_folder(ws), trials)
    record("two loads filling one cache entry", lambda: two_loads_one_cache(ws), trials)
    for case in DAMAGE:
        record(f"resume: {case}", lambda case=case: damaged_resume(ws, case), trials)  # type: ignore[misc]
    record("resume: dataset changed (class renamed)", lambda: changed_classes(ws), trials)
    record("read-only (immutable) data folder", lambda: read_only_data(ws), trials)
    for kind in ("parent is a file", "under /proc", "immutable folder"):
        record(f"unwritable --runs-dir ({kind})", lambda kind=kind: unwritable_output(ws, kind), trials)  # type: ignore[misc]
    if files:
        line = many_files(ws, files)
        notes.append(f"many files: {line}")
        progress(line)
    return cases, notes


def table(cases: list[Case]) -> str:
    width = max(len(c.name) for c in cases)
    lines = [f"{'case':<{width}}  trials  survived", f"{'-' * width}  ------  --------"]
    lines += [f"{c.name:<{width}}  {len(c.trials):>6}  {c.survived:>8}" for c in cases]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="kill -9 trials (default 30)")
    parser.add_argument("--trials", type=int, default=3, help="trials of every other case (default 3)")
    parser.add_argument("--files", type=int, default=50_000, help="tiny images for the first-load figure (0: skip)")
    parser.add_argument("--out", type=Path, help="also write the table and notes to this file")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cnnkit-faults-") as scratch:
        ws = Workspace(Path(scratch))
        cases, notes = run_all(
            ws, args.kills, args.trials, args.files, lambda line: print(line, file=sys.stderr, flush=True)
        )
    import platform

    import torch

    report = (
        f"bench/faults.py --kills {args.kills} --trials {args.trials} --files {args.files}  "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {'root' if os.geteuid() == 0 else 'not root'}; {time.monotonic() - started:.0f} s)\n\n"
        f"{table(cases)}\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    )
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    if any(c.survived != len(c.trials) for c in cases):
        sys.exit(1)


if __name__ == "__main__":
    main()
