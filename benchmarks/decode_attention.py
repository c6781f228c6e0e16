"""Decode attention over the paged KV cache: time per call against the number of context
partitions (flash-decoding splits), Llama-3-8B's attention (32 heads, 8 KV heads, head 128,
bf16, blocks of 16 tokens), to set ``choose_splits`` (kernels/src/ops.py) from measurements.

    python benchmarks/decode_attention.py [--batch 1,8,32] [--context 256,1024,4096]
                                          [--splits auto,1,2,4,8,16,32] [--fold off,on]

Each (batch, context, splits) is one CUDA graph of 32 calls, one per layer of a 32-layer cache
(as a decode step runs them), median of 20 replays, divided by 32; the graph's bound on the
context is the decode graphs' bucket (the context rounded up to a power of two, at least 256),
as the CUDA runner captures them, while every request's real context is ``context``.  The
split-combining kernel, when the splits ask for it, is included; ``--fold on`` times the
partitions combined in the attention kernel's last CTA instead (IRLM_FOLD_SPLITS=1).  GB/s
counts the K and V bytes read.
"""
from __future__ import annotations

import argparse
import os

import torch

LAYERS, HEADS, KV_HEADS, D, BLOCK = 32, 32, 8, 128, 16


def bucket(ctx: int) -> int:
    b = 256
    while b < ctx:
        b *= 2
    return b


def time_config(batch, ctx, splits, cache, tables, cached, q, out):
    """Microseconds a layer: one CUDA graph of LAYERS calls, the median of 20 replays."""
    from irlm.kernels import ops
    from kernel_launches import graph_time
    bound = bucket(ctx + 1)
    calls = [lambda layer=layer: ops.paged_attention_decode(
        q, cache, layer, tables, cached, out=out, max_kv_len=bound, num_splits=splits)
        for layer in range(LAYERS)]
    return graph_time(calls, reps=20) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--context", default="256,1024,4096")
    ap.add_argument("--splits", default="auto,1,2,4,8,16,32")
    ap.add_argument("--fold", default="off",
                    help="off, on or off,on: the partitions combined by the reduce kernel or "
                         "in the attention kernel (IRLM_FOLD_SPLITS)")
    a = ap.parse_args()
    folds = a.fold.split(",")
    if not folds or any(f not in ("off", "on") for f in folds):
        ap.error(f"--fold: expected off, on or off,on; got {a.fold!r}")
    try:
        batches = [int(x) for x in a.batch.split(",")]
        contexts = [int(x) for x in a.context.split(",")]
        splits = [None if x == "auto" else int(x) for x in a.splits.split(",")]
    except ValueError:
        ap.error("--batch, --context: integers; --splits: auto or integers, comma-separated")
    if min(batches) < 1 or min(contexts) < 1 or any(s is not None and s < 1 for s in splits):
        ap.error("--batch, --context and --splits must be positive")
    from irlm.kernels import ops
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs; {LAYERS} layers, {HEADS}/{KV_HEADS} "
          f"heads, D {D}, bf16, blocks of {BLOCK}")
    g = torch.Generator(device="cpu").manual_seed(0)
    for batch in batches:
        for ctx in contexts:
            per_req = -(-(ctx + 1) // BLOCK)
            nblocks = batch * per_req + 1
            cache = torch.randn(LAYERS, nblocks, 2, BLOCK, KV_HEADS, D, generator=g,
                                dtype=torch.bfloat16).to(dev)
            width = -(-bucket(ctx + 1) // BLOCK)
            tables = torch.zeros(batch, width, dtype=torch.int32)
            tables[:, :per_req] = torch.randperm(batch * per_req, generator=g,
                                                 dtype=torch.int32).view(batch, per_req)
            tables = tables.to(dev)
            cached = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
            q = torch.randn(batch, HEADS, D, generator=g, dtype=torch.bfloat16).to(dev)
            out = torch.empty_like(q)
            kv_bytes = batch * (ctx + 1) * KV_HEADS * D * 2 * 2
            auto = ops.choose_splits(batch * KV_HEADS, bucket(ctx + 1),
                                     ops.attention_block_n(torch.bfloat16, D, True), sms)[0]
            for s in splits:
                for fold in folds:
                    os.environ["IRLM_FOLD_SPLITS"] = "1" if fold == "on" else "0"
                    us = time_config(batch, ctx, s, cache, tables, cached, q, out)
                    label = f"auto ({auto})" if s is None else str(s)
                    print(f"batch {batch:3d} context {ctx:5d} splits {label:>9} fold {fold:>3}: "
                          f"{us:7.2f} us {kv_bytes / us / 1e3:7.0f} GB/s", flush=True)
            del cache


if __name__ == "__main__":
    main()
