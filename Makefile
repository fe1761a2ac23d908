# Every target sets itself up from nothing: a fresh clone needs only python3 (>= 3.11).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cnnkit-installed
# Real data: Debian's dataset-fashion-mnist package, else ../shared/datasets beside a checkout.
export CNNKIT_DATA ?= $(firstword $(wildcard ../shared/datasets) $(HOME)/.cache/cnnkit/datasets)

.PHONY: demo test test-fast bench gpu-check gpu-wheels docs lint clean install

install: $(STAMP)

# Every package under plugins/ is installed editable too, so `make test` runs their tests.
$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,onnx]'
	for p in plugins/*/; do if [ -f "$$p/pyproject.toml" ]; then $(BIN)/python -m pip install --quiet -e "$$p" || exit 1; fi; done
	touch $@

# The demo tells the user's own CNNKIT_DATA (origin: environment) from the default set above (file).
demo: $(STAMP)
	CNNKIT_DATA_ORIGIN='$(origin CNNKIT_DATA)' bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop: the suite without the tests marked slow (over ~2 s each); `make test` runs all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/data.py
	$(BIN)/python bench/loop.py
	$(BIN)/python bench/onnx_latency.py

# On a CUDA machine: pytest -m cuda, loop benchmarks, a timed train, AMP/channels-last, peers,
# 10-epoch accuracy runs, in at most 8 minutes; writes bench/results/gpu-check.md. Without CUDA: a
# short dry run of the same code. With GPU_PYTHON (a Python that has torch; no registry needed):
# that Python as it is, plus a venv beside it (GPU_VENV) of the wheels from `make gpu-wheels`, all
# under 9 minutes (scripts/gpu_env.py). Without GPU_PYTHON: the .venv built with pip, as ever.
GPU_WHEELS ?= .gpu-wheels
GPU_VENV   ?= .gpu-venv
ifdef GPU_PYTHON
gpu-check:
	$(GPU_PYTHON) scripts/gpu_env.py --venv $(GPU_VENV) --wheels $(GPU_WHEELS) -- scripts/gpu_check.py $(GPU_CHECK_ARGS)
else
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py $(GPU_CHECK_ARGS)
endif

# Where a registry is reachable: the wheels gpu-check GPU_PYTHON=... needs (CPython 3.12 manylinux
# x86_64 and this machine's Python), resolved from pyproject.toml; at most 40 MiB (scripts/gpu_wheels.py).
gpu-wheels: $(STAMP)
	$(BIN)/python scripts/gpu_wheels.py --out $(GPU_WHEELS)

# Static checks for developers (not part of `make test`): pyflakes-class errors, imports, types.
lint: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/ruff check cnnkit tests bench
	$(BIN)/mypy cnnkit

# The CLI reference is generated from the commands' own help.
docs: $(STAMP)
	$(BIN)/python -m typer cnnkit.cli.app utils docs --name cnnkit --title "cnnkit command-line reference" --output docs/cli.md
	$(BIN)/python -c "from cnnkit.config import config_reference; print(config_reference(), end='')" > docs/config.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
