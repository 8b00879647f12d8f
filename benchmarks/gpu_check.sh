#!/usr/bin/env bash
# GPU check: one prepared run (<= 10 minutes) of everything llmpipe has never measured on a GPU.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with a CUDA GPU
#   MIRROR=/path/to/shared/data bash benchmarks/gpu_check.sh
#
# 1. the test suite's CUDA-marked tests (tests/test_precision.py -m cuda): dtype auto picks bf16,
#    bf16 pretraining learns like fp32, torch.compile matches eager, DDP over NCCL in a world of 1;
# 2. GPT-2 124M at context 1024, 300 steps, bf16 + torch.compile + fused AdamW through llmpipe's
#    pretrain stage on the gutenberg books (random words when $MIRROR has none): tokens/s and MFU
#    against the GPU's dense bf16 peak (benchmarks/gpu_pretrain.py);
# 3. KV-cache generation speed vs recomputing, 124M, 200 new tokens (benchmarks/generate_speed.py).
# Each step has its own time limit, so one that hangs cannot eat the others' time; the script
# goes on after a failure and exits non-zero if any step failed. Needs a CUDA build of
# torch==2.13.0 and llmpipe's dependencies (pip install -e ".[dev]"); it installs nothing.
# Anchors to compare with: nanoGPT ~29% MFU on an A100 (124M), llm.c ~60%, the book's A100 table
# 12.5k -> 142k tokens/s (bf16 + SDPA + compile + fused AdamW).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MIRROR="${MIRROR:-../shared/data}"
PY="${PYTHON:-python}"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi not found"
if ! "$PY" -c "import torch, sys; print('torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA GPU; nothing to check" >&2
    exit 2
fi
failed=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo; echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    [ $rc -eq 0 ] || failed=1
}
step "CUDA-marked tests" 200 "$PY" -m pytest -q -m cuda tests/test_precision.py
step "124M pretrain, context 1024, bf16 + compile + fused AdamW" 270 \
    "$PY" benchmarks/gpu_pretrain.py --steps 300 --batch 16 --mirror "$MIRROR"
step "KV-cache generation" 90 "$PY" benchmarks/generate_speed.py --device cuda --new-tokens 200 --repeats 2
exit $failed
