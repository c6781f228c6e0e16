"""Speed of the IR text format: print and parse a 30-layer Llama-like decoder (>= 3,000 ops).

    python benchmarks/ir_text.py [--layers 30] [--repeat 5]

The graph is what the frontend makes of an eager HF Llama with Qwen3-style q/k norms (every
RMSNorm, RoPE and attention step decomposed into core ops), with symbolic ``batch``/``seq``
dims, one ``param`` per weight and a module location on every op.  Prints ops/s for printing
and parsing (best of ``--repeat`` runs) next to the targets.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irlm import Builder, DType, Graph, Location, TensorType, sym  # noqa: E402
from irlm.text.parser import parse_graph  # noqa: E402
from irlm.text.printer import print_graph  # noqa: E402

PARSE_TARGET = 10_000   # ops/s
PRINT_TARGET = 50_000   # ops/s

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 576, 9, 3, 64, 1536, 49152
FILE = "modeling_llama.py"


def build_decoder(layers: int = 30) -> Graph:
    g = Graph("decoder")
    g.declare_dim("batch", 1, 64)
    g.declare_dim("seq", 1, 4096)
    B, S = sym("batch"), sym("seq")
    bf16 = DType.bf16
    ids = g.add_input(TensorType((B, S), DType.i64), "input_ids")
    cos = g.add_input(TensorType((B, S, HEAD_DIM), bf16), "cos")
    sin = g.add_input(TensorType((B, S, HEAD_DIM), bf16), "sin")
    mask = g.add_input(TensorType((B, 1, S, S), bf16), "attention_mask")
    b = Builder(g)

    def at(module: str, line: int) -> Location:
        return Location(module, FILE, line)

    def param(name: str, shape) -> object:
        return b.param(name + ".weight", TensorType(shape, bf16), loc=at(name, 0))

    def rms_norm(x, name: str, dim: int):
        b.loc = at(name, 72)
        w = param(name, (dim,))
        h = b.op("core.cast", x, dtype=DType.f32)
        two = b.op("core.full", shape=[], value=2.0, dtype=DType.f32)
        var = b.op("core.mean", b.op("core.pow", h, two), dims=[-1], keepdim=True)
        eps = b.op("core.full", shape=[], value=1e-5, dtype=DType.f32)
        h = b.op("core.mul", h, b.op("core.rsqrt", b.op("core.add", var, eps)))
        return b.op("core.mul", w, b.op("core.cast", h, dtype=bf16))

    def linear(x, name: str, out_f: int, in_f: int):
        w = param(name, (out_f, in_f))
        b.loc = at(name, 0)
        return b.op("core.linear", x, w)

    def rope(x, c, s):
        b.loc = at(b.loc.module, 151)
        x1 = b.op("core.slice", x, dim=-1, start=0, end=HEAD_DIM // 2)
        x2 = b.op("core.slice", x, dim=-1, start=HEAD_DIM // 2)
        rotated = b.op("core.concat", b.op("core.neg", x2), x1, dim=-1)
        return b.op("core.add", b.op("core.mul", x, c), b.op("core.mul", rotated, s))

    def repeat_kv(x, n_rep: int):
        b.loc = at(b.loc.module, 230)
        x = b.op("core.unsqueeze", x, dim=2)
        x = b.op("core.expand", x, shape=[B, KV_HEADS, n_rep, S, HEAD_DIM])
        return b.op("core.reshape", x, shape=[B, KV_HEADS * n_rep, S, HEAD_DIM])

    b.loc = at("model.embed_tokens", 71)
    emb = param("model.embed_tokens", (VOCAB, HIDDEN))
    h = b.op("core.embedding", emb, ids)
    for i in range(layers):
        p = f"model.layers.{i}"
        x = rms_norm(h, f"{p}.input_layernorm", HIDDEN)
        attn = f"{p}.self_attn"
        heads = {}
        for proj, n in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            y = linear(x, f"{attn}.{proj}_proj", n * HEAD_DIM, HIDDEN)
            b.loc = at(attn, 265)
            y = b.op("core.reshape", y, shape=[B, S, n, HEAD_DIM])
            if proj != "v":
                y = rms_norm(y, f"{attn}.{proj}_norm", HEAD_DIM)
            heads[proj] = b.op("core.transpose", y, dim0=1, dim1=2)
        b.loc = at(attn, 150)
        c = b.op("core.unsqueeze", cos, dim=1)
        s = b.op("core.unsqueeze", sin, dim=1)
        q, k = rope(heads["q"], c, s), rope(heads["k"], c, s)
        k, v = repeat_kv(k, HEADS // KV_HEADS), repeat_kv(heads["v"], HEADS // KV_HEADS)
        b.loc = at(attn, 190)
        scores = b.op("core.matmul", q, b.op("core.transpose", k, dim0=2, dim1=3))
        scale = b.op("core.full", shape=[], value=HEAD_DIM ** -0.5, dtype=bf16)
        causal = b.op("core.slice", mask, dim=3, start=0, end=S)
        scores = b.op("core.add", b.op("core.mul", scores, scale), causal)
        probs = b.op("core.softmax", b.op("core.cast", scores, dtype=DType.f32), dim=-1)
        out = b.op("core.matmul", b.op("core.cast", probs, dtype=bf16), v)
        out = b.op("core.reshape", b.op("core.transpose", out, dim0=1, dim1=2),
                   shape=[B, S, HIDDEN])
        out = linear(out, f"{attn}.o_proj", HIDDEN, HEADS * HEAD_DIM)
        b.loc = at(p, 310)
        h = b.op("core.add", h, out)
        x = rms_norm(h, f"{p}.post_attention_layernorm", HIDDEN)
        mlp = f"{p}.mlp"
        gate = linear(x, f"{mlp}.gate_proj", FFN, HIDDEN)
        up = linear(x, f"{mlp}.up_proj", FFN, HIDDEN)
        b.loc = at(mlp, 189)
        y = b.op("core.mul", b.op("core.silu", gate), up)
        y = linear(y, f"{mlp}.down_proj", HIDDEN, FFN)
        b.loc = at(p, 320)
        h = b.op("core.add", h, y)
    h = rms_norm(h, "model.norm", HIDDEN)
    b.loc = at("lm_head", 0)
    logits = b.op("core.linear", h, emb)  # tied embeddings
    g.set_outputs([logits])
    return g


def best_time(fn, repeat: int) -> tuple[float, float]:
    """Best wall-clock and best CPU time of ``repeat`` runs, in seconds."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    g = build_decoder(args.layers)
    n = len(g)
    text = print_graph(g)
    parse_graph(text, "bench.irlm")  # build the parser and warm the type caches once
    again = print_graph(parse_graph(text, "bench.irlm"))
    assert again == text, "print -> parse -> print is not the identity"
    results = {"print": (best_time(lambda: print_graph(g), args.repeat), PRINT_TARGET),
               "parse": (best_time(lambda: parse_graph(text, "bench.irlm"), args.repeat),
                         PARSE_TARGET)}

    print(f"graph: {args.layers} layers, {n} ops, {len(text.splitlines())} lines, "
          f"{len(text) / 1024:.0f} KiB of text; best of {args.repeat} runs; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    ok = True
    for what, ((wall, cpu), target) in results.items():
        met = n / wall >= target
        ok &= met
        print(f"{what}: {wall * 1e3:7.1f} ms  {n / wall:9,.0f} ops/s  "
              f"(CPU time {cpu * 1e3:.1f} ms, "
              f"{n / cpu:,.0f} ops/s)  target >= {target:,} ops/s: {'ok' if met else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
