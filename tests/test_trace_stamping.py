"""Stamping decoder layers (irlm.frontends.stamping) gives exactly the graph the full trace gives.

Oracle: ``irlm.frontends.trace`` of the whole model (every layer through torch.export).  The
stamped graph must print to the same IR text byte for byte and carry the same weight store
(names in the same order, types, tensors); compiled, the engine files must be equal.  Each
architecture of tests/test_frontend_architectures.py is built with 5 layers (3 traced, 2
stamped); SmolLM2 from its GGUF has 30.  Models whose layers differ must fall back to the
full trace and still equal it.
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from irlm.compilation import CompileConfig, compile as irlm_compile
from irlm.compilation.causal_lm import inference_example_inputs, takes_position_ids
from irlm.frontends import stamping, trace
from irlm.frontends.stamping import trace_stamped

transformers = pytest.importorskip("transformers")

from irlm_test_helpers import smollm_gguf  # noqa: E402
from test_frontend_architectures import ARCHITECTURES  # noqa: E402

LAYERS = 5
DIMS = {"batch": (1, 8), "seq": (1, 256)}
# one case per architecture (GPT-J and BLOOM have no sdpa path; Mixtral's default experts)
CASES = [("llama", "sdpa", None), ("mistral", "sdpa", None), ("qwen2", "sdpa", None),
         ("gemma", "sdpa", None), ("phi3", "sdpa", None), ("gpt2", "sdpa", None),
         ("gpt_neox", "sdpa", None), ("gptj", "eager", None), ("opt", "sdpa", None),
         ("bloom", "eager", None), ("falcon", "sdpa", None), ("mixtral", "sdpa", "grouped_mm"),
         ("bert", "sdpa", None)]


def build(name: str, attn: str = "sdpa", experts=None, layers: int = LAYERS, **overrides):
    config_cls, model_cls, kwargs = ARCHITECTURES[name]
    kwargs = {k: layers if k in ("num_hidden_layers", "n_layer") else v
              for k, v in kwargs.items()}
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs, **overrides)
    config._attn_implementation = attn
    if experts is not None:
        config._experts_implementation = experts
    return getattr(transformers, model_cls)(config).eval()


def example(model) -> dict:
    """What the compiler's trace stage feeds a model (causal LMs) or the encoder's inputs."""
    if hasattr(model, "generate") and model.get_output_embeddings() is not None:
        return inference_example_inputs(model.config.vocab_size, batch=2,
                                        position_ids=takes_position_ids(model))
    return {"input_ids": torch.randint(3, 128, (2, 8)),
            "attention_mask": torch.ones(2, 8, dtype=torch.int64)}


def assert_same_graph(got, want):
    assert str(got) == str(want)          # the IR text, byte for byte
    names = want.weights.names()
    assert got.weights.names() == names   # same entries, added in the same order
    for name in names:
        assert got.weights.type_of(name) == want.weights.type_of(name), name
        a, b = got.weights.entry(name), want.weights.entry(name)
        assert a.source == b.source, name
        if b.source != "meta":
            assert torch.equal(got.weights.get(name), want.weights.get(name)), name


def layer_list(model):
    plan, why = stamping._stamp_plan(model)
    assert plan is not None, why
    return plan.parent, plan.attr, plan.layers


@pytest.mark.parametrize("name,attn,experts", CASES, ids=[c[0] for c in CASES])
def test_stamped_trace_is_the_full_trace(name, attn, experts):
    model = build(name, attn, experts)
    parent, attr, layers = layer_list(model)
    inputs = example(model)
    got, how = trace_stamped(model, inputs, dims=DIMS)
    assert how.startswith(f"stamped 2 of {LAYERS} layers"), how
    assert getattr(parent, attr) is layers and len(layers) == LAYERS   # the model restored
    want = trace(model, inputs, dims=DIMS)
    assert_same_graph(got, want)


def test_compiled_engine_files_are_equal(tmp_path):
    """The whole compile: frontend IR, plan, weights and engine.json."""
    model = build("llama")
    engines = {}
    for stamp in (True, False):
        out = tmp_path / f"stamp-{stamp}"
        engines[stamp] = irlm_compile(model, CompileConfig(output=out, stamp_layers=stamp,
                                                           max_seq=256))
    assert engines[True].layer_stamping.startswith("stamped 2 of 5 layers")
    assert engines[False].layer_stamping == "full trace: --no-stamp-layers"
    a, b = tmp_path / "stamp-True", tmp_path / "stamp-False"
    for name in ("ir/00-frontend.irlm", "plan.irlm"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "engine.json").read_text()) == \
        json.loads((b / "engine.json").read_text())
    from safetensors.torch import load_file
    wa, wb = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    assert list(wa) == list(wb)
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


@pytest.mark.slow
def test_smollm2_gguf_stamped_is_the_full_trace():
    """The real model: 30 layers, meta-device parameters, weights from the GGUF store."""
    from irlm.compilation.stages import inference_example_inputs as job_inputs
    from irlm.frontends.gguf import load_gguf
    model = load_gguf(smollm_gguf())
    inputs = job_inputs(model, 2)
    dims = {"batch": (1, 8), "seq": (1, 8192)}
    before = set(model.weights.names())
    got, how = trace_stamped(model.module, inputs, dims=dims, weights=model.weights)
    assert how == "stamped 27 of 30 layers (model.layers) from a 3-layer trace"
    stamped_store = got.weights
    added = [n for n in stamped_store.names() if n not in before]
    reloaded = load_gguf(smollm_gguf())
    want = trace(reloaded.module, inputs, dims=dims, weights=reloaded.weights)
    assert str(got) == str(want)
    assert stamped_store.names() == want.weights.names()
    assert added == [n for n in want.weights.names() if n not in before]
    for name in added:   # what the trace adds to the loader's store: the model's buffers
        assert torch.equal(stamped_store.get(name), want.weights.get(name)), name


# ----- falling back -----------------------------------------------------------------------------

def test_sliding_window_on_some_layers_is_not_stamped():
    model = build("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert len(set(model.config.layer_types)) == 2
    plan, why = stamping._stamp_plan(model)
    assert plan is None and why.startswith("config.layer_types varies per layer"), why


def test_a_later_layer_that_differs_falls_back():
    """Layer 4 is never traced by the short trace: the module comparison must see it."""
    model = build("llama")
    model.model.layers[4].input_layernorm.variance_epsilon = 0.25
    inputs = example(model)
    got, how = trace_stamped(model, inputs, dims=DIMS)
    assert how == ("full trace: model.layers.4.input_layernorm.variance_epsilon = 0.25 "
                   "differs from layer 1's"), how
    want = trace(model, inputs, dims=DIMS)
    assert "0.25" in str(want)    # the full trace has layer 4's own epsilon: stamping would not
    assert_same_graph(got, want)


def test_traced_layer_2_that_differs_is_not_stamped():
    """The IR check: stamping layer 1 must reproduce the traced layer 2 (here its epsilon
    differs, which the module comparison would have caught first)."""
    model = build("llama", layers=3)
    model.model.layers[2].input_layernorm.variance_epsilon = 0.25
    short = trace(model, example(model), dims=DIMS)
    graph, why = stamping.stamp_layers(short, "model.layers", 30)
    assert graph is None
    assert why.startswith("layer 2 stamped from layer 1 differs from the traced layer 2: op "), why
    assert "its attributes differ" in why


def test_stamping_the_traced_layers_again_reproduces_them():
    model = build("llama", layers=3)
    short = trace(model, example(model), dims=DIMS)
    graph, why = stamping.stamp_layers(short, "model.layers", 3)
    assert why == "" and str(graph) == str(short)
    graph, why = stamping.stamp_layers(short, "model.layers", 4)

    def layer_ops(g, i):
        return [op for op in g.ops if op.loc.module.startswith(f"model.layers.{i}.")
                or op.loc.module == f"model.layers.{i}"]
    assert len(graph) == len(short) + len(layer_ops(short, 2))
    two, three = layer_ops(graph, 2), layer_ops(graph, 3)
    assert [op.name for op in three] == [op.name for op in two]
    assert [op.attrs["name"] for op in three if op.name == "param"] == \
        [op.attrs["name"].replace("layers.2.", "layers.3.") for op in two if op.name == "param"]
    # layer 3 reads layer 2's output; the LM head reads layer 3's
    assert any(v.producer is two[-1] for op in three for v in op.operands)
    ops = list(graph.ops)
    after = ops[ops.index(three[-1]) + 1:]
    assert after and any(v.producer is three[-1] for op in after for v in op.operands)
    assert not any(v.producer in two for op in after for v in op.operands)


def test_a_failing_short_trace_falls_back_and_restores_the_layers(monkeypatch):
    model = build("llama")
    layers = model.model.layers
    real_trace = stamping.trace

    def short_fails(module, *args, **kwargs):
        if len(module.model.layers) != LAYERS:
            raise RuntimeError("the short trace broke")
        return real_trace(module, *args, **kwargs)

    monkeypatch.setattr(stamping, "trace", short_fails)
    inputs = example(model)
    got, how = trace_stamped(model, inputs, dims=DIMS)
    assert how == "full trace: the 3-layer trace failed (RuntimeError: the short trace broke)"
    assert model.model.layers is layers
    assert got.weights is not None and len(got) > 0


@pytest.mark.parametrize("config_cls,kwargs,why", [
    ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4, max_window_layers=3),
     "config.layer_types varies per layer"),
    ("GPT2Config", dict(scale_attn_by_inverse_layer_idx=True),
     "config.scale_attn_by_inverse_layer_idx = True makes layers differ"),
    ("Qwen2MoeConfig", dict(decoder_sparse_step=2), "config.decoder_sparse_step = 2"),
    ("Qwen2MoeConfig", dict(mlp_only_layers=[3]), "config.mlp_only_layers = [3] names some"),
    ("Gemma2Config", dict(), "config.layer_types varies per layer"),
])
def test_configs_with_per_layer_variation_are_refused(config_cls, kwargs, why):
    n = 8
    config = getattr(transformers, config_cls)(num_hidden_layers=n, **kwargs)
    assert stamping._config_varies(config, n).startswith(why)


def test_plain_configs_are_accepted():
    for name, _ in [("llama", 0), ("qwen2", 0), ("mixtral", 0), ("gpt2", 0)]:
        config_cls, _, kwargs = ARCHITECTURES[name]
        config = getattr(transformers, config_cls)(**kwargs)
        assert stamping._config_varies(config, config.num_hidden_layers) is None, name


def test_few_layers_and_plain_modules_take_the_full_trace():
    assert stamping._stamp_plan(build("llama", layers=4)) == \
        (None, "4 layers (stamping starts at 5)")
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    got, how = trace_stamped(mlp, torch.randn(2, 4), dims={"batch": (1, 8)})
    assert how == "full trace: Sequential is not a Hugging Face model"
    assert_same_graph(got, trace(mlp, torch.randn(2, 4), dims={"batch": (1, 8)}))


class _CacheOnly(torch.nn.Module):
    def forward(self, x, cache=None):
        if cache is not None:
            x = cache.update(x, self.layer_idx)
        return x


class _Threshold(torch.nn.Module):
    def forward(self, x):
        return x * 2 if self.layer_idx >= 3 else x


def test_a_layer_index_read_outside_the_cache_is_refused():
    assert stamping._index_read_outside_cache(_CacheOnly, "layer_idx") is None
    why = stamping._index_read_outside_cache(_Threshold, "layer_idx")
    assert why == "_Threshold.forward reads .layer_idx (the layer index) for more than the KV cache"


class _LoopsOverLayers(torch.nn.Module):
    def forward(self, x):
        for layer in self.layers[: self.n]:
            x = layer(x)
        return self.layers[0](x)


class _ScalesByDepth(torch.nn.Module):
    def forward(self, x):
        for layer in self.layers:
            x = layer(x) / len(self.layers)
        return x


class _LastLayerSpecial(torch.nn.Module):
    def forward(self, x):
        return self.layers[-1](x)


def test_code_that_sees_the_short_layer_list_is_refused():
    assert stamping._layer_list_read_whole(_LoopsOverLayers, "layers") is None
    assert stamping._layer_list_read_whole(_ScalesByDepth, "layers") == \
        "_ScalesByDepth.forward reads len(.layers)"
    assert stamping._layer_list_read_whole(_LastLayerSpecial, "layers") == \
        "_LastLayerSpecial.forward indexes .layers with -1"


def test_no_stamp_layers_flag():
    from irlm.cli import compile as cli_compile
    parser = argparse.ArgumentParser()
    cli_compile.add_parser(parser.add_subparsers())
    for flags, want in (([], True), (["--no-stamp-layers"], False)):
        args = parser.parse_args(["compile", "m.py", "-o", "out", *flags])
        assert cli_compile.config_from_args(args).stamp_layers is want
