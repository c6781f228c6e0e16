"""substitute-attention: turn a traced, stateless decoder into the paged inference form.

Input: a causal LM traced with ``input_ids``, an all-ones ``attention_mask`` and
``position_ids`` of shape ``[batch, seq]`` (``irlm.compilation.inference_example_inputs``).  Output (see irlm/ops/llm.py for the semantics):

    inputs:  input_ids [tokens] i64, position_ids [tokens] i64,
             q_lens [reqs] i32, cached_lens [reqs] i32, block_tables [reqs, max_blocks] i32,
             kv_cache [layers, cache_blocks, 2, block_size, kv_heads, head_dim]
    outputs: logits [reqs, vocab] of each request's last token

The rewrite is exact because every op of a decoder except attention acts on each token on its
own: fixing ``batch = 1`` and letting ``seq`` count the packed tokens of all requests leaves
those ops unchanged, and each ``scaled_dot_product_attention`` (whose mask only encoded
causality) becomes one ``llm.paged_attention`` that attends within each request through its
block table.  GQA's ``repeat_kv`` expansion is removed so the cache holds only kv heads.
Positions come from ``position_ids``, so rotary embeddings need no change.

Models without an sdpa path spell attention out as ``softmax(Q K^T * scale + bias) V``;
eager_attention.py finds those and proves the bias is causal (within the sliding window) plus
ALiBi (BLOOM), and they become ``llm.paged_attention`` with ``alibi_slopes`` the same way.  A
model that takes no ``position_ids`` (ALiBi) still gets the input, unused.
"""
from __future__ import annotations

from typing import Optional

import sympy

from irlm.builder import Builder, make_op
from irlm.errors import IRError
from irlm.ir import Graph, Op, Value
from irlm.ops.llm import INFERENCE_INPUTS
from irlm.registry import get_op_def
from irlm.types import DType, TensorType, dims_equal, sym

from ..transforms.dce import eliminate_dead_code
from .eager_attention import EagerAttention, find_eager_attention

_BIG = 2 ** 62


def substitute_attention(graph: Graph, tokens_per_block: int = 16, sliding_window: int = 0,
                         kv_cache_dtype: Optional[DType] = None, max_tokens: int = 8192,
                         max_reqs: int = 512, max_blocks_per_seq: int = 4096) -> Graph:
    g = graph
    for name, value, top in (("tokens_per_block", tokens_per_block, 4096),
                             ("sliding_window", sliding_window, 1 << 24),
                             ("max_tokens", max_tokens, 1 << 24), ("max_reqs", max_reqs, 1 << 20),
                             ("max_blocks_per_seq", max_blocks_per_seq, 1 << 20)):
        low = 0 if name == "sliding_window" else 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
            raise IRError(f"substitute-attention: {name} must be an int in [{low}, {top}], "
                          f"got {value!r}")
    sdpas = [op for op in g.ops if op.name == "core.scaled_dot_product_attention"]
    if not sdpas and not any(op.name == "core.softmax" for op in g.ops):
        raise IRError("substitute-attention: the graph has no core.scaled_dot_product_attention "
                      "op (is it a decoder traced with attention?)")
    names = {v.name: v for v in g.inputs}
    if "input_ids" not in names:
        raise IRError("substitute-attention: the graph has no input %input_ids; trace the "
                      "model with input_ids and position_ids (inference form)")
    if "position_ids" not in names and sdpas:
        raise IRError("substitute-attention: the graph has no input %position_ids; trace "
                      "the model with input_ids and position_ids (inference form)")

    # 1. One packed sequence: batch = 1, seq = tokens of all requests.
    T, R, MB, NB = sym("tokens"), sym("reqs"), sym("max_blocks"), sym("cache_blocks")
    seq_names = [n for n in g.dims if n not in ("batch",)]
    mapping = {}
    if "batch" in g.dims:
        mapping["batch"] = 1
    for name in seq_names:
        mapping[name] = T
    specialize_dims(g, mapping)
    for name in mapping:
        g.dims.pop(name, None)
    g.declare_dim("tokens", 1, max_tokens)
    g.declare_dim("reqs", 1, max_reqs)
    g.declare_dim("max_blocks", 1, max_blocks_per_seq)
    g.declare_dim("cache_blocks", 1, 1 << 24)

    # Explicit softmax(Q K^T) V attention (models without an sdpa path, e.g. BLOOM's ALiBi).
    eager = find_eager_attention(g, T, sliding_window)
    if not sdpas and not eager:
        raise IRError("substitute-attention: the graph has no core.scaled_dot_product_attention "
                      "op and no explicit softmax(Q K^T) V attention (is it a decoder traced "
                      "with attention?)")
    order = {id(op): i for i, op in enumerate(g.ops)}
    layers = sorted([(order[id(op)], op) for op in sdpas] +
                    [(order[id(a.softmax)], a) for a in eager], key=lambda t: t[0])

    # 2. Packed inputs and per-request metadata.
    first = layers[0][1]
    if isinstance(first, EagerAttention):
        k0 = strip_repeat_kv(first.k)
        kv_heads, head_dim = k0.type.shape[-3], k0.type.shape[-1]
    else:
        k0 = strip_repeat_kv(first.operands[1])
        kv_heads, head_dim = k0.type.shape[1], k0.type.shape[3]
    cache_dtype = kv_cache_dtype or k0.type.dtype
    q_lens = g.add_input(TensorType((R,), DType.i32), "q_lens")
    cached = g.add_input(TensorType((R,), DType.i32), "cached_lens")
    tables = g.add_input(TensorType((R, MB), DType.i32), "block_tables")
    cache = g.add_input(TensorType((len(layers), NB, 2, tokens_per_block, kv_heads, head_dim),
                                   cache_dtype), "kv_cache")
    for name in ("input_ids", "position_ids"):
        if name in names:
            _flatten_input(g, names[name], T)
        else:       # an ALiBi model reads no positions; the inference form still takes them
            g.add_input(TensorType((T,), DType.i64), name)

    # 3. Attention → paged attention, one cache layer each, in graph order.
    for layer, (_, att) in enumerate(layers):
        if isinstance(att, EagerAttention):
            _replace_eager(g, att, layer, T, cache, tables, q_lens, cached, sliding_window)
        else:
            _replace_sdpa(g, att, layer, T, cache, tables, q_lens, cached, sliding_window)

    # 4. Only each request's last token reaches the LM head.
    if len(g.outputs) != 1:
        raise IRError(f"substitute-attention: expected one output (logits), found "
                      f"{len(g.outputs)}")
    g.outputs[0] = _last_token_logits(g, g.outputs[0], q_lens, T)

    eliminate_dead_code(g)
    g.inputs = [v for v in g.inputs if v.uses or v.name in INFERENCE_INPUTS]
    order = {n: i for i, n in enumerate(INFERENCE_INPUTS)}
    g.inputs.sort(key=lambda v: order.get(v.name, len(order)))
    return g


# ----- pieces ----------------------------------------------------------------------------------

def specialize_dims(g: Graph, mapping: dict) -> None:
    """Substitute symbolic dims everywhere: value types and dim-valued attributes."""
    subs = {sym(k): (v if not isinstance(v, int) else sympy.Integer(v)) for k, v in mapping.items()}

    def sub_type(t: TensorType) -> TensorType:
        if not t.free_symbols():
            return t
        return TensorType([d if isinstance(d, int) else d.subs(subs) for d in t.shape], t.dtype)

    for v in g.values():
        v.type = sub_type(v.type)
    for op in g.ops:
        d = get_op_def(op.name)
        for k, spec in d.attrs.items():
            val = op.attrs.get(k)
            if val is None:
                continue
            if spec.kind == "dim" and not isinstance(val, int):
                op.attrs[k] = _norm(val.subs(subs))
            elif spec.kind == "dims":
                op.attrs[k] = tuple(x if isinstance(x, int) else _norm(x.subs(subs)) for x in val)
            elif spec.kind == "type":
                op.attrs[k] = sub_type(val)


def _norm(e):
    from irlm.types import normalize_dim
    return normalize_dim(e)


def _flatten_input(g: Graph, v: Value, T) -> None:
    """Replace input ``[1, tokens]`` by ``[tokens]`` (reshaped back for its users)."""
    if v.type.rank != 2 or v.type.shape[0] != 1 or not dims_equal(v.type.shape[1], T):
        raise IRError(f"substitute-attention: input {v.label()} is {v.type}, expected [1, tokens]")
    new = Value(TensorType((T,), v.type.dtype), v.name)
    reshape = make_op("core.reshape", [new], {"shape": [1, T]})
    if g.first is None:
        g.append(reshape)
    else:
        g.insert_before(g.first, reshape)
    v.replace_all_uses_with(reshape.result)
    g.inputs[g.inputs.index(v)] = new


def strip_repeat_kv(v: Value) -> Value:
    """``repeat_kv(x) = reshape(expand(unsqueeze(x, 2)))`` → x  (GQA head expansion), and
    ``expand(x)`` of one kv head to every head → x  (multi-query attention as Falcon's sdpa
    path broadcasts it).

    Matched exactly: x is [b, kv, t, d], the unsqueeze is at dim 2, the expand only grows
    that new dim to rep, and the reshape merges (kv, rep) into kv*rep heads; or x is
    [b, 1, t, d] and the expand grows only its dim 1.
    """
    r = v.producer
    if r is not None and r.name == "core.expand":
        x = r.operands[0]
        if x.type.rank == 4 and v.type.rank == 4 and x.type.shape[1] == 1 and all(
                dims_equal(a, b) for i, (a, b) in enumerate(zip(x.type.shape, v.type.shape))
                if i != 1):
            return x
        return v
    if r is None or r.name != "core.reshape":
        return v
    e = r.operands[0].producer
    if e is None or e.name != "core.expand":
        return v
    u = e.operands[0].producer
    if u is None or u.name != "core.unsqueeze" or u.attrs["dim"] not in (2, -3):
        return v
    x = u.operands[0]
    if x.type.rank != 4:
        return v
    b, kv, t, d = x.type.shape
    es = e.result.type.shape
    if not (len(es) == 5 and dims_equal(es[0], b) and dims_equal(es[1], kv)
            and dims_equal(es[3], t) and dims_equal(es[4], d)):
        return v
    rs = v.type.shape
    if not (dims_equal(rs[0], b) and dims_equal(rs[1], kv * es[2]) and dims_equal(rs[2], t)
            and dims_equal(rs[3], d)):
        return v
    return x


def _replace_sdpa(g: Graph, op: Op, layer: int, T, cache, tables, q_lens, cached,
                  sliding_window: int) -> None:
    q = op.operands[0]
    k = strip_repeat_kv(op.operands[1])
    v = strip_repeat_kv(op.operands[2])
    for x, what in ((q, "query"), (k, "key"), (v, "value")):
        if x.type.rank != 4 or x.type.shape[0] != 1 or not dims_equal(x.type.shape[2], T):
            raise IRError(f"substitute-attention: {op.describe()}: {what} is {x.type}, "
                          f"expected [1, heads, tokens, head_dim]")
    if op.attrs["is_causal"] is False and len(op.operands) < 4:
        raise IRError(f"substitute-attention: {op.describe()} has no mask and is not causal; "
                      f"only causal decoders can be served")
    b = Builder(g, before=op, loc=op.loc)

    def packed(x: Value) -> Value:  # [1, heads, tokens, d] → [tokens, heads, d]
        heads, d = x.type.shape[1], x.type.shape[3]
        return b.op("core.reshape", b.op("core.transpose", x, dim0=1, dim1=2),
                    shape=[T, heads, d])

    out = b.op("llm.paged_attention", packed(q), packed(k), packed(v), cache, tables, q_lens,
               cached, layer=layer, scale=op.attrs["scale"], sliding_window=sliding_window)
    heads, d = out.type.shape[1], out.type.shape[2]
    back = b.op("core.transpose", b.op("core.reshape", out, shape=[1, T, heads, d]),
                dim0=1, dim1=2)
    op.result.replace_all_uses_with(back)
    g.erase(op)


def _replace_eager(g: Graph, att: EagerAttention, layer: int, T, cache, tables, q_lens, cached,
                   sliding_window: int) -> None:
    """``softmax(Q K^T * scale + causal/ALiBi bias) V`` → ``llm.paged_attention`` (see
    eager_attention.py for what was proved)."""
    pv = att.out.producer
    b = Builder(g, before=pv, loc=att.softmax.loc)

    def packed(x: Value) -> Value:  # [heads, tokens, d] or [1, heads, tokens, d] → [tokens, heads, d]
        heads, d = x.type.shape[-3], x.type.shape[-1]
        if x.type.rank == 4:
            x = b.op("core.reshape", x, shape=[heads, T, d])
        return b.op("core.transpose", x, dim0=0, dim1=1)

    out = b.op("llm.paged_attention", packed(att.q), packed(strip_repeat_kv(att.k)),
               packed(strip_repeat_kv(att.v)), cache, tables, q_lens, cached, layer=layer,
               scale=att.scale, sliding_window=sliding_window, alibi_slopes=list(att.slopes))
    back = b.op("core.transpose", out, dim0=0, dim1=1)                  # [heads, tokens, d]
    if att.out.type.rank == 4:
        back = b.op("core.reshape", back, shape=list(att.out.type.shape))
    if back.type.dtype is not att.out.type.dtype:
        back = b.op("core.cast", back, dtype=att.out.type.dtype)
    att.out.replace_all_uses_with(back)
    g.erase(pv)


_PER_TOKEN_UNARY = {"core.cast", "core.tanh", "core.neg", "core.exp", "core.sigmoid"}


def _last_token_logits(g: Graph, out: Value, q_lens: Value, T) -> Value:
    """Move the LM head after a per-request gather of the last token's hidden state."""
    chain: list[Op] = []
    p = out.producer
    while p is not None and p.name != "core.linear" and _per_token(p):
        chain.append(p)
        p = p.operands[0].producer
    b = Builder(g)
    if p is not None and p.name == "core.linear" and p.operands[0].type.rank == 3:
        h = p.operands[0]
        while h.producer is not None and _noop_slice(h.producer):
            h = h.producer.operands[0]
        hidden = h.type.shape[-1]
        last = b.op("llm.last_tokens", b.op("core.reshape", h, shape=[T, hidden]), q_lens,
                    loc=p.loc)
        x = b.op("core.linear", last, *p.operands[1:], loc=p.loc)
        for c in reversed(chain):
            x = b.create(c.name, [x] + c.operands[1:], c.attrs, c.loc).result
        return x
    # Unknown head: gather after it (correct, but computes logits for every token).
    flat = b.op("core.reshape", out, shape=[T] + list(out.type.shape[2:]))
    return b.op("llm.last_tokens", flat, q_lens)


def _per_token(op: Op) -> bool:
    if op.name in _PER_TOKEN_UNARY:
        return True
    if op.name in ("core.mul", "core.div", "core.add") and op.operands[1].type.rank == 0:
        return True
    return False


def _noop_slice(op: Op) -> bool:
    if op.name != "core.slice":
        return False
    a = op.attrs
    return a["start"] == 0 and a["step"] == 1 and (a["end"] == _BIG or
                                                   dims_equal(a["end"], op.operands[0].type.shape[a["dim"]]))


def _register() -> None:
    from ..options import Option
    from ..registry import register_pass

    @register_pass("substitute-attention", options={
        "tokens_per_block": Option(int, 16, "tokens per KV-cache block"),
        "sliding_window": Option(int, 0, "attend to at most this many recent positions (0: all)"),
        "kv_cache_dtype": Option(str, "auto", "KV cache element type",
                                 choices=("auto", "f32", "f16", "bf16")),
        "max_tokens": Option(int, 8192, "most packed tokens in one step"),
        "max_reqs": Option(int, 512, "most requests in one step"),
    })
    def _pass(graph, ctx):
        """Rewrite a traced decoder into the paged inference form (see the module doc)."""
        o = ctx.options
        dtype = None if o["kv_cache_dtype"] == "auto" else DType.parse(o["kv_cache_dtype"])
        names = {v.name for v in graph.inputs}
        substitute_attention(graph, o["tokens_per_block"], o["sliding_window"], dtype,
                             o["max_tokens"], o["max_reqs"])
        # one paged attention (one KV-cache layer) per scaled_dot_product_attention it replaced
        ctx.stats.bump("attention ops made paged",
                       sum(op.name == "llm.paged_attention" for op in graph.ops))
        ctx.stats.bump("inference inputs added",
                       sum(v.name not in names for v in graph.inputs))


_register()
