"""Quantized-linear kernels one by one, on the GPU: time per call, TFLOP/s and GB/s of every
path per batch size M on Llama-3-8B's linear shapes, next to bf16 cuBLAS (device machine only).

    python benchmarks/quant_gemm.py [--m 1,8,16,32,64,128,256,512,2048,8192]
                                    [--shapes qkv,o,gate_up,down] [--paths ...] [--sweep]
                                    [--json OUT.json]

Paths (irlm.kernels; lowering/quant_linears.py picks among them by M):
  bf16         cuBLAS on the bf16 weight (the baseline)
  bf16-gemv    irlm's dense GEMV on the bf16 weight (M <= 16; the runner times it against
               cuBLAS at one row per shape, lowering/tactics.py); -w1: one warp a feature
               (the default shares a feature among 1-4 warps, gemv_warps_per_row)
  int8-gemv    irlm's W8A16 GEMV (M <= 16)        int8-gemm  Triton W8A16 GEMM (quant_gemm)
  int8-deq     dequantize kernel + cuBLAS
  int4-gemv    irlm's W4A16 GEMV on the stored layout, 2 features per warp (int4-gemv4: 4)
  int4-mma     the same on the tensor cores (exact q - z, mma.sync; groups of 128k), 8 warps
               a block splitting K (int4-mma-w1 .. -w8: 1, 2, 4, 8 warps)
  int4-tiny    tinygemm (_weight_int4pack_mm)     int4-gemm  Triton W4A16 GEMM (group 128)
  int4-deq     dequantize kernel + cuBLAS
  fp8-gemv     GEMV with e4m3 weights, x rounded (M <= 16)
  fp8-mm       _scaled_mm (cuBLASLt fp8)          w8a8       _int_mm with per-token scales
  fp8-mm-fast  _scaled_mm with use_fast_accum (not used by the runner: less exact sums)
Shapes: qkv 4096->6144 (fused), o 4096->4096, gate_up 4096->28672 (fused), down 14336->4096.

Each (shape, M, path) is one CUDA graph of 8 calls on 8 copies of the weights (so that they do
not sit in L2), median of 20 replays, divided by 8.  TFLOP/s counts 2*M*N*K; GB/s counts the
bytes each path must move at least once: the weight in its stored format (int4 with its
scales and zero points), x and the output.  The copy bandwidth measured first and bf16
cuBLAS's TFLOP/s at the largest M are the ceilings.  The summary after the table gives, per
mode, the fastest path at each M: where ``int8-deq`` / ``int4-deq`` beat the GEMM is where
``quant_gemm.GEMM_MAX_M`` belongs, and where ``int4-tiny`` beats ``int4-gemm`` says how far
``quant_linear.INT4_TINYGEMM_MAX_M`` should reach.

``--sweep``: also time every candidate launch configuration of the Triton GEMM
(``quant_gemm.CANDIDATES``, those with up to twice M's rows per tile) for int8 and int4 g128
at each shape and M >= 17, and print the fastest next to the one ``gemm_config`` picks.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
LAYERS = 8
GROUP = 128
ALL_PATHS = ("bf16", "bf16-gemv", "bf16-gemv-w1", "int8-gemv", "int8-gemv-w1", "int8-gemm",
             "int8-deq", "int4-gemv", "int4-gemv4", "int4-mma", "int4-mma-w1", "int4-mma-w2",
             "int4-mma-w4", "int4-mma-w8", "int4-tiny", "int4-gemm", "int4-deq", "fp8-gemv",
             "fp8-mm", "fp8-mm-fast", "w8a8")
#: tinygemm above this many rows takes seconds per graph; not timed there
TINYGEMM_LIMIT = 2048
GEMV_LIMIT = 16          # the GEMV kernels measured up to here, whatever the runtime limit


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


def timed_graph(fn, replays: int = 20) -> float:
    """Median seconds of one call of fn, replayed from a CUDA graph (warmed up first on a side
    stream, which also compiles the Triton kernels)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del g
    return statistics.median(times)


def make_weights(n: int, k: int) -> list[dict]:
    from irlm.kernels import quant_gemm as qg, quant_linear as ql
    from irlm.passes.llm.quantize import quantize_fp8, quantize_int4, quantize_int8
    layers = []
    for _ in range(LAYERS):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q8, s8 = quantize_int8(w)
        q4, s4, z4 = quantize_int4(w, GROUP)
        packed, sz = ql.pack_int4_tinygemm(q4, s4, z4)
        s4t, z4t = qg.prepare_int4_scales(s4, z4)
        f8, fs = quantize_fp8(w)
        layers.append({"bf16": w, "q8": q8, "s8": s8.float().contiguous(), "q4": q4,
                       "s4": s4.float().contiguous(), "z4": z4, "s4t": s4t, "z4t": z4t,
                       "packed": packed, "sz": sz, "f8": f8, "fs": fs.reshape(())})
    return layers


def min_bytes(path: str, m: int, n: int, k: int) -> float:
    weight = 2.0 * n * k if path.startswith("bf16") else 1.0 * n * k
    if path.startswith("int4"):
        weight = 0.5 * n * k + n * (k // GROUP) * 5        # f32 scale + u8 zero per group
    return weight + 2.0 * m * k + 2.0 * m * n


def path_fns(layers, x, xs, names) -> dict:
    from irlm.kernels import gemv as dense, quant_gemm as qg, quant_linear as ql
    F = torch.nn.functional
    m = x.shape[0]
    xs_v = float(xs)

    def each(f):
        def run():
            for w in layers:
                f(w)
        return run
    fns = {
        "bf16": each(lambda w: F.linear(x, w["bf16"])),
        "int8-gemm": each(lambda w: qg.w8a16_gemm(x, w["q8"], w["s8"])),
        "int8-deq": each(lambda w: F.linear(
            x, ql.dequantize_int8(w["q8"], w["s8"], torch.bfloat16))),
        "int4-gemm": each(lambda w: qg.w4a16_gemm(x, w["q4"], w["s4t"], w["z4t"], GROUP)),
        "int4-deq": each(lambda w: F.linear(
            x, ql.dequantize_int4(w["q4"], w["s4"], w["z4"], GROUP, torch.bfloat16))),
        "fp8-mm": each(lambda w: ql.fp8_linear(x, w["f8"], w["fs"], xs)),
        "fp8-mm-fast": each(lambda w: ql.fp8_linear(x, w["f8"], w["fs"], xs, fast_accum=True)),
        "w8a8": each(lambda w: ql.w8a8_linear(x, w["q8"], w["s8"])),
    }
    if m <= GEMV_LIMIT:
        fns["bf16-gemv"] = each(lambda w: dense.gemv(x, w["bf16"]))
        fns["int8-gemv"] = each(lambda w: ql.w8a16_gemv(x, w["q8"], w["s8"]))
        # one warp a feature whatever the shape (before 2026-12-05)
        fns["bf16-gemv-w1"] = each(lambda w: dense.gemv(x, w["bf16"], warps_per_row=1))
        fns["int8-gemv-w1"] = each(lambda w: ql.w8a16_gemv(x, w["q8"], w["s8"],
                                                           warps_per_row=1))
        fns["fp8-gemv"] = each(lambda w: ql.fp8_linear_gemv(x, w["f8"], w["fs"], xs, xs_v))
        fns["int4-gemv"] = each(lambda w: ql.w4a16_gemv(x, w["q4"], w["s4"], w["z4"], GROUP,
                                                        rows=2, tensor_cores=False))
        fns["int4-gemv4"] = each(lambda w: ql.w4a16_gemv(x, w["q4"], w["s4"], w["z4"], GROUP,
                                                         rows=4, tensor_cores=False))
        fns["int4-mma"] = each(lambda w: ql.w4a16_gemv(x, w["q4"], w["s4"], w["z4"], GROUP,
                                                       tensor_cores=True))
        for wp in (1, 2, 4, 8):     # the warps a block, against the default 8
            fns[f"int4-mma-w{wp}"] = each(lambda w, wp=wp: ql.w4a16_gemv(
                x, w["q4"], w["s4"], w["z4"], GROUP, tensor_cores=True, warps=wp))
    if m <= TINYGEMM_LIMIT:
        fns["int4-tiny"] = each(lambda w: ql.int4_tinygemm(x, w["packed"], GROUP, w["sz"]))
    return {p: fns[p] for p in names if p in fns}


def sweep(layers, x, n, k) -> list[dict]:
    """Every candidate configuration for int8 and int4 on this shape and M: rows."""
    from irlm.kernels import quant_gemm as qg
    m = x.shape[0]
    cap = 2 * max(16, 1 << (m - 1).bit_length())
    rows = []
    for mode in ("int8", "int4"):
        group = GROUP if mode == "int4" else 0
        picked = qg.gemm_config(m, n, k, group, torch.cuda.get_device_properties(0)
                                .multi_processor_count)
        for cand in (c for c in qg.CANDIDATES if c.bm <= cap):
            cfg = qg.fit_config(cand, k)

            def run(cfg=cfg, mode=mode):
                for w in layers:
                    if mode == "int8":
                        qg.w8a16_gemm(x, w["q8"], w["s8"], config=cfg)
                    else:
                        qg.w4a16_gemm(x, w["q4"], w["s4t"], w["z4t"], GROUP, config=cfg)
            try:
                t = timed_graph(run, replays=10) / LAYERS
            except Exception as e:  # noqa: BLE001 - report and go on with the others
                print(f"    sweep {mode} {cfg.describe()}: failed: {type(e).__name__}: {e}",
                      flush=True)
                continue
            rows.append({"mode": mode, "config": cfg.describe(), "us": t * 1e6,
                         "picked": cfg == picked})
    for mode in ("int8", "int4"):
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["us"])
        pick = next((r for r in mine if r["picked"]), None)
        print(f"    sweep {mode}: best {best['config']} {best['us']:.1f} us; table's "
              f"{pick['config'] if pick else '?'} "
              f"{pick['us'] if pick else float('nan'):.1f} us "
              f"({len(mine)} candidates)", flush=True)
    return rows


def summary(rows: list[dict]) -> None:
    """Per shape and M: the fastest path of each weight-only mode, and bf16."""
    print("\nfastest weight-only path per shape and M (us; bf16 for reference)")
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["m"]), {})[r["path"]] = r["us"]
    for (shape, m), t in sorted(by.items(), key=lambda kv: (list(SHAPES).index(kv[0][0]),
                                                             kv[0][1])):
        parts = []
        for mode in ("int8", "int4"):
            cands = {p: v for p, v in t.items() if p.startswith(mode)}
            if cands:
                p = min(cands, key=cands.get)
                parts.append(f"{mode}: {p} {cands[p]:.1f}")
        print(f"  {shape:8s} M={m:5d}  bf16 {t.get('bf16', float('nan')):8.1f}  "
              + "  ".join(parts), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", default="1,8,16,32,64,128,256,512,2048,8192")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--paths", default=",".join(ALL_PATHS))
    ap.add_argument("--sweep", action="store_true",
                    help="also time every candidate configuration of the Triton GEMM")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    names = a.paths.split(",")
    bad = [p for p in names if p not in ALL_PATHS]
    if bad:
        ap.error(f"--paths: unknown {', '.join(bad)} (known: {', '.join(ALL_PATHS)})")
    bad = [s for s in a.shapes.split(",") if s not in SHAPES]
    if bad:
        ap.error(f"--shapes: unknown {', '.join(bad)} (known: {', '.join(SHAPES)})")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s (read+write)", flush=True)
    results = {"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9,
               "torch": torch.__version__, "rows": [], "sweep": []}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        pass
    ms = [int(v) for v in a.m.split(",")]
    for shape in a.shapes.split(","):
        n, k = SHAPES[shape]
        layers = make_weights(n, k)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xs = (x.float().abs().amax() / 448.0).reshape(())
            flops = 2.0 * m * n * k
            base = None
            for name, fn in path_fns(layers, x, xs, names).items():
                try:
                    t = timed_graph(fn) / LAYERS
                except Exception as e:  # noqa: BLE001 - report and go on with the other paths
                    print(f"{shape} M={m} {name}: failed: {type(e).__name__}: {e}", flush=True)
                    continue
                gbs = min_bytes(name, m, n, k) / t / 1e9
                if name == "bf16":
                    base = t
                vs = f"  {base / t:5.2f}x bf16" if base else ""
                results["rows"].append({"shape": shape, "n": n, "k": k, "m": m, "path": name,
                                        "us": t * 1e6, "TFLOPs": flops / t / 1e12,
                                        "GBps": gbs})
                print(f"{shape:8s} M={m:5d} {name:10s} {t * 1e6:9.1f} us  "
                      f"{flops / t / 1e12:6.1f} TFLOP/s  {gbs:6.0f} GB/s "
                      f"({100 * gbs * 1e9 / bw:3.0f}% of copy){vs}", flush=True)
            if a.sweep and m > 16:
                for r in sweep(layers, x, n, k):
                    results["sweep"].append({"shape": shape, "m": m, **r})
        del layers
        torch.cuda.empty_cache()
    summary(results["rows"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
