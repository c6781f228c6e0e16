"""Rotary embedding fused into paged attention on the GPU (lowering/rope_attention.py).

* ``rope_kv_write`` reading the graph's cos / sin rows into new q / k buffers: against the
  ``llm.rope`` formula in float64 on the same rows, the inputs left as they were, and the cache
  holding exactly the rotated keys (as stored) and the values, for a float and an int8 / fp8
  cache.
* The CUDA runner with the fusion against the runner without it (whose kernels other tests
  hold to HF): the same greedy tokens and logits within rounding, through piecewise prompt
  graphs, decode graphs and a mixed step, for rotate-half (full and partial) and GPT-J's
  interleaved pairs.
"""
import pytest
import torch

from irlm_test_helpers import rel_l2, run_schedule

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("fresh_tactics")]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from irlm.kernels import ops  # noqa: E402
from irlm.ops.llm import write_kv  # noqa: E402

DEV = "cuda"
bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


def _rope64(x, cos, sin, style):
    """llm.rope in float64: element j of the first r dims -> x[j] cos[j] + rotate(x)[j] sin[j]."""
    x, c, s = x.double(), cos.double()[:, None, :], sin.double()[:, None, :]
    r = c.shape[-1]
    a = x[..., :r]
    if style == "neox":
        rot = torch.cat((-a[..., r // 2:], a[..., :r // 2]), dim=-1)
    else:
        rot = torch.stack((-a[..., 1::2], a[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((a * c + rot * s, x[..., r:]), dim=-1)


def _case(T, H, KV, D, rot, dtype, seed, cache_dtype=None):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (H + 2 * KV) * D, generator=g).to(dtype)   # strided q, k, v views
    q = qkv[:, :H * D].view(T, H, D)
    k = qkv[:, H * D:(H + KV) * D].view(T, KV, D)
    v = qkv[:, (H + KV) * D:].view(T, KV, D)
    ang = torch.rand(T, rot // 2, generator=g) * 50
    # table rows as frontends make them (a pair's two elements share an angle), plus noise so
    # that reading the wrong element of a row shows
    full = torch.cat((ang, ang), -1) if seed % 2 else ang.repeat_interleave(2, -1)
    cos = (full.cos() + 0.01 * torch.randn(T, rot, generator=g)).to(dtype)
    sin = (full.sin() + 0.01 * torch.randn(T, rot, generator=g)).to(dtype)
    bs, blocks = 16, 2 * T + 4
    tables = torch.randperm(blocks, generator=g)[:2 * T].view(2, T).to(torch.int32)
    q_lens = torch.tensor([T - T // 3, T // 3], dtype=torch.int32)
    cached = torch.tensor([5, 17], dtype=torch.int32)
    cache = torch.randn(2, blocks, 2, bs, KV, D, generator=g).to(dtype)
    if cache_dtype is not None:
        cache = cache.to(cache_dtype) if cache_dtype != torch.int8 else \
            torch.randint(-127, 128, cache.shape, generator=g, dtype=torch.int8)
    return dict(qkv=qkv, q=q, k=k, v=v, cos=cos, sin=sin, tables=tables, q_lens=q_lens,
                cached=cached, cache=cache)


@pytest.mark.parametrize("dtype", [bf16, fp16, fp32])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("D,rot", [(128, 128), (128, 64), (64, 32), (128, 96), (64, 36)])
def test_rope_kv_write_from_tables_out_of_place(dtype, style, D, rot):
    H, KV, T = 8, 2, 23
    c = _case(T, H, KV, D, rot, dtype, seed=D + rot + len(style))
    d = {n: (x.to(DEV) if isinstance(x, torch.Tensor) else x) for n, x in c.items()}
    qkv = d["qkv"]
    q, k, v = (qkv[:, :H * D].view(T, H, D), qkv[:, H * D:(H + KV) * D].view(T, KV, D),
               qkv[:, (H + KV) * D:].view(T, KV, D))
    before = qkv.clone()
    q_out = torch.full((T, H, D), float("nan"), dtype=dtype, device=DEV)
    k_out = torch.full((T, KV, D), float("nan"), dtype=dtype, device=DEV)
    ops.rope_kv_write(q, k, cos=d["cos"], sin=d["sin"], v=v, kv_cache=d["cache"], layer=1,
                      block_tables=d["tables"], q_lens=d["q_lens"], cached_lens=d["cached"],
                      style=style, q_out=q_out, k_out=k_out)
    torch.cuda.synchronize()
    assert torch.equal(qkv, before)                          # q and k read, not rotated
    tol = {bf16: 8e-3, fp16: 1.5e-3, fp32: 2e-6}[dtype]
    assert rel_l2(q_out, _rope64(c["q"], c["cos"], c["sin"], style)) < tol
    assert rel_l2(k_out, _rope64(c["k"], c["cos"], c["sin"], style)) < tol
    # the unrotated tail is copied bit for bit
    assert torch.equal(q_out[..., rot:].cpu(), c["q"][..., rot:])
    want = c["cache"].clone()
    write_kv(want, 1, k_out.cpu(), c["v"], c["tables"], c["q_lens"], c["cached"])
    assert torch.equal(d["cache"].cpu(), want)


@pytest.mark.parametrize("cdt", [torch.int8, torch.float8_e4m3fn])
def test_rope_kv_write_from_tables_into_a_quantized_cache(cdt):
    H, KV, D, T, rot = 8, 2, 128, 9, 128
    c = _case(T, H, KV, D, rot, bf16, seed=7, cache_dtype=cdt)
    d = {n: (x.to(DEV) if isinstance(x, torch.Tensor) else x) for n, x in c.items()}
    q_out, k_out = torch.empty_like(d["q"]), torch.empty_like(d["k"])
    scales = (0.05, 0.03)
    ops.rope_kv_write(d["q"], d["k"], cos=d["cos"], sin=d["sin"], v=d["v"],
                      kv_cache=d["cache"], layer=0, block_tables=d["tables"],
                      q_lens=d["q_lens"], cached_lens=d["cached"], q_out=q_out, k_out=k_out,
                      kv_scales=scales)
    torch.cuda.synchronize()
    want = c["cache"].clone()
    write_kv(want, 0, k_out.cpu(), c["v"], c["tables"], c["q_lens"], c["cached"], scales)
    assert torch.equal(d["cache"].cpu().view(torch.int8), want.view(torch.int8))


def test_rope_kv_write_refuses_half_a_table():
    q = torch.zeros(3, 4, 64, dtype=bf16, device=DEV)
    k = torch.zeros(3, 2, 64, dtype=bf16, device=DEV)
    cos = torch.zeros(3, 64, dtype=bf16, device=DEV)
    with pytest.raises(ops.KernelArgumentError, match="either inv_freq or both cos and sin"):
        ops.rope_kv_write(q, k, cos=cos, positions=torch.zeros(3, dtype=torch.int32,
                                                                  device=DEV))
    with pytest.raises(ops.KernelArgumentError, match=r"must be \[3, rot_dim\] rows"):
        ops.rope_kv_write(q, k, cos=cos[:2], sin=cos[:2],
                          positions=torch.zeros(3, dtype=torch.int32, device=DEV))


def _engine(kind):
    import transformers
    from irlm.compilation import compile_causal_lm
    small = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=512)
    cfg = {"llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **small),
           "gpt_neox": lambda: transformers.GPTNeoXConfig(rotary_pct=0.25, **small),
           "gptj": lambda: transformers.GPTJConfig(n_embd=256, n_layer=2, n_head=4,
                                                   rotary_dim=32, vocab_size=512,
                                                   n_positions=512, bos_token_id=0,
                                                   eos_token_id=0)}[kind]()
    # GPT-J has no sdpa path in transformers 5.x; the other two take it
    cfg._attn_implementation = "eager" if kind == "gptj" else "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    return compile_causal_lm(model, max_seq=256)


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "gptj"])
def test_runner_with_the_fusion_equals_the_runner_without(kind):
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    graph = _engine(kind)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 512, (60,), generator=g) for _ in range(3)]
    tables = [list(range(r * 8, r * 8 + 8)) for r in range(3)]
    # piecewise prompt graphs, decode graphs, a step mixing a prompt with decoding requests
    schedule = [{0: 20, 1: 12}] + [{0: 1, 1: 1}] * 3 + [{0: 1, 1: 1, 2: 30}] + [{2: 1}] * 3

    def run(fuse):
        runner = CudaGraphRunner(graph, num_blocks=64, fuse_rope=fuse)
        return runner, run_schedule(lambda b: runner.step(b).float().cpu(), seqs, tables,
                                    schedule)
    fused, got = run(True)
    plain, want = run(False)
    assert fused.rope_fusions == 2 and plain.rope_fusions == 0
    assert not any(op.name == "llm.rope" for op in fused.graph.ops)
    assert fused.stats["graph_replays"] == plain.stats["graph_replays"] == 6
    for a, b in zip(got, want):
        assert rel_l2(a, b) < 2e-2
        assert torch.equal(a.argmax(-1), b.argmax(-1))
