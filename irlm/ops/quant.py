"""The ``quant`` dialect: weight-only quantized storage and the GEMM that reads it.

What the ``quantize`` pass (irlm/passes/llm/quantize.py) produces.  A quantized weight is a
stored integer (or fp8) tensor plus its scales (and, for int4, zero points); the reference
implementations dequantize to floating point and run the ordinary float op, which states the
semantics a kernel must reproduce.  Storage layouts, for a weight ``W`` of
``[out_features N, in_features K]`` (docs/quantization.md has the full description):

=========  ============================  ==============================  ====================
mode       qweight                       scales                          zeros
=========  ============================  ==============================  ====================
``int8``   ``i8 [N, K]``, symmetric      ``[N]`` f32/f16/bf16, one per   none
           (-127..127)                   output channel (row)
``int4``   ``u8 [N, K/2]``: element 2j   ``[N, K/group]``, one per       ``u8 [N, K/group]``,
           in the low nibble, 2j+1 in    group of ``group`` consecutive  integer zero point
           the high nibble, unsigned     input features of a row         0..15
           0..15
``fp8``    ``f8e4m3 [N, K]``             ``[]`` (0-d), one per tensor    none
=========  ============================  ==============================  ====================

Dequantization: int8 ``q * s[n]``; int4 ``(q - z[n, k // group]) * s[n, k // group]``;
fp8 ``float(q) * s``.  All arithmetic in float32, rounded to the requested dtype once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import IRError
from ..registry import attr, define_op
from ..types import DType, TensorType, dims_equal, format_dim
from ._shape import require_float, require_rank, same_dim

MODES = ("int8", "int4", "fp8")
#: activation epilogues of the quantized linears (those of llm.linear_act, or none)
EPILOGUES = ("none", "silu", "gelu", "gelu_tanh", "relu")
#: the storage dtype of qweight per mode
QWEIGHT_DTYPE = {"int8": DType.i8, "int4": DType.u8, "fp8": DType.f8e4m3}
SCALE_DTYPES = (DType.f32, DType.f16, DType.bf16)
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


# ----- packing and dequantization (shared by the references, the pass and the tests) ------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` integers in 0..15 -> ``u8 [..., K/2]``: element 2j in the low nibble,
    element 2j+1 in the high nibble."""
    if q.shape[-1] % 2:
        raise IRError(f"int4 packing needs an even last dim, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """``u8 [..., K/2]`` -> ``u8 [..., K]`` values in 0..15 (the inverse of :func:`pack_int4`)."""
    lo, hi = p & 0xF, p >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def mode_of(qdtype: DType) -> str:
    for m, d in QWEIGHT_DTYPE.items():
        if d is qdtype:
            return m
    raise IRError(f"quantized data must be i8 (int8), u8 (packed int4) or f8e4m3 (fp8), got "
                  f"{qdtype.value}")


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, zero=None, *, axis: int = 0,
                         group: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight that ``(q, scale, zero)`` stores; see the module doc for the layouts."""
    s = scale.float()
    if q.dtype == torch.uint8:  # packed int4, group-wise along the last dim
        v = unpack_int4(q).float()
        if zero is not None:
            v = v - zero.float().repeat_interleave(group, dim=-1)
        w = v * s.repeat_interleave(group, dim=-1)
    else:
        v = q.float()
        if s.dim() == 0:
            w = v * s
        elif group > 0:
            if zero is not None:
                v = v - zero.float().repeat_interleave(group, dim=-1)
            w = v * s.repeat_interleave(group, dim=-1)
        else:
            shape = [1] * v.dim()
            shape[axis] = -1
            w = v * s.reshape(shape)
    return w.to(dtype)


# ----- quant.dequantize --------------------------------------------------------------------------


def _check_quantized(q: TensorType, s: TensorType, z, axis: int, group: int,
                     mode: str = "") -> None:
    """Raise unless (q, s, z) is one of the documented layouts."""
    m = mode_of(q.dtype)
    if mode and m != mode:
        raise IRError(f"mode {mode} stores qweight as {QWEIGHT_DTYPE[mode].value}, got "
                      f"{q.dtype.value}")
    require_rank(q, 2, "quantized data")
    if s.dtype not in SCALE_DTYPES:
        raise IRError(f"scales must be f32, f16 or bf16, got {s.dtype.value}")
    rows, cols = q.shape
    if m == "int4":
        cols = cols * 2 if isinstance(cols, int) else cols
        if group <= 0:
            raise IRError("packed int4 data needs group > 0")
    if group > 0:
        if not isinstance(cols, int) or cols % group:
            raise IRError(f"group {group} does not divide the {format_dim(cols)} columns")
        want = (rows, cols // group)
        if s.rank != 2 or not all(dims_equal(a, b) for a, b in zip(s.shape, want)):
            raise IRError(f"group-wise scales must be [{format_dim(rows)}, {cols // group}], "
                          f"got {s}")
        if z is not None:
            if z.dtype not in (DType.u8, DType.i8) and z.dtype not in SCALE_DTYPES:
                raise IRError(f"zero points must be u8, i8 or float, got {z.dtype.value}")
            if z.rank != 2 or not all(dims_equal(a, b) for a, b in zip(z.shape, want)):
                raise IRError(f"zero points {z} must have the scales' shape {s}")
    else:
        if z is not None:
            raise IRError("zero points are only supported group-wise (group > 0)")
        if s.rank == 0:
            return
        if axis not in (0, 1, -1, -2):
            raise IRError(f"axis {axis} is out of range for rank-2 data")
        if s.rank != 1:
            raise IRError(f"scales must be 0-d (per tensor), 1-d (per channel along axis) or "
                          f"2-d with group > 0, got {s}")
        same_dim(s.shape[0], q.shape[axis], f"scales length differs from dim {axis} of the data")


def _broadcast_layout(act_dtype: bool, q_rank: int, s_rank: int, has_zero: bool,
                      group: int) -> bool:
    """Activations: i8/f8 data of any rank with a scale of the same rank whose dims are 1 or
    the data's (``[tokens, 1]`` per token, ``[1, 1]`` per tensor), or a 0-d scale on data that
    is not rank 2.  Weight layouts never have a scale of the data's rank with group = 0, so
    the two cannot be confused.  Shared by the type rule and the reference."""
    return (act_dtype and not has_zero and group == 0
            and (s_rank == q_rank >= 1 or (s_rank == 0 and q_rank != 2)))


def _is_broadcast_layout(q: TensorType, s: TensorType, z, group: int) -> bool:
    return _broadcast_layout(q.dtype in ACT_DTYPES, q.rank, s.rank, z is not None, group)


def _infer_dequantize(t, a):
    q, s = t[0], t[1]
    z = t[2] if len(t) > 2 else None
    require_float(TensorType((), a["dtype"]), "dtype")
    if _is_broadcast_layout(q, s, z, a["group"]):
        if s.dtype not in SCALE_DTYPES:
            raise IRError(f"scales must be f32, f16 or bf16, got {s.dtype.value}")
        for i, (dq, ds) in enumerate(zip(q.shape, s.shape)):
            if not (dims_equal(ds, 1) or dims_equal(ds, dq)):
                raise IRError(f"scale dim {i} ({format_dim(ds)}) must be 1 or the data's "
                              f"{format_dim(dq)}")
        return [TensorType(tuple(q.shape), a["dtype"])]
    _check_quantized(q, s, z, a["axis"], a["group"])
    rows, cols = q.shape
    if q.dtype is DType.u8:
        cols = cols * 2
    return [TensorType((rows, cols), a["dtype"])]


def _ref_dequantize(ctx, x, a):
    if _broadcast_layout(x[0].dtype in (torch.int8, torch.float8_e4m3fn), x[0].dim(),
                         x[1].dim(), len(x) > 2, a["group"]):
        return [(x[0].float() * x[1].float()).to(a["dtype"].torch)]
    return [dequantize_reference(x[0], x[1], x[2] if len(x) > 2 else None, axis=a["axis"],
                                 group=a["group"], dtype=a["dtype"].torch)]


define_op(
    "quant.dequantize", ["q", "scale", "zero?"],
    {"axis": attr("int", 0), "group": attr("int", 0), "dtype": attr("dtype", DType.f32)},
    infer=_infer_dequantize, reference=_ref_dequantize,
    doc="The float weight [N, K] that quantized data q stores, in dtype. q is i8 [N, K] "
        "(int8), u8 [N, K/2] (int4 packed two per byte, low nibble first) or f8e4m3 [N, K]. "
        "group = 0: scale is 0-d (per tensor) or 1-d along axis (per channel); group > 0: "
        "scale (and the optional zero point) is [N, K/group], one per group of consecutive "
        "columns. Result = (q - zero) * scale in float32, rounded to dtype once.")


# ----- quant.linear ------------------------------------------------------------------------------


def _linear_operands(t, mode):
    """(x, qweight, scales, zeros, bias) from the operand list: zeros only for int4."""
    n_extra = len(t) - 3
    if mode == "int4":
        if n_extra < 1:
            raise IRError("mode int4 needs zero points: (x, qweight, scales, zeros[, bias])")
        return t[0], t[1], t[2], t[3], t[4] if n_extra > 1 else None
    if n_extra > 1:
        raise IRError(f"mode {mode} takes (x, qweight, scales[, bias]), got {len(t)} operands")
    return t[0], t[1], t[2], None, t[3] if n_extra == 1 else None


def _check_bias(b, x: TensorType, q: TensorType) -> None:
    """An optional bias: one value per weight row, in the input's dtype."""
    if b is None:
        return
    require_rank(b, 1, "bias")
    if b.dtype is not x.dtype:
        raise IRError(f"bias dtype {b.dtype.value} differs from the input's {x.dtype.value}")
    same_dim(b.shape[0], q.shape[0], "bias length differs from weight rows")


def _infer_qlinear(t, a):
    mode, group = a["mode"], a["group"]
    x, q, s, z, b = _linear_operands(t, mode)
    require_float(x, "input")
    if x.rank == 0:
        raise IRError("input must have rank >= 1")
    if mode == "int4" and group <= 0:
        raise IRError("mode int4 needs group > 0")
    if mode != "int4" and group != 0:
        raise IRError(f"mode {mode} is not group-wise: group must be 0, got {group}")
    if mode == "fp8" and s.rank != 0:
        raise IRError(f"fp8 scales are per tensor (0-d), got {s}")
    if mode == "int8" and s.rank != 1:
        raise IRError(f"int8 scales are per output channel ([N]), got {s}")
    _check_quantized(q, s, z, 0, group, mode)
    in_features = q.shape[1] * 2 if mode == "int4" else q.shape[1]
    same_dim(x.shape[-1], in_features, "input features differ from the weight's columns")
    _check_bias(b, x, q)
    return [TensorType(tuple(x.shape[:-1]) + (q.shape[0],), x.dtype)]


def _epilogue(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return y
    from .fused import ACTIVATIONS
    return ACTIVATIONS[act](y)


def _ref_qlinear(ctx, x, a):
    xv, q, s, z, b = _linear_operands(x, a["mode"])
    w = dequantize_reference(q, s, z, axis=0, group=a["group"], dtype=xv.dtype)
    return [_epilogue(F.linear(xv, w, b), a["act"])]


define_op(
    "quant.linear", ["x", "qweight", "scales", "zeros?", "bias?"],
    {"mode": attr("str", choices=MODES), "group": attr("int", 0),
     "act": attr("str", "none", EPILOGUES)},
    infer=_infer_qlinear, reference=_ref_qlinear,
    doc="x @ dequantize(qweight)^T + bias, a weight-only quantized linear; weight [N, K] as "
        "for core.linear. Operands after scales: zeros (int4 only, required), then the "
        "optional bias. int8: qweight i8 [N, K], scales [N]; int4: qweight u8 [N, K/2] "
        "(low nibble first), scales and zeros [N, K/group]; fp8: qweight f8e4m3 [N, K], "
        "scales 0-d. The weight is dequantized in float32 and rounded to x's dtype once. "
        "act (silu, gelu, gelu_tanh, relu) is applied to the result as llm.linear_act's.")


# ----- activation quantization -------------------------------------------------------------------
#
# Activations are quantized symmetrically to i8 (-127..127) or f8e4m3 (±448): statically with a
# calibrated scale (``quant.quantize``), or dynamically with one scale per token (row) computed
# from the row's absolute maximum (``quant.quantize_per_token``).  ``quant.dequantize`` with a
# scale of the data's rank (``[tokens, 1]`` or ``[1, 1]``) is the inverse.

ACT_DTYPES = (DType.i8, DType.f8e4m3)
_QMAX = {DType.i8: 127.0, DType.f8e4m3: FP8_MAX}
_EPS = 1e-12


def quantize_act_reference(x: torch.Tensor, scale: torch.Tensor, dtype: DType) -> torch.Tensor:
    """``x / scale`` rounded (i8: to nearest, ties to even, clamped to ±127; f8e4m3: the
    nearest e4m3 value after clamping to ±448), float32 math."""
    v = x.float() / scale.float()
    if dtype is DType.i8:
        return torch.round(v).clamp(-127, 127).to(torch.int8)
    return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def per_token_scales(x: torch.Tensor, dtype: DType) -> torch.Tensor:
    """``amax(|x|, -1) / qmax`` as f32 ``[..., 1]`` (a row of zeros gets a tiny scale)."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    # a tensor divisor: on CUDA, torch divides by a Python number as a multiply by its
    # reciprocal, which rounds differently from the division in ~4.5% of the values (and from
    # this op on the CPU and irlm's fused kernel)
    return (amax / amax.new_full((), _QMAX[dtype])).clamp(min=_EPS)


def _act_dtype(a) -> DType:
    d = a["dtype"]
    if d not in ACT_DTYPES:
        raise IRError(f"activations quantize to i8 or f8e4m3, not {d.value}")
    return d


def _infer_quantize(t, a):
    x, s = t
    require_float(x, "input")
    dt = _act_dtype(a)
    if s.dtype not in SCALE_DTYPES:
        raise IRError(f"scale must be f32, f16 or bf16, got {s.dtype.value}")
    if s.rank != 0:
        raise IRError(f"quant.quantize takes one scale per tensor (0-d), got {s}")
    return [TensorType(tuple(x.shape), dt)]


define_op(
    "quant.quantize", ["x", "scale"], {"dtype": attr("dtype", DType.i8)},
    infer=_infer_quantize,
    reference=lambda ctx, x, a: [quantize_act_reference(x[0], x[1], a["dtype"])],
    doc="Static per-tensor quantization of activations: x / scale (0-d, from calibration) "
        "rounded to dtype: i8 (nearest, clamped to +-127) or f8e4m3 (clamped to +-448).")


def _infer_quantize_per_token(t, a):
    x = t[0]
    require_float(x, "input")
    if x.rank < 1:
        raise IRError("input must have rank >= 1")
    dt = _act_dtype(a)
    return [TensorType(tuple(x.shape), dt),
            TensorType(tuple(x.shape[:-1]) + (1,), DType.f32)]


def _ref_quantize_per_token(ctx, x, a):
    s = per_token_scales(x[0], a["dtype"])
    return [quantize_act_reference(x[0], s, a["dtype"]), s]


define_op(
    "quant.quantize_per_token", ["x"], {"dtype": attr("dtype", DType.i8)},
    infer=_infer_quantize_per_token, reference=_ref_quantize_per_token,
    doc="Dynamic per-token quantization: (q, scale) with scale = amax(|x|, -1) / qmax as f32 "
        "[..., 1] (qmax 127 for i8, 448 for f8e4m3) and q = x / scale rounded as by "
        "quant.quantize.")


# ----- quant.linear_a8: 8-bit weights and 8-bit activations ----------------------------------------

A8_MODES = ("w8a8", "fp8")


def _a8_operands(t, mode):
    """(x, qweight, w_scales, x_scale, bias): x_scale only for fp8 (static per tensor)."""
    if mode == "fp8":
        if len(t) < 4:
            raise IRError("mode fp8 needs the activation scale: (x, qweight, w_scale, x_scale"
                          "[, bias])")
        return t[0], t[1], t[2], t[3], t[4] if len(t) > 4 else None
    if len(t) > 4:
        raise IRError(f"mode w8a8 takes (x, qweight, w_scales[, bias]), got {len(t)} operands")
    return t[0], t[1], t[2], None, t[3] if len(t) > 3 else None


def _infer_linear_a8(t, a):
    mode = a["mode"]
    x, q, ws, xs, b = _a8_operands(t, mode)
    require_float(x, "input")
    require_rank(q, 2, "qweight")
    if x.rank == 0:
        raise IRError("input must have rank >= 1")
    want = DType.i8 if mode == "w8a8" else DType.f8e4m3
    if q.dtype is not want:
        raise IRError(f"mode {mode} stores qweight as {want.value}, got {q.dtype.value}")
    for s, what in ((ws, "weight scales"), (xs, "activation scale")):
        if s is not None and s.dtype not in SCALE_DTYPES:
            raise IRError(f"{what} must be f32, f16 or bf16, got {s.dtype.value}")
    if mode == "w8a8":
        require_rank(ws, 1, "weight scales (one per output channel)")
        same_dim(ws.shape[0], q.shape[0], "weight scales length differs from weight rows")
    else:
        if ws.rank != 0 or xs.rank != 0:
            raise IRError(f"fp8 scales are per tensor (0-d), got {ws} and {xs}")
    same_dim(x.shape[-1], q.shape[1], "input features differ from the weight's columns")
    _check_bias(b, x, q)
    return [TensorType(tuple(x.shape[:-1]) + (q.shape[0],), x.dtype)]


def linear_a8_reference(x, q, ws, xs, b, mode: str) -> torch.Tensor:
    """Quantize x (w8a8: per token, dynamic; fp8: per tensor with xs), multiply the 8-bit
    values exactly (float64 accumulation: int8 products summed over K < 2^37 are exact),
    scale by x's and the weight's scales, add the bias, round to x's dtype once."""
    dt = DType.i8 if mode == "w8a8" else DType.f8e4m3
    if mode == "w8a8":
        xs = per_token_scales(x, dt)
    xq = quantize_act_reference(x, xs, dt)
    acc = xq.double() @ q.double().transpose(0, 1)
    w_s = ws.double() if ws.dim() == 0 else ws.double()[None, :].expand(1, -1)
    y = acc * xs.double() * w_s
    if b is not None:
        y = y + b.double()
    return y.to(x.dtype)


def _ref_linear_a8(ctx, x, a):
    xv, q, ws, xs, b = _a8_operands(x, a["mode"])
    shape = xv.shape
    flat = xv.reshape(-1, shape[-1])
    y = linear_a8_reference(flat, q, ws, xs, b, a["mode"])
    return [_epilogue(y.reshape(tuple(shape[:-1]) + (q.shape[0],)), a["act"])]


define_op(
    "quant.linear_a8", ["x", "qweight", "w_scales", "x_scale?", "bias?"],
    {"mode": attr("str", choices=A8_MODES), "act": attr("str", "none", EPILOGUES)},
    infer=_infer_linear_a8, reference=_ref_linear_a8,
    doc="A linear with 8-bit weights and 8-bit activations. w8a8 (SmoothQuant): qweight i8 "
        "[N, K] with one scale per output channel [N]; x is quantized to i8 per token "
        "(dynamic, amax / 127). fp8: qweight f8e4m3 [N, K], 0-d weight scale, and x is "
        "quantized to f8e4m3 with the 0-d x_scale (static, from calibration). The 8-bit "
        "products are accumulated exactly, scaled, the bias added, and rounded to x's dtype "
        "once; then act (none, silu, gelu, gelu_tanh, relu) as llm.linear_act's.")
