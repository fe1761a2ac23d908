"""``make gpu-check`` (scripts/gpu_check.py): its CPU dry run end to end, its time limits, its plan;
and ``make gpu-check GPU_PYTHON=...`` (scripts/gpu_env.py) on a simulated GPU machine's Python."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
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
    from cnnkit.registry import MODELS

    side = MODELS.get("lenet_bn").recipe.on("fashion-mnist").input_size  # the loop runs the recipe's size
    assert re.search(rf"\| `lenet_bn` \| {side} \| 128 \| None \| [\d,]+ \| [\d,]+ \| \d\.\d{{3}} \| n/a \| n/a \|", report)
    assert re.search(r"## \(c\) cnnkit train lenet_bn .*\n\nEnd to end .*\*\*[\d.]+ s\*\* wall; .*(test|val) accuracy 0\.\d{4}", report)
    assert re.search(r"\| `lenet_bn` \| 0\.100 \| \*\*0\.\d{4}\*\* \|", report)
    assert re.search(rf"\| `lenet_bn` \| {side} \| .* \| \d+\.\d% \| \d+\.\d% \|", report)  # MFU, cnnkit and bare
    assert "MFU = ex/s x 3 x forward FLOPs per image" in report
    assert len(re.findall(r"\| (on|off) \| (on|off) \| [\d,]+ \| [\d.]+x \| \d+\.\d% \|", report)) == 4
    assert re.search(r"## \(e\) bench/peers.py on cpu.*\n\n(ok in|not measured: bench/peers.py not present|"
                     r"not measured: Lightning is not installed)", report)  # fmt: skip
    assert re.search(r"## \(f\) Image store throughput.*\n\n(ok in|not measured: the image store \(the folder issue\) "
                     r"does not exist)", report)  # fmt: skip
    # Every part that ran shows its exact commands, as run from the checkout.
    assert report.count("Commands (from the checkout):") >= 5
    assert "-m cnnkit train lenet_bn --device cpu" in report and "--no-amp --no-channels-last" in report
    assert report.rstrip().endswith("every part ran as expected.")
    # Each part printed its figures as it finished, in order, before the next began.
    parts = "abcdefg"
    heads = [out.index(f"## ({part})") for part in parts]
    assert heads == sorted(heads)
    for head, part in zip(heads, parts[1:]):
        if f"== ({part})" in out:
            assert head < out.index(f"== ({part})")
    path.unlink()
    path.parent.rmdir()


@pytest.mark.slow
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
    for part in ("(a) pytest", "(c) cnnkit train"):
        assert re.search(rf"## {re.escape(part)}.*\n\nnot run: out of time", report)
    assert "lenet_bn: not run: out of time" in report and "`lenet_bn`: not started, out of time" in report
    assert len(re.findall(r"- AMP o(n|ff), channels-last o(n|ff): not run: out of time", report)) == 4  # (d)
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


def _torch_only_python(folder: Path) -> Path:
    """A virtual environment (no pip) whose site-packages hold exactly torch, torchvision, OpenCV (the
    GPU machines' image has it too: scripts/gpu_wheels.py's OPENCV) and their dependencies: links to
    this interpreter's installed copies, so it takes seconds, not the 4 GB install of a CUDA torch
    (the CPU torch wheel on this machine's disk has no matching torchvision)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    dists = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    if "torch" not in dists or "torchvision" not in dists:
        pytest.skip(f"{sys.executable} has no installed torch and torchvision to link a torch-only Python to")
    wanted, todo = set(), [("torch", ()), ("torchvision", ()), ("opencv-python-headless", ())]
    while todo:
        name, extras = todo.pop()
        dist = dists.get(canonicalize_name(name))
        if dist is None or (canonicalize_name(name), extras) in wanted:
            continue
        wanted.add((canonicalize_name(name), extras))
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or ("",))):
                todo.append((req.name, tuple(sorted(req.extras))))
    names = {name for name, _ in wanted}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = next(folder.glob("lib/python*/site-packages"))
    for name in sorted(names):
        dist = dists[name]
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")} - {"__pycache__"}
        for top in tops:
            if not (site / top).exists():
                (site / top).symlink_to(Path(str(dist.locate_file(top))))
    return folder / "bin" / "python"


def _freeze(python: Path) -> str:
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "freeze", "--all"], check=True,
                          capture_output=True, text=True, env={**os.environ, "PIP_NO_INDEX": "1"}).stdout  # fmt: skip


@pytest.mark.slow
def test_make_gpu_check_with_a_torch_only_python_and_no_index(tmp_path: Path) -> None:
    """The GPU machine simulated: a Python with only torch and torchvision, PIP_NO_INDEX=1, no pip
    configuration; `make gpu-check GPU_PYTHON=...` installs from the wheels only, passes its dry run,
    and leaves that Python as it was."""
    wheels = ROOT / ".gpu-wheels"
    if not any(wheels.glob("*.whl")):  # not made yet: this machine's share of them, here
        wheels = tmp_path / "wheels"
        made = subprocess.run([sys.executable, "scripts/gpu_wheels.py", "--only-here", "--out", str(wheels)], cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        if made.returncode != 0:
            pytest.skip(f"no .gpu-wheels and `make gpu-wheels` failed here (a registry is needed): {made.stderr[-300:]}")
    python = _torch_only_python(tmp_path / "torch-only")
    site = next((tmp_path / "torch-only").glob("lib/python*/site-packages"))
    before, entries = _freeze(python), sorted(os.listdir(site))
    assert "torch==" in before and "torchvision==" in before and "pydantic" not in before and "cnnkit" not in before

    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "CNNKIT_GPU_CHECK"))}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    report = tmp_path / "report.md"
    venv = tmp_path / "gpu-venv"
    make = [shutil.which("make") or "make", "--no-print-directory", "gpu-check", f"GPU_PYTHON={python}",
            f"GPU_VENV={venv}", f"GPU_WHEELS={wheels}", f"VENV={tmp_path / 'no-venv'}",
            f"GPU_CHECK_ARGS=--dry-run --out {report}"]  # fmt: skip
    proc = subprocess.run(make, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    text = report.read_text()
    assert text.startswith("# cnnkit GPU check (CPU dry run)")
    assert "## Setup (scripts/gpu_env.py: no package index, nothing installed into that Python)" in text
    assert re.search(r"Installed there from .*with `--no-index`: .*pydantic==", text)
    assert f"from {site}" in text  # its own torch, from that Python's site-packages
    assert "--no-deps --no-build-isolation --editable" in text and "--no-index --find-links" in text
    assert text.rstrip().endswith("every part ran as expected.")
    assert not (tmp_path / "no-venv").exists()  # the pip-built .venv path was never taken
    assert _freeze(python) == before and sorted(os.listdir(site)) == entries  # that Python is as it was
