#!/usr/bin/env bash
# The whole test suite: lints, Rust tests (unit, property, loom, fuzz-corpus replay),
# the PTX compile check, the stub check and pytest. Run through `scripts/dev.sh test`,
# which sets up the environment first.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${VIRTUAL_ENV:?run through scripts/dev.sh}/bin/python

stage() { printf '\033[1m==> %s\033[0m\n' "$*"; }

stage "cargo fmt --check"
cargo fmt --all -- --check

stage "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy --workspace --all-targets --features python,cuda --quiet -- -D warnings

stage "ruff"
"$VIRTUAL_ENV/bin/ruff" check python tests scripts benchmarks
"$VIRTUAL_ENV/bin/ruff" format --check python tests scripts benchmarks

stage "cargo test (unit, property, fuzz-corpus replay)"
cargo test --workspace --release --quiet
# The int8 expert kernels this CPU does not pick by itself (AVX2 and the scalar
# definition under AVX-512 VNNI), through the whole-expert property tests.
for kernel in avx2 scalar; do
    DYNAEXQ_INT8_KERNEL=$kernel cargo test -p dynaexq --release --quiet --test cpu_experts
done

stage "CUDA kernels: NVRTC -> PTX (sm_80/86/89/90/120) + ptxas via nvJitLink"
"$py" scripts/compile_kernels.py --out "${CARGO_TARGET_DIR:-$root/target}/dynaexq-ptx"

stage "loom (publish / lease / reclaim model, bounded preemption)"
# A separate target dir: --cfg loom rebuilds every dependency.
RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/loom" \
    cargo test -p dynaexq --release --quiet --test loom_table

stage "stub check (mypy stubtest)"
"$VIRTUAL_ENV/bin/python" -m mypy.stubtest dynaexq._core --ignore-missing-stub --allowlist "$root/tests/stubtest-allowlist.txt"

stage "pytest"
# The wheel test builds the wheel (own target dir under the cache), installs it into a
# fresh venv outside the tree and runs the main job there.
export DYNAEXQ_TEST_WHEEL=${DYNAEXQ_TEST_WHEEL:-1}
"$py" -m pytest -q -p no:cacheprovider "$@"
