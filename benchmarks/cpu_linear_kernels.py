"""The CPU linear kernels a decode step could use, on SmolLM2-135M's 210 linear shapes.

One pass = every linear of the 30 layers once (q, k, v, o, gate, up, down; batch ``--rows``),
with weights that do not fit in cache, as in a decode step.  Random weights of the real
shapes: the figures are speeds, not accuracy.  Median wall and process-CPU time of
``--repeats`` passes per kernel; run pinned (``taskset -c 0``) at one thread.

    taskset -c 0 python benchmarks/cpu_linear_kernels.py [--rows 1] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

G = 32
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
          (576, 1536)] * 30


def _int4(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), torch.rand(k // G, n, 2)


def _fp16_packed(n, k):
    import torch.ao.nn.quantized  # noqa: F401  (registers torch.ops.quantized)
    return torch.ops.quantized.linear_prepack_fp16(torch.randn(n, k), None)


#: name -> (make weight for [N, K], run x [rows, K] against it)
KERNELS = {
    "F.linear f32": (lambda n, k: torch.randn(n, k), lambda x, w: F.linear(x, w)),
    "F.linear bf16 (bf16 activations)": (
        lambda n, k: torch.randn(n, k).bfloat16(), lambda x, w: F.linear(x.bfloat16(), w)),
    "F.linear f16 (f16 activations)": (
        lambda n, k: torch.randn(n, k).half(), lambda x, w: F.linear(x.half(), w)),
    "fbgemm f16 weights, f32 activations": (
        _fp16_packed, lambda x, w: torch.ops.quantized.linear_dynamic_fp16(x, w)),
    "int8 weights, bf16 activations": (
        lambda n, k: (torch.randint(-127, 127, (n, k), dtype=torch.int8),
                      torch.rand(n).bfloat16()),
        lambda x, w: torch._weight_int8pack_mm(x.bfloat16(), w[0], w[1])),
    "int8 weights, f32 activations": (
        lambda n, k: (torch.randint(-127, 127, (n, k), dtype=torch.int8), torch.rand(n)),
        lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1])),
    "int4 g32 weights, bf16 activations": (
        lambda n, k: (lambda p, sz: (p, sz.bfloat16()))(*_int4(n, k)),
        lambda x, w: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), w[0], G, w[1])),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1, help="activation rows (the batch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated substrings of kernel names")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| kernel | ms per pass (wall) | ms per pass (CPU) |  # torch {torch.__version__}, "
          f"rows {args.rows}, threads {args.threads}")
    print("| --- | --- | --- |")
    for name, (make, run) in KERNELS.items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        weights = [make(n, k) for n, k in SHAPES]
        xs = {k: torch.randn(args.rows, k) for k in {k for _, k in SHAPES}}
        with torch.inference_mode():
            for w, (_, k) in zip(weights, SHAPES):
                run(xs[k], w)
            wall, cpu = [], []
            for _ in range(args.repeats):
                t, c = time.perf_counter(), time.process_time()
                for w, (_, k) in zip(weights, SHAPES):
                    run(xs[k], w)
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        print(f"| {name} | {statistics.median(wall) * 1e3:.1f} | "
              f"{statistics.median(cpu) * 1e3:.1f} |", flush=True)
        del weights
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
