#!/usr/bin/env bash
# On a CUDA machine: build the extension (with the cuda feature), run the GPU tests and
# the transfer benchmarks on the CUDA backend, and write everything to one folder.
# Budget: under 8 minutes.   Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/out/gpu_check}
mkdir -p "$out"
cd "$root"
bash scripts/dev.sh setup >"$out/setup.log" 2>&1
py=${DYNAEXQ_CACHE:-$HOME/.cache/dynaexq}/venv/bin/python
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
timeout 180 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_transfer_gpu.py \
    2>&1 | tee "$out/pytest_gpu.txt"
timeout 180 "$py" benchmarks/bench_transfer.py --backend cuda --out "$out" \
    2>&1 | tee "$out/bench_transfer_cuda.txt"
timeout 60 "$py" benchmarks/bench_pool.py 2>&1 | tee "$out/bench_pool.txt"
# The dequantize kernels loaded and launched by the Rust core (rust/src/kernels.rs):
# every kernel against the torch reference (compiles the PTX for this GPU with NVRTC).
timeout 240 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_rust.py \
    2>&1 | tee "$out/pytest_gpu_kernels_rust.txt"
echo "results in $out"
