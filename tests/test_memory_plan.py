"""Activation memory planning: a valid placement, as small as the liveness allows."""
import torch
import transformers

from irlm import Builder, DType, Graph, TensorType
from irlm.compilation import compile_causal_lm
from irlm.lowering.memory_plan import ALIGN, plan_activation_memory


def overlapping(a, b):
    return a.start <= b.end and b.start <= a.end


def test_chain_reuses_memory_and_views_alias():
    g = Graph()
    x = g.add_input(TensorType((1024,), DType.f32), "x")     # 4 KiB each
    b = Builder(g)
    a1 = b.op("core.exp", x)
    a2 = b.op("core.neg", a1)
    v = b.op("core.reshape", a2, shape=[32, 32])             # a view: no storage of its own
    a3 = b.op("core.tanh", v)
    a4 = b.op("core.abs", a3)
    g.set_outputs([a4])
    plan = plan_activation_memory(g, {})
    assert len(plan.buffers) == 4                           # exp, neg, tanh, abs
    # at most two 4 KiB buffers are live at once along a chain: exp|neg, neg|tanh, tanh|abs
    assert plan.peak_live_bytes == 2 * 4096
    assert plan.arena_bytes == 2 * 4096
    assert plan.naive_bytes == 4 * 4096
    neg = next(b for b in plan.buffers if b.start == 1)
    assert neg.end == 3                                      # lives as long as its view is read


def test_plan_of_a_decoder_is_valid_and_tight():
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    g = compile_causal_lm(transformers.LlamaForCausalLM(cfg).eval(), max_seq=256)
    dims = {"tokens": 4096, "reqs": 64, "max_blocks": 16, "cache_blocks": 1}
    plan = plan_activation_memory(g, dims)
    bufs = plan.buffers
    for i, a in enumerate(bufs):
        assert a.offset % ALIGN == 0 and a.size % ALIGN == 0
        for b in bufs[i + 1:]:
            if overlapping(a, b):                            # live together: disjoint memory
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)
    assert plan.peak_live_bytes <= plan.arena_bytes <= plan.naive_bytes
    assert plan.arena_bytes <= 1.25 * plan.peak_live_bytes
    assert plan.arena_bytes * 4 < plan.naive_bytes           # reuse across layers pays
