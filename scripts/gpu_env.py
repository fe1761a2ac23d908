"""``make gpu-check GPU_PYTHON=python3``: run the GPU check with a Python that has torch, offline.

    GPU_PYTHON scripts/gpu_env.py [--venv .gpu-venv] [--wheels .gpu-wheels] [-- scripts/gpu_check.py ARGS]

Run by that Python itself (this script needs only the standard library), it

1. makes ``--venv`` (default ``.gpu-venv``, ignored by git) a virtual environment of that Python
   which sees exactly what that Python sees: a ``.pth`` file adds that Python's own site folders
   (``site.addsitedir``, so their ``.pth`` files work too). That is ``--system-site-packages``
   made to work also when that Python is itself a virtual environment (whose packages a
   ``--system-site-packages`` venv made from it would not see);
2. installs there, with pip run from the pip wheel in ``--wheels`` (or that Python's own pip),
   ``--no-index --find-links WHEELS`` and no pip configuration (``PIP_CONFIG_FILE=/dev/null``),
   so that no registry is ever contacted: what cnnkit needs at run time and for its tests, the
   ``onnx`` extra if its wheels or packages are there, then cnnkit itself (editable, no
   dependencies, no build isolation; setuptools from the wheels in a folder used only for that
   build). pip takes from the wheels only what that Python lacks: its torch, torchvision and
   everything else it has are used as they are, and nothing is ever installed into it;
3. writes what it did (each exact command, what was installed, its time) to
   ``VENV/cnnkit-gpu-setup.json`` for the report, and runs the rest of the command line with the
   environment's Python (``exec``), with ``CNNKIT_GPU_CHECK_T0`` set to when this began, so that
   the check's own time budget counts the setup too.

A venv made before for the same Python, wheels and pyproject.toml is reused (a rerun on a still
warm machine skips the setup). Wheels come from ``make gpu-wheels``, run where a registry is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETUP_FILE = "cnnkit-gpu-setup.json"
PTH_FILE = "_cnnkit_gpu_python.pth"
STEP_LIMIT = 180.0
"""Seconds one pip command may take (the whole setup is normally 10-30 s)."""


def say(text: str) -> None:
    print(f"gpu-env: {text}", flush=True)


def site_folders() -> list[str]:
    """This Python's import folders beyond its standard library and this script's folder."""
    paths = sysconfig.get_paths()
    stdlib = {os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib")}
    here = os.path.realpath(os.path.dirname(__file__))
    found = []
    for entry in sys.path:
        real = os.path.realpath(entry) if entry else ""
        if not real or not os.path.isdir(real) or real == here or real in found:
            continue
        if any(real == lib or real.startswith(lib + os.sep) for lib in stdlib) and "-packages" not in real:
            continue
        found.append(real)
    return found


def fingerprint(wheels: Path, folders: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(os.path.realpath(sys.executable).encode())
    digest.update(sys.version.encode())
    digest.update("\n".join(folders).encode())
    digest.update((ROOT / "pyproject.toml").read_bytes())
    digest.update(Path(__file__).read_bytes())
    for wheel in sorted(wheels.glob("*.whl")):
        digest.update(f"{wheel.name}:{wheel.stat().st_size}".encode())
    return digest.hexdigest()


def requirements() -> tuple[list[str], list[str], list[str]]:
    """(run time and tests, the onnx extra, the build), from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = project["project"]["optional-dependencies"]
    return (list(project["project"]["dependencies"]) + list(extras.get("test", [])), list(extras.get("onnx", [])),
            list(project["build-system"]["requires"]))  # fmt: skip


def pip_env() -> dict[str, str]:
    """No pip configuration at all (no file, no PIP_* variable): the command line alone decides."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


class Setup:
    def __init__(self, venv: Path, wheels: Path) -> None:
        self.venv, self.wheels = venv, wheels
        self.python = venv / "bin" / "python"
        self.commands: list[dict[str, Any]] = []

    def run(self, argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        shown = " ".join(shlex.quote(_short(arg)) for arg in argv)
        say(f"+ {shown}")
        started = time.perf_counter()
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=STEP_LIMIT)
        except subprocess.TimeoutExpired:
            self.commands.append({"command": shown, "status": f"stopped at its limit ({STEP_LIMIT:.0f} s)"})
            raise SystemExit(f"gpu-env: `{shown}` took over {STEP_LIMIT:.0f} s")
        seconds = time.perf_counter() - started
        output = (proc.stdout + proc.stderr).strip()
        self.commands.append({"command": shown, "status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}",
                              "seconds": round(seconds, 1), "tail": output.splitlines()[-6:]})  # fmt: skip
        if output:
            print("\n".join("    " + line for line in output.splitlines()[-15:]), flush=True)
        if check and proc.returncode != 0:
            raise SystemExit(f"gpu-env: `{shown}` failed (exit {proc.returncode})")
        return proc

    def pip(self) -> list[str]:
        wheel = sorted(self.wheels.glob("pip-*.whl"))
        if wheel:  # pip runs from its own wheel: no pip needed in that Python
            return [str(self.python), str(wheel[-1] / "pip")]
        return [str(self.python), "-m", "pip"]

    def make(self, folders: list[str]) -> None:
        shutil.rmtree(self.venv, ignore_errors=True)
        self.run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)])
        site = self.run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
        # One line, executed at start-up: this Python's folders after the venv's own (and their .pth files).
        line = f"import site; list(map(site.addsitedir, {folders!r}))\n"
        (Path(site) / PTH_FILE).write_text(line, encoding="utf-8")
        self.commands.append({"command": f"write {_short(site)}/{PTH_FILE}: {line.strip()}", "status": "ok"})

    def install(self) -> dict[str, Any]:
        runtime, onnx, build = requirements()
        pip = [*self.pip(), "install", "--no-index", "--find-links", str(self.wheels), "--no-warn-script-location"]
        env = pip_env()
        before = self.installed()
        self.run([*pip, "--only-binary=:all:", *runtime], env)
        onnx_note = "installed (or already there)"
        if onnx and self.run([*pip, "--only-binary=:all:", *onnx], env, check=False).returncode != 0:
            onnx_note = "not installed: neither its packages nor wheels for them are here (the ONNX tests skip)"
        build_dir = self.venv / "cnnkit-build-requirements"
        shutil.rmtree(build_dir, ignore_errors=True)
        self.run([*pip, "--only-binary=:all:", "--target", str(build_dir), *build], env)
        self.run([*pip, "--no-deps", "--no-build-isolation", "--editable", str(ROOT)], {**env, "PYTHONPATH": str(build_dir)})
        shutil.rmtree(build_dir, ignore_errors=True)
        added = sorted(set(self.installed()) - set(before))
        return {"installed": added, "onnx extra": onnx_note}

    def installed(self) -> list[str]:
        site = next(self.venv.glob("lib/python*/site-packages"), None)
        if site is None:
            return []
        names = []
        for info in site.glob("*.dist-info"):
            dist = metadata.Distribution.at(info)
            names.append(f"{dist.metadata['Name']}=={dist.version}")
        return sorted(names, key=str.lower)

    def verify(self) -> dict[str, str]:
        code = (
            "import json, torch, torchvision, cnnkit, pydantic, typer, pytest; "
            "print(json.dumps({'torch': torch.__version__ + ' from ' + torch.__file__.rsplit('/torch/', 1)[0], "
            "'torchvision': torchvision.__version__, 'cnnkit': cnnkit.__file__.rsplit('/', 2)[0], "
            "'cuda available': str(torch.cuda.is_available())}))"
        )
        proc = self.run([str(self.python), "-c", code])
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _short(arg: str) -> str:
    """Paths under the checkout relative to it (commands run there)."""
    try:
        return str(Path(arg).relative_to(ROOT)) if arg.startswith(str(ROOT) + os.sep) else arg
    except ValueError:
        return arg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, rest = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".gpu-venv")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    args = parser.parse_args(argv)
    started = float(os.environ.get("CNNKIT_GPU_CHECK_T0") or time.time())
    venv: Path = (args.venv if args.venv.is_absolute() else ROOT / args.venv).absolute()
    wheels: Path = (args.wheels if args.wheels.is_absolute() else ROOT / args.wheels).absolute()

    if sys.version_info < (3, 11):
        raise SystemExit(f"gpu-env: {sys.executable} is Python {sys.version.split()[0]}; cnnkit needs 3.11 or newer")
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        raise SystemExit(f"gpu-env: {sys.executable} has no torch; GPU_PYTHON must be a Python with torch installed")
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        raise SystemExit(f"gpu-env: no wheels in {wheels}: run `make gpu-wheels` where a registry is reachable "
                         "and bring the folder along")  # fmt: skip
    folders = site_folders()
    stamp = fingerprint(wheels, folders)
    setup_file = venv / SETUP_FILE
    previous = json.loads(setup_file.read_text(encoding="utf-8")) if setup_file.exists() else {}
    setup = Setup(venv, wheels)
    if previous.get("fingerprint") == stamp and setup.python.exists():
        say(f"reusing {_short(str(venv))} (made for this Python, these wheels and this pyproject.toml)")
        record = {**previous, "reused": True, "seconds": round(time.time() - started, 1)}
    else:
        say(f"{sys.executable} (Python {sys.version.split()[0]}, torch {torch_version}) -> {_short(str(venv))}, "
            f"wheels from {_short(str(wheels))}, no index")  # fmt: skip
        setup.make(folders)
        result = setup.install()
        checked = setup.verify()
        record = {
            "fingerprint": stamp, "python": sys.executable, "python version": sys.version.split()[0],
            "site folders": folders, "venv": _short(str(venv)), "wheels": _short(str(wheels)), **result,
            "verified": checked, "commands": setup.commands, "reused": False,
            "seconds": round(time.time() - started, 1),
        }  # fmt: skip
    setup_file.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    say(f"ready in {record['seconds']:.0f} s: {len(record.get('installed', []))} distributions in {_short(str(venv))}")
    if not rest:
        return 0
    env = {**os.environ, "CNNKIT_GPU_CHECK_T0": repr(started)}
    sys.stdout.flush()
    os.execve(str(setup.python), [str(setup.python), *rest], env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
