"""``make gpu-wheels``: the wheels ``make gpu-check GPU_PYTHON=...`` installs on a machine that reaches
no package registry, downloaded into ``.gpu-wheels/`` (ignored by git) where one is reachable.

    python scripts/gpu_wheels.py                 # -> .gpu-wheels/ (at most 40 MiB), with MANIFEST.txt
    python scripts/gpu_wheels.py --out DIR

Nothing here is a hand-kept list of wheels. The rule, for each target Python:

1. **What cnnkit needs** is read from ``pyproject.toml``: ``[project] dependencies``, the extras the
   target gets (``onnx``, ``test``: part (a) of the check runs pytest), ``[build-system] requires``
   (cnnkit is installed without build isolation, so setuptools must be there) and pip itself (a
   Python without pip, or a Debian one without ensurepip, can still install: pip runs from its wheel).
2. **pip resolves it** for that target (``pip install --dry-run --ignore-installed --report``, with
   ``--python-version/--platform/--abi --only-binary=:all:`` for the GPU target): every distribution
   and its exact version, transitive dependencies included. torch and torchvision are left out of
   this resolution (fetching the metadata of torch's CUDA wheels alone takes minutes): every target
   has them.
3. **What the target already has is dropped**: torch, torchvision and their own dependencies (the
   closure of the requirements of the torch and torchvision installed in the Python running this
   script, evaluated for the target: numpy, pillow, sympy, jinja2, ...), plus, for the GPU machines,
   the packages issue 22 lists on their Python (``GPU_PYTHON_HAS``), and OpenCV on every target
   (``OPENCV``: its wheel alone is over the limit). Only those names are assumed:
   their own dependencies are not (their versions there are unknown), so for instance matplotlib's
   kiwisolver is downloaded and pip skips it where it is installed.
4. **Kept anyway**: the build requirements and pip (the target's may be too old), and the
   pure-Python wheel of an assumed package that a downloaded one needs at a minimum version (e.g.
   pydantic's ``typing-extensions>=4.16``: torch 2.11 asks only for 4.10).

Targets: CPython 3.12 on manylinux x86_64 (the GPU machines), and the Python running this script
(for the CPU simulation in tests/test_gpu_check.py, a Python with only torch and torchvision). The
``onnx`` extra is resolved for the GPU target only: there onnx and onnxruntime are installed, so it
costs nothing; for this machine's Python their wheels (onnxruntime alone is 28 MB) would not fit the
40 MiB, and the dry run does not use them. Every downloaded distribution's requirements are checked,
with the target's markers, to be downloaded or assumed (pip evaluates markers for the running
Python even under ``--python-version``; the check catches what that would miss).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always has a copy
    from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".gpu-wheels"
LIMIT_BYTES = 40 * 2**20
MANIFEST = "MANIFEST.txt"

# Issue 22: "What their Python (3.12) has: torch 2.11, torchvision 0.26, typer, rich, safetensors,
# matplotlib, pillow, onnx, onnxruntime, onnxscript, lightning and pytest, but not pydantic or
# entrypoints." A fact about those machines, not a list of what to download.
GPU_PYTHON_HAS = ("torch", "torchvision", "typer", "rich", "safetensors", "matplotlib", "pillow", "onnx",
                  "onnxruntime", "onnxscript", "lightning", "pytest")  # fmt: skip
TORCH = ("torch", "torchvision")
# OpenCV's wheel (62 MB) alone is over the limit, so both targets are assumed to have it: the GPU
# machines' image does (device KINDS.md lists opencv-python-headless), and the torch-only Python of
# tests/test_gpu_check.py links this machine's copy beside torch's.
OPENCV = ("opencv-python-headless",)
GPU_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux_2_5_x86_64", "manylinux1_x86_64")  # fmt: skip


@dataclass
class Target:
    name: str
    python: str
    """X.Y"""
    pip_args: list[str]
    """How pip is told the target (empty: the running interpreter)."""
    has: tuple[str, ...]
    extras: tuple[str, ...]
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)
    """canonical name -> the report's entry."""
    files: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)


def targets() -> list[Target]:
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    gpu_args = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary=:all:"]
    gpu_args += [arg for plat in GPU_PLATFORMS for arg in ("--platform", plat)]
    tag = f"{sys.implementation.name} {here} {sysconfig.get_platform()}"
    return [
        Target("gpu (CPython 3.12, manylinux x86_64)", "3.12", gpu_args, TORCH + GPU_PYTHON_HAS + OPENCV,
               ("onnx", "test")),  # fmt: skip
        Target(f"this machine ({tag})", here, ["--only-binary=:all:"], TORCH + OPENCV, ("test",)),
    ]


def project_requirements(extras: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(what cnnkit needs at run time with ``extras``, what building it needs), from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    runtime = list(project["project"]["dependencies"])
    for extra in extras:
        runtime += project["project"]["optional-dependencies"][extra]
    return runtime, list(project["build-system"]["requires"]) + ["pip"]


def marker_environment(python: str) -> dict[str, str]:
    """The running interpreter's marker values, with the target's Python version."""
    env = dict(default_environment())
    if python != env["python_version"]:
        env.update(python_version=python, python_full_version=f"{python}.0", implementation_version=f"{python}.0")
    return env


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+ " + " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def resolve(target: Target, requirements: list[str], work: Path) -> None:
    report = work / f"report-{target.python}.json"
    wanted = [r for r in requirements if canonicalize_name(Requirement(r).name) not in TORCH]
    pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *target.pip_args, *wanted)
    for item in json.loads(report.read_text(encoding="utf-8"))["install"]:
        target.resolved[canonicalize_name(item["metadata"]["name"])] = item


def requires(name: str, target: Target) -> list[str]:
    """A distribution's requirements: from the resolution, else as installed here, else none known."""
    if name in target.resolved:
        return list(target.resolved[name]["metadata"].get("requires_dist") or [])
    try:
        return list(metadata.requires(name) or [])
    except metadata.PackageNotFoundError:
        return []


def applies(requirement: Requirement, env: dict[str, str], extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**env, "extra": extra}) for extra in (extras or {""}))


def closure(roots: tuple[str, ...], target: Target, env: dict[str, str]) -> set[str]:
    """``roots`` and, for torch and torchvision, everything their requirements reach."""
    seen = {canonicalize_name(root) for root in roots}
    todo = [canonicalize_name(name) for name in TORCH]
    for name in TORCH:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"gpu-wheels: {name} is not installed in {sys.executable}; its dependencies are read from it")
    while todo:
        for line in requires(todo.pop(), target):
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            if applies(requirement, env, set()) and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def choose(target: Target, build: list[str]) -> dict[str, str]:
    """name -> pinned requirement of what to download for ``target`` (rules 3 and 4)."""
    env = marker_environment(target.python)
    assumed = closure(target.has, target, env)
    always = {canonicalize_name(Requirement(r).name) for r in build}
    chosen = {name for name in target.resolved if name not in assumed or name in always}
    # Rule 4: an assumed package that a chosen one needs at a minimum version, when pure Python.
    for name in sorted(chosen):
        for line in requires(name, target):
            requirement = Requirement(line)
            dep = canonicalize_name(requirement.name)
            if (dep in assumed and dep in target.resolved and dep not in chosen and applies(requirement, env, set())
                    and any(spec.operator in (">=", ">", "==", "~=") for spec in requirement.specifier)
                    and target.resolved[dep]["download_info"]["url"].endswith("-none-any.whl")):  # fmt: skip
                chosen.add(dep)
    # Every chosen distribution's requirements must be chosen or assumed, for the target's markers.
    missing = []
    for name in sorted(chosen):
        extras = set(_requested_extras(name, target))
        for line in requires(name, target):
            requirement = Requirement(line)
            dep = canonicalize_name(requirement.name)
            if applies(requirement, env, extras) and dep not in chosen and dep not in assumed:
                missing.append(f"{name} needs {requirement} (not resolved for Python {target.python})")
    if missing:
        raise SystemExit("gpu-wheels: the resolution misses requirements:\n  " + "\n  ".join(missing))
    target.assumed = sorted(assumed & set(target.resolved) - chosen)
    return {name: f"{target.resolved[name]['metadata']['name']}=={target.resolved[name]['metadata']['version']}"
            for name in sorted(chosen)}  # fmt: skip


def _requested_extras(name: str, target: Target) -> list[str]:
    """Extras pip resolved ``name`` with (none for cnnkit's current requirements; kept general)."""
    return list(target.resolved[name].get("requested_extras") or [])


def download(target: Target, pins: dict[str, str], out: Path, old: Path | None) -> None:
    """Download ``pins`` into ``out`` (taking any already in ``old``); their file names into ``target.files``."""
    from urllib.parse import unquote

    before = set(os.listdir(out))
    links = ["--find-links", str(old)] if old is not None and old.is_dir() else []
    pip("download", "--quiet", "--no-deps", "--dest", str(out), *links, *target.pip_args, *pins.values())
    after = set(os.listdir(out))
    wanted = {unquote(target.resolved[name]["download_info"]["url"].rsplit("/", 1)[-1]) for name in pins}
    target.files = sorted((after - before) | (wanted & after))


def size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.2f} MiB"


def write_manifest(out: Path, chosen: list[Target], total: int) -> None:
    lines = [
        "Wheels for `make gpu-check GPU_PYTHON=...` on a machine without a package registry.",
        f"Made by scripts/gpu_wheels.py (make gpu-wheels) with {sys.executable} (Python {platform.python_version()}).",
        "The rule is in that script's docstring; these are its results.",
        "",
    ]
    for target in chosen:
        lines += [f"## {target.name}", f"assumed there (not downloaded): {', '.join(target.assumed) or '-'}",
                  f"extras: {', '.join(target.extras)}", "files:"]  # fmt: skip
        lines += [f"  {name}  ({size(out / name)})" for name in target.files]
        lines.append("")
    lines.append(f"total: {total / 2**20:.2f} MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    (out / MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder (replaced whole; default .gpu-wheels)")
    parser.add_argument("--only-here", action="store_true", help="only this machine's Python (no GPU target)")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    chosen = targets()[1:] if args.only_here else targets()
    new = out.with_name(out.name + ".new")  # beside it, so that the swap is a rename
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as work:
        for target in chosen:
            runtime, build = project_requirements(target.extras)
            print(f"gpu-wheels: {target.name}", flush=True)
            resolve(target, runtime + build, Path(work))
            download(target, choose(target, build), new, out)
    total = sum(path.stat().st_size for path in new.glob("*.whl"))
    write_manifest(new, chosen, total)
    shutil.rmtree(out, ignore_errors=True)
    new.rename(out)
    print((out / MANIFEST).read_text(encoding="utf-8"), end="")
    if total > LIMIT_BYTES:
        print(f"gpu-wheels: {total / 2**20:.1f} MiB is over the {LIMIT_BYTES / 2**20:.0f} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
