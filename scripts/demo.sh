#!/usr/bin/env bash
# `make demo` (after .venv exists): find or fetch Fashion-MNIST, train BN-LeNet for 2 epochs,
# evaluate the run's weights, and say where the run, its curves and its weights are.
set -euo pipefail
cd "$(dirname "$0")/.."
cnnkit() { .venv/bin/cnnkit "$@"; }

# A folder holds Fashion-MNIST when it has the training images (gzipped or not).
holds_fmnist() { [ -n "${1:-}" ] && compgen -G "$1/train-images-idx3-ubyte*" >/dev/null; }

find_fmnist() {
    local candidate
    for candidate in "${CNNKIT_DATA:+$CNNKIT_DATA/fashion-mnist}" ../shared/datasets/fashion-mnist \
        /usr/share/datasets/fashion-mnist; do
        if holds_fmnist "$candidate"; then echo "$candidate"; return 0; fi
    done
    return 1
}

DATA="$(find_fmnist || true)"
if [ -z "$DATA" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "demo: installing Fashion-MNIST with apt-get (dataset-fashion-mnist)"
    if apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
        installed="$(dpkg -L dataset-fashion-mnist 2>/dev/null | grep -m1 'train-images-idx3-ubyte' || true)"
        DATA="${installed:+$(dirname "$installed")}"
        [ -n "$DATA" ] || DATA="$(find_fmnist || true)"
    fi
fi
if [ -z "$DATA" ]; then
    echo "demo: downloading Fashion-MNIST (cnnkit data fetch fashion-mnist)"
    if fetched="$(cnnkit data fetch fashion-mnist)"; then
        DATA="${fetched##*files in }"
    fi
fi
if ! holds_fmnist "$DATA"; then
    echo "demo: Fashion-MNIST not found and could not be fetched; put its four IDX files in a folder" \
        "and run: CNNKIT_DATA=<parent folder> make demo" >&2
    exit 1
fi
echo "demo: Fashion-MNIST from $DATA"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cnnkit train lenet_bn --epochs 2 --data "$DATA" | tee "$log"
RUN="$(awk '/^run /{print $2}' "$log" | tail -n1)"
cnnkit eval "$RUN" --data "$DATA"
echo
echo "demo: run directory  $RUN"
echo "demo: curves         $RUN/curves.png"
echo "demo: weights        $RUN/best.safetensors (and last.safetensors)"
echo "demo: continue it    .venv/bin/cnnkit train --resume $RUN --epochs 10"
