#!/usr/bin/env bash
# One entry point for setting up and using dynaexq on a fresh machine.
#   scripts/dev.sh run    set up, then run the main job (generation on the embedded default
#                         model within a byte budget; extra args go to `dynaexq generate`)
#   scripts/dev.sh test   set up, then run every lint and test (what CI runs)
#   scripts/dev.sh setup  only set up
# The Python environment and the cargo target directory live outside the clone
# (default ~/.cache/dynaexq, override with DYNAEXQ_CACHE) so fresh clones reuse them.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${DYNAEXQ_CACHE:-$HOME/.cache/dynaexq}
venv=$cache/venv
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
export VIRTUAL_ENV=$venv
export PATH=$venv/bin:$HOME/.cargo/bin:$PATH
cd "$root"

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

setup() {
    mkdir -p "$cache"
    if [ ! -x "$venv/bin/python" ]; then
        log "creating the Python environment in $venv"
        python3 -m venv "$venv"
    fi
    # Install only when the requirement list changed since the last install.
    want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
    have=$(cat "$venv/.dynaexq-requirements" 2>/dev/null || true)
    if [ "$want" != "$have" ]; then
        log "installing Python dependencies (once; torch is large)"
        "$venv/bin/pip" install --quiet -r requirements-dev.txt
        echo "$want" >"$venv/.dynaexq-requirements"
    fi
    log "building the Rust extension (dynaexq._core)"
    "$venv/bin/maturin" develop --release
    "$venv/bin/python" -c 'import dynaexq._core' || { echo "extension failed to build" >&2; exit 1; }
}

run_main() {
    # The main job: generation on the embedded default model with its experts in a byte
    # budget (20%: the bytes at which a static hot map holds 20% of experts in bf16, the
    # rest in int2) under the dynamic policy. Extra arguments replace the defaults.
    if [ $# -eq 0 ]; then
        set -- --budget 20% --policy dynamic --max-new-tokens 256 --temperature 0.8 \
            --top-p 0.95 --seed 0 --stats \
            "def fibonacci(n):"
    fi
    "$venv/bin/python" -m dynaexq.cli generate "$@"
}

run_tests() {
    bash "$root/scripts/test.sh"
}

cmd=${1:-run}
shift || true
case "$cmd" in
    setup) setup ;;
    run) setup; run_main "$@" ;;
    test) setup; run_tests "$@" ;;
    *) echo "usage: scripts/dev.sh {run|test|setup} [args]" >&2; exit 2 ;;
esac
