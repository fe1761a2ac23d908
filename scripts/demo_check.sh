#!/usr/bin/env bash
# What a new user does: `make demo`, then the README's next commands in a plain shell (no
# Makefile, no CNNKIT_DATA, the venv activated). Exits non-zero when any of them fails.
#
# Runs with a fresh HOME (so ~/.cache/cnnkit starts empty, as on a new machine; DEMO_CHECK_HOME
# overrides it) and the README's commands in a scratch folder, so that `runs/lenet_bn-fashion-mnist/1`
# is the run they create. Trains 2 + 10 epochs of BN-LeNet on Fashion-MNIST: minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
home="${DEMO_CHECK_HOME:-$scratch/home}"
mkdir -p "$home" "$scratch/work"
plain() { env -i HOME="$home" PATH="$repo/.venv/bin:$PATH" LANG="${LANG:-C.UTF-8}" "$@"; }
step() { echo; echo "demo_check: \$ $*"; }

step make demo
env -i HOME="$home" PATH="$PATH" LANG="${LANG:-C.UTF-8}" make demo | tee "$scratch/demo.log"
demo_run="$(awk '/^demo: run directory/{print $4}' "$scratch/demo.log")"
[ -n "$demo_run" ] || { echo "demo_check: make demo printed no run directory" >&2; exit 1; }
case "$demo_run" in /*) ;; *) demo_run="$repo/$demo_run" ;; esac

cd "$scratch/work"
step cnnkit summary googlenet --input 1x96x96
plain cnnkit summary googlenet --input 1x96x96 >/dev/null
step cnnkit train lenet_bn
plain cnnkit train lenet_bn
step cnnkit eval runs/lenet_bn-fashion-mnist/1
plain cnnkit eval runs/lenet_bn-fashion-mnist/1
step cnnkit eval "$demo_run" "| head -2"   # the demo's own run, without --data; a closed pipe is fine
plain cnnkit eval "$demo_run" | head -2
echo
echo "demo_check: make demo and the README's next commands all worked in a plain shell"
