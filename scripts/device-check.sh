#!/usr/bin/env bash
# One call on the lent GPU machine: the GPU test suite, the one-GPU NCCL check, and the
# benchmarks whose figures docs/performance.md and the row limits need, each within a time
# budget so that one 10-minute call brings all of them back.  Run from the repository root,
# with .whl carried (scripts/device-wheels.sh) and $OUT set by the device tool:
#   bash scripts/device-check.sh [SECONDS]        (default 580: the call's limit less margin)
# Everything goes under $OUT: smi.txt, gpu.log (pytest -m gpu), share.log (NCCL, 2 ranks on
# one GPU), qg.log (benchmarks/quant_gemm.py at 1-8 rows), bench.log + b1.json
# (benchmarks/gpu_decode.py); the last lines of gpu.log and share.log are echoed.
set -u
BUDGET=${1:-580}
OUT=${OUT:?set OUT to the folder that comes back}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,compute_mode --format=csv > "$OUT/smi.txt" 2>&1
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/pip.log" 2>&1

# the whole GPU suite, four test files at a time (each file's tests share one process)
date -u > "$OUT/gpu.log"
timeout 380 python3 -m pytest -q -m gpu -rfE -p no:cacheprovider --timeout 120 -n 4 \
    --dist loadfile --durations 20 tests/ >> "$OUT/gpu.log" 2>&1
echo "rc=$?" >> "$OUT/gpu.log"
date -u >> "$OUT/gpu.log"

# issue 15's one-GPU acceptance: a tp 2 engine as 2 processes on this GPU over NCCL
IRLM_TEST_NCCL_SHARING=1 timeout "$(( $(left) < 70 ? $(left) : 70 ))" python3 -m pytest -q -rfE \
    -p no:cacheprovider --timeout 65 tests/test_distributed_gpu.py -k sharing \
    > "$OUT/share.log" 2>&1
echo "rc=$?" >> "$OUT/share.log"

# the one-row paths of every format, next to bf16 cuBLAS (sets the GEMV limits)
if [ "$(left)" -gt 100 ]; then
    timeout 60 python3 benchmarks/quant_gemm.py --m 1,2,4,8 \
        --paths bf16,bf16-gemv,int8-gemv,int4-gemv,int4-gemv4,int4-tiny,fp8-gemv,fp8-mm \
        > "$OUT/qg.log" 2>&1
fi

# large batches: cuBLASLt's fp8 GEMM with and without fast accumulation, the weight-only GEMMs
if [ "$(left)" -gt 160 ]; then
    timeout 60 python3 benchmarks/quant_gemm.py --m 512,4096 \
        --paths bf16,fp8-mm,fp8-mm-fast,int8-gemm,int4-gemm > "$OUT/qg-large.log" 2>&1
fi

# end to end: batch 1 per format, with the load-time tactics and a kernel profile
if [ "$(left)" -gt 40 ]; then
    timeout "$(left)" python3 benchmarks/gpu_decode.py --sections copy,build,b1,profile \
        --quant bf16,int4,fp8,int8 --json "$OUT/b1.json" > "$OUT/bench.log" 2>&1
fi
tail -3 "$OUT/gpu.log"
tail -2 "$OUT/share.log"
