#!/usr/bin/env bash
# Install llmpipe and everything its pipeline needs into the current Python environment.
#
#   bash scripts/setup.sh            # torch (CPU build), llmpipe[dev], the embedded judge
#   LLMPIPE_SKIP_JUDGE=1 bash scripts/setup.sh   # skip the judge (use judge.url=... instead)
#
# torch is pinned first so that pip does not resolve the open range in pyproject.toml to a
# multi-GB CUDA build on a CPU machine; set LLMPIPE_TORCH to choose another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --disable-pip-version-check -q "${LLMPIPE_TORCH:-torch==2.13.0}"
"$PY" -m pip install --disable-pip-version-check -q -e ".[dev]"
# The book's reference code, for the parity test and benchmarks/train_speed.py; --no-deps
# because its declared requirements include tensorflow, which nothing here uses.
"$PY" -m pip install --disable-pip-version-check -q --no-deps "llms_from_scratch==1.0.19"
if [ -z "${LLMPIPE_SKIP_JUDGE:-}" ] && [ -f scripts/install_judge.sh ]; then
  bash scripts/install_judge.sh
fi
echo "llmpipe installed: $(command -v llmpipe)"
