"""ONNX lowering (irlm.lowering.onnx), proved in onnxruntime against independent oracles.

For every frontend architecture (the tiny seeded HF models of test_frontend_architectures):
the traced stateless graph and the -O2-fused stateless graph export to ONNX, pass
onnx.checker with full shape inference, and give the reference interpreter's logits in
onnxruntime (CPU) on a batch of a different shape than the traced one (symbolic dims are
real ONNX dims).  For every causal LM the paged inference form exports with one
``irlm.PagedAttention`` custom node per layer and runs in onnxruntime (the node backed by
irlm's reference implementation through onnxruntime-extensions): prefill of two packed
prompts, then a decode step, with the KV cache as graph input and output, against the
interpreter and against HF on the full prefix.  An op without a converter fails the export
with its source location before anything is written.

Tolerance: 1e-4 x (logit range), as the frontend tests: onnxruntime and torch run different
fp32 kernels, whose rounding differences are ~1e-7 of the range.
"""
from __future__ import annotations

import json

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from irlm.frontends import trace  # noqa: E402
from irlm.interpreter import Interpreter, run_graph  # noqa: E402
from irlm.lowering.onnx import (UnsupportedOpsError, export_onnx,  # noqa: E402
                                get_converters, unsupported_ops)
from irlm.lowering.onnx.ort import onnxruntime_session, run  # noqa: E402
from irlm.text.parser import parse_graph  # noqa: E402
from irlm.passes import run_pipeline  # noqa: E402
from irlm.passes.fusions import FUSION_PIPELINE  # noqa: E402

from test_frontend_architectures import ARCHITECTURES, VOCAB, build  # noqa: E402
import transformers  # noqa: E402  (present: test_frontend_architectures skips without it)
from irlm_test_helpers import sdpa_or_eager_for  # noqa: E402

TOLERANCE = 1e-4
#: one case per architecture, sdpa where transformers has it (BLOOM: never; GPT-J: after 5.17); Mixtral's default experts path
#: (grouped_mm, histc, sort, scatter)
CASES = [(n, sdpa_or_eager_for(getattr(transformers, ARCHITECTURES[n][1])),
          "grouped_mm" if n == "mixtral" else None) for n in ARCHITECTURES]
#: decoders that irlm compiles to the paged inference form (BLOOM's explicit attention with
#: ALiBi too: substitute-attention proves its bias and records the slopes)
CAUSAL = [c for c in CASES if c[0] != "bert"]


@pytest.fixture(scope="module")
def models():
    """(name, attn, experts) -> the seeded HF model, built once for both tests."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = build(*case)
        return cache[case]
    return get


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def assert_close(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    spread = (want.max() - want.min()).item()
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= TOLERANCE * spread, f"{what}: max |diff| {diff:.3g} > 1e-4 x {spread:.3g}"


def stateless_inputs(graph, batch=3, seq=11):
    g = torch.Generator().manual_seed(2)
    out = {}
    for v in graph.inputs:
        if v.name == "input_ids":
            out[v.name] = torch.randint(3, VOCAB, (batch, seq), generator=g)
        elif v.name == "attention_mask":
            out[v.name] = torch.ones(batch, seq, dtype=torch.int64)
        elif v.name == "position_ids":
            out[v.name] = torch.arange(seq).repeat(batch, 1)
        else:
            raise AssertionError(v.name)
    return out


def check_export(graph, out_dir, what):
    """Export, check, run in onnxruntime, compare with the reference interpreter."""
    export = export_onnx(graph, out_dir)
    model = onnx.load(str(export.model_path), load_external_data=False)
    assert not any(n.domain for n in model.graph.node), what   # standard ops only
    # weights are external data, never inline
    big = [t.name for t in model.graph.initializer
           if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024]
    assert not big, f"{what}: inline initializers {big[:3]}"
    inputs = stateless_inputs(graph)
    want = run_graph(graph, inputs).outputs[0]
    got = run(onnxruntime_session(export.model_path), inputs)[0]
    assert_close(got, want, what)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name,attn,experts", CASES,
                         ids=[c[0] for c in CASES])
def test_stateless_and_fused_graphs_match_interpreter(name, attn, experts, models, tmp_path):
    model = models((name, attn, experts))
    example = {"input_ids": torch.randint(3, VOCAB, (2, 8)),
               "attention_mask": torch.ones(2, 8, dtype=torch.int64)}
    g = trace(model, example)
    m = check_export(g, tmp_path / "frontend", f"{name} frontend")
    dims = {d.dim_param for i in m.graph.input for d in i.type.tensor_type.shape.dim}
    assert dims == {"batch", "seq"}
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["irlm.dims"]) == {k: [r.min, r.max] for k, r in g.dims.items()}
    run_pipeline(g, FUSION_PIPELINE)
    fused = check_export(g, tmp_path / "fused", f"{name} fused")
    ops = {n.op_type for n in fused.graph.node}
    if name in ("llama", "mistral", "qwen2", "gemma", "phi3", "mixtral"):
        assert "RMSNormalization" in ops
    if attn == "sdpa" and name != "bert":
        assert "Attention" in ops
    if name == "llama":
        assert "RotaryEmbedding" in ops


def packed_steps():
    """Prefill of two prompts (7 and 3 tokens), then one decode step each."""
    g = torch.Generator().manual_seed(3)
    a = torch.randint(3, VOCAB, (8,), generator=g)
    b = torch.randint(3, VOCAB, (4,), generator=g)
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    prefill = dict(input_ids=torch.cat([a[:7], b[:3]]),
                   position_ids=torch.cat([torch.arange(7), torch.arange(3)]),
                   q_lens=i32(7, 3), cached_lens=i32(0, 0), block_tables=tables)
    decode = dict(input_ids=torch.stack([a[7], b[3]]), position_ids=torch.tensor([7, 3]),
                  q_lens=i32(1, 1), cached_lens=i32(7, 3), block_tables=tables)
    return (a, b), [prefill, decode]


@pytest.mark.slow
@pytest.mark.parametrize("name,attn,experts", CAUSAL, ids=[c[0] for c in CAUSAL])
def test_inference_form_runs_in_onnxruntime(name, attn, experts, models, tmp_path):
    from irlm.compilation import compile_causal_lm
    model = models((name, attn, experts))
    g = compile_causal_lm(model, max_seq=64, tokens_per_block=4)
    assert unsupported_ops(g) == []    # the converter table covers the -O2 graph
    export = export_onnx(g, tmp_path)
    m = onnx.load(str(export.model_path), load_external_data=False)
    custom = [n for n in m.graph.node if n.domain == "irlm"]
    layers = model.config.num_hidden_layers
    assert [n.op_type for n in custom] == ["PagedAttention"] * layers
    assert [onnx.helper.get_attribute_value(
        next(a for a in n.attribute if a.name == "layer")) for n in custom] == list(range(layers))
    assert len(export.custom_nodes) == layers
    assert [o.name for o in m.graph.output][-1] == "kv_cache_out"
    assert (tmp_path / "build_trt.sh").read_text().count("--dynamicPlugins=") == 1

    cache_t = next(v for v in g.inputs if v.name == "kv_cache").type
    cache = torch.zeros((cache_t.shape[0], 8) + tuple(cache_t.shape[2:]))
    ref_cache = cache.clone()
    session = onnxruntime_session(export.model_path)
    (a, b), steps = packed_steps()
    for i, step in enumerate(steps):
        want = Interpreter(g).run(dict(step, kv_cache=ref_cache)).outputs[0]
        got, cache = run(session, dict(step, kv_cache=cache))
        assert_close(got, want, f"{name} step {i}")
        assert torch.allclose(cache, ref_cache, atol=1e-5), f"{name} step {i}: KV cache"
    with torch.no_grad():    # the decode step's logits are HF's on the whole prefix
        for r, ids in enumerate((a, b)):
            hf = model(input_ids=ids[None]).logits[0, -1]
            assert_close(got[r], hf, f"{name} request {r} vs transformers")


def test_unsupported_op_is_named_with_its_location_before_writing(tmp_path):
    text = (
        "graph @g(%x: tensor<4x8xf32>) -> (tensor<4x8xf32>) {\n"
        "  %y = core.relu(%x) : tensor<4x8xf32>\n"
        "  %z = dist.all_reduce(%y) {group_size = 2} : tensor<4x8xf32> "
        "loc(\"model.layers.0.mlp\" \"modeling.py\":12)\n"
        "  return %z\n"
        "}\n")
    g = parse_graph(text, "tp.irlm")
    problems = unsupported_ops(g)
    assert [p.op.name for p in problems] == ["dist.all_reduce"]
    with pytest.raises(UnsupportedOpsError) as e:
        export_onnx(g, tmp_path / "out")
    msg = str(e.value)
    assert "tp.irlm:3:" in msg and "dist.all_reduce" in msg
    assert "model.layers.0.mlp" in msg and "modeling.py:12" in msg
    assert "no ONNX converter" in msg
    assert not (tmp_path / "out").exists()


def test_capability_check_rejects_an_attribute_it_cannot_lower(tmp_path):
    text = (
        "graph @g(%x: tensor<16xf32>) -> (tensor<4xf32>) {\n"
        "  %h = core.histc(%x) {bins = 4, min = 1.0, max = 1.0} : tensor<4xf32>\n"
        "  return %h\n"
        "}\n")
    g = parse_graph(text, "h.irlm")
    with pytest.raises(UnsupportedOpsError, match=r"h.irlm:2:.*max <= min"):
        export_onnx(g, tmp_path)


def test_every_registry_op_is_covered_or_listed_as_not_lowering():
    """A new op must get an ONNX converter or a place in docs/onnx.md's list."""
    from pathlib import Path
    from irlm.registry import all_ops
    # ops that tests define for themselves (e.g. test.kinds in test_text_format) may share the
    # registry in this worker: only irlm's own ops need converters
    ours = {name for name, d in all_ops().items() if d.reference.__module__.startswith("irlm")}
    missing = sorted(ours - set(get_converters()))
    doc = (Path(__file__).parent.parent / "docs" / "onnx.md").read_text()
    for name in missing:
        assert f"`{name}`" in doc, f"{name}: no converter and not listed in docs/onnx.md"


QUANT = {
    "int8": "quantize{{mode=int8,fuse=false}},fuse-quant,dce",
    "int4": "quantize{{mode=int4,group=32,fuse=false}},fuse-quant,dce",
    "w8a8-sq": 'quantize{{mode=w8a8-sq,fuse=false,calib="{calib}"}},fuse-quant,dce',
    "fp8": 'quantize{{mode=fp8,fuse=false,calib="{calib}"}},fuse-quant,dce',
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(QUANT))
def test_quantized_inference_form_exports_as_qdq(mode, models, random_calibration, tmp_path):
    """Weights stay quantized (int8, UINT4 blocks, float8) behind DequantizeLinear; the
    model's logits equal the interpreter's.  onnxruntime runs with basic graph rewrites only:
    its extended ones swap int8 DQ + MatMul for a dynamically quantized GEMM."""
    from irlm.compilation import compile_causal_lm
    model = models(("llama", "sdpa", None))
    extra = QUANT[mode].format(calib=random_calibration(VOCAB, 4, 16, 0))
    g = compile_causal_lm(model, max_seq=64, tokens_per_block=4, extra_pipeline=extra)
    assert any(op.name.startswith("quant.linear") for op in g.ops)
    export = export_onnx(g, tmp_path)
    m = onnx.load(str(export.model_path), load_external_data=False)
    # qkv, o, gate|up, down per layer (the LM head is kept in float)
    assert sum(n.op_type == "DequantizeLinear" for n in m.graph.node) >= 4 * 2
    read = {i for n in m.graph.node for i in n.input}
    assert all(t.name in read for t in m.graph.initializer)   # no weight written twice
    stored = {t.data_type for t in m.graph.initializer}
    want = {"int8": onnx.TensorProto.INT8, "int4": onnx.TensorProto.UINT4,
            "w8a8-sq": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}[mode]
    assert want in stored
    cache_t = next(v for v in g.inputs if v.name == "kv_cache").type
    cache = torch.zeros((cache_t.shape[0], 8) + tuple(cache_t.shape[2:]))
    session = onnxruntime_session(export.model_path, optimize=False)
    ref_cache = cache.clone()
    for i, step in enumerate(packed_steps()[1]):
        want_logits = Interpreter(g).run(dict(step, kv_cache=ref_cache)).outputs[0]
        got, cache = run(session, dict(step, kv_cache=cache))
        assert_close(got, want_logits, f"{mode} step {i}")
