#!/usr/bin/env bash
# The real-engine smoke test, one command: set up (idempotent), then a tiny replay through the gateway into vLLM
# (every policy, one seed, a backlog and load 0.9, 8 requests a run capped at 32 tokens, a one-epoch adaptation).
# It checks the pipeline end to end — priorities honoured, every request answered and logged exactly once — and
# writes its report to OUT (default reports/serving/smoke). Its timings are not results.
#
#   bash benchmarks/serving/smoke.sh [LENPRED_EXPORT]        (default outputs/lenpred-minilm)
#
# Environment: PYTHON (the project's python, default .venv/bin/python), OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-outputs/lenpred-minilm}
OUT=${OUT:-reports/serving/smoke}
PY=${PYTHON:-.venv/bin/python}
t0=$(date +%s)
bash benchmarks/serving/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg \
  TOKENIZERS_PARALLELISM=false
"$PY" benchmarks/serving/replay.py --model "$MODEL" --out "$OUT" --smoke \
  --requests 8 --holdout 8 --adapt-prompts 24 --solo 2 --max-tokens 32 --seeds 0 --loads 0.9 inf \
  --adapt-args "--num_train_epochs 1 --max_length 32 --save_strategy no --eval_strategy no" "${@:2}"
echo "smoke: done in $(( $(date +%s) - t0 )) s"
