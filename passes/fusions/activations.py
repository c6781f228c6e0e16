"""``fuse-activations``: activation functions written out in core ops -> one core op.

GPT-2's ``gelu_new`` and other hand-written activations reach the IR as their formula.  The
GEMM-epilogue fusions (``fuse-bias-act``, ``fuse-gated-mlp``) match the one-op spelling, so
they include these patterns; ``fuse-activations`` runs them alone.

    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x³)))  = gelu(x){approximate = tanh}
    0.5 * x * (1 + tanh(sqrt(2/pi) * x * (1 + 0.044715 * x²)))  (BLOOM's spelling)
    0.5 * x * (1 + erf(x / sqrt(2)))                        = gelu(x)
    x * sigmoid(x)                                          = silu(x)

The half may multiply x, the bracket, or their product; x³ may be ``pow(x, 3)`` or
``x * x * x``, and ``0.044715 * x²`` ``(x * 0.044715) * x`` or ``(x * x) * 0.044715``; ``x / sqrt(2)`` may be ``x * (1 / sqrt(2))``; constants are compared to
float32 rounding.  The result must have x's type (no constant broadcasts it larger).
"""
from __future__ import annotations

import math

from ..rewriting.driver import pattern_pass
from ..rewriting.pattern import Var, op, rule
from .constraints import approx, keeps_type, scalar

x = Var("x").is_float()
half = scalar(0.5)
one = scalar(1.0)

cube = op("core.pow")(x, scalar(3.0)) | op("core.mul")(op("core.mul")(x, x), x)
square_term = (op("core.mul")(op("core.mul")(x, approx(0.044715)).one_use(), x) |
               op("core.mul")(op("core.mul")(x, x).one_use(), approx(0.044715)))
tanh_argument = (
    op("core.mul")(
        op("core.add")(x, op("core.mul")(cube.one_use(), approx(0.044715)).one_use()).one_use(),
        approx(math.sqrt(2 / math.pi))) |
    op("core.mul")(op("core.mul")(x, approx(math.sqrt(2 / math.pi))).one_use(),
                   op("core.add")(square_term.one_use(), one).one_use()))
tanh_bracket = op("core.add")(op("core.tanh")(tanh_argument.one_use()).one_use(), one)

erf_argument = op("core.div")(x, approx(math.sqrt(2))) | op("core.mul")(x, approx(math.sqrt(0.5)))
erf_bracket = op("core.add")(op("core.erf")(erf_argument.one_use()).one_use(), one)


def half_x_times(bracket):
    """0.5 * x * bracket, with the 0.5 on x, on the bracket, or on their product."""
    b = bracket.one_use()
    return (op("core.mul")(op("core.mul")(x, half).one_use(), b) |
            op("core.mul")(x, op("core.mul")(b, half).one_use()) |
            op("core.mul")(op("core.mul")(x, b).one_use(), half))


@rule(half_x_times(tanh_bracket))
def gelu_tanh_formula(m, rw):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x³))) = gelu(x){approximate = tanh}
    0.5 * x * (1 + tanh(sqrt(2/pi) * x * (1 + 0.044715 * x²))) = gelu(x){approximate = tanh}"""
    if not keeps_type(m.root.results[0], m.x):
        return None
    return rw.op("core.gelu", m.x, approximate="tanh")


@rule(half_x_times(erf_bracket))
def gelu_erf_formula(m, rw):
    """0.5 * x * (1 + erf(x / sqrt(2))) = gelu(x)"""
    if not keeps_type(m.root.results[0], m.x):
        return None
    return rw.op("core.gelu", m.x)


@rule(op("core.mul")(x, op("core.sigmoid")(x).one_use()))
def silu_formula(m, rw):
    """x * sigmoid(x) = silu(x)"""
    if not keeps_type(m.root.results[0], m.x):
        return None
    return rw.op("core.silu", m.x)


ACTIVATION_PATTERNS = [gelu_tanh_formula, gelu_erf_formula, silu_formula]

fuse_activations = pattern_pass("fuse-activations", ACTIVATION_PATTERNS)
