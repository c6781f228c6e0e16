"""Check and time irlm's CUDA kernels at Llama-3-8B shapes on the GPU.

    python benchmarks/kernel_launches.py [--quick] [--json FILE]

Llama-3-8B: 32 query heads, 8 kv heads, head_dim 128, hidden 4096, intermediate 14336, vocab
128256, bf16, paged cache with 16-token blocks.  For each kernel: a correctness check against
torch at the benchmark shape (‖out − ref‖ / ‖ref‖), then the GPU time per call as the median
over replays of a CUDA graph holding several calls (so Python launch overhead is excluded;
inputs rotate over enough copies to exceed L2 where they are small), and the achieved
bandwidth (fewest bytes the call must move / time) against a device-to-device copy measured
in the same run (bytes read + written).  Prefill attention also reports TFLOP/s.  Decode
attention is also timed over int8 and fp8 KV caches (``kv_scales``; the bytes counted are the
8-bit cache's).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch

try:
    from irlm.kernels import ops
except ImportError:  # not installed: run from the checkout (needs the package-dir mapping)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from irlm.kernels import ops
from irlm.kernels.nvrtc import precompile  # noqa: E402

DEV = "cuda"
H, KV, D, HIDDEN, INTER, VOCAB, BS = 32, 8, 128, 4096, 14336, 128256, 16
bf16 = torch.bfloat16
L2_BYTES = 200 * 2 ** 20  # rotate inputs until each graph replay touches at least this much

RESULTS: list[dict] = []


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def events_time(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over reps runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_time(calls, reps: int = 15) -> float:
    """Median milliseconds per call: the calls (closures) are captured in one CUDA graph."""
    for c in calls:       # warm-up: compiles, loads modules, raises smem limits
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return events_time(g.replay, reps) / len(calls)


def copies_for(nbytes: int, cap: int = 32) -> int:
    return max(1, min(cap, math.ceil(L2_BYTES / max(nbytes, 1))))


def record(name, shape, ms, nbytes, err, copy_bw, flops=None, note=""):
    bw = nbytes / (ms * 1e-3) / 1e9
    row = {"kernel": name, "shape": shape, "us": round(ms * 1e3, 2), "GB/s": round(bw, 1),
           "pct_copy": round(100 * bw / copy_bw, 1), "rel_err": err, "note": note}
    if flops:
        row["TFLOP/s"] = round(flops / (ms * 1e-3) / 1e12, 1)
    RESULTS.append(row)
    tf = f"  {row['TFLOP/s']:7.1f} TFLOP/s" if flops else ""
    print(f"{name:28s} {shape:34s} {row['us']:10.1f} us {bw:8.1f} GB/s "
          f"{row['pct_copy']:6.1f}% copy  err {err:.2e}{tf} {note}", flush=True)


# ---- ceilings -----------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    n = 2 ** 30
    a = torch.randn(n // 4, device=DEV)
    b = torch.empty_like(a)
    ms = events_time(lambda: b.copy_(a), 20)
    bw = 2 * n / (ms * 1e-3) / 1e9
    print(f"device-to-device copy: 1 GiB in {ms:.3f} ms = {bw:.0f} GB/s (read + write)")
    return bw


def matmul_tflops() -> float:
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=bf16)
    b = torch.randn(n, n, device=DEV, dtype=bf16)
    ms = events_time(lambda: a @ b, 10)
    tf = 2 * n ** 3 / (ms * 1e-3) / 1e12
    print(f"bf16 matmul 8192^3: {ms:.3f} ms = {tf:.0f} TFLOP/s")
    return tf


# ---- kernels ------------------------------------------------------------------------------------
def bench_rms(tokens, copy_bw):
    es = 2
    nbytes = (4 * tokens * HIDDEN + HIDDEN) * es  # x, residual in; residual, out out; w
    n = copies_for(nbytes)
    xs = [torch.randn(tokens, HIDDEN, device=DEV, dtype=bf16) for _ in range(n)]
    rs = [torch.randn(tokens, HIDDEN, device=DEV, dtype=bf16) for _ in range(n)]
    w = (1 + 0.1 * torch.randn(HIDDEN, device=DEV)).to(bf16)
    outs = [torch.empty_like(x) for x in xs]
    # correctness (fresh copies: the kernel updates residual in place)
    x0, r0 = xs[0].clone(), rs[0].clone()
    out, _ = ops.fused_add_rms_norm(x0, r0, w, 1e-5)
    s = (xs[0].float() + rs[0].float()).to(bf16).float()
    ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    err = rel_err(out, ref)
    calls = [lambda i=i: ops.fused_add_rms_norm(xs[i], rs[i], w, 1e-5, out=outs[i])
             for i in range(n)]
    ms = graph_time(calls)

    def torch_eager(i=0):
        r = xs[i] + rs[i]
        rf = r.float()
        return (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf16) * w
    tms = events_time(torch_eager, 10)
    record("fused_add_rms_norm", f"{tokens}x{HIDDEN} bf16", ms, nbytes, err, copy_bw,
           note=f"(torch eager {tms * 1e3:.1f} us)")


def bench_act(tokens, copy_bw):
    nbytes = tokens * 3 * INTER * 2
    n = copies_for(nbytes)
    xs = [torch.randn(tokens, 2 * INTER, device=DEV, dtype=bf16) for _ in range(n)]
    outs = [torch.empty(tokens, INTER, device=DEV, dtype=bf16) for _ in range(n)]
    out = ops.gated_act(xs[0], "silu")
    ref = torch.nn.functional.silu(xs[0][:, :INTER].float()) * xs[0][:, INTER:].float()
    err = rel_err(out, ref)
    ms = graph_time([lambda i=i: ops.gated_act(xs[i], "silu", out=outs[i]) for i in range(n)])
    tms = events_time(lambda: torch.nn.functional.silu(xs[0][:, :INTER]) * xs[0][:, INTER:], 10)
    record("gated_act silu", f"{tokens}x{2 * INTER} bf16", ms, nbytes, err, copy_bw,
           note=f"(torch eager {tms * 1e3:.1f} us)")


def paged_setup(reqs, q_len, cached, copies=1, layers=1):
    """Block tables for `copies` disjoint sets of blocks (rotated to defeat L2)."""
    per = -(-(cached + q_len) // BS)
    nblocks = reqs * per * copies
    cache = torch.randn(layers, nblocks, 2, BS, KV, D, device=DEV, dtype=bf16)
    perm = torch.randperm(nblocks, device=DEV).to(torch.int32)
    tables = [perm[c * reqs * per:(c + 1) * reqs * per].view(reqs, per).contiguous()
              for c in range(copies)]
    q_lens = torch.full((reqs,), q_len, dtype=torch.int32, device=DEV)
    cached_lens = torch.full((reqs,), cached, dtype=torch.int32, device=DEV)
    return cache, tables, q_lens, cached_lens


def bench_rope(tokens, copy_bw):
    reqs = max(1, tokens // 128) if tokens > 256 else tokens
    q_len = tokens // reqs
    nbytes = tokens * D * 2 * (2 * H + 2 * KV + KV + 2 * KV)  # q, k r/w; v read; k, v to cache
    n = copies_for(nbytes, 8)
    cache, tables, q_lens, cached = paged_setup(reqs, q_len, 1000, copies=n)
    cu = ops.cu_seqlens(q_lens)
    inv = ops.rope_inv_freq(D, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}).to(DEV)
    qkv = [torch.randn(tokens, (H + 2 * KV) * D, device=DEV, dtype=bf16) for _ in range(n)]

    def views(t):
        return (t[:, :H * D].view(tokens, H, D), t[:, H * D:(H + KV) * D].view(tokens, KV, D),
                t[:, (H + KV) * D:].view(tokens, KV, D))
    # correctness: rotate-half reference in float32
    q, k, v = views(qkv[0].clone())
    pos = (cached[:, None] + torch.arange(q_len, device=DEV)[None]).reshape(-1)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    qf = q.float()
    ref = torch.cat([qf[..., :64] * cos - qf[..., 64:] * sin, qf[..., 64:] * cos + qf[..., :64] * sin], -1)
    ops.rope_kv_write(q, k, inv, v=v, kv_cache=cache, layer=0, block_tables=tables[0],
                      cached_lens=cached, cu_q_lens=cu)
    err = rel_err(q, ref)

    def call(i):
        q, k, v = views(qkv[i])
        ops.rope_kv_write(q, k, inv, v=v, kv_cache=cache, layer=0, block_tables=tables[i],
                          cached_lens=cached, cu_q_lens=cu)
    ms = graph_time([lambda i=i: call(i) for i in range(n)])
    record("rope_kv_write (llama3)", f"{tokens} tok, {H}+{KV}+{KV} heads", ms, nbytes, err,
           copy_bw)


KV_CACHES = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def bench_decode(batch, ctx, copy_bw, kv=None):
    """``kv``: None (a bf16 cache) or "int8" / "fp8" (an 8-bit cache with scales for N(0, 1)
    keys and values of amax 4, as quantize-kv-cache would calibrate them)."""
    es = 2 if kv is None else 1
    kv_bytes = batch * ctx * KV * D * 2 * es
    nbytes = kv_bytes + batch * H * D * 2 * 2
    n = copies_for(nbytes, 16)
    cache, tables, q_lens, cached = paged_setup(batch, 1, ctx - 1, copies=n)
    scales = None
    if kv is not None:
        from irlm.ops.llm import kv_to_cache
        cdt, qmax = KV_CACHES[kv]
        scales = (4.0 / qmax, 4.0 / qmax)
        cache = kv_to_cache(cache, cdt, scales[0])
    qs = [torch.randn(batch, H, D, device=DEV, dtype=bf16) for _ in range(n)]
    outs = [torch.empty_like(q) for q in qs]
    out = ops.paged_attention_decode(qs[0], cache, 0, tables[0], cached, max_kv_len=ctx,
                                     kv_scales=scales)
    # reference on the GPU (float32) for up to 16 requests
    m = min(batch, 16)
    blocks = tables[0][:m].long()
    sk, sv = scales or (1.0, 1.0)
    # gathered as bytes (indexing float8 tensors is not supported everywhere), then decoded
    raw = cache if kv is None else cache.view(torch.uint8)
    kc, vc = (raw[0, blocks, i] if kv is None else raw[0, blocks, i].view(cache.dtype)
              for i in (0, 1))
    kc = kc.reshape(m, -1, KV, D)[:, :ctx].float().repeat_interleave(H // KV, 2)
    vc = vc.reshape(m, -1, KV, D)[:, :ctx].float().repeat_interleave(H // KV, 2)
    s = torch.einsum("rhd,rthd->rht", qs[0][:m].float(), kc * sk) / math.sqrt(D)
    ref = torch.einsum("rht,rthd->rhd", torch.softmax(s, -1), vc * sv)
    err = rel_err(out[:m], ref)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits, _ = ops.choose_splits(batch * KV, ctx, 64, sms)
    ms = graph_time([lambda i=i: ops.paged_attention_decode(
        qs[i], cache, 0, tables[i], cached, out=outs[i], max_kv_len=ctx, kv_scales=scales)
        for i in range(n)])
    host = events_time(lambda: ops.paged_attention_decode(qs[0], cache, 0, tables[0], cached,
                                                          out=outs[0], max_kv_len=ctx,
                                                          kv_scales=scales), 20)
    name = "paged_attention_decode" + ("" if kv is None else f" ({kv} cache)")
    record(name, f"batch {batch} ctx {ctx}", ms, nbytes, err, copy_bw,
           note=f"splits {splits}; eager call {host * 1e3:.0f} us")


def bench_decode_splits(batch, ctx, copy_bw):
    """Time the decode kernel (+ reduce) at forced partition counts, to tune choose_splits."""
    nbytes = batch * ctx * KV * D * 2 * 2 + batch * H * D * 2 * 2
    n = copies_for(nbytes, 16)
    cache, tables, q_lens, cached = paged_setup(batch, 1, ctx - 1, copies=n)
    qs = [torch.randn(batch, H, D, device=DEV, dtype=bf16) for _ in range(n)]
    outs = [torch.empty_like(q) for q in qs]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen, _ = ops.choose_splits(batch * KV, ctx, 64, sms)
    line = []
    for ns in (1, 4, 8, 16, 32, 64, 128):
        if ns > 1 and ctx // ns < 64:
            continue
        ms = graph_time([lambda i=i: ops.paged_attention_decode(
            qs[i], cache, 0, tables[i], cached, out=outs[i], max_kv_len=ctx, num_splits=ns)
            for i in range(n)])
        line.append(f"{ns}:{ms * 1e3:.1f}")
    print(f"decode split sweep batch {batch} ctx {ctx} (splits:us; planner picks {chosen}): "
          + " ".join(line), flush=True)


def bench_prefill(reqs, q_len, copy_bw):
    tokens = reqs * q_len
    cache, tables, q_lens, cached = paged_setup(reqs, q_len, 0)
    cu = ops.cu_seqlens(q_lens)
    q = torch.randn(tokens, H, D, device=DEV, dtype=bf16)
    k = torch.randn(tokens, KV, D, device=DEV, dtype=bf16)
    v = torch.randn(tokens, KV, D, device=DEV, dtype=bf16)
    out = torch.empty_like(q)
    ops.kv_cache_write(k, v, cache, 0, tables[0], q_lens, cached, cu_q_lens=cu)
    ops.prefill_attention(q, cache, 0, tables[0], q_lens, cached, out=out, cu_q_lens=cu,
                          max_q_len=q_len)
    # reference: SDPA per request batch (all requests have the same length here)
    m = min(reqs, 64)
    qr = q[:m * q_len].view(m, q_len, H, D).transpose(1, 2)
    kr = k[:m * q_len].view(m, q_len, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1)
    vr = v[:m * q_len].view(m, q_len, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(qr.float(), kr.float(), vr.float(),
                                                           is_causal=True)
    err = rel_err(out[:m * q_len].view(m, q_len, H, D).transpose(1, 2), ref)
    flops = 4 * reqs * H * D * (q_len * (q_len + 1) // 2)
    nbytes = tokens * D * 2 * (2 * H + 2 * KV)
    ms = graph_time([lambda: ops.prefill_attention(q, cache, 0, tables[0], q_lens, cached,
                                                   out=out, cu_q_lens=cu, max_q_len=q_len)] * 3)
    record("prefill_attention", f"{reqs} req x {q_len} tok", ms, nbytes, err, copy_bw,
           flops=flops)
    qt, kt, vt = (x[:m * q_len].view(m, q_len, -1, D).transpose(1, 2) for x in (q, k, v))
    kt, vt = kt.repeat_interleave(H // KV, 1), vt.repeat_interleave(H // KV, 1)
    sdpa = events_time(lambda: torch.nn.functional.scaled_dot_product_attention(
        qt, kt, vt, is_causal=True), 10) * reqs / m
    print(f"{'':28s} (torch SDPA on dense bf16, same work: {sdpa * 1e3:.0f} us)")
    kvb = tokens * KV * D * 2 * 2 * 2
    ms = graph_time([lambda: ops.kv_cache_write(k, v, cache, 0, tables[0], q_lens, cached,
                                                cu_q_lens=cu)] * 3)
    record("kv_cache_write", f"{tokens} tok", ms, kvb, 0.0, copy_bw)


def bench_sampling(batch, copy_bw):
    nbytes = batch * VOCAB * 4
    n = copies_for(nbytes, 16)
    ls = [torch.randn(batch, VOCAB, device=DEV) * 3 for _ in range(n)]
    outs = [torch.empty(batch, dtype=torch.int32, device=DEV) for _ in range(n)]
    g = ops.greedy(ls[0])
    err = float((g.long() != ls[0].argmax(-1)).sum())
    ms = graph_time([lambda i=i: ops.greedy(ls[i], out=outs[i]) for i in range(n)])
    tms = events_time(lambda: ls[0].argmax(-1), 10)
    record("sample greedy", f"{batch}x{VOCAB} f32", ms, nbytes, err, copy_bw,
           note=f"(torch argmax {tms * 1e3:.1f} us)")
    temp = torch.full((batch,), 0.8, device=DEV)
    tk = torch.full((batch,), 50, dtype=torch.int32, device=DEV)
    tp = torch.full((batch,), 0.9, device=DEV)
    seeds = torch.arange(batch, dtype=torch.int64, device=DEV)
    offs = torch.zeros(batch, dtype=torch.int64, device=DEV)
    ms = graph_time([lambda i=i: ops.sample(ls[i], temp, tk, tp, seeds, offs, out=outs[i])
                     for i in range(n)])
    record("sample top-k 50 top-p 0.9", f"{batch}x{VOCAB} f32", ms, nbytes, 0.0, copy_bw,
           note="(bytes: one read of the logits)")


def diagnose():
    """Small attention cases with known answers, printed as a ladder (for debugging)."""
    torch.manual_seed(0)

    def case(dtype, heads, kv, d, ctxs, qlens, zero_q=False, bs=16):
        R = len(ctxs)
        per = [-(-(c + n) // bs) for c, n in zip(ctxs, qlens)]
        nb = sum(per) + 1
        cache = torch.randn(1, nb, 2, bs, kv, d, device=DEV).to(dtype)
        tables = torch.zeros(R, max(per), dtype=torch.int32, device=DEV)
        at = 0
        for r, n in enumerate(per):
            tables[r, :n] = torch.arange(at, at + n, dtype=torch.int32)
            at += n
        T = sum(qlens)
        q = torch.randn(T, heads, d, device=DEV).to(dtype)
        if zero_q:
            q.zero_()
        k = torch.randn(T, kv, d, device=DEV).to(dtype)
        v = torch.randn(T, kv, d, device=DEV).to(dtype)
        ql = torch.tensor(qlens, dtype=torch.int32, device=DEV)
        cl = torch.tensor(ctxs, dtype=torch.int32, device=DEV)
        ref_cache = cache.clone().cpu()
        from irlm.ops.llm import write_kv
        from irlm.registry import get_op_def
        ref = get_op_def("llm.paged_attention").run_reference(
            [q.cpu().float(), k.cpu().float(), v.cpu().float(), ref_cache.float(),
             tables.cpu(), ql.cpu(), cl.cpu()], {"layer": 0})[0]
        out = torch.full_like(q, float("nan"))
        ops.paged_attention(q, k, v, cache, tables, ql, cl, 0, out=out)
        torch.cuda.synchronize()
        o, rf = out.float().cpu(), ref
        nan = int((~torch.isfinite(o)).sum())
        err = rel_err(o.nan_to_num(0), rf)
        by_dim = ((o - rf).nan_to_num(0).pow(2).sum((0, 1)).view(-1, 8).sum(1).sqrt()
                  / rf.pow(2).sum((0, 1)).view(-1, 8).sum(1).sqrt().clamp_min(1e-9))
        by_head = ((o - rf).nan_to_num(0).pow(2).sum((0, 2)).sqrt()
                   / rf.pow(2).sum((0, 2)).sqrt().clamp_min(1e-9))
        print(f"{str(dtype)[6:]:8s} H{heads} KV{kv} D{d} ctx {ctxs} q {qlens} zero_q={zero_q}: "
              f"err {err:.2e} nan {nan}  by8dims {[round(x, 2) for x in by_dim.tolist()]} "
              f"byhead {[round(x, 2) for x in by_head.tolist()]}", flush=True)

    for dtype in (bf16, torch.float32):
        for zq in (True, False):
            case(dtype, 8, 8, 128, [0], [1], zq)
            case(dtype, 8, 8, 128, [1], [1], zq)
            case(dtype, 8, 8, 128, [15], [1], zq)
            case(dtype, 8, 8, 128, [16], [1], zq)
            case(dtype, 8, 2, 128, [100], [1], zq)
            case(dtype, 8, 8, 128, [3000], [1], zq)
            case(dtype, 8, 8, 128, [0], [1 + 0], zq)
            case(dtype, 8, 8, 128, [0, 0], [2, 1], zq)
            case(dtype, 8, 8, 64, [0], [20], zq)
            case(dtype, 8, 2, 128, [5], [70], zq)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--diag", action="store_true", help="only the small attention ladder")
    ap.add_argument("--dump-cubins", default=None, metavar="DIR",
                    help="also write every compiled cubin there (for cuobjdump -sass)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark")
        return 1
    if args.diag:
        diagnose()
        return 0
    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "sms": props.multi_processor_count,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "command": " ".join([os.path.basename(sys.executable)]
                                                             + sys.argv)}
    print(json.dumps(info))
    t0 = time.time()
    mods = precompile(ops.all_kernels())
    print(f"compiled / loaded every kernel in {time.time() - t0:.1f} s")
    if args.dump_cubins:
        os.makedirs(args.dump_cubins, exist_ok=True)
        for k, mod in zip(ops.all_kernels(), mods):
            name = k.names[0].split("<")[0] + "_" + k.names[0].split("<")[1].split(",")[0]
            name = name.replace(">", "").replace(" ", "")
            if "attention" in name:
                name += "_d" + k.names[0].split(",")[1].strip()
            with open(os.path.join(args.dump_cubins, name + ".cubin"), "wb") as f:
                f.write(mod.cubin)
    copy_bw = copy_bandwidth()
    info["copy_GBps"] = round(copy_bw, 1)
    info["matmul_TFLOPs"] = round(matmul_tflops(), 1)
    sections = [
        *(lambda b=b: bench_rms(b, copy_bw) for b in (1, 32, 256, 65536)),
        *(lambda b=b: bench_act(b, copy_bw) for b in (32, 256, 8192)),
        *(lambda b=b: bench_rope(b, copy_bw) for b in (32, 256, 65536)),
        *(lambda b=b, c=c: bench_decode(b, c, copy_bw)
          for b in (1, 32, 256) for c in ((128, 2048) if args.quick else (128, 512, 2048))),
        lambda: bench_decode(1, 16384, copy_bw),
        *(lambda b=b, c=c, kv=kv: bench_decode(b, c, copy_bw, kv)
          for kv in KV_CACHES for b, c in ((1, 2048), (32, 2048), (256, 512), (256, 2048))),
        *(lambda b=b, c=c: bench_decode_splits(b, c, copy_bw)
          for b, c in ((1, 2048), (1, 16384), (8, 8192), (32, 2048))),
        lambda: bench_prefill(512, 128, copy_bw),
        lambda: bench_prefill(8, 2048, copy_bw),
        *(lambda b=b: bench_sampling(b, copy_bw) for b in (1, 32, 256)),
    ]
    for s in sections:
        try:
            s()
        except Exception as e:  # noqa: BLE001 - report and go on to the next kernel
            print(f"FAILED: {type(e).__name__}: {e}", flush=True)
            RESULTS.append({"kernel": "FAILED", "error": f"{type(e).__name__}: {e}"})
            torch.cuda.synchronize()
    print("\n| kernel | shape | us | GB/s | % of copy | TFLOP/s | rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in RESULTS:
        if r["kernel"] == "FAILED":
            print(f"| FAILED | {r['error']} | | | | | |")
            continue
        print(f"| {r['kernel']} | {r['shape']} | {r['us']} | {r['GB/s']} | {r['pct_copy']} | "
              f"{r.get('TFLOP/s', '')} | {r['rel_err']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": RESULTS}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
