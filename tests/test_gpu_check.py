"""``make gpu-check`` (scripts/gpu_check.py): its CPU dry run end to end, its time limits, its plan."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _stat(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else None


@pytest.mark.slow
def test_dry_run_runs_every_part_and_reports_to_a_temporary_file(
    gpu_check: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _stat(gpu_check.DEFAULT_REPORT)
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    path = Path(re.search(r"report -> (\S+)", out).group(1))  # type: ignore[union-attr]
    assert path.is_relative_to(tempfile.gettempdir()) and path != gpu_check.DEFAULT_REPORT
    assert _stat(gpu_check.DEFAULT_REPORT) == before  # the GPU figures are never overwritten by a dry run
    report = path.read_text()
    assert report.startswith("# cnnkit GPU check (CPU dry run)") and "none of these figures are GPU figures" in report
    assert re.search(r"## \(a\) pytest -m cuda tests/test_cuda.py\n\n\*\*\d+ skipped", report)
    assert re.search(r"\| `lenet_bn` \| 28 \| 128 \| None \| [\d,]+ \| [\d,]+ \| \d\.\d{3} \| n/a \| n/a \|", report)
    assert re.search(r"## \(c\) cnnkit train lenet_bn .*\n\nEnd to end .*\*\*[\d.]+ s\*\* wall; .*test accuracy 0\.\d{4}", report)
    assert re.search(r"\| `lenet_bn` \| 0\.100 \| \*\*0\.\d{4}\*\* \|", report)
    assert report.rstrip().endswith("every part ran as expected.")
    # Each part printed its figures as it finished, in order, before the next began.
    heads = [out.index(f"## ({part})") for part in "abcd"]
    starts = [out.index(f"== ({part})") for part in "abcd"]
    assert heads == sorted(heads) and all(head < start for head, start in zip(heads, starts[1:]))
    path.unlink()
    path.parent.rmdir()


def test_a_part_past_its_limit_is_stopped_with_what_it_started(gpu_check: ModuleType) -> None:
    # The part starts a grandchild; the limit must stop both (the whole process group).
    code = (
        "import subprocess, sys, time; child = subprocess.Popen(['sleep', '60']); "
        "print('grandchild', child.pid, flush=True); time.sleep(60)"
    )
    started = time.monotonic()
    result = gpu_check.run_step([sys.executable, "-c", code], limit=3)
    assert time.monotonic() - started < 20
    assert result.timed_out and not result.ok and result.status() == "stopped at its time limit (3 s)"
    grandchild = int(result.lines[0].split()[1])
    time.sleep(0.2)
    assert not _running(grandchild)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait a while for a reaper)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and re.search(r"^State:\s+Z", status.read_text(), re.M))


def test_out_of_time_parts_are_reported_not_started(gpu_check: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    assert gpu_check.main(["--dry-run", "--budget", "5", "--out", str(out)]) == 1  # nothing could run
    report = out.read_text()
    assert report.count("not run: out of time") == 3 and "`lenet_bn`: not started, out of time" in report
    assert "problems in: tests, loop, train" in report


def test_report_goes_where_asked(gpu_check: ModuleType, tmp_path: Path) -> None:
    assert gpu_check.report_path(str(tmp_path / "r.md"), dry_run=True) == tmp_path / "r.md"
    assert gpu_check.report_path(None, dry_run=False) == ROOT / "bench" / "results" / "gpu-check.md"
    assert gpu_check.report_path(None, dry_run=True).is_relative_to(tempfile.gettempdir())


def test_the_gpu_plan_measures_what_the_issue_asks(gpu_check: ModuleType) -> None:
    plan = gpu_check.gpu_settings(Path("/data/fashion-mnist"))
    assert plan.device == "cuda" and plan.tests == ["tests"]
    assert plan.loop_runs == [("resnet18", []), ("googlenet", []), ("vgg11", ["width=0.25"])]
    assert plan.train_args[:3] == ["vgg11", "-o", "width=0.25"]
    targets = {model: target for model, _, target in plan.accuracy_runs}
    assert targets == {"alexnet": 0.882, "vgg11": 0.922, "nin": 0.785, "googlenet": 0.883, "resnet18": 0.918,
                       "densenet": 0.821}  # fmt: skip
    assert plan.accuracy_epochs == 10 and dict((m, o) for m, o, _ in plan.accuracy_runs)["vgg11"] == ["width=0.25"]
