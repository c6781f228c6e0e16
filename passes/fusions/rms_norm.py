"""``fuse-rms-norm``: RMSNorm written out in core ops -> ``llm.rms_norm``.

What models write (HF's LlamaRMSNorm and its many copies)::

    xf = x.to(float32)
    xf * rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)        # or xf / sqrt(...), xf * xf
    weight * normalized.to(x.dtype)                           # Llama, Mistral, Qwen, Phi-3
    (normalized * (1 + weight.float())).to(x.dtype)           # Gemma: weight_offset = 1

One pattern covers the spellings: the square as ``pow(x, 2)`` or ``x * x``; the inverse root
as ``rsqrt(v)``, ``1 / sqrt(v)`` or a division by ``sqrt(v)``; the weight on either side of
each multiply, before or after the cast back, widened or not, with or without Gemma's
``1 +``.  Every constraint the rewrite relies on is checked: the mean reduces the last axis
only, eps is a scalar constant, the weight is a vector as long as that axis, each
intermediate has one use (or the fusion would compute it twice), and the result has the
input's type.  The fused op computes in float32 and rounds once (see irlm/ops/fused.py).
"""
from __future__ import annotations

from typing import Optional

from irlm.ir import Value

from ..rewriting.driver import pattern_pass
from ..rewriting.pattern import Const, Var, has_one_use, op, rule
from .constraints import (is_vector_of, keeps_type, reduces_last_axis, scalar, scalar_splat,
                          unwidened)

xf = Var("xf").is_float()
eps = Const(name="eps")
w = Var("w")

square = op("core.pow")(xf, scalar(2.0)) | op("core.mul")(xf, xf)
variance = op("core.mean", keepdim=True)(square.one_use()).named("mean")
variance_eps = op("core.add")(variance.one_use(), eps).named("add_eps").one_use()
root_mean_square = op("core.sqrt")(variance_eps).one_use()
inv_rms = op("core.rsqrt")(variance_eps) | op("core.reciprocal")(root_mean_square)
normalized = (op("core.mul")(xf, inv_rms.one_use()) |
              op("core.div")(xf, root_mean_square)).one_use()
#: the normalized value, possibly cast back to the input dtype (HF: ``.to(input_dtype)``)
normalized_back = op("core.cast")(normalized).one_use() | normalized

#: the weight, possibly widened (``weight.float()``), possibly as Gemma's ``1 + weight``
weight = op("core.cast")(w).named("weight_cast") | w
scale = op("core.add")(weight, Const(1.0)).named("offset") | weight

weighted = op("core.mul")(scale, normalized_back)


@rule(op("core.cast")(weighted.one_use()) | weighted)
def rms_norm_weight_last(m, rw):
    """w * cast(x * rsqrt(mean(x², -1) + eps)) = rms_norm(x, w){eps}
    cast((1 + w) * x * rsqrt(mean(x², -1) + eps)) = rms_norm(x, w){eps, weight_offset = 1}"""
    return _fuse(m, rw)


@rule(op("core.mul")(op("core.mul")(scale, xf).one_use(), inv_rms.one_use()))
def rms_norm_weight_first(m, rw):
    """(w * x) * rsqrt(mean(x², -1) + eps) = rms_norm(x, w){eps}"""
    return _fuse(m, rw)


def _fuse(m, rw) -> Optional[Value]:
    out = m.root.result
    if not reduces_last_axis(m.mean) or not keeps_type(m.mean.operands[0], m.xf):
        return None
    epsilon = scalar_splat(m.eps)
    if epsilon is None or epsilon < 0 or not keeps_type(m.add_eps.results[0], m.mean.results[0]):
        return None
    weight_value = m.w
    if "weight_cast" in m:
        weight_value = unwidened(m.weight_cast.results[0])
        if weight_value is m.weight_cast.results[0]:
            return None  # a narrowing cast rounds the weight: not what rms_norm computes
    hidden = m.xf.type.shape[-1]
    if not is_vector_of(weight_value, hidden):
        return None
    x = _input_of_dtype(m.xf, out)
    if x is None or _cast_back_follows(m.root, m.xf):
        return None
    offset = 1.0 if "offset" in m else 0.0
    return rw.op("llm.rms_norm", x, weight_value, eps=epsilon, weight_offset=offset)


def _input_of_dtype(xf: Value, out: Value) -> Optional[Value]:
    """The value to normalize so the fused op has ``out``'s type: the input before HF's
    ``.to(float32)``, or the float32 value itself."""
    for x in (unwidened(xf), xf):
        if keeps_type(out, x):
            return x
    return None


def _cast_back_follows(root, xf: Value) -> bool:
    """A float32 norm whose only reader casts it back to the input dtype: leave it to the
    larger match rooted at that cast (one op instead of a norm between two casts)."""
    out = root.results[0]
    x = unwidened(xf)
    if x is xf or not has_one_use(out) or root.name == "core.cast":
        return False
    reader = out.uses[0].op
    return reader.name == "core.cast" and reader.attrs["dtype"] is x.type.dtype


RMS_NORM_PATTERNS = [rms_norm_weight_last, rms_norm_weight_first]

fuse_rms_norm = pattern_pass("fuse-rms-norm", RMS_NORM_PATTERNS)
