#!/usr/bin/env bash
# `make demo`: the main job on the default data, from a fresh machine (called by the Makefile).
set -euo pipefail
cd "$(dirname "$0")/.."
cnnkit() { .venv/bin/cnnkit "$@"; }
cnnkit list models
cnnkit summary lenet_bn --input 1x28x28
