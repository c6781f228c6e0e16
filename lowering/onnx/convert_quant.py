"""ONNX converters for the ``quant`` dialect: QuantizeLinear / DequantizeLinear (Q/DQ).

Weights stay quantized in the model (int8, packed int4 as ONNX UINT4, float8 e4m3) and are
dequantized by DequantizeLinear nodes in front of the MatMul: the explicit-quantization form
TensorRT fuses into quantized GEMMs and onnxruntime runs as written.  Scales are cast to
float32 first, so the dequantized weight is computed in float32 and rounded to the activation
dtype once, as the reference (irlm/ops/quant.py) does.  Activations quantize through
QuantizeLinear (static per-tensor scale) or the per-token arithmetic (dynamic scale).
"""
from __future__ import annotations

from typing import Optional

import torch
from onnx import TensorProto, helper

from irlm.ir import Op
from irlm.ops.quant import _EPS, _QMAX, FP8_MAX, _broadcast_layout
from irlm.types import DType

from .context import ONNX_DTYPE, LoweringContext as Ctx
from .convert_core import linear
from .convert_llm import act
from .registry import converter


def _is_param(op: Op, i: int) -> bool:
    return i < len(op.operands) and op.operands[i].producer is not None and \
        op.operands[i].producer.name == "param"


def _int4_weight(ctx: Ctx, op: Op, i: int) -> str:
    """Packed u8 [N, K/2] (low nibble first) is ONNX UINT4 [N, K] byte for byte."""
    v = op.operands[i]
    name = v.producer.attrs["name"]
    data = ctx.weights.get(name).contiguous()
    rows, half = data.shape
    return _raw_initializer(ctx, f"{name}.uint4", TensorProto.UINT4, [rows, half * 2],
                            data.numpy().tobytes())


def _int4_zeros(ctx: Ctx, op: Op, i: int) -> str:
    """u8 zero points [N, G] (values 0..15) packed two per byte as ONNX UINT4."""
    v = op.operands[i]
    name = v.producer.attrs["name"]
    z = ctx.weights.get(name).to(torch.uint8).reshape(-1)
    if z.numel() % 2:
        z = torch.cat([z, torch.zeros(1, dtype=torch.uint8)])
    packed = (z[0::2] & 0xF) | ((z[1::2] & 0xF) << 4)
    return _raw_initializer(ctx, f"{name}.uint4", TensorProto.UINT4,
                            list(v.type.shape), packed.numpy().tobytes())


def _raw_initializer(ctx: Ctx, name: str, elem: int, dims, raw: bytes) -> str:
    key = ("raw", name)
    if key in ctx._consts:
        return ctx._consts[key]
    out = ctx.unique(name)
    if ctx.external is not None and len(raw) >= 1024:
        ctx.initializers.append(ctx.external.add(out, raw, dims, elem))
    else:
        ctx.initializers.append(helper.make_tensor(out, elem, dims, raw, raw=True))
    ctx._consts[key] = out
    return out


def _f32(ctx: Ctx, op: Op, i: int) -> str:
    return ctx.operand_as(op, i, DType.f32)


def dequantize_weight(ctx: Ctx, op: Op, q: int, s: int, z: Optional[int], axis: int,
                      group: int, dtype: DType) -> str:
    """DequantizeLinear of a stored weight (per tensor, per channel along axis, or blocks of
    ``group`` columns with zero points), in float32, cast to ``dtype``."""
    qt = op.operands[q].type
    scale = _f32(ctx, op, s)
    if qt.dtype is DType.u8:   # packed int4: blocks along the columns, u8 zero points
        data = _int4_weight(ctx, op, q)
        zero = _int4_zeros(ctx, op, z) if z is not None else None
        out = ctx.node1("DequantizeLinear", [data, scale, zero], axis=1, block_size=group)
    elif group > 0:
        out = ctx.node1("DequantizeLinear", [ctx.inp(op, q), scale], axis=1, block_size=group)
    elif op.operands[s].type.rank == 0:
        out = ctx.node1("DequantizeLinear", [ctx.inp(op, q), scale])
    else:
        out = ctx.node1("DequantizeLinear", [ctx.inp(op, q), scale], axis=axis % qt.rank)
    return ctx.cast(out, DType.f32, dtype)


def _check_weight_layout(op: Op, q: int, z: Optional[int]) -> Optional[str]:
    qt = op.operands[q].type
    if qt.dtype is DType.u8:
        if not _is_param(op, q):
            return "packed int4 data that is not a stored weight (it is repacked as UINT4)"
        if z is not None and (not _is_param(op, z) or op.operands[z].type.dtype is not DType.u8):
            return "int4 zero points that are not stored u8 weights"
    elif z is not None:
        return "zero points on i8/f8 data (DequantizeLinear takes them only with int4 here)"
    return None


# ----- quant.dequantize ---------------------------------------------------------------------------
def _check_dequantize(op: Op):
    q, s = op.operands[0].type, op.operands[1].type
    if _broadcast_layout(q.dtype in (DType.i8, DType.f8e4m3), q.rank, s.rank,
                         len(op.operands) > 2, op.attrs["group"]):
        return None
    return _check_weight_layout(op, 0, 2 if len(op.operands) > 2 else None)


@converter("quant.dequantize", "DequantizeLinear (per tensor / channel / block, UINT4)",
           check=_check_dequantize)
def _dequantize(ctx: Ctx, op: Op):
    q, s = op.operands[0].type, op.operands[1].type
    a = op.attrs
    if _broadcast_layout(q.dtype in (DType.i8, DType.f8e4m3), q.rank, s.rank,
                         len(op.operands) > 2, a["group"]):
        out = ctx.node1("Mul", [_f32(ctx, op, 0), _f32(ctx, op, 1)])
        return [ctx.cast(out, DType.f32, a["dtype"])]
    return [dequantize_weight(ctx, op, 0, 1, 2 if len(op.operands) > 2 else None, a["axis"],
                              a["group"], a["dtype"])]


# ----- quant.linear -------------------------------------------------------------------------------
def _qlinear_slots(op: Op):
    n_extra = len(op.operands) - 3
    if op.attrs["mode"] == "int4":
        return 3, (4 if n_extra > 1 else None)
    return None, (3 if n_extra == 1 else None)


def _check_qlinear(op: Op):
    zero, _ = _qlinear_slots(op)
    return _check_weight_layout(op, 1, zero)


@converter("quant.linear", "DequantizeLinear(weight) + MatMul (+ Add, activation)",
           check=_check_qlinear)
def _qlinear(ctx: Ctx, op: Op):
    zero, bias = _qlinear_slots(op)
    dtype = op.operands[0].type.dtype
    w = dequantize_weight(ctx, op, 1, 2, zero, 0, op.attrs["group"], dtype)
    out = linear(ctx, ctx.inp(op, 0), w, ctx.inp(op, bias) if bias is not None else None)
    return [out if op.attrs["act"] == "none" else act(ctx, out, op.attrs["act"])]


# ----- activation quantization --------------------------------------------------------------------
def _zero_point(ctx: Ctx, dtype: DType) -> str:
    if dtype is DType.i8:
        return ctx.scalar(0, DType.i8)
    return ctx.const(torch.zeros((), dtype=torch.float8_e4m3fn))


def quantize_static(ctx: Ctx, x_f32: str, scale_f32: str, dtype: DType) -> str:
    """QuantizeLinear with irlm's clamp: i8 to +-127 (ONNX saturates to -128; clipping x to
    +-127*scale first gives the same values), f8e4m3 saturating to +-448."""
    if dtype is DType.i8:
        bound = ctx.node1("Mul", [scale_f32, ctx.scalar(127.0, DType.f32)])
        x_f32 = ctx.node1("Clip", [x_f32, ctx.node1("Neg", [bound]), bound])
        return ctx.node1("QuantizeLinear", [x_f32, scale_f32, _zero_point(ctx, dtype)])
    return ctx.node1("QuantizeLinear", [x_f32, scale_f32, _zero_point(ctx, dtype)], saturate=1)


def per_token_scale(ctx: Ctx, x_f32: str, dtype: DType) -> str:
    """max(amax(|x|, -1) / qmax, eps) as float32 [..., 1]."""
    amax = ctx.node1("ReduceMax", [ctx.node1("Abs", [x_f32]), ctx.ints([-1])], keepdims=1)
    return ctx.node1("Max", [ctx.node1("Div", [amax, ctx.scalar(_QMAX[dtype], DType.f32)]),
                             ctx.scalar(_EPS, DType.f32)])


def quantize_per_token(ctx: Ctx, x_f32: str, scale: str, dtype: DType) -> str:
    v = ctx.node1("Div", [x_f32, scale])
    if dtype is DType.i8:   # Round is ties-to-even, as torch.round
        v = ctx.node1("Clip", [ctx.node1("Round", [v]), ctx.scalar(-127.0, DType.f32),
                               ctx.scalar(127.0, DType.f32)])
        return ctx.node1("Cast", [v], to=TensorProto.INT8)
    v = ctx.node1("Clip", [v, ctx.scalar(-FP8_MAX, DType.f32), ctx.scalar(FP8_MAX, DType.f32)])
    return ctx.node1("Cast", [v], to=ONNX_DTYPE[DType.f8e4m3])


@converter("quant.quantize", "QuantizeLinear (per tensor)")
def _quantize(ctx: Ctx, op: Op):
    return [quantize_static(ctx, _f32(ctx, op, 0), _f32(ctx, op, 1), op.attrs["dtype"])]


@converter("quant.quantize_per_token", "ReduceMax/Div/Round/Clip/Cast (dynamic per token)")
def _quantize_per_token(ctx: Ctx, op: Op):
    x = _f32(ctx, op, 0)
    s = per_token_scale(ctx, x, op.attrs["dtype"])
    return [quantize_per_token(ctx, x, s, op.attrs["dtype"]), s]


# ----- quant.linear_a8 ----------------------------------------------------------------------------
@converter("quant.linear_a8", "Q/DQ activations and weights + MatMul (+ Add, activation)")
def _linear_a8(ctx: Ctx, op: Op):
    """w8a8: x quantized per token (dynamic), fp8: with the static x_scale; both sides
    dequantized (DequantizeLinear) into one float32 MatMul, the form TensorRT fuses into an
    8-bit GEMM."""
    mode = op.attrs["mode"]
    xt = op.operands[0].type
    k = xt.shape[-1]
    dtype = xt.dtype
    x2 = ctx.node1("Reshape", [_f32(ctx, op, 0), ctx.ints([-1, k])])
    if mode == "w8a8":
        s = per_token_scale(ctx, x2, DType.i8)                       # [rows, 1]
        xq = quantize_per_token(ctx, x2, s, DType.i8)
        xdq = ctx.node1("DequantizeLinear", [xq, ctx.node1("Reshape", [s, ctx.ints([-1])])],
                        axis=0)
        bias_i = 3 if len(op.operands) > 3 else None
    else:
        xs = _f32(ctx, op, 3)
        xq = quantize_static(ctx, x2, xs, DType.f8e4m3)
        xdq = ctx.node1("DequantizeLinear", [xq, xs])
        bias_i = 4 if len(op.operands) > 4 else None
    w = dequantize_weight(ctx, op, 1, 2, None, 0, 0, DType.f32)
    y = linear(ctx, xdq, w, _f32(ctx, op, bias_i) if bias_i is not None else None)
    out_shape = list(xt.shape[:-1]) + [op.operands[1].type.shape[0]]
    y = ctx.node1("Reshape", [ctx.cast(y, DType.f32, dtype), ctx.reshape_shape(out_shape)])
    return [y if op.attrs["act"] == "none" else act(ctx, y, op.attrs["act"])]
