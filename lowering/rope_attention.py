"""Rotary embedding fused into paged attention, for the GPU executor.

An inference-form layer rotates its queries and keys with two ``llm.rope`` ops (on the
projection's ``[1, heads, tokens, D]`` views, as Hugging Face writes it), views them back to
``[tokens, heads, D]`` and hands them to ``llm.paged_attention``, which writes the keys into the
cache and attends.  On the GPU that is three kernels a layer before the attention itself:
rotary for q, rotary for k, the cache write; at batch 1 each is a few microseconds of launch
and drain for a few KB of data.  :func:`fuse_rope_attention` replaces the three ops with one
``llm.rope_paged_attention`` whose kernel (``rope_kv_write.cu`` reading the graph's own cos / sin
rows) rotates q and k and writes the cache in one launch.

The rewrite is made on the executor's own copy of the graph (``CudaGraphRunner``), never on
the engine: ONNX export, tp/pp splitting and the other executors keep seeing the plain ops.

A pair of ropes is fused only when nothing else can tell: each rope result, and each view
between it and the attention, has the attention as its one reader; both ropes read the same
cos / sin and style; and cos / sin vary along the tokens axis alone, which the views carry to
the attention's token axis (checked by following each axis through the views), so one
``[tokens, r]`` row of cos / sin serves every head of a token.
"""
from __future__ import annotations

import os
from typing import Optional

from irlm.ir import Graph, Op, Value
from irlm.passes import Rewriter
from irlm.types import dims_equal

#: the views a query / key may pass through between its rope and the attention
_VIEWS = ("core.reshape", "core.transpose", "core.permute", "core.squeeze", "core.unsqueeze")


def fusion_enabled() -> bool:
    """``IRLM_FUSE_ROPE``: 1 (the default: a decode step of the 8B shape 2.5% shorter on an
    H200, docs/performance.md) fuses, 0 keeps the ropes and the attention apart."""
    v = os.environ.get("IRLM_FUSE_ROPE", "1").strip()
    if v not in ("0", "1"):
        from irlm.errors import IRLMError
        raise IRLMError(f"IRLM_FUSE_ROPE must be 0 or 1, got {v!r}")
    return v == "1"


def fuse_rope_attention(graph: Graph) -> int:
    """Rewrite each ``llm.paged_attention`` whose query and key come from ``llm.rope`` (through
    views only) into one ``llm.rope_paged_attention``; returns how many were fused."""
    rw = Rewriter(graph)
    outputs = {id(o) for o in graph.outputs}
    fused = 0
    for att in [op for op in graph.ops if op.name == "llm.paged_attention"]:
        q, k = _rotated(att.operands[0], outputs), _rotated(att.operands[1], outputs)
        if q is None or k is None:
            continue
        (rq, chain_q, tok), (rk, chain_k, tok_k) = q, k
        cos, sin = rq.operands[1], rq.operands[2]
        if rk.operands[1] is not cos or rk.operands[2] is not sin \
                or rk.attrs["style"] != rq.attrs["style"] or not dims_equal(tok, tok_k):
            continue
        rw.set_insertion_point(before=att)
        loc = att.loc
        qx = _replay(rw, rq.operands[0], chain_q, loc)
        kx = _replay(rw, rk.operands[0], chain_k, loc)
        r = cos.type.shape[-1]
        rows = [_rows(rw, t, tok, r, loc) for t in (cos, sin)]
        new = rw.op("llm.rope_paged_attention", qx, kx, *att.operands[2:3], *rows,
                    *att.operands[3:], loc=loc, style=rq.attrs["style"], **att.attrs)
        rw.replace_op(att, new)
        for op in chain_q + [rq] + chain_k + [rk]:     # readers first
            rw.erase_op(op)
        fused += 1
    return fused


def _rotated(v: Value, outputs: set) -> Optional[tuple[Op, list[Op], object]]:
    """``(rope, views from the attention back to it, the token dim)`` when ``v`` is an
    ``llm.rope`` result seen through views only, each value read by the next op alone and none
    a graph output (``outputs``: their ids), and the rope's cos / sin vary along one axis of x
    that the views carry to axis 0 of ``v``."""
    chain: list[Op] = []
    while True:
        if len(v.uses) != 1 or id(v) in outputs or v.producer is None:
            return None
        op = v.producer
        if op.name == "llm.rope":
            break
        if op.name not in _VIEWS:
            return None
        chain.append(op)
        v = op.operands[0]
    rope = op
    x, cos = rope.operands[0], rope.operands[1]
    labels, tok = _axis_labels(x.type.shape, cos.type.shape)
    if labels is None:
        return None
    for view in reversed(chain):
        labels = _through(view, labels)
        if labels is None:
            return None
    if labels[0] != "T" or labels[-1] != "D" or len(labels) != 3:
        return None
    return rope, chain, tok


def _static_one(d) -> bool:
    return isinstance(d, int) and d == 1


def _axis_labels(x_shape, cos_shape):
    """Each axis of x as "T" (the one axis cos / sin vary along), "H" (another axis of size
    other than 1: heads), "1" or "D" (the last), and the token dim; None, None when cos / sin
    vary along no leading axis or several, or x has several head-like axes."""
    n = len(x_shape)
    lead = [1] * (n - len(cos_shape)) + list(cos_shape[:-1])
    if len(lead) != n - 1:
        return None, None
    varying = [i for i, d in enumerate(lead) if not _static_one(d)]
    if len(varying) != 1 or not dims_equal(lead[varying[0]], x_shape[varying[0]]):
        return None, None
    t = varying[0]
    labels = []
    for i, d in enumerate(x_shape):
        labels.append("D" if i == n - 1 else "T" if i == t else "1" if _static_one(d) else "H")
    if labels.count("H") > 1:
        return None, None
    return labels, x_shape[t]


def _through(view: Op, labels: list[str]) -> Optional[list[str]]:
    """The axis labels of ``view``'s result, or None where an axis would be split or merged."""
    n, a = len(labels), view.attrs
    if view.name == "core.transpose":
        i, j = a["dim0"] % n, a["dim1"] % n
        out = list(labels)
        out[i], out[j] = out[j], out[i]
        return out
    if view.name == "core.permute":
        return [labels[d % n] for d in a["dims"]]
    if view.name == "core.unsqueeze":
        out = list(labels)
        out.insert(a["dim"] % (n + 1), "1")
        return out
    if view.name == "core.squeeze":
        dims = {d % n for d in a["dims"]} if a["dims"] else \
            {i for i, d in enumerate(view.operands[0].type.shape) if _static_one(d)}
        if any(labels[i] != "1" for i in dims):
            return None
        return [lab for i, lab in enumerate(labels) if i not in dims]
    # core.reshape: allowed when it only adds or drops axes of size 1
    src = [d for d in view.operands[0].type.shape if not _static_one(d)]
    dst = view.results[0].type.shape
    kept = [d for d in dst if not _static_one(d)]
    if len(src) != len(kept) or not all(dims_equal(p, q) for p, q in zip(src, kept)):
        return None
    names = iter(lab for lab, d in zip(labels, view.operands[0].type.shape)
                 if not _static_one(d))
    return ["1" if _static_one(d) else next(names) for d in dst]


def _replay(rw: Rewriter, x: Value, chain: list[Op], loc) -> Value:
    """The views of ``chain`` (attention side first) applied to ``x``, the unrotated input."""
    for view in reversed(chain):
        x = rw.op(view.name, x, loc=loc, **view.attrs)
    return x


def _rows(rw: Rewriter, t: Value, tok, r: int, loc) -> Value:
    """cos or sin as ``[tokens, r]``: its only axis of size other than 1 is the tokens."""
    shape = t.type.shape
    if len(shape) == 2 and dims_equal(shape[0], tok):
        return t
    return rw.op("core.reshape", t, loc=loc, shape=[tok, r])
