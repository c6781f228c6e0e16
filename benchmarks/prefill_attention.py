"""Prefill attention on the GPU: irlm's paths against the fastest attention torch offers.

    python benchmarks/prefill_attention.py [--json FILE]

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16), causal, packed
variable-length prompts with no cached prefix (a fresh prefill step), for prompt lengths 128
(512 requests), 2048 (8 requests) and 8192 (2 requests).  Rows:

* ``irlm prefill kernel``: kernels/src/prefill_attention.cu over the paged cache (the cache
  write timed separately; it is not part of the row).
* ``irlm fresh prefill``: what ``ops.paged_attention(..., fresh=True)`` runs for prompts
  with no cached prefix: torch's SDPA on a dense view when every prompt has one length
  (cuDNN first), its variable-length flash attention otherwise; again without the cache
  write.
* torch SDPA on dense ``[reqs, heads, len, D]`` tensors with each backend forced (flash,
  cuDNN, memory-efficient), K/V repeated to 32 heads where the backend needs it, and the
  variable-length flash function on packed tensors.

Each row's output is checked against an fp32 SDPA reference (relative L2 error).  Times are
medians of CUDA-event-timed calls; TFLOP/s counts the causal half (4·H·D·len²/2 per request).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F

from kernel_launches import events_time, rel_err  # benchmarks/ is on sys.path

H, KV, D, BS = 32, 8, 128, 16
DEV = "cuda"
bf16 = torch.bfloat16
ROWS: list[dict] = []


def events_ms(fn):
    return events_time(fn, 10)


def row(shape, name, ms, flops, err, best=None):
    r = {"shape": shape, "path": name, "ms": round(ms, 4),
         "TFLOP/s": round(flops / (ms * 1e-3) / 1e12, 1), "rel_err": err}
    ROWS.append(r)
    print(f"{shape:18s} {name:34s} {ms * 1e3:10.1f} us {r['TFLOP/s']:7.1f} TFLOP/s "
          f"err {err:.1e}", flush=True)
    return r


def bench(reqs, q_len):
    from irlm.kernels import ops
    shape = f"{reqs} x {q_len}"
    T = reqs * q_len
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(T, H, D, device=DEV, dtype=bf16, generator=g)
    k = torch.randn(T, KV, D, device=DEV, dtype=bf16, generator=g)
    v = torch.randn(T, KV, D, device=DEV, dtype=bf16, generator=g)
    q_lens = torch.full((reqs,), q_len, dtype=torch.int32, device=DEV)
    cached = torch.zeros(reqs, dtype=torch.int32, device=DEV)
    cu = ops.cu_seqlens(q_lens)
    per = -(-q_len // BS)
    cache = torch.zeros(1, reqs * per, 2, BS, KV, D, device=DEV, dtype=bf16)
    tables = torch.randperm(reqs * per, device=DEV).to(torch.int32).view(reqs, per)
    flops = 4 * reqs * H * D * q_len * (q_len + 1) / 2
    # reference: fp32 SDPA on the first (up to) 2 requests
    m = min(reqs, 2)
    qd, kd, vd = (x[:m * q_len].view(m, q_len, -1, D).transpose(1, 2) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qd.float(), kd.float().repeat_interleave(H // KV, 1),
                                         vd.float().repeat_interleave(H // KV, 1),
                                         is_causal=True)
    ref = ref.transpose(1, 2).reshape(m * q_len, H, D)

    ops.kv_cache_write(k, v, cache, 0, tables, q_lens, cached, cu_q_lens=cu)
    out = torch.empty_like(q)

    def ours():
        ops.prefill_attention(q, cache, 0, tables, q_lens, cached, out=out, cu_q_lens=cu,
                              max_q_len=q_len)
    ours()
    row(shape, "irlm prefill kernel (paged)", events_ms(ours), flops,
        rel_err(out[:m * q_len], ref))
    for name, uniform in (("one length: dense SDPA", q_len), ("varlen flash", None)):
        def fresh(uniform=uniform):
            return ops.paged_attention(q, k, v, cache, tables, q_lens, cached, 0,
                                       cu_q_lens=cu, max_q_len=q_len, max_kv_len=q_len,
                                       decode=False, write_kv=False, fresh=True,
                                       uniform_q_len=uniform)
        o = fresh()
        row(shape, f"irlm fresh prefill ({name})", events_ms(fresh), flops,
            rel_err(o[:m * q_len], ref))

    qt = q.view(reqs, q_len, H, D).transpose(1, 2)
    kt = k.view(reqs, q_len, KV, D).transpose(1, 2)
    vt = v.view(reqs, q_len, KV, D).transpose(1, 2)
    kr, vr = kt.repeat_interleave(H // KV, 1), vt.repeat_interleave(H // KV, 1)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for gqa in (False, True):
            try:
                with sdpa_kernel([be]):
                    if gqa:
                        fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
                            qt, kt, vt, is_causal=True, enable_gqa=True)
                    else:
                        fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
                            qt, kr, vr, is_causal=True)
                    o = fn()
                    ms = events_ms(fn)
                o = o.transpose(1, 2).reshape(T, H, D)
                row(shape, f"torch SDPA {name}{' gqa' if gqa else ' (K/V repeated)'}", ms,
                    flops, rel_err(o[:m * q_len], ref))
            except Exception as e:  # noqa: BLE001 - a backend that refuses the shape
                print(f"{shape:18s} torch SDPA {name}{' gqa' if gqa else ''}: "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    try:
        from torch.nn.attention.varlen import varlen_attn
        import inspect
        params = inspect.signature(varlen_attn).parameters
        kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        for name, kk, vv in (("gqa", k, v),
                             ("K/V repeated", k.repeat_interleave(H // KV, 1),
                              v.repeat_interleave(H // KV, 1))):
            try:
                fn = lambda: varlen_attn(q, kk, vv, cu, cu, q_len, q_len, **kw)  # noqa: E731
                o = fn()
                row(shape, f"torch varlen_attn ({name})", events_ms(fn), flops,
                    rel_err(o[:m * q_len], ref))
            except Exception as e:  # noqa: BLE001
                print(f"{shape:18s} torch varlen_attn ({name}): {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160]}")
    except ImportError as e:
        print(f"torch.nn.attention.varlen: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default="512x128,8x2048,2x8192")
    a = ap.parse_args()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import inspect
        from torch.nn.attention.varlen import varlen_attn
        info["varlen_attn"] = str(inspect.signature(varlen_attn))
    except ImportError:
        info["varlen_attn"] = None
    print(json.dumps(info), flush=True)
    for s in a.shapes.split(","):
        r, n = (int(x) for x in s.split("x"))
        try:
            bench(r, n)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{s}: FAILED {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "rows": ROWS}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
