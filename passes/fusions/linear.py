"""``fuse-linear``: a product with a weight matrix, and its bias add -> ``core.linear``.

Some models write their projections as plain products rather than ``nn.Linear`` calls, so
they trace to ``core.matmul``: Falcon's ``FalconLinear`` computes ``x @ W.T (+ b)`` with an
``[out, in]`` weight, GPT-2's ``Conv1D`` ``x @ W + b`` with an ``[in, out]`` one.  Everything
that treats a projection as one (the quantize pass, the GPU executor's GEMV tactics,
``fuse-qkv``, ``fuse-bias-act``, tp-split) reads ``core.linear``, so without this their
projections stayed unquantized bf16 GEMMs under ``--quant``.  Three rules::

    x @ transpose(W)       = linear(x, W)        W an [out, in] param (Falcon)
    x @ W                  = linear(x, Wᵀ)       W an [in, out] param (GPT-2); Wᵀ is a derived,
                                                 lazily transposed weight (weights.py)
    linear(x, W) + b       = linear(x, W, b)     b a param vector of the output width

Checked: the weight is a 2-D float param of x's dtype, the transpose swaps its two axes, the
bias add has the linear as its only input it reads once and does not broadcast the product
larger.
"""
from __future__ import annotations

from ..rewriting.driver import pattern_pass
from ..rewriting.pattern import Var, op, rule, same_type
from .constraints import is_param, is_vector_of
from .weights import transposed_param

x, w, b = Var("x"), Var("w"), Var("b")


def _weight(m) -> bool:
    return (is_param(m.w) and m.w.type.rank == 2 and m.x.type.rank >= 1
            and m.x.type.dtype is m.w.type.dtype and m.x.type.dtype.is_float)


@rule(op("core.matmul")(x, op("core.transpose")(w).named("t")), benefit=2)
def matmul_transposed_weight(m, rw):
    """x @ transpose(W) = linear(x, W)   (W an [out, in] param)"""
    if not _weight(m) or {m.t.attrs["dim0"] % 2, m.t.attrs["dim1"] % 2} != {0, 1}:
        return None
    return rw.op("core.linear", m.x, m.w)


@rule(op("core.matmul")(x, w))
def matmul_weight(m, rw):
    """x @ W = linear(x, Wᵀ)   (W an [in, out] param)"""
    if not _weight(m):
        return None
    return rw.op("core.linear", m.x, transposed_param(rw, m.w))


@rule(op("core.add")(op("core.linear")(x, w).named("linear").one_use(), b))
def linear_then_bias(m, rw):
    """linear(x, W) + b = linear(x, W, b)"""
    product = m.linear.results[0]
    if not (is_param(m.b) and is_vector_of(m.b, m.w.type.shape[0], product.type.dtype)
            and same_type(m.root.results[0], product)):
        return None
    return rw.op("core.linear", m.x, m.w, m.b)


LINEAR_PATTERNS = [matmul_transposed_weight, matmul_weight, linear_then_bias]

fuse_linear = pattern_pass("fuse-linear", LINEAR_PATTERNS)
