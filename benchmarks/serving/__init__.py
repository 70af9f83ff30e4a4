"""LenPred in front of a real vLLM: set-up, servers, replay benchmark, simulator comparison, closed loop.

`replay.py` is the door (`--help`); `setup.sh` prepares the engine's venv and model; `smoke.sh` is the one-command
smoke run. See docs/serving-vllm.md.
"""
