"""Quantized-linear kernels one by one, on the GPU: time per call and the weight bandwidth each
path reaches, per batch size M, on Llama-3-8B's linear shapes (device machine only).

    python benchmarks/quant_gemm.py [--m 1,2,4,8,16,32,64,128,512] [--json OUT.json]

Paths (irlm.kernels.quant_linear; lowering/quant_linears.py picks among them by M):
  bf16         cuBLAS on the bf16 weight (the baseline)
  int8-gemv    irlm's W8A16 GEMV                  int8-deq   dequantize kernel + cuBLAS
  int4-tiny    tinygemm (_weight_int4pack_mm)     int4-deq   dequantize kernel + cuBLAS
  fp8-gemv     GEMV with e4m3 weights, x rounded  fp8-mm     _scaled_mm (cuBLASLt fp8)
  w8a8         _int_mm (cuBLASLt int8) with per-token quantization and scaling
Each is timed over the four linears of one layer (fused qkv 6144x4096, o 4096x4096, fused
gate/up 28672x4096, down 4096x14336), replayed from a CUDA graph with the weights of 8 layers
rotated so that they do not sit in L2; median of 20 replays.  "GB/s" counts the weight bytes
each path must read once (int8/fp8 1 byte, int4 0.5 byte + scales, bf16 2 bytes) over its
time; the copy bandwidth measured first is the ceiling.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
LAYERS = 8


def copy_bandwidth() -> float:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for i in range(23):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) / 1e3)
    return 2 * n / statistics.median(times)


def timed_graph(fn) -> float:
    """Median seconds of one call of fn, replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def make_weights():
    from irlm.kernels import quant_linear as ql
    from irlm.passes.llm.quantize import quantize_fp8, quantize_int4, quantize_int8
    layers = []
    for _ in range(LAYERS):
        ws = []
        for n, k in SHAPES:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            q8, s8 = quantize_int8(w)
            q4, s4, z4 = quantize_int4(w, 128)
            packed, sz = ql.pack_int4_tinygemm(q4, s4, z4)
            f8, fs = quantize_fp8(w)
            ws.append({"bf16": w, "q8": q8, "s8": s8, "q4": q4, "s4": s4, "z4": z4,
                       "packed": packed, "sz": sz, "f8": f8, "fs": fs.reshape(())})
        layers.append(ws)
    return layers


def bytes_read(path: str) -> int:
    per = {"bf16": 2.0, "int4-tiny": 0.5, "int4-deq": 0.5}.get(path, 1.0)
    return int(sum(n * k for n, k in SHAPES) * per * LAYERS)


def paths(layers, x, xs):
    from irlm.kernels import quant_linear as ql
    F = torch.nn.functional
    m = x.shape[0]
    xs_v = float(xs)

    def each(f):
        def run():
            for ws in layers:
                for w, shape in zip(ws, SHAPES):
                    f(x if x.shape[1] == shape[1] else xk[shape[1]], w)
        return run
    xk = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, k in SHAPES}
    out = {"bf16": each(lambda x, w: F.linear(x, w["bf16"])),
           "int8-deq": each(lambda x, w: F.linear(
               x, ql.dequantize_int8(w["q8"], w["s8"], torch.bfloat16))),
           "int4-deq": each(lambda x, w: F.linear(
               x, ql.dequantize_int4(w["q4"], w["s4"], w["z4"], 128, torch.bfloat16))),
           "fp8-mm": each(lambda x, w: ql.fp8_linear(x, w["f8"], w["fs"], xs)),
           "w8a8": each(lambda x, w: ql.w8a8_linear(x, w["q8"], w["s8"]))}
    if m <= 16:
        out["int8-gemv"] = each(lambda x, w: ql.w8a16_gemv(x, w["q8"], w["s8"]))
        out["fp8-gemv"] = each(lambda x, w: ql.fp8_linear_gemv(x, w["f8"], w["fs"], xs, xs_v))
    if m <= 64:
        out["int4-tiny"] = each(lambda x, w: ql.int4_tinygemm(x, w["packed"], 128, w["sz"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", default="1,2,4,8,16,32,64,128,512")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s (read+write)", flush=True)
    layers = make_weights()
    results = {"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "rows": []}
    for m in (int(v) for v in a.m.split(",")):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        xs = (x.float().abs().amax() / 448.0).reshape(())
        for name, fn in paths(layers, x, xs).items():
            try:
                t = timed_graph(fn) / LAYERS
            except Exception as e:  # noqa: BLE001 - report and go on with the other paths
                print(f"M={m} {name}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            gbs = bytes_read(name) / LAYERS / t / 1e9
            results["rows"].append({"m": m, "path": name, "us_per_layer": t * 1e6,
                                    "weight_GBps": gbs})
            print(f"M={m:4d} {name:10s} {t * 1e6:8.1f} us/layer  weights {gbs:6.0f} GB/s "
                  f"({100 * gbs * 1e9 / bw:.0f}% of copy)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
