"""Load-time tactic selection (lowering/tactics.py) and the plans that use it for one-row
linears (lowering/dense_linears.py, lowering/quant_linears.py), on the CPU with a stand-in
timer.  The kernels' numerics and the real CUDA timer run on the GPU
(tests/test_dense_gemv_gpu.py)."""
import json

import pytest
import torch
import transformers

from irlm.compilation import compile_causal_lm
from irlm.lowering import dense_linears, quant_linears, tactics
from irlm.lowering.dense_linears import DenseLinearPlan
from irlm.lowering.quant_linears import QuantLinearPlan

pytestmark = pytest.mark.usefixtures("fresh_tactics")


class FakeTimer:
    """Times from a table (name -> us, or key-dependent via a function); records the calls."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, candidates):
        self.calls.append(sorted(candidates))
        return {name: (self.times(name, len(self.calls)) if callable(self.times)
                       else self.times[name]) for name in candidates}


def _noop():
    pass


def test_the_fastest_candidate_wins():
    t = FakeTimer({"a": 10.0, "b": 6.0, "c": 8.0})
    c = tactics.choose("cuda:0", ("k",), {"a": _noop, "b": _noop, "c": _noop}, "a", t)
    assert c.chosen == "b" and c.times_us == {"a": 10.0, "b": 6.0, "c": 8.0}
    assert "b" in repr(c) and "6.0 us" in repr(c)


def test_the_default_stays_unless_another_is_clearly_faster():
    # 2% faster is within timing noise: the default stays; 5% faster replaces it
    near = FakeTimer({"default": 100.0, "gemv": 98.0})
    assert tactics.choose("cuda:0", ("near",), {"default": _noop, "gemv": _noop}, "default",
                          near).chosen == "default"
    far = FakeTimer({"default": 100.0, "gemv": 95.0})
    assert tactics.choose("cuda:0", ("far",), {"default": _noop, "gemv": _noop}, "default",
                          far).chosen == "gemv"


def test_a_choice_is_timed_once_per_device_and_key():
    t = FakeTimer({"default": 10.0, "gemv": 5.0})
    cands = {"default": _noop, "gemv": _noop}
    for _ in range(3):
        assert tactics.choose("cuda:0", ("same",), cands, "default", t).chosen == "gemv"
    tactics.choose("cuda:1", ("same",), cands, "default", t)
    tactics.choose("cuda:0", ("other",), cands, "default", t)
    assert len(t.calls) == 3


def test_a_candidate_that_failed_to_run_is_never_chosen():
    inf = float("inf")
    cands = {"default": _noop, "gemv": _noop}
    c = tactics.choose("cuda:0", ("a",), cands, "default", FakeTimer({"default": 5.0, "gemv": inf}))
    assert c.chosen == "default"
    c = tactics.choose("cuda:0", ("b",), cands, "default", FakeTimer({"default": inf, "gemv": 5.0}))
    assert c.chosen == "gemv"
    c = tactics.choose("cuda:0", ("c",), cands, "default", FakeTimer({"default": inf, "gemv": inf}))
    assert c.chosen == "default" and "no candidate ran" in repr(c)


def test_irlm_tactics_0_keeps_every_default_without_timing(monkeypatch):
    monkeypatch.setenv("IRLM_TACTICS", "0")
    t = FakeTimer({"default": 10.0, "gemv": 1.0})
    c = tactics.choose("cuda:0", ("k",), {"default": _noop, "gemv": _noop}, "default", t)
    assert c.chosen == "default" and not t.calls and "IRLM_TACTICS=0" in repr(c)


def test_one_candidate_is_not_timed_and_the_default_must_be_a_candidate():
    t = FakeTimer({"only": 1.0})
    assert tactics.choose("cuda:0", ("k",), {"only": _noop}, "only", t).chosen == "only"
    assert not t.calls
    with pytest.raises(ValueError, match="default 'x' is not among the candidates"):
        tactics.choose("cuda:0", ("k",), {"only": _noop}, "x", t)


# ----- the plans ----------------------------------------------------------------------------------
def _llama(dtype=torch.bfloat16, layers=2, extra=()):
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    return compile_causal_lm(model, max_seq=64, extra_pipeline=",".join(extra) or None)


def _linears(graph):
    return [op for op in graph.ops if op.name == "core.linear"]


def _shape(graph, op):
    return tuple(graph.weights.get(op.operands[1].producer.attrs["name"]).shape)


def test_dense_plan_times_each_weight_shape_and_row_count_and_marks_its_linears(monkeypatch):
    monkeypatch.setattr(dense_linears, "gemv_matches_reference", lambda device, dtype: True)
    graph = _llama()
    ops = _linears(graph)
    shapes = {_shape(graph, op) for op in ops}
    assert len(ops) > len(shapes) >= 4          # 2 layers share their shapes; the LM head
    # the GEMV wins only for the widest weight (the fused gate/up projection), at 1 and 2 rows
    widest = max(shapes)
    timed = []
    real = dense_linears._candidates

    def spy(members, rows, k, dtype, device):
        timed.append((tuple(members[0][1].shape), rows))
        return real(members, rows, k, dtype, device)
    monkeypatch.setattr(dense_linears, "_candidates", spy)

    def times(name, call):
        shape, rows = timed[call - 1]
        return 1.0 if name == "gemv" and shape == widest and rows <= 2 else 2.0
    timer = FakeTimer(times)
    plan = DenseLinearPlan(timer).prepare(graph, graph.weights, torch.device("cpu"))
    assert sorted(timed) == sorted((sh, r) for sh in shapes for r in tactics.SMALL_ROWS)
    assert len(timer.calls) == len(timed) and all(c == ["cublas", "gemv"] for c in timer.calls)
    want = {op for op in ops if _shape(graph, op) == widest}
    assert {op for op in ops if id(op) in plan.gemv_rows} == want and len(want) == 2
    assert all(plan.gemv_rows[id(op)] == {1, 2} for op in want)
    assert "core.linear" in plan.overrides()
    summary = plan.summary()
    assert len(summary) == len(timed)
    assert sum("gemv (fastest" in v for v in summary.values()) == 2, summary


def test_dense_plan_runs_its_row_counts_through_the_gemv_and_others_through_f_linear(
        monkeypatch):
    import irlm.kernels.gemv as gemv_module
    monkeypatch.setattr(dense_linears, "gemv_matches_reference", lambda device, dtype: True)
    graph = _llama(layers=1)
    plan = DenseLinearPlan(FakeTimer({"cublas": 2.0, "gemv": 1.0})).prepare(
        graph, graph.weights, torch.device("cpu"))
    op = _linears(graph)[0]
    assert plan.gemv_rows[id(op)] == set(tactics.SMALL_ROWS)
    w = graph.weights.get(op.operands[1].producer.attrs["name"])
    calls = []

    def spy(x, weight, bias=None):       # the GEMV's contract, on the CPU
        calls.append(tuple(x.shape))
        return torch.nn.functional.linear(x, weight, bias)
    monkeypatch.setattr(gemv_module, "gemv", spy)

    class Ctx:
        pass
    ctx = Ctx()
    ctx.op = op
    k, n = w.shape[1], w.shape[0]
    for rows in (3, 5, 16):                                  # not timed: F.linear
        x = torch.randn(rows, k, dtype=w.dtype)
        assert torch.equal(plan.linear(ctx, [x, w], {})[0], torch.nn.functional.linear(x, w))
    assert calls == []
    x1 = torch.randn(1, 1, k, dtype=w.dtype)                 # one row, as [1, 1, K]
    assert plan.linear(ctx, [x1, w], {})[0].shape == (1, 1, n)
    x4 = torch.randn(4, k, dtype=w.dtype)
    plan.linear(ctx, [x4, w], {})
    assert calls == [(1, k), (4, k)]
    bias = torch.randn(2 * n, dtype=w.dtype)[::2]            # not contiguous: F.linear
    plan.linear(ctx, [x1, w, bias], {})
    assert len(calls) == 2


def test_dense_plan_matches_weights_on_the_device_however_it_is_named(monkeypatch):
    """``cpu:0`` (like ``cuda`` against ``cuda:0``) names the device the weights are on."""
    monkeypatch.setattr(dense_linears, "gemv_matches_reference", lambda device, dtype: True)
    graph = _llama(layers=1)
    timer = FakeTimer({"cublas": 2.0, "gemv": 1.0})
    plan = DenseLinearPlan(timer).prepare(graph, graph.weights, "cpu:0")
    assert timer.calls and len(plan.gemv_rows) == len(_linears(graph))


def test_irlm_tactics_0_leaves_the_plans_as_they_were(monkeypatch, tmp_path):
    monkeypatch.setenv("IRLM_TACTICS", "0")
    checked = []
    monkeypatch.setattr(dense_linears, "gemv_matches_reference",
                        lambda device, dtype: checked.append(dtype) or True)
    graph = _llama(layers=1)
    plan = DenseLinearPlan(FakeTimer({"cublas": 2.0, "gemv": 1.0})).prepare(
        graph, graph.weights, "cpu")
    assert not plan.gemv_rows and not plan.choices and not checked


def test_dense_plan_leaves_everything_to_cublas_where_the_gemv_is_wrong_or_absent(monkeypatch):
    graph = _llama(layers=1)
    timer = FakeTimer({"cublas": 2.0, "gemv": 1.0})
    # on the CPU the GEMV's check cannot run: nothing is timed, nothing overridden
    plan = DenseLinearPlan(timer).prepare(graph, graph.weights, torch.device("cpu"))
    assert not timer.calls and not plan.gemv_rows and plan.overrides() == {}
    # an fp32 engine: the GEMV takes bf16 / fp16 only
    monkeypatch.setattr(dense_linears, "gemv_matches_reference", lambda device, dtype: True)
    graph32 = _llama(torch.float32, layers=1)
    plan = DenseLinearPlan(timer).prepare(graph32, graph32.weights, torch.device("cpu"))
    assert not timer.calls and not plan.gemv_rows


def test_quantized_int4_linears_time_the_gemv_against_their_own_paths(monkeypatch, tmp_path):
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([list(range(1, 17))]))
    graph = _llama(layers=2, extra=(f'quantize{{mode=int4,group=32,fuse=false,'
                                    f'calib="{calib}"}}', "fuse-quant", "dce"))
    monkeypatch.setattr(quant_linears, "int4_gemv_matches_reference",
                        lambda device, dtype=None: True)
    monkeypatch.setattr(QuantLinearPlan, "_tinygemm", lambda self, device: False)
    monkeypatch.setattr(QuantLinearPlan, "_gemm", lambda self, *a: False)
    timed = []
    real = QuantLinearPlan._gemv_candidates

    def spy(self, key, members, rows, device):
        timed.append((key, rows))
        return real(self, key, members, rows, device)
    monkeypatch.setattr(QuantLinearPlan, "_gemv_candidates", spy)

    def times(name, call):   # the GEMV wins for the o projection's shape (128 x 128) at 1 row
        key, rows = timed[call - 1]
        return 1.0 if name == "gemv" and key[1:3] == (128, 128) and rows == 1 else 2.0
    timer = FakeTimer(times)
    plan = QuantLinearPlan(timer).prepare(graph, graph.weights, torch.device("cpu"))
    assert plan.summary() == {"int4: gemv (1-8 rows, if faster) / dequantize+cublas": 8}
    assert len(timed) == 4 * len(tactics.SMALL_ROWS) == len(timer.calls)
    assert all(c == ["default", "gemv"] for c in timer.calls)
    with_gemv = [e for e in plan.prepared.values() if e["gemv_rows"]]
    assert len(with_gemv) == 2                       # the o projections of the 2 layers
    assert all(e["gemv_rows"] == {1} and e["scales"].shape[0] == 128 for e in with_gemv)
    text = plan.tactics_summary()
    assert len(text) == len(timed)
    assert sum("gemv (fastest" in v for v in text.values()) == 1, text
