"""Explicit ("eager") attention in a traced decoder, for substitute-attention.

Models without a ``scaled_dot_product_attention`` path (BLOOM) spell attention out:

    out = softmax(Q K^T * scale + bias) V          (casts and reshapes in between)

where ``bias`` holds the causal mask and, for ALiBi models, ``slope[h] * key_position``.
:func:`find_eager_attention` finds each such softmax and proves what the rewrite to
``llm.paged_attention`` relies on:

* the scores are one batched product ``Q @ transpose(K)`` (times a scalar constant) plus
  terms that read no weight and no graph input but ``attention_mask``;
* those bias terms, evaluated as the inference form feeds them (an all-ones mask; several
  lengths), are ``slope[h] * (j - i)`` plus a per-row constant on every key ``j <= i`` and at
  most -1e4 (masked) on every ``j > i``: causal attention with ALiBi slopes ``slope`` (all
  zero: none), which is what ``llm.paged_attention{alibi_slopes}`` computes, since softmax
  ignores a per-row constant;
* the probabilities reach one product ``P @ V`` through casts and reshapes only.

A bias that is not of that form (a sliding window, a padding pattern the mask does not give)
is refused with the op and what was found, never rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from irlm.errors import IRError
from irlm.interpreter import RefContext
from irlm.ir import Graph, Op, Value
from irlm.registry import get_op_def
from irlm.types import dims_equal

#: sequence lengths at which the bias is evaluated
PROBE_LENGTHS = (2, 5, 17, 40)
_PRODUCTS = ("core.bmm", "core.matmul")
_MASKED = -1e4


@dataclass
class EagerAttention:
    softmax: Op
    q: Value            # [heads, tokens, D] or [1, heads, tokens, D]
    k: Value
    v: Value
    out: Value          # P @ V, which the rewrite replaces
    scale: float
    slopes: tuple       # ALiBi slopes, one per head; () for none


def find_eager_attention(g: Graph, T, sliding_window: int = 0) -> list[EagerAttention]:
    """Every explicit attention of ``g`` (already specialized to batch 1, tokens ``T``);
    ``sliding_window`` > 0: the mask must also hide keys that many positions back or more."""
    found = []
    for op in list(g.ops):
        if op.name == "core.softmax":
            att = _match(g, op, T, sliding_window)
            if att is not None:
                found.append(att)
    return found


def _skip_back(v: Value) -> Value:
    while v.producer is not None and v.producer.name in ("core.cast", "core.reshape"):
        v = v.producer.operands[0]
    return v


def _scalar_constant(v: Value) -> Optional[float]:
    p = v.producer
    if p is None or v.type.rank != 0:
        return None
    if p.name == "core.constant":
        return float(p.attrs["value"])
    if p.name == "core.full":
        return float(p.attrs["value"])
    return None


def _additive_terms(v: Value) -> list[Value]:
    p = v.producer
    if p is not None and p.name in ("core.cast", "core.reshape"):
        return _additive_terms(p.operands[0])
    if p is not None and p.name == "core.add":
        return _additive_terms(p.operands[0]) + _additive_terms(p.operands[1])
    return [v]


def _product(term: Value):
    """``bmm(Q, Kt) [* c | / c]`` → (product op, scale), else None."""
    v, scale = term, 1.0
    p = v.producer
    if p is not None and p.name in ("core.mul", "core.div"):
        a, b = p.operands
        c = _scalar_constant(b)
        if c is None and p.name == "core.mul":
            a, c = b, _scalar_constant(a)
        if c is None or c == 0:
            return None
        scale = c if p.name == "core.mul" else 1.0 / c
        v = a
    v = _skip_back(v)
    p = v.producer
    if p is None or p.name not in _PRODUCTS:
        return None
    return p, scale


def _transposed_last(v: Value) -> Optional[Value]:
    p = v.producer
    if p is None or p.name != "core.transpose":
        return None
    r = v.type.rank
    dims = {d % r for d in (p.attrs["dim0"], p.attrs["dim1"])}
    return p.operands[0] if dims == {r - 2, r - 1} else None


def _match(g: Graph, sm: Op, T, window: int) -> Optional[EagerAttention]:
    x = sm.operands[0]
    r = x.type.rank
    if sm.attrs["dim"] % r != r - 1 or r not in (3, 4):
        return None
    terms = _additive_terms(x)
    products = [(t, _product(t)) for t in terms]
    products = [(t, p) for t, p in products if p is not None]
    if len(products) != 1:
        return None
    term, (qk, scale) = products[0]
    q, kt = qk.operands
    k = _transposed_last(kt)
    if k is None:
        return None
    # the probabilities: casts and reshapes to one product P @ V
    y = sm.result
    while len(y.uses) == 1 and y.uses[0].op.name in ("core.cast", "core.reshape"):
        y = y.uses[0].op.result
    if len(y.uses) != 1 or y.uses[0].op.name not in _PRODUCTS or y.uses[0].index != 0:
        return None
    pv = y.uses[0].op
    v = pv.operands[1]
    for t, what in ((q, "query"), (k, "key"), (v, "value")):
        s = t.type.shape
        if t.type.rank not in (3, 4) or (t.type.rank == 4 and s[0] != 1) \
                or not dims_equal(s[-2], T):
            raise IRError(f"substitute-attention: {sm.describe()}: the {what} of an explicit "
                          f"attention is {t.type}, expected [heads, tokens, head_dim] or "
                          f"[1, heads, tokens, head_dim]")
    heads = q.type.shape[-3]
    slopes = _alibi_slopes(g, sm, x, term, T, heads, window)
    return EagerAttention(sm, q, k, v, pv.result, scale, slopes)


# ----- the bias, evaluated -------------------------------------------------------------------------

def _cone(target: Value, stop: Value) -> list[Op]:
    """The ops ``target`` depends on, ``stop``'s producer chain excluded."""
    seen, stack, out = set(), [target], []
    while stack:
        v = stack.pop()
        if v is stop or id(v) in seen or v.producer is None:
            continue
        seen.add(id(v))
        out.append(v.producer)
        stack.extend(v.producer.operands)
    return out


def _alibi_slopes(g: Graph, sm: Op, x: Value, product: Value, T, heads, window: int) -> tuple:
    ops = _cone(x, product)
    inputs = {id(v): v for v in g.inputs}
    for op in ops:
        if op.name == "param":
            raise IRError(f"substitute-attention: {sm.describe()}: the scores' bias reads "
                          f"weight '{op.attrs['name']}' ({op.describe()}); only a causal mask "
                          f"and ALiBi slopes can become paged attention")
        for v in op.operands:
            if id(v) in inputs and v.name != "attention_mask":
                raise IRError(f"substitute-attention: {sm.describe()}: the scores' bias reads "
                              f"input {v.label()}; only a causal mask and ALiBi slopes (from "
                              f"the attention mask) can become paged attention")
    order = {id(op): i for i, op in enumerate(g.ops)}
    ops.sort(key=lambda op: order[id(op)])
    found = None
    for n in PROBE_LENGTHS:
        bias = _evaluate(g, ops, x, product, T, n)
        bias = bias.reshape(-1, n, n)
        if bias.shape[0] != int(heads):
            raise IRError(f"substitute-attention: {sm.describe()}: scores of {bias.shape[0]} "
                          f"rows of heads for {heads} query heads")
        slopes = _causal_alibi(sm, bias, n, window)
        if found is not None and not torch.allclose(slopes, found, rtol=1e-5, atol=1e-9):
            raise IRError(f"substitute-attention: {sm.describe()}: the scores' bias changes its "
                          f"slopes with the sequence length ({found.tolist()} vs "
                          f"{slopes.tolist()}); not ALiBi")
        found = slopes
    if not bool((found != 0).any()):
        return ()
    return tuple(float(s) for s in found.float())


def _evaluate(g: Graph, ops: list[Op], x: Value, product: Value, T, n: int) -> torch.Tensor:
    """``x`` with the product term zero and an all-ones ``attention_mask`` of length n, in
    float64 (a cast to a float type keeps float64, so a bf16 model's rounded ALiBi terms are
    evaluated exactly)."""
    ctx = RefContext(g, g.weights, {T: n} if not isinstance(T, int) else {}, {})
    env = {}
    for v in g.inputs:
        if v.name == "attention_mask":
            env[id(v)] = torch.ones([ctx.dim(d) for d in v.type.shape], dtype=v.type.dtype.torch)
    env[id(product)] = torch.zeros([ctx.dim(d) for d in product.type.shape],
                                   dtype=torch.float64)
    for op in ops:
        args = [env[id(v)] for v in op.operands]
        ctx.op = op
        if op.name == "core.cast" and op.attrs["dtype"].torch.is_floating_point:
            results = [args[0].to(torch.float64)]
        else:
            results = get_op_def(op.name).reference(ctx, args, op.attrs)
        for r, t in zip(op.results, results):
            env[id(r)] = t
    return env[id(x)].to(torch.float64)


def _causal_alibi(sm: Op, bias: torch.Tensor, n: int, window: int) -> torch.Tensor:
    """Slopes s[h] with bias[h, i, j] = s[h] * (j - i) + c[h, i] for the keys query i sees
    (j <= i, and i - j < window if window > 0) and bias <= -1e4 for the others (IRError
    otherwise)."""
    i = torch.arange(n).view(n, 1)
    j = torch.arange(n).view(1, n)
    allowed = j <= i
    if window > 0:
        allowed &= (i - j) < window
    if not bool((bias[:, ~allowed] <= _MASKED).all()):
        what = f"keys outside its {window}-token window" if window > 0 else "later keys"
        raise IRError(f"substitute-attention: {sm.describe()}: the scores' mask lets a query "
                      f"see {what}; only causal decoders (with the model's sliding window) "
                      f"can be served")
    diag = torch.diagonal(bias, dim1=1, dim2=2)                      # [heads, n]
    if not bool(torch.isfinite(diag).all()):
        raise IRError(f"substitute-attention: {sm.describe()}: the scores' mask hides a "
                      f"query's own key")
    if window == 1:      # each query sees only its own key: no slope to read
        slopes = torch.zeros(bias.shape[0], dtype=bias.dtype)
    else:
        slopes = bias[:, n - 1, n - 1] - bias[:, n - 1, n - 2]
    want = slopes.view(-1, 1, 1) * (j - i) + diag.unsqueeze(2)
    got = bias.masked_fill(~allowed, 0)
    want = want.masked_fill(~allowed, 0)
    scale = want.abs().max().clamp(min=1.0)
    if not bool(((got - want).abs() <= 1e-6 * scale).all()):
        raise IRError(f"substitute-attention: {sm.describe()}: the scores' bias is not "
                      f"slope * (key - query) on the causal keys (a sliding window the model "
                      f"config does not state, or another position bias?); cannot make it "
                      f"paged attention")
    return slopes
