#!/usr/bin/env bash
# What one lent-GPU session runs, as one command: the GPU checks (benchmarks/gpu_check.sh)
# and, beside them on the same GPU, a training phase of the embedded model, moved to the
# lent machine with `scripts/train_embedded.py pack` and moved back the same way.
#
#   bash benchmarks/device_session.sh CARRY OUT [TRAIN_MINUTES] [-- extra train args]
#
# CARRY holds what a bare machine lacks: core.so (the abi3 extension built here),
# tokens.tar.xz (the token streams and tokenizer: `tar cJf tokens.tar.xz tokens tokenizer`
# in the training work folder) and run/ (a run written by `pack`). OUT receives run/ (the
# new phase, packed) and gpu_check.tgz (GPU test and benchmark logs, the training log).
set -uo pipefail
carry=$1 out=$2 minutes=${3:-6}
shift $(($# < 3 ? $# : 3)); [ "${1:-}" = "--" ] && shift
py=${DYNAEXQ_PYTHON:-python3}
device=${DYNAEXQ_TRAIN_DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python
logs=$(mktemp -d)/gpu_check
mkdir -p "$logs" "$out"
cp "$carry/core.so" python/dynaexq/_core.abi3.so
work=$(mktemp -d)
tar xJf "$carry/tokens.tar.xz" -C "$work"
"$py" scripts/train_embedded.py unpack --work "$work" --src "$carry/run" --run start

train_phase() {
    local impl
    for impl in grouped_mm eager; do  # eager if this torch has no grouped_mm for fp32
        timeout $((${minutes%.*} * 60 + 120)) "$py" scripts/train_embedded.py train \
            --work "$work" --run phase --continue-from start --device "$device" \
            --experts-impl $impl --max-minutes "$minutes" --ckpt-minutes 1 "$@" \
            >>"$logs/train.out" 2>&1 && break
        [ -f "$work/runs/phase/ckpt.pt" ] && break  # it trained, then stopped: keep that
        echo "== train with --experts-impl $impl failed" >>"$logs/train.out"
    done
    "$py" scripts/train_embedded.py pack --work "$work" --run phase --out "$out/run" \
        >>"$logs/train.out" 2>&1
}
train_phase "$@" &
trainer=$!
DYNAEXQ_PYTHON=$py bash benchmarks/gpu_check.sh "$logs" >"$logs/gpu_check.out" 2>&1
wait $trainer
tail -5 "$logs/train.out"
tail -3 "$logs/pytest_gpu.txt"
tar czf "$out/gpu_check.tgz" -C "$(dirname "$logs")" gpu_check
ls -la "$out" "$out/run"
