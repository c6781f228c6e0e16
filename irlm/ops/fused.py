"""Fused ops of the ``llm`` dialect: what the fusion passes (irlm.passes.fusions) produce.

Each op is one kernel's worth of work that a traced model spells as a chain of ``core`` ops.
The reference implementations state the semantics; where a fused kernel rounds differently
from the unfused chain, the reference follows the kernel and the difference is stated here:

* ``llm.rms_norm`` / ``llm.add_rms_norm``: statistics and the weight multiply in float32,
  one rounding to the input dtype at the end (HF's Llama rounds the normalized value to the
  input dtype before multiplying by the weight: up to one ulp of bf16/f16 apart; identical in
  float32).
* ``llm.rope``, ``llm.gated_act``, ``llm.linear_act``: the same operations as the unfused
  chain, in the operand dtype.

Activation names (``act``) are the kernels' (kernels/src/ops.py): ``silu``, ``gelu`` (exact,
erf), ``gelu_tanh`` (the tanh approximation), and for ``llm.linear_act`` also ``relu``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import IRError
from ..registry import attr, define_op
from ..types import TensorType, dims_equal, format_dim
from ._shape import broadcast_shapes, require_float, require_rank, same_dim

#: act name -> its elementwise function (the same as core.silu / core.gelu / core.relu).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": torch.relu,
}
GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


# ----- RMS normalization -----------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       weight_offset: float = 0.0) -> torch.Tensor:
    """``x * rsqrt(mean(x², -1) + eps) * (weight + weight_offset)`` in float32, rounded to
    x's dtype once."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (weight.float() + weight_offset)).to(x.dtype)


def _check_norm_weight(x: TensorType, w: TensorType) -> None:
    require_float(x, "input")
    require_float(w, "weight")
    require_rank(w, 1, "weight")
    if x.rank == 0:
        raise IRError("input must have rank >= 1")
    same_dim(w.shape[0], x.shape[-1], "weight length differs from the input's last dim")


def check_eps(a) -> None:
    """A norm's epsilon: added to a variance, so it must not be negative (nor NaN)."""
    if not a["eps"] >= 0:
        raise IRError(f"eps {a['eps']} must be >= 0")


def _infer_rms_norm(t, a):
    check_eps(a)
    _check_norm_weight(t[0], t[1])
    return [t[0]]


define_op(
    "llm.rms_norm", ["x", "weight"],
    {"eps": attr("float"), "weight_offset": attr("float", 0.0)},
    infer=_infer_rms_norm,
    reference=lambda ctx, x, a: [rms_norm_reference(x[0], x[1], a["eps"], a["weight_offset"])],
    doc="x * rsqrt(mean(x^2, -1) + eps) * (weight + weight_offset) over the last dim, in "
        "float32, rounded to x's dtype once. weight_offset = 1 is Gemma's (1 + w) form.")


def _infer_add_rms_norm(t, a):
    x, residual = t[0], t[1]
    if x != residual:
        raise IRError(f"x {x} and residual {residual} must have one type")
    check_eps(a)
    _check_norm_weight(x, t[2])
    return [x, x]


def _ref_add_rms_norm(ctx, x, a):
    total = x[0] + x[1]
    return [rms_norm_reference(total, x[2], a["eps"], a["weight_offset"]), total]


define_op(
    "llm.add_rms_norm", ["x", "residual", "weight"],
    {"eps": attr("float"), "weight_offset": attr("float", 0.0)},
    infer=_infer_add_rms_norm, reference=_ref_add_rms_norm,
    doc="(rms_norm(x + residual, weight), x + residual): the residual add (rounded to the "
        "dtype, as the unfused add) and the RMSNorm of the sum, in one kernel.")


# ----- rotary position embedding ---------------------------------------------------------------

ROPE_STYLES = ("rotate_half", "interleaved")


def rotate(x: torch.Tensor, style: str) -> torch.Tensor:
    """rotate_half: ``cat(-x[..., d/2:], x[..., :d/2])`` (Llama, NeoX);
    interleaved: ``stack(-x[..., 1::2], x[..., ::2], -1).flatten(-2)`` (GPT-J)."""
    if style == "rotate_half":
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _ref_rope(ctx, x, a):
    t, cos, sin = x
    r = cos.shape[-1]
    t_rot = t[..., :r]
    out = t_rot * cos + rotate(t_rot, a["style"]) * sin
    if r == t.shape[-1]:
        return [out]
    return [torch.cat((out, t[..., r:]), dim=-1)]


def _infer_rope(t, a):
    x, cos, sin = t
    for v, what in ((x, "x"), (cos, "cos"), (sin, "sin")):
        require_float(v, what)
        if v.rank == 0:
            raise IRError(f"{what} must have rank >= 1")
    if cos != sin:
        raise IRError(f"cos {cos} and sin {sin} must have one type")
    if cos.dtype is not x.dtype:
        raise IRError(f"cos/sin dtype {cos.dtype.value} differs from x's {x.dtype.value}")
    rot, d = cos.shape[-1], x.shape[-1]
    if not isinstance(rot, int) or rot % 2 or (isinstance(d, int) and rot > d):
        raise IRError(f"the rotary dim (cos's last dim, {format_dim(rot)}) must be a static "
                      f"even number no larger than x's last dim {format_dim(d)}")
    lead = broadcast_shapes(x.shape[:-1], cos.shape[:-1])
    if len(lead) != x.rank - 1 or not all(dims_equal(p, q) for p, q in zip(lead, x.shape)):
        raise IRError(f"cos/sin {cos} would broadcast x {x} to a larger shape")
    return [x]


define_op(
    "llm.rope", ["x", "cos", "sin"],
    {"style": attr("str", "rotate_half", ROPE_STYLES)},
    infer=_infer_rope, reference=_ref_rope,
    doc="Rotary position embedding: with r = cos's last dim, the first r dims of x become "
        "x*cos + rotate(x)*sin (rotate per style: rotate_half or interleaved pairs) and the "
        "rest pass through. cos and sin broadcast against x's leading dims.")


# ----- activations -----------------------------------------------------------------------------


def _infer_gated_act(t, a):
    x = t[0]
    require_float(x, "input")
    if x.rank == 0:
        raise IRError("input must have rank >= 1")
    n = x.shape[-1]
    if not isinstance(n, int) or n % 2:
        raise IRError(f"the last dim ({format_dim(n)}) must be static and even: gate | up")
    return [x.with_shape(tuple(x.shape[:-1]) + (n // 2,))]


def _ref_gated_act(ctx, x, a):
    gate, up = x[0].chunk(2, dim=-1)
    return [ACTIVATIONS[a["act"]](gate) * up]


define_op(
    "llm.gated_act", ["x"], {"act": attr("str", "silu", GATED_ACTIVATIONS)},
    infer=_infer_gated_act, reference=_ref_gated_act,
    doc="act(x[..., :n]) * x[..., n:] for x [..., 2n]: the gated MLP's activation over one "
        "fused gate|up projection.")


def _infer_linear_act(t, a):
    from .core import _infer_linear
    return _infer_linear(t, a)


def _ref_linear_act(ctx, x, a):
    return [ACTIVATIONS[a["act"]](F.linear(x[0], x[1], x[2] if len(x) > 2 else None))]


define_op(
    "llm.linear_act", ["x", "weight", "bias?"], {"act": attr("str", choices=tuple(ACTIVATIONS))},
    infer=_infer_linear_act, reference=_ref_linear_act,
    doc="act(x @ weight^T + bias): a linear layer with its activation as the GEMM epilogue; "
        "weight is [out_features, in_features] as for core.linear.")
