"""The CUDA kernels against references, on a GPU (skipped where torch sees none).

Paged attention is checked against ``llm.paged_attention``'s registry reference (float32 on
the CPU, inputs upcast from the kernel's dtype), the cache writes bit for bit against
``irlm.ops.llm.write_kv``; the elementwise kernels against float64 torch.  Errors are
‖out − ref‖ / ‖ref‖; every output is poisoned with NaN first, so an unwritten element fails.
Inputs are fresh random draws (never zeros).
"""
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from irlm.kernels import ops  # noqa: E402
from irlm.ops.llm import write_kv  # noqa: E402
from irlm.registry import get_op_def  # noqa: E402

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
DEV = "cuda"
# ‖out-ref‖/‖ref‖ limits: outputs rounded to bf16/fp16 (and P rounded to it inside attention);
# float32 attention runs on the tensor cores as tf32.
ATTN_TOL = {bf16: 1.2e-2, fp16: 3e-3, fp32: 3e-3}
ELEM_TOL = {bf16: 8e-3, fp16: 1.5e-3, fp32: 2e-6}


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    from irlm.kernels.nvrtc import precompile
    precompile(ops.all_kernels())


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    bad = ~torch.isfinite(out)
    assert not bad.any(), f"{int(bad.sum())} non-finite outputs (unwritten?) e.g. at " \
                          f"{bad.nonzero()[:4].tolist()}"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- paged attention ----------------------------------------------------------------------------
def make_case(seqs, heads, kv_heads, D, bs, dtype, seed, layers=2, fused_qkv=False, qscale=1.5):
    """seqs: [(q_len, cached_len)].  Block ids are a random permutation; unused table entries
    point at random (valid) blocks; the cache starts full of random values."""
    g = gen(seed)
    nblk = [-(-(n + c) // bs) for n, c in seqs]
    R, total = len(seqs), sum(nblk) + 3
    mb = max(nblk) + 2
    perm = torch.randperm(total, generator=g).to(torch.int32)
    tables = torch.randint(0, total, (R, mb), generator=g, dtype=torch.int32)
    at = 0
    for r, n in enumerate(nblk):
        tables[r, :n] = perm[at:at + n]
        at += n
    cache = torch.randn(layers, total, 2, bs, kv_heads, D, generator=g).to(dtype)
    T = sum(n for n, _ in seqs)
    if fused_qkv:  # q, k, v as strided views of one [tokens, (H + 2 KV) * D] projection
        qkv = torch.randn(T, (heads + 2 * kv_heads) * D, generator=g)
        qkv[:, :heads * D] *= qscale
        qkv = qkv.to(dtype)
        q = qkv[:, :heads * D].view(T, heads, D)
        k = qkv[:, heads * D:(heads + kv_heads) * D].view(T, kv_heads, D)
        v = qkv[:, (heads + kv_heads) * D:].view(T, kv_heads, D)
    else:
        q = (torch.randn(T, heads, D, generator=g) * qscale).to(dtype)
        k = torch.randn(T, kv_heads, D, generator=g).to(dtype)
        v = torch.randn(T, kv_heads, D, generator=g).to(dtype)
        qkv = None
    q_lens = torch.tensor([n for n, _ in seqs], dtype=torch.int32)
    cached = torch.tensor([c for _, c in seqs], dtype=torch.int32)
    return dict(q=q, k=k, v=v, cache=cache, tables=tables, q_lens=q_lens, cached=cached, qkv=qkv)


def to_dev(case):
    out = {}
    if case["qkv"] is not None:
        qkv = case["qkv"].to(DEV)
        H, KV, D = case["q"].shape[1], case["k"].shape[1], case["q"].shape[2]
        T = qkv.shape[0]
        out["q"] = qkv[:, :H * D].view(T, H, D)
        out["k"] = qkv[:, H * D:(H + KV) * D].view(T, KV, D)
        out["v"] = qkv[:, (H + KV) * D:].view(T, KV, D)
    for name in ("q", "k", "v", "cache", "tables", "q_lens", "cached"):
        if name not in out:
            out[name] = case[name].to(DEV)
    return out


def reference(case, layer, window=0, alibi=(), scale=None):
    """(expected cache after the write, expected attention output in float32)."""
    exp_cache = case["cache"].clone()
    write_kv(exp_cache, layer, case["k"], case["v"], case["tables"], case["q_lens"],
             case["cached"])
    one_layer = case["cache"][layer:layer + 1].float()
    attrs = {"layer": 0, "scale": scale, "sliding_window": window,
             "alibi_slopes": tuple(alibi)}
    ref = get_op_def("llm.paged_attention").run_reference(
        [case["q"].float(), case["k"].float(), case["v"].float(), one_layer,
         case["tables"], case["q_lens"], case["cached"]], attrs)[0]
    return exp_cache, ref


def run_paged(case, layer, dtype, **kw):
    d = to_dev(case)
    out = torch.full(case["q"].shape, float("nan"), dtype=dtype, device=DEV)
    ops.paged_attention(d["q"], d["k"], d["v"], d["cache"], d["tables"], d["q_lens"],
                        d["cached"], layer, out=out, **kw)
    torch.cuda.synchronize()
    return out, d["cache"]


DECODE_CASES = [
    # dtype, head_dim, heads, kv_heads, block_size, cached lengths (the query sits after them)
    (bf16, 128, 32, 8, 16, [0, 1, 15, 16, 17, 100, 511, 1000, 2047]),
    (bf16, 128, 8, 8, 32, [31, 32, 33, 700, 5]),                 # G = 1
    (bf16, 64, 16, 2, 64, [63, 64, 65, 1200, 3]),                # G = 8
    (fp16, 128, 32, 4, 16, [2, 400, 1500]),                       # G = 8
    (fp16, 64, 12, 4, 64, [0, 129, 777]),                         # G = 3
    (fp32, 128, 32, 8, 16, [0, 17, 300, 1023]),                   # tf32
    (fp32, 64, 4, 4, 32, [1, 64, 999]),
    (bf16, 256, 8, 2, 16, [5, 250, 1111]),                        # head_dim 256
    (bf16, 128, 32, 1, 16, [9, 333, 1024]),                       # MQA: G = 32, two row tiles
    (fp32, 256, 16, 8, 64, [70, 513]),
    # head dims whose D / 4 does not divide 128 (Phi-3-mini, BLOOM-1b1: 96; OPT-2.7b: 80):
    # long contexts so that the split-K reduce runs with its idle threads
    (bf16, 96, 32, 32, 16, [0, 40, 1500, 3000]),
    (fp16, 80, 32, 8, 16, [7, 700, 2900]),
    (fp32, 96, 8, 2, 32, [3, 1200]),
]


@pytest.mark.parametrize("dtype,D,H,KV,bs,ctx", DECODE_CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-h{c[2]}kv{c[3]}-bs{c[4]}"
                              for c in DECODE_CASES])
def test_decode_matches_reference(dtype, D, H, KV, bs, ctx):
    case = make_case([(1, c) for c in ctx], H, KV, D, bs, dtype, seed=D + H + bs + len(ctx))
    exp_cache, ref = reference(case, layer=1)
    out, cache = run_paged(case, 1, dtype)
    assert torch.equal(cache.cpu(), exp_cache), "cache after the k/v write differs"
    err = rel_err(out, ref)
    assert err < ATTN_TOL[dtype], err


@pytest.mark.parametrize("dtype", [bf16, fp32])
def test_decode_long_context_split_k(dtype):
    ctx = [4095, 9000, 16383]
    H, KV, D, bs = 16, 4, 128, 16
    splits, size = ops.choose_splits(len(ctx) * KV, max(ctx) + 1,
                                     ops.attention_block_n(dtype, D, True),
                                     torch.cuda.get_device_properties(0).multi_processor_count)
    assert splits > 1
    case = make_case([(1, c) for c in ctx], H, KV, D, bs, dtype, seed=7)
    exp_cache, ref = reference(case, layer=0)
    out, cache = run_paged(case, 0, dtype)
    assert torch.equal(cache.cpu(), exp_cache)
    err = rel_err(out, ref)
    assert err < ATTN_TOL[dtype], err


@pytest.mark.parametrize("num_splits", [1, 2, 5, 13, 128, 500])
def test_decode_forced_splits_with_short_requests(num_splits):
    # partitions past a short request's context are empty; the reduce must skip them
    ctx = [0, 3, 200, 1000, 2500, 64, 8191]
    case = make_case([(1, c) for c in ctx], 32, 8, 128, 16, bf16, seed=num_splits)
    exp_cache, ref = reference(case, layer=1)
    d = to_dev(case)
    ops.kv_cache_write(d["k"], d["v"], d["cache"], 1, d["tables"], d["q_lens"], d["cached"])
    out = torch.full(case["q"].shape, float("nan"), dtype=bf16, device=DEV)
    ops.paged_attention_decode(d["q"], d["cache"], 1, d["tables"], d["cached"], out=out,
                               num_splits=num_splits, max_kv_len=max(ctx) + 1)
    torch.cuda.synchronize()
    assert torch.equal(d["cache"].cpu(), exp_cache)
    assert rel_err(out, ref) < ATTN_TOL[bf16]


@pytest.mark.parametrize("dtype", [bf16, fp32])
@pytest.mark.parametrize("window,alibi", [(37, False), (0, True), (100, True), (1, False)])
def test_decode_sliding_window_and_alibi(dtype, window, alibi):
    ctx = [0, 20, 36, 37, 38, 500, 3000]
    H, KV = 8, 2
    slopes = [2 ** (-8 * (i + 1) / H) for i in range(H)] if alibi else ()
    case = make_case([(1, c) for c in ctx], H, KV, 128, 16, dtype, seed=window)
    exp_cache, ref = reference(case, 1, window=window, alibi=slopes)
    out, cache = run_paged(case, 1, dtype, sliding_window=window, alibi_slopes=slopes)
    assert torch.equal(cache.cpu(), exp_cache)
    assert rel_err(out, ref) < ATTN_TOL[dtype]


PREFILL_CASES = [
    # dtype, head_dim, heads, kv_heads, block_size, [(q_len, cached_len)]
    (bf16, 128, 32, 8, 16, [(37, 0), (1, 0), (128, 0), (200, 50), (1, 77), (64, 64), (5, 300)]),
    (fp16, 64, 8, 8, 32, [(100, 0), (33, 31), (1, 5), (70, 130)]),                    # G = 1
    (fp32, 128, 16, 4, 16, [(50, 0), (17, 16), (1, 1), (90, 200)]),                   # tf32
    (bf16, 256, 8, 1, 64, [(65, 0), (3, 62), (120, 10)]),                             # G = 8
    (bf16, 64, 9, 3, 16, [(129, 0), (1, 40), (31, 33)]),                              # G = 3
    (fp16, 128, 32, 4, 64, [(300, 0), (7, 1000)]),
    (bf16, 128, 32, 8, 32, [(512, 1000)]),                         # a long chunk after a prefix
    (fp32, 64, 4, 1, 16, [(40, 0), (1, 0), (2, 2)]),
    (bf16, 96, 32, 32, 16, [(70, 0), (1, 300), (33, 64)]),
    (fp16, 80, 32, 8, 32, [(129, 0), (5, 77)]),
]


@pytest.mark.parametrize("dtype,D,H,KV,bs,seqs", PREFILL_CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-h{c[2]}kv{c[3]}-bs{c[4]}-{i}"
                              for i, c in enumerate(PREFILL_CASES)])
def test_prefill_matches_reference(dtype, D, H, KV, bs, seqs):
    case = make_case(seqs, H, KV, D, bs, dtype, seed=len(seqs) * 31 + D + H)
    exp_cache, ref = reference(case, layer=1)
    out, cache = run_paged(case, 1, dtype)
    assert torch.equal(cache.cpu(), exp_cache)
    err = rel_err(out, ref)
    assert err < ATTN_TOL[dtype], err


@pytest.mark.parametrize("dtype", [bf16, fp32])
@pytest.mark.parametrize("window,alibi", [(16, False), (0, True), (50, True)])
def test_prefill_sliding_window_and_alibi(dtype, window, alibi):
    seqs = [(60, 0), (1, 70), (100, 25), (9, 9)]
    H, KV = 8, 4
    slopes = [0.5 ** (i + 1) for i in range(H)] if alibi else ()
    case = make_case(seqs, H, KV, 64, 16, dtype, seed=window + 3)
    exp_cache, ref = reference(case, 0, window=window, alibi=slopes)
    out, cache = run_paged(case, 0, dtype, sliding_window=window, alibi_slopes=slopes)
    assert torch.equal(cache.cpu(), exp_cache)
    assert rel_err(out, ref) < ATTN_TOL[dtype]


FRESH_CASES = [
    # dtype, head_dim, heads, kv_heads, prompt lengths (no cached prefix), one length?
    (bf16, 128, 32, 8, [128, 128, 128, 128], True),      # dense SDPA (cuDNN first)
    (bf16, 128, 32, 8, [300, 17, 1, 64], False),          # variable-length flash
    (fp16, 64, 12, 4, [77, 77, 77], True),
    (fp16, 64, 12, 4, [5, 200, 33], False),
    (bf16, 256, 8, 1, [65, 3], False),                     # MQA, head_dim 256
    (bf16, 128, 16, 4, [2048], True),                      # one long prompt
]


@pytest.mark.parametrize("dtype,D,H,KV,lens,uniform", FRESH_CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-h{c[2]}kv{c[3]}-{'dense' if c[5] else 'varlen'}"
                              for c in FRESH_CASES])
@pytest.mark.parametrize("fused", [False, True])
def test_fresh_prefill_path_matches_reference(dtype, D, H, KV, lens, uniform, fused):
    """``fresh=True`` (no cached prefix): torch's fused attention on this step's k/v, against
    the registry reference; the cache is still written bit for bit; a scale is honoured."""
    case = make_case([(n, 0) for n in lens], H, KV, D, 16, dtype, seed=sum(lens) + D,
                     fused_qkv=fused)
    exp_cache, ref = reference(case, 1, scale=0.07)
    kw = {"uniform_q_len": lens[0]} if uniform else {}
    out, cache = run_paged(case, 1, dtype, scale=0.07, fresh=True, max_q_len=max(lens), **kw)
    assert torch.equal(cache.cpu(), exp_cache)
    err = rel_err(out, ref)
    assert err < ATTN_TOL[dtype], err
    # and it is the same attention the paged prefill kernel computes
    paged, _ = run_paged(case, 1, dtype, scale=0.07)
    assert rel_err(out, paged.float().cpu()) < ATTN_TOL[dtype]


@pytest.mark.parametrize("dtype,seqs", [
    (bf16, [(1, 40), (1, 7), (64, 128), (100, 0), (100, 0)]),   # decode rows, a chunk, 2 new
    (fp16, [(1, 300), (37, 0), (5, 0), (200, 0)]),
    (bf16, [(3, 2), (1, 0)]),                                      # one new prompt of 1 token
])
@pytest.mark.parametrize("fused", [False, True])
def test_fresh_suffix_of_an_in_flight_batch_matches_reference(dtype, seqs, fused):
    """Running requests (cached prefix) first, newly admitted prompts after them, as the
    scheduler packs an in-flight step: the new prompts attend through torch, the others
    through the paged kernel, one output."""
    case = make_case(seqs, 32, 8, 128, 16, dtype, seed=len(seqs) * 7 + int(fused),
                     fused_qkv=fused)
    fresh = ops.FreshSuffix.of([n for n, _ in seqs], [c for _, c in seqs])
    assert fresh is not None and fresh.request > 0
    exp_cache, ref = reference(case, 0)
    out, cache = run_paged(case, 0, dtype, fresh=fresh, max_q_len=max(n for n, _ in seqs))
    assert torch.equal(cache.cpu(), exp_cache)
    err = rel_err(out, ref)
    assert err < ATTN_TOL[dtype], err


def test_fresh_prefill_falls_back_to_the_paged_kernel_for_alibi_and_windows():
    seqs = [(60, 0), (100, 0)]
    slopes = [0.5 ** (i + 1) for i in range(8)]
    case = make_case(seqs, 8, 4, 64, 16, bf16, seed=5)
    for window, alibi in ((16, ()), (0, slopes)):
        assert not ops.fresh_prefill_supported(case["q"].to(DEV), case["k"].to(DEV), alibi,
                                               window)
        exp_cache, ref = reference(case, 0, window=window, alibi=alibi)
        out, cache = run_paged(case, 0, bf16, sliding_window=window, alibi_slopes=alibi,
                               fresh=True)
        assert torch.equal(cache.cpu(), exp_cache)
        assert rel_err(out, ref) < ATTN_TOL[bf16]


@pytest.mark.parametrize("decode", [False, True])
def test_attention_on_fused_qkv_views_and_custom_scale(decode):
    seqs = [(1, 40), (1, 7), (1, 300)] if decode else [(33, 0), (1, 12), (70, 64)]
    case = make_case(seqs, 16, 4, 128, 16, bf16, seed=11, fused_qkv=True)
    assert case["q"].stride(0) == (16 + 8) * 128
    exp_cache, ref = reference(case, 1, scale=0.05)
    out, cache = run_paged(case, 1, bf16, scale=0.05)
    assert torch.equal(cache.cpu(), exp_cache)
    assert rel_err(out, ref) < ATTN_TOL[bf16]


def test_chunked_prefill_then_decode_equals_one_shot():
    """A prompt fed in three chunks and then decoded gives what one prefill gives."""
    H, KV, D, bs = 8, 2, 128, 16
    n = 150
    g = gen(5)
    q = torch.randn(n, H, D, generator=g).to(bf16).to(DEV)
    k = torch.randn(n, KV, D, generator=g).to(bf16).to(DEV)
    v = torch.randn(n, KV, D, generator=g).to(bf16).to(DEV)
    tables = torch.randperm(16, generator=g).to(torch.int32).view(1, 16).to(DEV)
    one = torch.zeros(1, 16, 2, bs, KV, D, dtype=bf16, device=DEV)
    full = ops.paged_attention(q, k, v, one, tables, torch.tensor([n], dtype=torch.int32,
                                                                  device=DEV),
                               torch.tensor([0], dtype=torch.int32, device=DEV), 0)
    chunked = torch.zeros_like(one)
    outs = []
    for a, b in ((0, 64), (64, 100), (100, 149), (149, 150)):
        outs.append(ops.paged_attention(
            q[a:b], k[a:b], v[a:b], chunked, tables,
            torch.tensor([b - a], dtype=torch.int32, device=DEV),
            torch.tensor([a], dtype=torch.int32, device=DEV), 0))
    torch.cuda.synchronize()
    assert torch.equal(chunked, one)
    assert rel_err(torch.cat(outs), full.float()) < 1e-2


def test_argument_errors_on_gpu():
    case = to_dev(make_case([(1, 5)], 8, 2, 128, 16, bf16, seed=1))
    with pytest.raises(ops.KernelArgumentError, match="not a multiple"):
        ops.paged_attention_decode(case["q"][:, :7], case["cache"], 0, case["tables"],
                                   case["cached"])
    with pytest.raises(ops.KernelArgumentError, match="head_dim 72 has no attention kernel"):
        ops.paged_attention_decode(torch.zeros(1, 8, 72, dtype=bf16, device=DEV), case["cache"],
                                   0, case["tables"], case["cached"])
    with pytest.raises(ops.KernelArgumentError, match="layer 5 is outside"):
        ops.paged_attention_decode(case["q"], case["cache"], 5, case["tables"], case["cached"])
    with pytest.raises(ops.KernelArgumentError, match="kv_cache dtype"):
        ops.paged_attention_decode(case["q"], case["cache"].float(), 0, case["tables"],
                                   case["cached"])


# ---- KV cache write -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [bf16, fp16, fp32])
@pytest.mark.parametrize("fused", [False, True])
def test_kv_cache_write_is_exact(dtype, fused):
    case = make_case([(13, 0), (1, 31), (40, 17), (0, 5), (2, 64)], 8, 4, 64, 16, dtype,
                     seed=3, fused_qkv=fused)
    exp = case["cache"].clone()
    write_kv(exp, 1, case["k"], case["v"], case["tables"], case["q_lens"], case["cached"])
    d = to_dev(case)
    ops.kv_cache_write(d["k"], d["v"], d["cache"], 1, d["tables"], d["q_lens"], d["cached"])
    torch.cuda.synchronize()
    assert torch.equal(d["cache"].cpu(), exp)


# ---- RoPE + KV write ----------------------------------------------------------------------------
def rope_ref(x, pos, inv_freq, style):
    """float64 rotation with the kernel's float32 angles (pos * inv_freq rounded to float32)."""
    ang = (pos.float()[:, None] * inv_freq.float()[None, :]).double()   # [T, half]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x = x.double()
    half = inv_freq.shape[0]
    out = x.clone()
    if style == "neox":
        a, b = x[..., :half], x[..., half:2 * half]
        out[..., :half] = a * cos - b * sin
        out[..., half:2 * half] = b * cos + a * sin
    else:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        out[..., 0:2 * half:2] = a * cos - b * sin
        out[..., 1:2 * half:2] = b * cos + a * sin
    return out


@pytest.mark.parametrize("dtype", [bf16, fp16, fp32])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rot,scaling", [(128, None), (64, None), (128, "llama3"), (96, None), (36, None)])
def test_rope_kv_write(dtype, style, rot, scaling):
    H, KV, D, bs = 8, 2, 128, 16
    seqs = [(5, 0), (1, 16000), (40, 100), (1, 3), (17, 8190)]
    case = make_case(seqs, H, KV, D, bs, dtype, seed=rot + len(style), fused_qkv=True)
    sc = ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
          if scaling else None)
    inv = ops.rope_inv_freq(rot, 500000.0 if scaling else 10000.0, sc)
    pos = torch.cat([torch.arange(c, c + n) for n, c in seqs])
    q_ref = rope_ref(case["q"], pos, inv, style)
    k_ref = rope_ref(case["k"], pos, inv, style)
    d = to_dev(case)
    ops.rope_kv_write(d["q"], d["k"], inv.to(DEV), v=d["v"], kv_cache=d["cache"], layer=1,
                      block_tables=d["tables"], q_lens=d["q_lens"], cached_lens=d["cached"],
                      style=style)
    torch.cuda.synchronize()
    assert rel_err(d["q"], q_ref) < ELEM_TOL[dtype] * (50 if dtype == fp32 else 1)
    assert rel_err(d["k"], k_ref) < ELEM_TOL[dtype] * (50 if dtype == fp32 else 1)
    # the cache holds exactly the rotated k (as stored in k) and v
    exp = case["cache"].clone()
    write_kv(exp, 1, d["k"].cpu(), case["v"], case["tables"], case["q_lens"], case["cached"])
    assert torch.equal(d["cache"].cpu(), exp)


def test_rope_explicit_positions_without_cache():
    T, H, KV, D = 9, 4, 2, 64
    g = gen(9)
    q = torch.randn(T, H, D, generator=g).to(DEV)
    k = torch.randn(T, KV, D, generator=g).to(DEV)
    pos = torch.randint(0, 5000, (T,), generator=g, dtype=torch.int32)
    inv = ops.rope_inv_freq(D)
    q_ref, k_ref = rope_ref(q.cpu(), pos, inv, "neox"), rope_ref(k.cpu(), pos, inv, "neox")
    ops.rope_kv_write(q, k, inv.to(DEV), positions=pos.to(DEV))
    torch.cuda.synchronize()
    assert rel_err(q, q_ref) < 1e-4 and rel_err(k, k_ref) < 1e-4


# ---- RMSNorm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [bf16, fp16, fp32])
@pytest.mark.parametrize("hidden", [576, 4096, 1001, 8192, 128])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm(dtype, hidden, rows):
    g = gen(hidden + rows)
    x = torch.randn(rows, hidden, generator=g).to(dtype).to(DEV)
    w = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype).to(DEV)
    out = torch.full_like(x, float("nan"))
    ops.rms_norm(x, w, 1e-5, out=out)
    xd = x.double().cpu()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double().cpu()
    torch.cuda.synchronize()
    assert rel_err(out, ref) < ELEM_TOL[dtype]


@pytest.mark.parametrize("dtype", [bf16, fp16, fp32])
@pytest.mark.parametrize("hidden", [576, 4096, 1001])
def test_fused_add_rms_norm(dtype, hidden):
    rows = 33
    g = gen(hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype).to(DEV)
    res = (4 * torch.randn(rows, hidden, generator=g)).to(dtype).to(DEV)
    w = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype).to(DEV)
    summed = (x.double() + res.double()).to(dtype).double().cpu()     # the model rounds it
    ref = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double().cpu()
    out, r = ops.fused_add_rms_norm(x, res, w, 1e-6, out=x)            # in place over x
    torch.cuda.synchronize()
    assert r is res and out is x
    assert rel_err(res, summed) < (1e-6 if dtype == fp32 else 1e-3)
    assert rel_err(out, ref) < ELEM_TOL[dtype]


# ---- gated activations --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [bf16, fp16, fp32])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("shape", [(1, 14336), (5, 1001), (129, 512), (3, 7, 64)])
def test_gated_act(dtype, act, shape):
    g = gen(shape[-1])
    x = (2 * torch.randn(*shape[:-1], 2 * shape[-1], generator=g)).to(dtype).to(DEV)
    out = torch.full(tuple(shape), float("nan"), dtype=dtype, device=DEV)
    ops.gated_act(x, act, out=out)
    xd = x.double().cpu()
    gate, up = xd[..., :shape[-1]], xd[..., shape[-1]:]
    if act == "silu":
        a = gate * torch.sigmoid(gate)
    elif act == "gelu_tanh":
        a = torch.nn.functional.gelu(gate, approximate="tanh")
    else:
        a = torch.nn.functional.gelu(gate)
    torch.cuda.synchronize()
    assert rel_err(out, a * up) < ELEM_TOL[dtype] * (5 if dtype == fp32 else 1)


# ---- sampling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,R,V", [(bf16, 37, 128256), (fp32, 5, 1001), (fp16, 64, 32000),
                                       (fp32, 3, 1)])
def test_greedy_equals_argmax(dtype, R, V):
    logits = (3 * torch.randn(R, V, generator=gen(V))).to(dtype).to(DEV)
    logits[0, V // 2] = 1e4  # an unambiguous maximum in one row
    got = ops.greedy(logits)
    torch.cuda.synchronize()
    assert got.dtype == torch.int32
    assert torch.equal(got.long().cpu(), torch.argmax(logits.float(), dim=-1).cpu())


def allowed_set(logits, temp, k, p):
    """Boolean [V]: the top-k set (ties kept), then the smallest top-p prefix by logit."""
    l = logits.double()
    V = l.shape[0]
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < k < V:
        kth = torch.sort(l, descending=True).values[k - 1]
        keep &= l >= kth
    if p < 1:
        probs = torch.softmax(torch.where(keep, l / temp, torch.tensor(-math.inf, dtype=l.dtype)),
                              0)
        order = torch.argsort(l, descending=True, stable=True)
        cum = torch.cumsum(probs[order], 0)
        n = int((cum < p).sum()) + 1
        thr = l[order[min(n, V) - 1]]
        keep &= l >= thr
    return keep


@pytest.mark.parametrize("dtype,V", [(fp32, 1000), (bf16, 32000)])
def test_top_k_top_p_samples_stay_in_the_allowed_set(dtype, V):
    R = 64
    g = gen(V)
    logits = (2 * torch.randn(R, V, generator=g)).to(dtype)
    temp = 0.3 + 1.5 * torch.rand(R, generator=g)
    top_k = torch.randint(0, 60, (R,), generator=g, dtype=torch.int32)
    top_p = 0.2 + 0.85 * torch.rand(R, generator=g)
    top_p[::4] = 1.0
    top_k[1::4] = 0
    for step in range(4):
        tok = ops.sample(logits.to(DEV), temp.to(DEV), top_k.to(DEV), top_p.to(DEV),
                         seeds=torch.arange(R, dtype=torch.int64).to(DEV) * 7919,
                         offsets=step).cpu()
        for r in range(R):
            t = int(tok[r])
            assert 0 <= t < V
            # a slightly larger p bounds rounding in the kernel's fixed-point masses
            ok = allowed_set(logits[r].float(), float(temp[r]), int(top_k[r]),
                             min(1.0, float(top_p[r]) + 1e-4))
            assert ok[t], (r, t, float(temp[r]), int(top_k[r]), float(top_p[r]))


@pytest.mark.parametrize("temp,k,p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 6, 0.7),
                                      (2.0, 3, 0.5)])
def test_sampling_frequencies_match_the_distribution(temp, k, p):
    V, N = 12, 60000
    logits = torch.randn(V, generator=gen(1)) * 1.5
    rows = logits.expand(N, V).contiguous().to(DEV)
    tok = ops.sample(rows, temp, k, p, seeds=torch.arange(N, dtype=torch.int64).to(DEV) + 12345,
                     offsets=3).cpu().long()
    keep = allowed_set(logits, temp, k, p)
    probs = torch.softmax(torch.where(keep, logits.double() / temp,
                                      torch.tensor(-math.inf, dtype=torch.float64)), 0)
    freq = torch.bincount(tok, minlength=V).double() / N
    assert freq[~keep].sum() == 0, "sampled outside the allowed set"
    tol = 5 * torch.sqrt(probs * (1 - probs) / N) + 1e-3
    assert ((freq - probs).abs() <= tol).all(), (freq, probs)


def test_sampling_is_reproducible_per_seed_and_offset():
    logits = torch.randn(8, 5000, generator=gen(2)).to(DEV)
    a = ops.sample(logits, 1.0, seeds=list(range(8)), offsets=5)
    b = ops.sample(logits, 1.0, seeds=list(range(8)), offsets=5)
    c = ops.sample(logits, 1.0, seeds=list(range(8)), offsets=6)
    torch.cuda.synchronize()
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy_rows = ops.sample(logits, [0.0] * 4 + [1.0] * 4, seeds=0)
    assert torch.equal(greedy_rows[:4].long(), torch.argmax(logits[:4], -1))


# ---- a decode step in a CUDA graph --------------------------------------------------------------
def test_decode_step_captures_in_a_cuda_graph():
    H, KV, D, bs, R = 8, 2, 128, 16, 4
    ctx = [10, 100, 31, 500]
    case = make_case([(1, c) for c in ctx], H, KV, D, bs, bf16, seed=21)
    d = to_dev(case)
    inv = ops.rope_inv_freq(D).to(DEV)
    cu = ops.cu_seqlens(d["q_lens"])
    w = torch.randn(64, H * D, generator=gen(3)).to(bf16).to(DEV)
    seeds = torch.arange(R, dtype=torch.int64, device=DEV)
    q0, k0, v0, cache0 = d["q"].clone(), d["k"].clone(), d["v"].clone(), d["cache"].clone()

    def step():
        ops.rope_kv_write(d["q"], d["k"], inv, v=d["v"], kv_cache=d["cache"], layer=1,
                          block_tables=d["tables"], cached_lens=d["cached"], cu_q_lens=cu)
        o = ops.paged_attention_decode(d["q"], d["cache"], 1, d["tables"], d["cached"],
                                       max_kv_len=max(ctx) + 1, num_splits=3)
        logits = o.view(R, H * D) @ w.t()
        return ops.sample(logits.float(), 0.8, 10, 0.9, seeds=seeds, offsets=0), o

    tok_eager, o_eager = step()
    torch.cuda.synchronize()

    def restore():
        for t, t0 in ((d["q"], q0), (d["k"], k0), (d["v"], v0), (d["cache"], cache0)):
            t.copy_(t0)

    restore()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tok_g, o_g = step()
    restore()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o_g, o_eager)
    assert torch.equal(tok_g, tok_eager)


@pytest.mark.parametrize("dtype,cos_dtype", [(torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float32),
                                              (torch.float32, torch.float32)])
@pytest.mark.parametrize("shape,rot", [((1, 32, 7, 128), 128), ((2, 5, 9, 64), 32),
                                       ((3, 11, 64), 64)])
def test_rope_apply_matches_reference_on_strided_views(dtype, cos_dtype, shape, rot):
    from irlm.ops.fused import rotate
    # x as the attention layout: a transposed view of [.., tokens, heads, D]
    base = torch.randn(*shape[:-3], shape[-2], shape[-3], shape[-1], device="cuda", dtype=dtype)
    x = base.transpose(-2, -3)
    pos = torch.arange(shape[-2], device="cuda", dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device="cuda").float() / rot))
    ang = torch.cat([pos[:, None] * inv[None]] * 2, -1)
    cos, sin = ang.cos().to(cos_dtype), ang.sin().to(cos_dtype)
    got = ops.rope_apply(x, cos, sin)
    xf = x.double()
    rotated = xf[..., :rot] * cos.double() + rotate(xf[..., :rot], "rotate_half") * sin.double()
    want = torch.cat([rotated, xf[..., rot:]], -1)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 1e-2), err
    assert got.stride() == x.stride()
