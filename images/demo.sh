#!/usr/bin/env bash
# `make demo`: bulwark run applying a policy, and each limit firing with its reason.
# Usage: images/demo.sh BULWARK GUESTS_DIR
set -uo pipefail
BULWARK=${1:?bulwark binary}
GUESTS=${2:?guests directory}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export BULWARK_CACHE_DIR="$WORK/cache"

step() {
    printf '\n\033[1m$ bulwark %s\033[0m\n' "$*"
    "$BULWARK" "$@"
    printf '\033[2m(exit code %s)\033[0m\n' "$?"
}

mkdir -p "$WORK/data" "$WORK/out"
echo "read-only input" > "$WORK/data/input.txt"

step run "$GUESTS/hello.wasm"
step run --env GREETING=hi "$GUESTS/echo.wasm" one two
step run "$GUESTS/passwd.wasm"
step run --dir "$WORK/data:ro" "$GUESTS/fileio.wasm" read "$WORK/data/input.txt"
step run --dir "$WORK/data:ro" "$GUESTS/fileio.wasm" write "$WORK/data/input.txt" overwritten
step run --dir "$WORK/out:rw" "$GUESTS/fileio.wasm" write "$WORK/out/result.txt" written
step run --fuel 5000000 "$GUESTS/loop.wasm"
step run --timeout 250ms "$GUESTS/loop.wasm"
step run --memory 16Mi "$GUESTS/membomb.wasm"
step run "$GUESTS/stack.wasm"
step run --memory 2Gi --config <(printf '[ceilings]\nmemory = "1Gi"\n') "$GUESTS/hello.wasm"
