#!/usr/bin/env bash
# Device calls on the lent GPU machine, each within a time budget so that one 10-minute call
# brings all of its outputs back.  Run from the repository root, with .whl carried
# (scripts/device-wheels.sh) and $OUT set by the device tool:
#   bash scripts/device-check.sh STEP[,STEP...] [SECONDS]   the steps in order, each capped:
#     tests    the GPU test suite (gpu.log)
#     retest   the tests named in $RETEST (retest.log)
#     share    the one-GPU NCCL check of issue 15, with a hang's stacks (share.log)
#     qg       benchmarks/quant_gemm.py at 1-8 rows (qg.log; paths: $QG_PATHS)
#     bench    benchmarks/quant_gemm.py at 1-8 rows (qg.log) and at 512 / 4096 rows
#              (qg-large.log), then decode
#     decode   benchmarks/gpu_decode.py batch 1 per format in $QUANT with a kernel profile
#              (bench.log, b1.json; other sections: $DECODE_SECTIONS; the prefill section's
#              prompt lengths: $PREFILL_TOKENS, default 128; b1's launch settings: $LAUNCH;
#              the rope fusion settings, engine's first: $FUSE_ROPE, e.g. on,off;
#              the profiled decode steps' rows: $PROFILE_BATCH, default 1)
#     attn     benchmarks/decode_attention.py against its splits, the partitions combined by the
#              reduce kernel and in the attention kernel (attn.log)
#     ncu      Nsight Compute on one launch each of the int4 tensor-core GEMV and the bf16
#              GEMV at one row, gate/up and down shapes (ncu-KERNEL-SHAPE.log)
# SECONDS defaults to 580 (the call's limit less margin).  nvidia-smi's line goes to smi.txt.
set -u
WHAT=${1:?usage: device-check.sh STEP[,STEP...] [SECONDS]}
BUDGET=${2:-580}
OUT=${OUT:?set OUT to the folder that comes back}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
cap() { local l; l=$(left); echo $(( l < $1 ? l : $1 )); }   # a step's limit: its own or what is left

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# cubins compiled ahead by scripts/device-kernel-cache.sh, when carried
[ -d .kcache ] && export IRLM_CACHE_DIR="$PWD/.kcache"
nvidia-smi --query-gpu=name,driver_version,compute_mode --format=csv > "$OUT/smi.txt" 2>&1
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/pip.log" 2>&1

one_row_paths() {
    timeout "$(cap 60)" python3 benchmarks/quant_gemm.py --m 1,2,4,8 \
        --paths "${QG_PATHS:-bf16,bf16-gemv,int8-gemv,int4-gemv,int4-mma,int4-tiny,fp8-gemv,fp8-mm}" \
        > "$OUT/qg.log" 2>&1
}

tests() {
    # the whole GPU suite, $TEST_WORKERS (4) test files at a time (a file's tests share a process)
    date -u > "$OUT/gpu.log"
    timeout "$(cap 420)" python3 -m pytest -q -m gpu -rfE -p no:cacheprovider --timeout 120 \
        -n "${TEST_WORKERS:-4}" --dist loadfile --durations 20 tests/ >> "$OUT/gpu.log" 2>&1
    echo "rc=$?" >> "$OUT/gpu.log"
    date -u >> "$OUT/gpu.log"
    tail -3 "$OUT/gpu.log"
}
retest() {
    # the tests named in $RETEST (pytest node ids or files), e.g. last run's failures
    timeout "$(cap 120)" python3 -m pytest -q -m gpu -rfE -p no:cacheprovider --timeout 100 \
        ${RETEST:?set RETEST to the tests to run again} > "$OUT/retest.log" 2>&1
    echo "rc=$?" >> "$OUT/retest.log"
    tail -2 "$OUT/retest.log"
}
share() {
    # issue 15's one-GPU acceptance (a tp 2 engine as 2 processes on this GPU over NCCL),
    # outside pytest, with timestamps, NCCL's log and the stacks of a hang
    local t; t=$(cap 200)
    timeout $((t + 15)) python3 scripts/device-nccl-share.py "$OUT" "$((t - 25))" \
        "$((t - 45))" > "$OUT/share.log" 2>&1
    echo "rc=$?" >> "$OUT/share.log"
    tail -2 "$OUT/share.log"
}
bench() {
    one_row_paths
    # large batches: cuBLASLt's fp8 GEMM with and without fast accumulation, the
    # weight-only GEMMs
    timeout "$(cap 60)" python3 benchmarks/quant_gemm.py --m 512,4096 \
        --paths bf16,fp8-mm,fp8-mm-fast,int8-gemm,int4-gemm > "$OUT/qg-large.log" 2>&1
    decode
}
decode() {
    # end to end: batch 1 per format ($QUANT, default bf16,int4,fp8,int8), with the
    # load-time tactics and a kernel profile
    [ "$(left)" -gt 40 ] && timeout "$(cap ${DECODE_S:-600})" python3 benchmarks/gpu_decode.py \
        --sections "${DECODE_SECTIONS:-copy,build,b1,profile}" --quant "${QUANT:-bf16,int4,fp8,int8}" \
        --prefill-tokens "${PREFILL_TOKENS:-128}" --launch "${LAUNCH:-default}" \
        --fuse-rope "${FUSE_ROPE:-default}" \
        --profile-batch "${PROFILE_BATCH:-1}" --json "$OUT/b1.json" > "$OUT/bench.log" 2>&1
    tail -5 "$OUT/bench.log"
}
attn() {
    timeout "$(cap 120)" python3 benchmarks/decode_attention.py --fold off,on \
        > "$OUT/attn.log" 2>&1
    tail -3 "$OUT/attn.log"
}
ncu_gemv() {
    # Why the int4 GEMV reads at a third of copy while the bf16 GEMV reads at ~90%: DRAM
    # throughput, achieved occupancy, warp stall reasons of one launch of each, per shape
    local kp k shape
    for shape in gate_up down; do
        for kp in irlm_w4a16_mma:int4-mma irlm_gemv:bf16-gemv; do   # kernel:the path that runs it
            k=${kp%%:*}
            [ "$(left)" -gt 30 ] || return
            timeout "$(cap 90)" ncu -k "regex:^${k}\b" -c 1 --section SpeedOfLight \
                --section Occupancy --section LaunchStats --section WarpStateStats \
                --section MemoryWorkloadAnalysis \
                python3 benchmarks/quant_gemm.py --m 1 --shapes "$shape" \
                --paths "${kp#*:}" > "$OUT/ncu-$k-$shape.log" 2>&1
            echo "rc=$?" >> "$OUT/ncu-$k-$shape.log"
        done
    done
    tail -n 3 "$OUT"/ncu-*.log
}

for step in ${WHAT//,/ }; do
    case "$step" in
    tests|retest|share|bench|decode|attn) [ "$(left)" -gt 20 ] && "$step" ;;
    qg) [ "$(left)" -gt 20 ] && one_row_paths ;;
    ncu) [ "$(left)" -gt 30 ] && ncu_gemv ;;
    *)
        echo "device-check.sh: unknown step '$step' (tests, retest, share, qg, bench, decode, attn, ncu)" >&2
        exit 2
        ;;
    esac
done
