"""Piecewise prompt graphs (irlm/runtime/runners/prefill_graphs.py) against the interpreter.

The cut, the padding to a token bucket, the slicing of cut-crossing values and the copies into
static buffers are the same on the CPU as on a GPU; only the recording differs.  Here a
"graph" is its segment's ops run again on replay, writing into the tensors the capture made
(what a CUDA graph replay does to its static outputs), so a value read from a stale or
wrongly sized buffer shows.  The oracle is the reference interpreter running the same steps
unpadded, logits and KV cache (tests/test_cuda_runner_gpu.py runs the CUDA graphs against HF).
"""
import pytest
import sympy
import torch
import transformers

from irlm.compilation import compile_causal_lm
from irlm.interpreter import Interpreter
from irlm.ir import Graph, Op
from irlm.runtime.model_runner import StepBatch
from irlm.runtime.runners.prefill_graphs import PiecewisePrefill, mixes_tokens
from irlm.types import DType, TensorType

VOCAB = 128
BLOCK_SIZE = 16


class _Replayed:
    """Replays a segment by running its ops again into the tensors its capture made."""

    def __init__(self, body, made):
        self.body, self.made = body, made

    def replay(self):
        for vid, x in self.body().items():
            self.made[vid].copy_(x)


class CpuPiecewise(PiecewisePrefill):
    def _warm_up(self, feeds, state):
        pass

    def _record(self, body):
        made = body()
        return _Replayed(body, made), made


class _Runner:
    """What PiecewisePrefill reads of a CudaGraphRunner, on the CPU."""

    def __init__(self, graph, num_blocks):
        self.graph = graph
        self.device = torch.device("cpu")
        self.block_size = BLOCK_SIZE
        self.max_num_tokens = graph.dims["tokens"].max
        self._interp = Interpreter(graph, graph.weights, device=self.device)
        cache_t = [v for v in graph.inputs if v.name == "kv_cache"][0].type
        shape = [int(d) if isinstance(d, int) else None for d in cache_t.shape]
        shape[1] = num_blocks + 1                   # the last: the scratch block
        self.kv_cache = torch.zeros(shape, dtype=cache_t.dtype.torch)
        self._scratch = num_blocks
        self.stats = {"prefill_replays": 0, "prefill_captures": 0}
        self._names = [v.name for v in graph.inputs]

    def _feeds(self, ids, pos, q_lens, cached, tables):
        by = {"input_ids": ids, "position_ids": pos, "q_lens": q_lens, "cached_lens": cached,
              "block_tables": tables, "kv_cache": self.kv_cache}
        return [by[n] for n in self._names]


@pytest.fixture(scope="module")
def llama_graph():
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, head_dim=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return compile_causal_lm(model, max_seq=256, tokens_per_block=BLOCK_SIZE)


def test_prompt_steps_padded_to_buckets_equal_the_interpreter(llama_graph):
    g = llama_graph
    runner = _Runner(g, num_blocks=24)
    plan = CpuPiecewise(runner)
    assert plan.why is None, plan.why
    # two attention cuts: three captured stretches around two eager attentions, then the
    # last-token gather and the LM head eagerly
    kinds = [s.graph for s in plan.segments]
    assert kinds.count(True) == 3 and kinds[-1] is False, kinds
    ref = Interpreter(g, g.weights)
    ref_cache = runner.kv_cache.clone()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (60,), generator=gen).tolist() for _ in range(4)]
    tables = [list(range(r * 6, r * 6 + 6))[::-1] for r in range(4)]
    done = [0] * 4
    # 62 tokens (bucket 64), then 11 and 4 (bucket 16, captured once, replayed), mixing
    # requests that decode with ones that prefill
    schedule = [{0: 37, 1: 5, 2: 20}, {0: 1, 1: 1, 3: 9}, {2: 3, 3: 1}]
    for step in schedule:
        reqs = sorted(step)
        b = StepBatch.pack(reqs, [seqs[r][done[r]:done[r] + step[r]] for r in reqs],
                           [done[r] for r in reqs], [tables[r] for r in reqs])
        feeds = runner._feeds(b.input_ids, b.positions, b.q_lens, b.cached_lens,
                              b.block_tables)
        got = plan.run(feeds, {}, b.num_tokens)
        ref_feeds = [ref_cache if x is runner.kv_cache else x for x in feeds]
        want = ref.run(ref_feeds).outputs[0]
        assert got.shape == want.shape == (len(reqs), VOCAB)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for r in reqs:
            done[r] += step[r]
    # the keys and values written for real tokens; the scratch block takes the padding's
    torch.testing.assert_close(runner.kv_cache[:, :24], ref_cache[:, :24], rtol=1e-5,
                               atol=1e-5)
    assert runner.stats == {"prefill_replays": 3, "prefill_captures": 2}


def test_a_bucket_replays_what_its_capture_recorded(llama_graph):
    """A second step in the same bucket must read its own tokens, not the capture's: the
    static inputs are refilled and their padding rows cleared."""
    g = llama_graph
    runner = _Runner(g, num_blocks=8)
    plan = CpuPiecewise(runner)
    ref = Interpreter(g, g.weights)
    for seed, n in ((2, 13), (3, 7)):
        ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
        b = StepBatch.pack([0], [ids.tolist()], [0], [[seed]])
        feeds = runner._feeds(b.input_ids, b.positions, b.q_lens, b.cached_lens,
                              b.block_tables)
        ref_cache = runner.kv_cache.clone()
        want = ref.run([ref_cache if x is runner.kv_cache else x for x in feeds]).outputs[0]
        torch.testing.assert_close(plan.run(feeds, {}, n), want, rtol=1e-4, atol=1e-4)
    assert runner.stats["prefill_captures"] == 1


def test_what_counts_as_mixing_tokens():
    tok = sympy.Symbol("tokens")
    x = Graph("m").add_input(TensorType((tok, 8), DType.f32), "x")

    def op(name, **attrs):
        return Op(name, [x], [x.type], attrs)
    assert mixes_tokens(op("core.softmax", dim=0), tok)
    assert not mixes_tokens(op("core.softmax", dim=-1), tok)
    assert mixes_tokens(op("core.cumsum", dim=0), tok)
    assert mixes_tokens(op("core.sum", dims=()), tok)       # every axis
    assert not mixes_tokens(op("core.sum", dims=(1,)), tok)
    assert not mixes_tokens(op("core.transpose", dim0=0, dim1=1), tok)   # a view
    assert mixes_tokens(op("core.slice", dim=0, start=0, end=1, step=1), tok)
    assert mixes_tokens(op("llm.last_tokens"), tok)
    assert not mixes_tokens(op("core.silu"), tok)
    assert mixes_tokens(op("dist.all_gather", axis=0, group_size=2), tok)
    assert not mixes_tokens(op("dist.all_gather", axis=1, group_size=2), tok)
