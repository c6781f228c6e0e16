"""The llm dialect's reference semantics against plain causal attention (torch SDPA)."""
import math

import pytest
import torch

from irlm import Builder, DType, Graph, TensorType, sym
from irlm.interpreter import run_graph
from irlm.verifier import verify

HEADS, KV_HEADS, D, BS, LAYERS, BLOCKS = 4, 2, 8, 4, 2, 32


def paged_graph(sliding_window=0, alibi=()):
    g = Graph("attn")
    for name, lo, hi in (("tokens", 1, 256), ("reqs", 1, 16), ("max_blocks", 1, 64)):
        g.declare_dim(name, lo, hi)
    T, R, MB = sym("tokens"), sym("reqs"), sym("max_blocks")
    q = g.add_input(TensorType((T, HEADS, D), DType.f32), "q")
    k = g.add_input(TensorType((T, KV_HEADS, D), DType.f32), "k")
    v = g.add_input(TensorType((T, KV_HEADS, D), DType.f32), "v")
    cache = g.add_input(TensorType((LAYERS, BLOCKS, 2, BS, KV_HEADS, D), DType.f32), "kv_cache")
    tables = g.add_input(TensorType((R, MB), DType.i32), "block_tables")
    q_lens = g.add_input(TensorType((R,), DType.i32), "q_lens")
    cached = g.add_input(TensorType((R,), DType.i32), "cached_lens")
    b = Builder(g)
    o = b.op("llm.paged_attention", q, k, v, cache, tables, q_lens, cached, layer=1,
             sliding_window=sliding_window, alibi_slopes=list(alibi))
    last = b.op("llm.last_tokens", o, q_lens)
    g.set_outputs([o, last])
    verify(g)
    return g


def dense_attention(q, k, v, sliding_window=0, alibi=None):
    """Oracle: causal attention over one whole sequence, [seq, heads, d]."""
    n = q.shape[0]
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, 1)
    v = v.repeat_interleave(rep, 1)
    pos = torch.arange(n)
    dist = pos[:, None] - pos[None, :]
    mask = torch.zeros(q.shape[1], n, n)
    allowed = dist >= 0
    if sliding_window:
        allowed &= dist < sliding_window
    mask = mask.masked_fill(~allowed, float("-inf"))
    if alibi is not None:
        mask = mask - torch.tensor(alibi)[:, None, None] * dist
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask).transpose(0, 1)


@pytest.mark.parametrize("window,alibi", [(0, None), (3, None), (0, [0.5, 0.25, 0.125, 0.0625])])
def test_paged_attention_equals_dense_attention_across_steps(window, alibi):
    torch.manual_seed(0)
    g = paged_graph(window, alibi or ())
    lengths = [7, 3, 10]            # full sequence length of each request
    seqs = [(torch.randn(n, HEADS, D), torch.randn(n, KV_HEADS, D), torch.randn(n, KV_HEADS, D))
            for n in lengths]
    want = [dense_attention(*s, window, alibi) for s in seqs]
    # Blocks are handed out in a scrambled order to prove the block tables are followed.
    perm = torch.randperm(BLOCKS).tolist()
    tables = torch.tensor([perm[0:3], perm[3:6], perm[6:9]], dtype=torch.int32)
    cache = torch.zeros(LAYERS, BLOCKS, 2, BS, KV_HEADS, D)
    # Steps: chunked prefill of different sizes, then decode; request 1 joins late.
    schedule = [{0: 4, 2: 5}, {0: 3, 1: 3, 2: 3}, {2: 1}, {2: 1}]
    done = [0, 0, 0]
    got = [torch.zeros(n, HEADS, D) for n in lengths]
    for step in schedule:
        reqs = sorted(step)
        pieces = [[s[i][done[r]:done[r] + step[r]] for i in range(3)] for r, s in
                  ((r, seqs[r]) for r in reqs)]
        q, k, v = (torch.cat([p[i] for p in pieces]) for i in range(3))
        q_lens = torch.tensor([step[r] for r in reqs], dtype=torch.int32)
        cached = torch.tensor([done[r] for r in reqs], dtype=torch.int32)
        out, last = run_graph(g, [q, k, v, cache, tables[reqs], q_lens, cached]).outputs
        start = 0
        for j, r in enumerate(reqs):
            got[r][done[r]:done[r] + step[r]] = out[start:start + step[r]]
            torch.testing.assert_close(last[j], out[start + step[r] - 1])
            start += step[r]
            done[r] += step[r]
    assert done == lengths
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-5)
    assert cache[0].abs().sum() == 0  # only layer 1 was written


def test_paged_attention_rejects_bad_shapes():
    from irlm import IRError
    g = Graph()
    q = g.add_input(TensorType((5, 3, D), DType.f32), "q")
    k = g.add_input(TensorType((5, 2, D), DType.f32), "k")
    cache = g.add_input(TensorType((1, 4, 2, BS, 2, D), DType.f32), "c")
    t = g.add_input(TensorType((1, 2), DType.i32), "t")
    n = g.add_input(TensorType((1,), DType.i32), "n")
    with pytest.raises(IRError, match="not a multiple"):
        Builder(g).op("llm.paged_attention", q, k, k, cache, t, n, n, layer=0)
