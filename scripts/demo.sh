#!/usr/bin/env bash
# `make demo` (after .venv exists): find or fetch Fashion-MNIST, train BN-LeNet for 2 epochs,
# evaluate the run's weights, and say where the run, its curves and its weights are. It leaves a
# plain shell able to run the README's next commands (`cnnkit train lenet_bn`, `cnnkit eval RUN`):
# when cnnkit's default search would not find the data, it links the folder it used there.
set -euo pipefail
cd "$(dirname "$0")/.."
cnnkit() { .venv/bin/cnnkit "$@"; }
say() { echo "demo: $*"; }

# The Makefile points CNNKIT_DATA at ../shared/datasets for its own targets only
# (CNNKIT_DATA_ORIGIN=file); the user's shell has their own CNNKIT_DATA, or none.
if [ "${CNNKIT_DATA_ORIGIN:-environment}" = environment ] && [ -n "${CNNKIT_DATA:-}" ]; then
    USER_DATA="$CNNKIT_DATA"
else
    USER_DATA=""
fi
USER_HOME="${USER_DATA:-$HOME/.cache/cnnkit/datasets}"   # cnnkit's default search starts here

# A folder holds Fashion-MNIST when it has the training images (gzipped or not).
holds_fmnist() { [ -n "${1:-}" ] && compgen -G "$1/train-images-idx3-ubyte*" >/dev/null; }

find_fmnist() {
    local candidate
    for candidate in "${CNNKIT_DATA:+$CNNKIT_DATA/fashion-mnist}" "$USER_HOME/fashion-mnist" \
        ../shared/datasets/fashion-mnist /usr/share/datasets/fashion-mnist; do
        if holds_fmnist "$candidate"; then echo "$candidate"; return 0; fi
    done
    return 1
}

# 1. Data already on this machine.
DATA="$(find_fmnist || true)"

# 2. Downloaded, where the internet is reachable (into the folder a plain shell searches).
if [ -z "$DATA" ]; then
    say "Fashion-MNIST not found; downloading it into $USER_HOME/fashion-mnist (cnnkit data fetch fashion-mnist)"
    if cnnkit data fetch fashion-mnist --data "$USER_HOME/fashion-mnist"; then
        DATA="$USER_HOME/fashion-mnist"
    else
        rmdir "$USER_HOME/fashion-mnist" 2>/dev/null || true   # an empty folder would hide other places
    fi
fi

# 3. Debian's package, only as root and after saying what it installs and why.
APT_COMMAND="apt-get install dataset-fashion-mnist"
if [ -z "$DATA" ] && command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        say "the download failed; Debian's package dataset-fashion-mnist holds the same four files"
        say "(about 30 MB, in /usr/share/datasets/fashion-mnist); installing it: apt-get update && $APT_COMMAND"
        answer=y
        if [ -t 0 ]; then
            read -r -p "demo: install dataset-fashion-mnist with apt-get? [Y/n] " answer || answer=n
        fi
        case "${answer:-y}" in
        [yY]*)
            if apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
                installed="$(dpkg -L dataset-fashion-mnist 2>/dev/null | grep -m1 'train-images-idx3-ubyte' || true)"
                DATA="${installed:+$(dirname "$installed")}"
                [ -n "$DATA" ] || DATA="$(find_fmnist || true)"
            fi
            ;;
        esac
    else
        say "Debian's package dataset-fashion-mnist holds Fashion-MNIST; install it as root with:"
        say "  sudo $APT_COMMAND"
    fi
fi

if ! holds_fmnist "$DATA"; then
    echo "demo: Fashion-MNIST not found and could not be fetched; put its four IDX files in" \
        "$USER_HOME/fashion-mnist (or any folder, then run: CNNKIT_DATA=<its parent> make demo)" >&2
    exit 1
fi
say "Fashion-MNIST from $DATA"

# A plain shell (without the Makefile's CNNKIT_DATA) must find it too, for the README's next
# commands: ask cnnkit's own search, and link the folder into its first place when it fails.
plain_shell_finds_it() {
    env -u CNNKIT_DATA ${USER_DATA:+CNNKIT_DATA="$USER_DATA"} .venv/bin/cnnkit data info fashion-mnist \
        >/dev/null 2>&1
}
if ! plain_shell_finds_it; then
    link="$USER_HOME/fashion-mnist"
    if [ -e "$link" ] || [ -L "$link" ]; then
        say "note: $link exists but holds no Fashion-MNIST, so outside make pass --data $DATA"
    else
        mkdir -p "$USER_HOME"
        ln -s "$(cd "$DATA" && pwd -P)" "$link"
        say "linked $link -> $(cd "$DATA" && pwd -P)"
        say "  so that cnnkit finds Fashion-MNIST from any shell (rm $link undoes it)"
    fi
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# The progress bar is drawn on stderr, so it shows although stdout goes through tee.
cnnkit train lenet_bn --epochs 2 --data "$DATA" | tee "$log"
RUN="$(awk '/^run /{print $2}' "$log" | tail -n1)"
# No --data: the run directory records where its data came from.
cnnkit eval "$RUN"
echo
say "run directory  $RUN"
say "curves         $RUN/curves.png"
say "weights        $RUN/best.safetensors (and last.safetensors)"
say "continue it    .venv/bin/cnnkit train --resume $RUN --epochs 10 --lr 0.1   (a warm restart: the 2 epochs annealed to ~0)"
say "next           source .venv/bin/activate; cnnkit train lenet_bn; cnnkit eval $RUN"
