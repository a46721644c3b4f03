#!/usr/bin/env bash
# One short GPU check (under 5 minutes): the role classes on CUDA and the weight round trips,
# with torch and transformers only (no Ray, no vLLM). Without CUDA it runs the same checks on the CPU.
#   scripts/gpu_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python}}"
export TOKENIZERS_PARALLELISM=false
exec timeout 290 "$PY" scripts/gpu_check.py
