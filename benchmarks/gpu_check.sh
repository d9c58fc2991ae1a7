#!/usr/bin/env bash
# GPU check: everything that needs a CUDA device, in a few minutes, results under $OUT.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Each section runs even if an earlier one failed; the exit status is non-zero if any did.
# Sections write <name>.log (and their own result files) under $OUT; summary.txt lists
# each section's exit status.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
OUT=${OUT:-$root/gpu-check-out}
mkdir -p "$OUT"
py=${PYTHON:-${VIRTUAL_ENV:-$HOME/.cache/dynaexq/venv}/bin/python}
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"
status=0

section() {
    local name=$1
    shift
    printf '\033[1m==> %s\033[0m\n' "$name"
    local t0=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || status=1
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

# --- quant kernels (issue 4): PTX for every arch, kernels vs the torch reference, timing.
section quant_ptx "$py" scripts/compile_kernels.py --out "$OUT/ptx"
section quant_kernel_tests "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py \
    --junitxml "$OUT/quant_kernel_tests.xml"
section quant_kernel_bench "$py" benchmarks/gpu_kernels.py --json "$OUT/quant_kernel_bench.json"

exit $status
