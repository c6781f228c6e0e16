"""``fuse-bias-act``: a linear layer and its activation -> ``llm.linear_act``.

The up-projection of a GPT-2 / OPT / BERT / NeoX MLP is a GEMM, a bias add and an
activation; ``llm.linear_act`` applies bias and activation in the GEMM's epilogue.  Two
spellings reach the IR:

    act(linear(x, W, b))                  nn.Linear (OPT, BERT, NeoX, Phi)
    act(reshape(matmul(x, W) + b))        GPT-2's Conv1D: W is [in, out], x flattened to 2-D

The second reads a derived, lazily transposed weight (``W.T``), so ``llm.linear_act`` has
core.linear's [out, in] layout in every case; the reshape moves after the activation
(an elementwise op commutes with a reshape).  Activations: relu, silu, gelu (exact and tanh),
including their written-out formulas (irlm/passes/fusions/activations.py).  Checked: the
GEMM and bias results have one use, the bias is a vector of the output width that does not
broadcast the product larger, the weight is a 2-D param, dtypes agree.
"""
from __future__ import annotations

from ..rewriting.driver import pattern_pass
from ..rewriting.pattern import Var, op, rule, same_type
from .activations import ACTIVATION_PATTERNS
from .constraints import ACTIVATION_OPS, activation_name, is_param, is_vector_of
from .weights import transposed_param

x, w, b = Var("x"), Var("w"), Var("b")


linear = op("core.linear")(x, w, ...).named("linear")


@rule(op(*ACTIVATION_OPS)(op("core.reshape")(linear.one_use()).named("reshape").one_use()
                          | linear.one_use()))
def linear_then_act(m, rw):
    """act(linear(x, W, b)) = linear_act(x, W, b){act}
    act(reshape(linear(x, W, b))) = reshape(linear_act(x, W, b){act})   (fuse-linear's form
    of GPT-2's Conv1D, which flattens x first)"""
    fused = rw.op("llm.linear_act", *m.linear.operands, act=activation_name(m.root))
    if "reshape" in m:
        out = m.root.results[0].type
        fused = rw.op("core.reshape", fused, shape=out.shape, result_types=[out])
    return fused


biased_product = op("core.add")(op("core.matmul")(x, w).named("matmul").one_use(),
                                b).named("bias_add")


@rule(op(*ACTIVATION_OPS)(op("core.reshape")(biased_product.one_use()).named("reshape")
                          .one_use() | biased_product.one_use()))
def matmul_bias_then_act(m, rw):
    """act(x @ W + b) = linear_act(x, Wᵀ, b){act}
    act(reshape(x @ W + b)) = reshape(linear_act(x, Wᵀ, b){act})   (W a [in, out] param)"""
    product, biased = m.matmul.results[0], m.bias_add.results[0]
    if not (is_param(m.w) and m.w.type.rank == 2 and m.x.type.rank >= 1):
        return None
    if m.x.type.dtype is not m.w.type.dtype or not m.x.type.dtype.is_float:
        return None
    if not (is_vector_of(m.b, m.w.type.shape[1], m.x.type.dtype) and same_type(biased, product)):
        return None
    fused = rw.op("llm.linear_act", m.x, transposed_param(rw, m.w), m.b,
                  act=activation_name(m.root))
    if "reshape" in m:
        out = m.root.results[0].type
        fused = rw.op("core.reshape", fused, shape=out.shape, result_types=[out])
    return fused


BIAS_ACT_PATTERNS = ACTIVATION_PATTERNS + [linear_then_act, matmul_bias_then_act]

fuse_bias_act = pattern_pass("fuse-bias-act", BIAS_ACT_PATTERNS)
