"""int8 / fp8 (e4m3) KV caches on the GPU: the cache writes, paged attention, and whole engines.

Oracles: ``irlm.ops.llm``'s reference semantics, run on the CPU.
* Cache writes (kv_cache_write, rope_kv_write) must equal ``write_kv`` with the same scales
  bit for bit (compared as bytes, so -0 / +0 and NaN codes count): both quantize
  ``x.float() / scale`` (an IEEE division) and round once.
* The 8-bit conversions themselves (hardware cvt on sm_89+, the integer fallback that sm_80
  compiles) are checked against torch on every e4m3 / int8 code and on floats around every
  rounding boundary.
* Attention against ``llm.paged_attention``'s reference (float32: ``cache.float() * scale``),
  with random 8-bit prefixes in the cache: decode with and without split-KV (chosen and forced),
  prefill chunks after a cached prefix, GQA / MQA, sliding window, ALiBi.  The kernels read
  every 8-bit value exactly as the model's dtype (each int8 and e4m3 value is a bf16 / fp16 /
  tf32 value) and apply the scales in float32, so the error bound is the unquantized kernels'
  (tests/test_kernels_gpu.py ATTN_TOL: P and the output rounded to the model's dtype).
* Whole engines: a tiny bf16 Llama compiled with ``irlm compile --kv-cache-dtype int8|fp8``
  on :class:`CudaGraphRunner` (prefill eager, decode as CUDA graph replays with split-KV)
  against the same engine on the reference interpreter (:class:`GraphRunner`, CPU), and
  served by ``LLM(engine, device="cuda")``.
"""
import ctypes
import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from irlm.kernels import ops  # noqa: E402
from irlm.ops.llm import kv_to_cache, write_kv  # noqa: E402
from irlm.registry import get_op_def  # noqa: E402
from test_kernels_gpu import ATTN_TOL, gen, make_case, rel_err, to_dev  # noqa: E402

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
i8, f8 = torch.int8, torch.float8_e4m3fn
DEV = "cuda"
QMAX = {i8: 127.0, f8: 448.0}
# key / value scales as quantize-kv-cache makes them (amax / qmax) for N(0, 1) keys and values
# with an amax of about 3.5 / 3: the tails saturate, as past a calibrated amax
SCALES = {i8: (3.5 / 127, 3.0 / 127), f8: (3.5 / 448, 3.0 / 448)}


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    from irlm.kernels.nvrtc import precompile
    precompile([k for k in ops.all_kernels() if ", signed char" in k.names[0]
                or "irlm_fp8e4m3" in k.names[0]])


def as_bytes(t):
    return t.contiguous().view(torch.uint8).cpu()


def quantized_case(seqs, H, KV, D, bs, dtype, cdt, seed, **kw):
    """make_case's request layout with the cache replaced by random 8-bit codes (a prefix
    written by earlier steps with the same scales)."""
    case = make_case(seqs, H, KV, D, bs, dtype, seed, **kw)
    ks, vs = SCALES[cdt]
    c = case["cache"].float()
    c[:, :, 0] = kv_to_cache(c[:, :, 0], cdt, ks).float()
    c[:, :, 1] = kv_to_cache(c[:, :, 1], cdt, vs).float()
    case["cache"] = c.to(cdt)
    return case


def reference(case, layer, cdt, window=0, alibi=(), scale=None):
    """(expected cache after the write, the op's reference output in float32)."""
    scales = SCALES[cdt]
    exp = case["cache"].clone()
    write_kv(exp, layer, case["k"], case["v"], case["tables"], case["q_lens"], case["cached"],
             scales)
    attrs = {"layer": 0, "scale": scale, "sliding_window": window,
             "alibi_slopes": tuple(alibi), "kv_scales": scales}
    ref = get_op_def("llm.paged_attention").run_reference(
        [case["q"].float(), case["k"].float(), case["v"].float(),
         case["cache"][layer:layer + 1].clone(), case["tables"], case["q_lens"],
         case["cached"]], attrs)[0]
    return exp, ref


def run_paged(case, layer, dtype, cdt, **kw):
    d = to_dev(case)
    out = torch.full(case["q"].shape, float("nan"), dtype=dtype, device=DEV)
    ops.paged_attention(d["q"], d["k"], d["v"], d["cache"], d["tables"], d["q_lens"],
                        d["cached"], layer, out=out, kv_scales=SCALES[cdt], **kw)
    torch.cuda.synchronize()
    return out, d["cache"]


CDTS = pytest.mark.parametrize("cdt", [i8, f8], ids=["int8", "fp8"])


# ---- the 8-bit conversions ----------------------------------------------------------------------
_PROBE = r"""
#include "common.cuh"
struct ProbeParams {
  const float* x; unsigned char* q_fp8; signed char* q_int8; const uint2* codes;
  float* dec_fp8; float* dec_int8; float scale; int n;
};
__global__ void irlm_kv_probe(const ProbeParams p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.n) {
    p.q_fp8[i] = quantize_kv<irlm_fp8e4m3>(p.x[i], p.scale).bits;
    p.q_int8[i] = quantize_kv<signed char>(p.x[i], p.scale);
  }
  if (i < 32) {   // 256 codes, 8 a thread, through the attention kernels' tile conversion
    float f[8];
    kv8_to_float<irlm_fp8e4m3>(p.codes[i], f);
    for (int j = 0; j < 8; ++j) p.dec_fp8[8 * i + j] = f[j];
    kv8_to_float<signed char>(p.codes[i], f);
    for (int j = 0; j < 8; ++j) p.dec_int8[8 * i + j] = f[j];
  }
}
"""


class _ProbeParams(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("q_fp8", ctypes.c_void_p), ("q_int8", ctypes.c_void_p),
                ("codes", ctypes.c_void_p), ("dec_fp8", ctypes.c_void_p),
                ("dec_int8", ctypes.c_void_p), ("scale", ctypes.c_float), ("n", ctypes.c_int)]


def _probe_kernel(soft: bool):
    """The probe compiled as the cache-write kernels are (fast math); ``soft`` forces the
    integer fp8 conversions that GPUs before sm_89 run."""
    from irlm.kernels.nvrtc import Kernel, compile_source, current_arch
    name = "kv_probe_soft.cu" if soft else "kv_probe.cu"
    src = ("#define IRLM_SOFT_FP8 1\n" if soft else "") + _PROBE
    k = Kernel(name, ["irlm_kv_probe"])
    arch = current_arch()
    k._modules[arch] = compile_source(name, ["irlm_kv_probe"], arch=arch, source=src,
                                      use_disk_cache=False)
    return k


def _boundary_floats():
    """Every e4m3 value, the midpoints between neighbours (ties) and one float32 ulp either
    side of each, both signs; int8 ties (n + 0.5); saturation, infinities and zeros."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(f8).float()
    pos = vals[torch.isfinite(vals) & (vals >= 0)].unique().sort().values
    mids = (pos[1:] + pos[:-1]) / 2
    pts = torch.cat([pos, mids, torch.nextafter(mids, torch.tensor(0.0)),
                     torch.nextafter(mids, torch.tensor(1e9)), torch.arange(0, 128) + 0.5,
                     torch.nextafter(torch.arange(0, 128) + 0.5, torch.tensor(0.0)), torch.tensor([447.9, 448.0, 463.9,
                     464.0, 465.0, 479.0, 480.0, 1e6, 2.0 ** -10, 2.0 ** -9.5, 1e-30])])
    x = torch.cat([pts, -pts, torch.tensor([0.0, -0.0, float("inf"), float("-inf")]),
                   torch.randn(20000, generator=gen(4)) * 100])
    return x.float()


@pytest.mark.parametrize("soft", [False, True], ids=["hardware", "integer"])
def test_8bit_conversions_match_torch(soft):
    kern = _probe_kernel(soft)
    x = _boundary_floats()
    scale = 1.0                      # the boundaries above are in units of the codes
    n = x.numel()
    xd = x.to(DEV)
    q8 = torch.empty(n, dtype=torch.uint8, device=DEV)
    qi = torch.empty(n, dtype=torch.int8, device=DEV)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEV)
    dec8 = torch.empty(256, dtype=torch.float32, device=DEV)
    deci = torch.empty(256, dtype=torch.float32, device=DEV)
    p = _ProbeParams(xd.data_ptr(), q8.data_ptr(), qi.data_ptr(), codes.data_ptr(),
                     dec8.data_ptr(), deci.data_ptr(), scale, n)
    kern.launch("irlm_kv_probe", (-(-n // 256),), (256,), p)
    torch.cuda.synchronize()
    want8 = kv_to_cache(x, f8, scale).view(torch.uint8)
    bad = (q8.cpu() != want8).nonzero().flatten()
    assert bad.numel() == 0, [(x[i].item(), int(q8[i]), int(want8[i])) for i in bad[:8]]
    finite = torch.isfinite(x)      # torch's float -> int8 of +-inf is undefined
    wanti = kv_to_cache(x[finite], i8, scale)
    assert torch.equal(qi.cpu()[finite], wanti)
    want_dec8 = codes.cpu().view(f8).float()
    assert torch.equal(torch.isnan(dec8.cpu()), torch.isnan(want_dec8))
    ok = ~torch.isnan(want_dec8)
    assert torch.equal(as_bytes(dec8.cpu()[ok]), as_bytes(want_dec8[ok]))   # -0.0 too
    assert torch.equal(deci.cpu(), codes.cpu().view(i8).float())


# ---- cache writes -------------------------------------------------------------------------------
@CDTS
@pytest.mark.parametrize("dtype", [bf16, fp16, fp32])
@pytest.mark.parametrize("layout", ["contiguous", "fused", "misaligned"])
def test_kv_cache_write_is_bit_exact(cdt, dtype, layout):
    seqs = [(13, 0), (1, 31), (40, 17), (0, 5), (2, 64)]
    case = quantized_case(seqs, 8, 4, 64, 16, dtype, cdt, seed=3, fused_qkv=layout == "fused")
    ks, vs = SCALES[cdt]
    exp = case["cache"].clone()
    write_kv(exp, 1, case["k"], case["v"], case["tables"], case["q_lens"], case["cached"],
             (ks, vs))
    d = to_dev(case)
    if layout == "misaligned":   # k, v not 16-byte aligned: the one-element kernel variant
        T, n = case["k"].shape[0], case["k"].numel()
        buf = torch.empty(2 * n + 1, dtype=dtype, device=DEV)
        d["k"], d["v"] = buf[1:1 + n].view(case["k"].shape), buf[1 + n:].view(case["k"].shape)
        d["k"].copy_(case["k"])
        d["v"].copy_(case["v"])
        assert d["k"].data_ptr() % 16 != 0
    ops.kv_cache_write(d["k"], d["v"], d["cache"], 1, d["tables"], d["q_lens"], d["cached"],
                       kv_scales=(ks, vs))
    torch.cuda.synchronize()
    assert torch.equal(as_bytes(d["cache"]), as_bytes(exp))


@CDTS
def test_kv_cache_write_rounds_ties_to_even(cdt):
    # with a scale of 0.25 every x / s below is exact: int8 ties n + 0.5 and e4m3 midpoints
    vals = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5, 127.5, 1000.0, 9.0, 11.0,
                         13.0, 17.0, 18.0, 19.0, 0.0078125, 0.01171875, 464.0, 240.0, 248.0])
    k = (vals * 0.25).to(bf16).view(-1, 1, 1).expand(-1, 1, 64).contiguous()
    assert torch.equal(k[:, 0, 0].float(), vals * 0.25)          # exact in bf16
    T = k.shape[0]
    tables = torch.arange(4, dtype=torch.int32).view(1, 4)
    q_lens, cached = torch.tensor([T], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    cache = torch.zeros(1, 4, 2, 16, 1, 64, dtype=cdt)
    exp = cache.clone()
    write_kv(exp, 0, k, -k, tables, q_lens, cached, (0.25, 0.25))
    got = cache.to(DEV)
    ops.kv_cache_write(k.to(DEV), (-k).to(DEV), got, 0, tables.to(DEV), q_lens.to(DEV),
                       cached.to(DEV), kv_scales=(0.25, 0.25))
    torch.cuda.synchronize()
    assert torch.equal(as_bytes(got), as_bytes(exp))


@CDTS
@pytest.mark.parametrize("dtype", [bf16, fp32])
@pytest.mark.parametrize("style,rot", [("neox", 128), ("neox", 64), ("gptj", 96)])
def test_rope_kv_write_quantizes_the_rotated_keys_exactly(cdt, dtype, style, rot):
    H, KV, D, bs = 8, 2, 128, 16
    seqs = [(5, 0), (1, 16000), (40, 100), (17, 8190)]
    case = quantized_case(seqs, H, KV, D, bs, dtype, cdt, seed=rot, fused_qkv=True)
    d = to_dev(case)
    inv = ops.rope_inv_freq(rot).to(DEV)
    ops.rope_kv_write(d["q"], d["k"], inv, v=d["v"], kv_cache=d["cache"], layer=1,
                      block_tables=d["tables"], q_lens=d["q_lens"], cached_lens=d["cached"],
                      style=style, kv_scales=SCALES[cdt])
    torch.cuda.synchronize()
    # the cache holds the rotated k, as stored in k (the model's dtype), and v, quantized
    exp = case["cache"].clone()
    write_kv(exp, 1, d["k"].cpu(), case["v"], case["tables"], case["q_lens"], case["cached"],
             SCALES[cdt])
    assert torch.equal(as_bytes(d["cache"]), as_bytes(exp))


# ---- attention ----------------------------------------------------------------------------------
DECODE_CASES = [
    # dtype, head_dim, heads, kv_heads, block_size, cached lengths (the query sits after them)
    (bf16, 128, 32, 8, 16, [0, 1, 15, 16, 17, 100, 511, 1000, 2047]),
    (bf16, 64, 16, 2, 64, [63, 64, 65, 1200, 3]),                # G = 8
    (fp16, 128, 32, 4, 16, [2, 400, 1500]),
    (fp32, 128, 32, 8, 16, [0, 17, 300, 1023]),                   # tf32
    (bf16, 256, 8, 2, 16, [5, 250, 1111]),                        # head_dim 256
    (bf16, 128, 32, 1, 16, [9, 333, 1024]),                       # MQA: G = 32, two row tiles
]


@CDTS
@pytest.mark.parametrize("dtype,D,H,KV,bs,ctx", DECODE_CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-h{c[2]}kv{c[3]}" for c in DECODE_CASES])
def test_decode_matches_reference(cdt, dtype, D, H, KV, bs, ctx):
    case = quantized_case([(1, c) for c in ctx], H, KV, D, bs, dtype, cdt, seed=D + H + len(ctx))
    exp, ref = reference(case, 1, cdt)
    out, cache = run_paged(case, 1, dtype, cdt)
    assert torch.equal(as_bytes(cache), as_bytes(exp)), "cache after the k/v write differs"
    err = rel_err(out, ref)
    assert err < ATTN_TOL[dtype], err


@CDTS
@pytest.mark.parametrize("dtype", [bf16, fp32])
def test_decode_long_context_split_kv(cdt, dtype):
    ctx = [4095, 9000, 16383]
    H, KV, D, bs = 16, 4, 128, 16
    splits, _ = ops.choose_splits(len(ctx) * KV, max(ctx) + 1,
                                  ops.attention_block_n(dtype, D, True),
                                  torch.cuda.get_device_properties(0).multi_processor_count)
    assert splits > 1
    case = quantized_case([(1, c) for c in ctx], H, KV, D, bs, dtype, cdt, seed=7)
    exp, ref = reference(case, 0, cdt)
    out, cache = run_paged(case, 0, dtype, cdt)
    assert torch.equal(as_bytes(cache), as_bytes(exp))
    assert rel_err(out, ref) < ATTN_TOL[dtype]


@CDTS
@pytest.mark.parametrize("num_splits", [1, 5, 128])
def test_decode_forced_splits_with_short_requests(cdt, num_splits):
    ctx = [0, 3, 200, 1000, 2500, 64, 8191]
    case = quantized_case([(1, c) for c in ctx], 32, 8, 128, 16, bf16, cdt, seed=num_splits)
    exp, ref = reference(case, 1, cdt)
    d = to_dev(case)
    ops.kv_cache_write(d["k"], d["v"], d["cache"], 1, d["tables"], d["q_lens"], d["cached"],
                       kv_scales=SCALES[cdt])
    out = torch.full(case["q"].shape, float("nan"), dtype=bf16, device=DEV)
    ops.paged_attention_decode(d["q"], d["cache"], 1, d["tables"], d["cached"], out=out,
                               num_splits=num_splits, max_kv_len=max(ctx) + 1,
                               kv_scales=SCALES[cdt])
    torch.cuda.synchronize()
    assert torch.equal(as_bytes(d["cache"]), as_bytes(exp))
    assert rel_err(out, ref) < ATTN_TOL[bf16]


PREFILL_CASES = [
    # dtype, head_dim, heads, kv_heads, block_size, [(q_len, cached_len)]
    (bf16, 128, 32, 8, 16, [(37, 0), (1, 0), (128, 0), (200, 50), (1, 77), (64, 64), (5, 300)]),
    (fp16, 64, 8, 8, 32, [(100, 0), (33, 31), (1, 5), (70, 130)]),                    # G = 1
    (fp32, 128, 16, 4, 16, [(50, 0), (17, 16), (1, 1), (90, 200)]),                   # tf32
    (bf16, 256, 8, 1, 64, [(65, 0), (3, 62), (120, 10)]),                             # G = 8
    (bf16, 64, 9, 3, 16, [(129, 0), (1, 40), (31, 33)]),                              # G = 3
    (bf16, 128, 32, 8, 32, [(512, 1000)]),                         # a long chunk after a prefix
]


@CDTS
@pytest.mark.parametrize("dtype,D,H,KV,bs,seqs", PREFILL_CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-h{c[2]}kv{c[3]}-{i}"
                              for i, c in enumerate(PREFILL_CASES)])
def test_prefill_with_prefix_matches_reference(cdt, dtype, D, H, KV, bs, seqs):
    case = quantized_case(seqs, H, KV, D, bs, dtype, cdt, seed=len(seqs) * 31 + D + H)
    exp, ref = reference(case, 1, cdt)
    out, cache = run_paged(case, 1, dtype, cdt)
    assert torch.equal(as_bytes(cache), as_bytes(exp))
    err = rel_err(out, ref)
    assert err < ATTN_TOL[dtype], err


@CDTS
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("window,alibi", [(37, False), (0, True)])
def test_sliding_window_and_alibi(cdt, decode, window, alibi):
    seqs = ([(1, c) for c in [0, 20, 36, 37, 38, 500, 3000]] if decode
            else [(60, 0), (1, 70), (100, 25), (9, 9)])
    H, KV = 8, 2
    slopes = [2 ** (-8 * (i + 1) / H) for i in range(H)] if alibi else ()
    case = quantized_case(seqs, H, KV, 128, 16, bf16, cdt, seed=window + decode)
    exp, ref = reference(case, 1, cdt, window=window, alibi=slopes)
    out, cache = run_paged(case, 1, bf16, cdt, sliding_window=window, alibi_slopes=slopes)
    assert torch.equal(as_bytes(cache), as_bytes(exp))
    assert rel_err(out, ref) < ATTN_TOL[bf16]


@CDTS
@pytest.mark.parametrize("decode", [True, False])
def test_fused_qkv_views_and_custom_scale(cdt, decode):
    seqs = [(1, 40), (1, 7), (1, 300)] if decode else [(33, 0), (1, 12), (70, 64)]
    case = quantized_case(seqs, 16, 4, 128, 16, bf16, cdt, seed=11, fused_qkv=True)
    exp, ref = reference(case, 1, cdt, scale=0.05)
    out, cache = run_paged(case, 1, bf16, cdt, scale=0.05)
    assert torch.equal(as_bytes(cache), as_bytes(exp))
    assert rel_err(out, ref) < ATTN_TOL[bf16]


@CDTS
def test_fresh_prompts_still_attend_over_the_quantized_cache(cdt):
    """Prompts with nothing cached may attend through torch's fused attention over this step's
    own k/v (``fresh``); the op attends over them as an 8-bit cache stores them, so with one
    the paged kernel runs: the reference's answer, not the unquantized attention's."""
    seqs = [(60, 0), (33, 0), (100, 0)]
    case = quantized_case(seqs, 16, 4, 128, 16, bf16, cdt, seed=17)
    exp, ref = reference(case, 1, cdt)
    out, cache = run_paged(case, 1, bf16, cdt, fresh=True)
    assert torch.equal(as_bytes(cache), as_bytes(exp))
    assert rel_err(out, ref) < ATTN_TOL[bf16]


def test_quantized_cache_argument_errors():
    case = to_dev(quantized_case([(1, 5)], 8, 2, 128, 16, bf16, i8, seed=1))
    q, c, t, n = case["q"], case["cache"], case["tables"], case["cached"]
    with pytest.raises(ops.KernelArgumentError, match="needs kv_scales"):
        ops.paged_attention_decode(q, c, 0, t, n)
    with pytest.raises(ops.KernelArgumentError, match="positive and finite"):
        ops.paged_attention_decode(q, c, 0, t, n, kv_scales=(0.1, 0.0))
    with pytest.raises(ops.KernelArgumentError, match="kv_scales are for an int8"):
        ops.paged_attention_decode(q, c.to(bf16), 0, t, n, kv_scales=(0.1, 0.1))
    with pytest.raises(ops.KernelArgumentError, match="kv_cache dtype torch.uint8 differs"):
        ops.paged_attention_decode(q, c.view(torch.uint8), 0, t, n, kv_scales=(0.1, 0.1))


@CDTS
def test_quantized_decode_step_captures_in_a_cuda_graph(cdt):
    H, KV, D, bs, R = 8, 2, 128, 16, 4
    ctx = [10, 100, 31, 500]
    case = quantized_case([(1, c) for c in ctx], H, KV, D, bs, bf16, cdt, seed=21)
    d = to_dev(case)
    inv = ops.rope_inv_freq(D).to(DEV)
    cu = ops.cu_seqlens(d["q_lens"])
    q0, k0, v0, cache0 = d["q"].clone(), d["k"].clone(), d["v"].clone(), d["cache"].clone()

    def step():
        ops.rope_kv_write(d["q"], d["k"], inv, v=d["v"], kv_cache=d["cache"], layer=1,
                          block_tables=d["tables"], cached_lens=d["cached"], cu_q_lens=cu,
                          kv_scales=SCALES[cdt])
        return ops.paged_attention_decode(d["q"], d["cache"], 1, d["tables"], d["cached"],
                                          max_kv_len=max(ctx) + 1, num_splits=3,
                                          kv_scales=SCALES[cdt])

    def restore():
        for t, t0 in ((d["q"], q0), (d["k"], k0), (d["v"], v0), (d["cache"], cache0)):
            t.copy_(t0)

    o_eager = step().clone()
    cache_eager = d["cache"].clone()
    torch.cuda.synchronize()
    restore()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_g = step()
    restore()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o_g, o_eager)
    assert torch.equal(as_bytes(d["cache"]), as_bytes(cache_eager))
    # and the eager step is the reference (rotary applied to q, k, as the model's dtype)
    exp = case["cache"].clone()
    write_kv(exp, 1, d["k"].cpu(), case["v"], case["tables"], case["q_lens"], case["cached"],
             SCALES[cdt])
    assert torch.equal(as_bytes(cache_eager), as_bytes(exp))


# ---- whole engines: CudaGraphRunner vs the reference interpreter -------------------------------
VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny bf16 Llama (GQA 4/2, head_dim 64) saved as a Hugging Face directory, and a JSON
    calibration set of random token ids."""
    import transformers
    d = tmp_path_factory.mktemp("tiny-llama-bf16")
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=VOCAB, head_dim=64, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval().save_pretrained(d)
    calib = d / "calib.json"
    g = torch.Generator().manual_seed(5)
    calib.write_text(json.dumps([torch.randint(0, VOCAB, (32,), generator=g).tolist()
                                 for _ in range(3)]))
    return d, calib


def _engine(model_dir, cdt_name, tmp_path):
    """``irlm compile --dtype bf16 --kv-cache-dtype cdt_name`` of the tiny Llama (the engine
    directory)."""
    from irlm.cli import main as irlm_main
    d, calib = model_dir
    out = tmp_path / cdt_name
    assert irlm_main(["compile", "--hf", str(d), "-o", str(out), "--dtype", "bf16",
                      "--max-seq", "256", "--kv-cache-dtype", cdt_name,
                      "--calib", str(calib)]) == 0
    return out


# Logits: the runner and the interpreter round the same bf16 ops in different orders (cuBLAS
# vs the CPU, the RMSNorm / rotary kernels vs torch), so a key or value can land one 8-bit
# step apart where it sits near a rounding boundary: an int8 step is 1/127 of the layer's
# amax, an e4m3 step up to 1/8 of the value.  Bounds: the runner tests' 2e-2 (bf16 vs HF)
# plus that: 3e-2 for int8, 5e-2 for fp8 (as the fp8 activation modes, tests/test_quant_gpu.py).
# A wrong scale, a swapped key/value scale or a misread code gives errors of order 1.
@pytest.mark.parametrize("cdt_name,cdt,tol", [("int8", i8, 3e-2), ("fp8", f8, 5e-2)])
def test_quantized_cache_engine_matches_the_reference_interpreter(model_dir, cdt_name, cdt, tol,
                                                                  tmp_path):
    from irlm.lowering.engine_format import load_engine
    from irlm.ops.llm import KV_CACHE_INPUT
    from irlm.runtime.model_runner import StepBatch
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    from irlm.runtime.runners.interpreter import GraphRunner
    graph = load_engine(_engine(model_dir, cdt_name, tmp_path)).graph
    cache_in = next(v for v in graph.inputs if v.name == KV_CACHE_INPUT)
    assert cache_in.type.dtype.torch == cdt
    scales = {op.attrs["layer"]: op.attrs["kv_scales"] for op in graph.ops
              if op.name == "llm.paged_attention"}
    ref = GraphRunner(graph, num_blocks=64)                     # CPU, reference ops
    fast = CudaGraphRunner(graph, num_blocks=64)
    assert fast.kv_cache.dtype == cdt and fast.kv_cache.element_size() == 1
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (120,), generator=g) for _ in range(4)]
    tables = [list(range(r * 12, r * 12 + 12))[::-1] for r in range(4)]
    done = [0, 0, 0, 0]
    # a prefill batch, decode replays (bucket 4, context bucket 256: split-KV), request 3's
    # prompt in two chunks (the second attends over its cached prefix, mixed with a decode
    # row), then decode with all four
    schedule = ([{0: 37, 1: 5, 2: 80}] + [{0: 1, 1: 1, 2: 1}] * 3 + [{3: 33}] +
                [{3: 20, 0: 1}] + [{0: 1, 1: 1, 2: 1, 3: 1}] * 6)
    checked = 0
    for step in schedule:
        reqs = sorted(step)
        batch = StepBatch.pack(reqs, [seqs[r][done[r]:done[r] + step[r]].tolist() for r in reqs],
                               [done[r] for r in reqs], [tables[r] for r in reqs])
        got = fast.step(batch)
        want = ref.step(batch)
        for r in reqs:
            done[r] += step[r]
        for j in range(len(reqs)):
            err = ((got[j].cpu() - want[j]).norm() / want[j].norm()).item()
            assert err <= tol, (cdt_name, step, reqs[j], err)
            top2 = want[j].topk(2).values
            if (top2[0] - top2[1]).item() > 0.1:
                assert got[j].argmax().item() == want[j].argmax().item(), (step, reqs[j])
            checked += 1
    assert checked == 3 + 9 + 1 + 2 + 24
    assert fast.stats["graph_replays"] == 9 and fast.stats["graph_captures"] >= 1
    # both caches hold the same 8-bit codes, up to those boundary cases
    for layer, (ks, vs) in scales.items():
        for kv, s in ((0, ks), (1, vs)):
            a = fast.kv_cache[layer, :48, kv].float().cpu() * s
            b = ref.kv_cache[layer, :48, kv].float() * s
            assert ((a - b).norm() / b.norm()).item() < tol, (layer, kv)


@pytest.mark.parametrize("cdt_name", ["int8", "fp8"])
def test_llm_serves_a_quantized_cache_engine_on_the_gpu(model_dir, cdt_name, tmp_path):
    """The user's path: LLM(engine, device="cuda") picks the CUDA runner, which runs the
    engine; the CPU engine's first greedy token is among the GPU engine's top 5 (a random
    model's top two can be closer than the bound above)."""
    from irlm.runtime import LLM, SamplingParams
    out = _engine(model_dir, cdt_name, tmp_path)
    prompts = [[5, 17, 33, 2, 9, 60, 41], list(range(100, 160)), [7] * 30]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=5)
    gpu = LLM.from_engine(out, device="cuda").generate(prompts, params)
    cpu = LLM.from_engine(out, device="cpu").generate(prompts, params)
    for g, c in zip(gpu, cpu):
        assert len(g.outputs[0].token_ids) == 4
        want = c.outputs[0].token_ids[0]
        assert want in g.outputs[0].logprobs[0], (cdt_name, want, g.outputs[0].logprobs[0])
