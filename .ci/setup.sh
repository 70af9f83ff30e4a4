#!/usr/bin/env bash
# Create .venv and install LenPred with torch's CPU wheel first (a bare `torch` requirement can pull a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test,app,fast,serve]"
