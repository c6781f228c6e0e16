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


def test_dense_plan_times_each_weight_shape_once_and_marks_its_linears(monkeypatch):
    monkeypatch.setattr(dense_linears, "gemv_matches_reference", lambda device, dtype: True)
    graph = _llama()
    ops = _linears(graph)
    shapes = {tuple(graph.weights.get(op.operands[1].producer.attrs["name"]).shape)
              for op in ops}
    assert len(ops) > len(shapes) >= 4          # 2 layers share their shapes; the LM head
    # the GEMV wins only for the widest weight (the fused gate/up projection)
    widest = max(shapes)

    def times(name, call):
        return 1.0 if name == "gemv" and plan_shape[0] == widest else 2.0
    plan_shape = [None]
    real = dense_linears._candidates

    def spy(members, k, dtype, device):
        plan_shape[0] = tuple(members[0][1].shape)
        return real(members, k, dtype, device)
    monkeypatch.setattr(dense_linears, "_candidates", spy)
    timer = FakeTimer(times)
    plan = DenseLinearPlan(timer).prepare(graph, graph.weights, torch.device("cpu"))
    assert len(timer.calls) == len(shapes)
    assert all(c == ["cublas", "gemv"] for c in timer.calls)
    chosen = {op for op in ops if id(op) in plan.m1}
    want = {op for op in ops
            if tuple(graph.weights.get(op.operands[1].producer.attrs["name"]).shape) == widest}
    assert chosen == want and len(want) == 2
    assert "core.linear" in plan.overrides()
    summary = plan.summary()
    assert sum("gemv (fastest" in v for v in summary.values()) == 1, summary
    assert sum(v.startswith("cublas") for v in summary.values()) == len(shapes) - 1


def test_dense_plan_runs_one_row_through_the_gemv_and_more_through_f_linear(monkeypatch):
    import irlm.kernels.gemv as gemv_module
    monkeypatch.setattr(dense_linears, "gemv_matches_reference", lambda device, dtype: True)
    graph = _llama(layers=1)
    plan = DenseLinearPlan(FakeTimer({"cublas": 2.0, "gemv": 1.0})).prepare(
        graph, graph.weights, torch.device("cpu"))
    op = _linears(graph)[0]
    assert id(op) in plan.m1
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
    x3 = torch.randn(3, w.shape[1], dtype=w.dtype)
    assert torch.equal(plan.linear(ctx, [x3, w], {})[0], torch.nn.functional.linear(x3, w))
    assert calls == []
    x1 = torch.randn(1, 1, w.shape[1], dtype=w.dtype)        # one row, as [1, 1, K]
    got = plan.linear(ctx, [x1, w], {})[0]
    assert calls == [(1, w.shape[1])] and got.shape == (1, 1, w.shape[0])
    bias = torch.randn(2 * w.shape[0], dtype=w.dtype)[::2]  # not contiguous: F.linear
    plan.linear(ctx, [x1, w, bias], {})
    assert len(calls) == 1


def test_dense_plan_matches_weights_on_the_device_however_it_is_named(monkeypatch):
    """``cpu:0`` (like ``cuda`` against ``cuda:0``) names the device the weights are on."""
    monkeypatch.setattr(dense_linears, "gemv_matches_reference", lambda device, dtype: True)
    graph = _llama(layers=1)
    timer = FakeTimer({"cublas": 2.0, "gemv": 1.0})
    plan = DenseLinearPlan(timer).prepare(graph, graph.weights, "cpu:0")
    assert timer.calls and len(plan.m1) == len(_linears(graph))


def test_irlm_tactics_0_leaves_the_plans_as_they_were(monkeypatch, tmp_path):
    monkeypatch.setenv("IRLM_TACTICS", "0")
    checked = []
    monkeypatch.setattr(dense_linears, "gemv_matches_reference",
                        lambda device, dtype: checked.append(dtype) or True)
    graph = _llama(layers=1)
    plan = DenseLinearPlan(FakeTimer({"cublas": 2.0, "gemv": 1.0})).prepare(
        graph, graph.weights, "cpu")
    assert not plan.m1 and not plan.choices and not checked


def test_dense_plan_leaves_everything_to_cublas_where_the_gemv_is_wrong_or_absent(monkeypatch):
    graph = _llama(layers=1)
    timer = FakeTimer({"cublas": 2.0, "gemv": 1.0})
    # on the CPU the GEMV's check cannot run: nothing is timed, nothing overridden
    plan = DenseLinearPlan(timer).prepare(graph, graph.weights, torch.device("cpu"))
    assert not timer.calls and not plan.m1 and plan.overrides() == {}
    # an fp32 engine: the GEMV takes bf16 / fp16 only
    monkeypatch.setattr(dense_linears, "gemv_matches_reference", lambda device, dtype: True)
    graph32 = _llama(torch.float32, layers=1)
    plan = DenseLinearPlan(timer).prepare(graph32, graph32.weights, torch.device("cpu"))
    assert not timer.calls and not plan.m1


def test_quantized_int4_linears_time_the_gemv_against_their_one_row_path(monkeypatch, tmp_path):
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([list(range(1, 17))]))
    graph = _llama(layers=2, extra=(f'quantize{{mode=int4,group=32,fuse=false,'
                                    f'calib="{calib}"}}', "fuse-quant", "dce"))
    monkeypatch.setattr(quant_linears, "int4_gemv_matches_reference",
                        lambda device, dtype=None: True)
    monkeypatch.setattr(QuantLinearPlan, "_tinygemm", lambda self, device: False)
    monkeypatch.setattr(QuantLinearPlan, "_gemm", lambda self, *a: False)
    shapes = []
    real = QuantLinearPlan._one_row_candidates

    def spy(self, key, members, device):
        shapes.append(key)
        return real(self, key, members, device)
    monkeypatch.setattr(QuantLinearPlan, "_one_row_candidates", spy)
    # the GEMV wins for the o projection's shape (128 x 128) only
    timer = FakeTimer(lambda name, call: 1.0 if name == "gemv" and shapes[call - 1][1:3] ==
                      (128, 128) else 2.0)
    plan = QuantLinearPlan(timer).prepare(graph, graph.weights, torch.device("cpu"))
    assert plan.summary() == {"int4: gemv (1 row, if faster) / dequantize+cublas": 8}
    assert len(timer.calls) == len(shapes) == 4 and all(c == ["default", "gemv"]
                                                        for c in timer.calls)
    with_gemv = [e for e in plan.prepared.values() if e.get("m1") == "gemv"]
    assert len(with_gemv) == 2                       # the o projections of the 2 layers
    assert all(e["scales"].shape[0] == 128 for e in with_gemv)
    tactics_text = plan.tactics_summary()
    assert len(tactics_text) == 4
    assert sum("gemv (fastest" in v for v in tactics_text.values()) == 1, tactics_text
