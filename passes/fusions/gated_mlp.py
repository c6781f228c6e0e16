"""``fuse-gated-mlp``: the gated MLP's two projections and activation -> one GEMM +
``llm.gated_act``.

A SwiGLU / GeGLU MLP (Llama, Mistral, Qwen, Gemma, Phi-3) computes
``act(x @ Wgᵀ) * (x @ Wuᵀ)``.  One GEMM over ``concat[Wg; Wu]`` (a derived weight,
concatenated lazily) gives ``[..., 2*inter]`` = gate | up, and ``llm.gated_act`` applies
``act(gate) * up`` in one pass over it.

The rule matches the mul with its operands in either order, the gate as ``act(linear)`` or as
an ``llm.linear_act`` that ``fuse-bias-act`` already made, and the written-out activation
formulas (irlm/passes/fusions/activations.py).  It composes with ``fuse-qkv`` in either
order: after ``fuse-qkv`` the two projections are adjacent equal pieces of one
``core.split`` of a fused linear (also how Phi-3 writes ``gate_up_proj(x).chunk(2, -1)``),
and the second rule fuses that form.  Checked: both projections read the same x, their
weights are params of one shape and dtype, biases are both absent or both params, the
activation is silu or gelu (exact or tanh), and every intermediate has one use.
"""
from __future__ import annotations


from irlm.ir import Op, Value
from irlm.ops.fused import GATED_ACTIVATIONS

from ..rewriting.driver import pattern_pass
from ..rewriting.pattern import Var, op, rule, same_type
from .activations import ACTIVATION_PATTERNS
from .constraints import ACTIVATION_OPS, activation_name, common_module, is_param, is_last_axis
from .weights import concat_params

x = Var("x")
gate_linear = op("core.linear")(x, Var("wg"), ...).named("gate")
gate = (op(*ACTIVATION_OPS)(gate_linear.one_use()).named("act") |
        op("llm.linear_act")(x, Var("wg"), ...).named("gate"))
up = op("core.linear")(x, Var("wu"), ...).named("up")


@rule(op("core.mul")(gate.one_use(), up.one_use()))
def gated_mlp(m, rw):
    """act(linear(x, Wg, bg)) * linear(x, Wu, bu)
    = gated_act(linear(x, concat[Wg; Wu], concat[bg; bu])){act}"""
    act = activation_name(m.act) if "act" in m else m.gate.attrs["act"]
    if act not in GATED_ACTIVATIONS:
        return None
    gate_op, up_op = m.gate, m.up
    if gate_op is up_op or not _same_projection_shape(gate_op, up_op):
        return None
    weights = [m.wg, m.wu]
    biases = [o.operands[2] for o in (gate_op, up_op) if len(o.operands) > 2]
    if biases and (len(biases) != 2 or not all(is_param(b) for b in biases)):
        return None
    at_mul, rw.loc = rw.loc, common_module([gate_op, up_op])  # the GEMM is the MLP's
    operands = [m.x, concat_params(rw, weights)]
    if biases:
        operands.append(concat_params(rw, biases))
    gate_up = rw.op("core.linear", *operands)
    rw.loc = at_mul
    return rw.op("llm.gated_act", gate_up, act=act)


def _same_projection_shape(a: Op, b: Op) -> bool:
    wa, wb = a.operands[1], b.operands[1]
    return (is_param(wa) and is_param(wb) and wa.type.rank == 2 and same_type(wa, wb)
            and same_type(a.results[0], b.results[0]))


def _split_piece(name: str):
    return Var(name).where(lambda v: v.producer is not None and v.producer.name == "core.split",
                           "a core.split piece").one_use()


@rule(op("core.mul")(op(*ACTIVATION_OPS)(_split_piece("gate_piece")).named("act").one_use(),
                     _split_piece("up_piece")))
def gated_mlp_split(m, rw):
    """act(split(y)[i]) * split(y)[i+1] = gated_act(y[..., gate|up]){act}   (equal pieces)"""
    act = activation_name(m.act)
    split: Op = m.gate_piece.producer
    i = m.gate_piece.result_index
    if act not in GATED_ACTIVATIONS or m.up_piece.producer is not split or \
            m.up_piece.result_index != i + 1:
        return None
    y = split.operands[0]
    sizes = list(split.attrs["sizes"])
    if not is_last_axis(split.attrs["dim"], y.type.rank) or sizes[i] != sizes[i + 1] or \
            not isinstance(sizes[i], int):
        return None
    gate_up = _merged_piece(rw, split, i) if len(sizes) > 2 else y
    return rw.op("llm.gated_act", gate_up, act=act)


def _merged_piece(rw, split: Op, i: int) -> Value:
    """Re-split y with pieces i and i+1 as one; the other readers move to the new split."""
    sizes = list(split.attrs["sizes"])
    merged = sizes[:i] + [sizes[i] + sizes[i + 1]] + sizes[i + 2:]
    with rw.insertion_point(after=split):
        pieces = rw.op("core.split", split.operands[0], dim=split.attrs["dim"], sizes=merged)
    for j, old in enumerate(split.results):
        if j < i:
            rw.replace_all_uses_with(old, pieces[j])
        elif j > i + 1:
            rw.replace_all_uses_with(old, pieces[j - 1])
    return pieces[i]


GATED_MLP_PATTERNS = ACTIVATION_PATTERNS + [gated_mlp, gated_mlp_split]

fuse_gated_mlp = pattern_pass("fuse-gated-mlp", GATED_MLP_PATTERNS)
