"""``cast-weights{dtype=f16|bf16}``: store the f32 matrices of linears and embeddings in 16 bits.

An f32 engine for a CPU computes its linears with 16-bit weights anyway (the CPU executor's
``f16`` / ``bf16`` linear dtypes, docs/runtime.md): storing the weights in f32 only doubles the
engine on disk and what loading reads.  This pass replaces each f32 weight matrix whose every
reader is a linear's weight (``core.linear`` / ``llm.linear_act``) or an embedding's table by a
16-bit weight and one ``core.cast`` back to f32, so the graph says what is stored and every
executor still computes in f32:

    %w = param {name = "model.layers.0.mlp.up_proj.weight"} : tensor<1536x576xf32>
  becomes
    %w16 = param {name = "model.layers.0.mlp.up_proj.weight.f16"} : tensor<1536x576xf16>
    %w = core.cast(%w16) {dtype = f32}

The CPU executor reads the 16-bit weight as it is (it packs the weights it runs in f16 or bf16
once at load, and an embedding gathers its rows before widening them); the reference
interpreter widens every weight each step (slow, and exact: f16 and bf16 values are f32
values).  Weights with other readers, vectors (norms, biases) and quantized weights are left
as they are.  ``irlm compile --device cpu`` runs it after the pipeline, with the dtype it
records in ``config.cpu_linear`` (f16 or bf16).  The rounding is the point of the pass, so
``--check-numerics`` does not hold it to f32 tolerances.
"""
from __future__ import annotations

from irlm.ir import Graph
from irlm.types import DType, TensorType

from ..registry import register_pass
from ..options import Option
from ..rewriting.rewriter import Rewriter

#: the readers whose weight operand may be 16-bit behind a cast: op name -> operand index
READERS = {"core.linear": 1, "llm.linear_act": 1, "core.embedding": 0}
DTYPES = {"f16": DType.f16, "bf16": DType.bf16}


@register_pass("cast-weights", options={
    "dtype": Option(str, "f16", "the stored dtype of the weight matrices: f16 or bf16",
                    choices=list(DTYPES)),
})
def cast_weights(graph: Graph, ctx):
    """Store each f32 weight matrix read only by linears and embeddings in 16 bits, with a
    core.cast back to f32 (the graph's arithmetic stays f32)."""
    want = DTYPES[ctx.options.dtype]
    rw = Rewriter(graph, ctx.stats)
    saved = 0
    for p in list(graph.params()):
        w = p.results[0]
        if w.type.dtype != DType.f32 or len(w.type.shape) != 2 or not w.uses:
            continue
        if any(v is w for v in graph.outputs):
            continue
        if not all(READERS.get(u.op.name) == u.index for u in w.uses):
            continue
        name = p.attrs["name"]
        rw.loc = p.loc
        with rw.insertion_point(before=p):
            narrow = rw.derived_param(f"{name}.{ctx.options.dtype}", [w],
                                      lambda t, dt=want.torch: t.to(dt),
                                      type=TensorType(w.type.shape, want),
                                      how=f"cast-{ctx.options.dtype}")
            wide = rw.op("core.cast", narrow, dtype=DType.f32)
        rw.replace_all_uses_with(w, wide)
        rw.erase_op(p)
        ctx.stats.bump("weights stored in " + ctx.options.dtype)
        saved += 2 * int(w.type.numel())
    if saved:
        ctx.stats.counters["MB saved"] = round(saved / 1e6, 1)
