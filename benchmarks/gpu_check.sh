#!/usr/bin/env bash
# On a CUDA machine: run every GPU test (CUDA backend, pool, dequantize kernels from
# Python and from the Rust core) and the transfer benchmarks, writing all to one folder.
# Budget: under 8 minutes.
#   Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
# A lent GPU session's second call, the whole model at Qwen3-30B-A3B's shapes (about 6
# minutes at 4 layers; writes gpu_model.md/json, kept as it goes if cut short):
#   python benchmarks/bench_gpu_model.py --out OUT_DIR --layers 4
# With DYNAEXQ_PYTHON set (a bare machine whose python already has torch, as a lent GPU
# has), no environment is built: dynaexq/_core.abi3.so must already be in python/dynaexq
# (built elsewhere; the extension is abi3 and loads the CUDA driver at run time).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/out/gpu_check}
mkdir -p "$out"
cd "$root"
if [ -n "${DYNAEXQ_PYTHON:-}" ]; then
    py=$DYNAEXQ_PYTHON
    export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH}
else
    bash scripts/dev.sh setup >"$out/setup.log" 2>&1 || { echo "setup failed: $out/setup.log"; exit 1; }
    py=${DYNAEXQ_CACHE:-$HOME/.cache/dynaexq}/venv/bin/python
fi
export PYTHONUNBUFFERED=1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
"$py" -c 'import torch, dynaexq; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())' \
    2>&1 | tee "$out/versions.txt"
xdist=$("$py" -c 'import xdist' 2>/dev/null && echo "-n 6" || true)
failed=0
step() {  # step NAME CMD...: run, log to $out/NAME.txt, record the exit status
    local name=$1; shift
    "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "$name $rc" >>"$out/status.txt"
    [ "$rc" = 0 ] || failed=$((failed + 1))
}
# Every test marked `gpu`, in parallel processes (they share the one GPU). A test module
# that cannot be imported (a server dependency missing from a bare image) is reported
# and the rest still run.
step pytest_gpu timeout 240 "$py" -m pytest -q -p no:cacheprovider -m gpu $xdist -rs \
    --durations=15 --continue-on-collection-errors tests/
step bench_transfer_cuda timeout 120 "$py" benchmarks/bench_transfer.py --backend cuda --out "$out"
step bench_pool timeout 60 "$py" benchmarks/bench_pool.py
# The grouped mixed-tier MoE kernels at Qwen3-30B-A3B's expert shape: decode of one layer
# at batch 1/8/32 per tier table, against the bandwidth bound and a torch bf16 loop.
step bench_moe_gpu timeout 120 "$py" benchmarks/bench_moe_gpu.py --out "$out"
echo "results in $out; $failed step(s) failed (status.txt)"
exit $((failed > 0))
