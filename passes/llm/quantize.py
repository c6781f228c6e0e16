"""``quantize{mode=...}``: quantization of the linear layers, inserted as quantize/dequantize ops.

Every ``core.linear`` (and ``llm.linear_act``, a linear with its activation epilogue) whose
weight is a ``param`` gets its weight replaced by
``quant.dequantize`` of *derived* weights (:meth:`irlm.passes.Rewriter.derived_param`: the
quantized tensor, its scales and zero points are computed lazily from the stored weight the
first time something reads them).  Modes that quantize activations also insert
``quant.quantize`` / ``quant.quantize_per_token`` + ``quant.dequantize`` on the linear's input.
``fuse-quant`` (passes/llm/quant_fuse.py, run at the end of this pass unless ``fuse=false``) then
turns each such pattern into the one op kernels implement: ``quant.linear`` (weight-only) or
``quant.linear_a8`` (8-bit weights and activations).

=============  =========================================================================
mode           what
=============  =========================================================================
``int8``       weight-only, symmetric, one scale per output channel (RTN)
``int4``       weight-only, asymmetric, one scale + zero point per ``group`` inputs (RTN)
``int4-awq``   ``int4`` after AWQ: per-input-channel scales ``s = mean|x|^a`` (``a``
               searched on the calibration activations to minimise the layer's output
               error) multiply the weight columns before rounding; ``x / s`` is folded into
               the producing norm's weight where it can be, else a ``core.mul``
``w8a8-sq``    SmoothQuant: ``s = amax|x|^alpha / amax|W|^(1-alpha)`` per input channel moves
               activation outliers into the weights (folded like AWQ); int8 weights per
               channel, int8 activations per token (dynamic)
``fp8``        e4m3 weights (one scale per tensor) and e4m3 activations with one static
               scale per tensor, ``amax(x) / 448`` over the calibration set
``fp8-weight`` e4m3 weights only
=============  =========================================================================

The calibrated modes (``int4-awq``, ``w8a8-sq``, ``fp8``) run the graph on a calibration set
(passes/llm/calibration.py): ``calib=FILE`` (``.json`` token ids, or text with ``tokenizer=``),
default the built-in ``passes/llm/calibration.txt``.  Layers that share one input (q/k/v, gate/up)
share one smoothing scale, so it can be folded once.

By default the LM head (a linear whose result reaches a graph output without passing another
linear, or whose weight is named ``lm_head`` or is also read by an embedding) stays in full
precision: ``skip=none`` quantizes it too.  ``ctx.stats`` gets ``rel error <weight>`` =
||W_eff - W||_F / ||W||_F per layer (W_eff: the weight the quantized layer effectively
multiplies by), with its mean and max, and for calibrated modes ``output error <weight>``: the
relative error of the layer's output on the calibration activations, activation rounding
included.  docs/quantization.md has the storage layouts and measured accuracy.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from irlm.errors import IRLMError
from irlm.ir import Graph, Op, Value
from irlm.ops.quant import FP8_MAX, dequantize_reference, pack_int4
from irlm.types import DType, TensorType

from ..errors import PassError
from ..fusions.weights import ensure_weight_store
from ..options import Option
from ..registry import register_pass
from ..rewriting.rewriter import Rewriter

#: pass modes, and the stored weight format each one uses
MODES = ("int8", "int4", "int4-awq", "w8a8-sq", "fp8", "fp8-weight")
WEIGHT_FORMAT = {"int8": "int8", "int4": "int4", "int4-awq": "int4", "w8a8-sq": "int8",
                 "fp8": "fp8", "fp8-weight": "fp8"}
CALIBRATED = ("int4-awq", "w8a8-sq", "fp8")
#: how activations are quantized per mode (None: weight-only)
ACT_QUANT = {"w8a8-sq": ("per_token", DType.i8), "fp8": ("per_tensor", DType.f8e4m3)}
_EPS = 1e-12


# ----- round-to-nearest quantizers (torch, float32 math) ------------------------------------------


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32):
    """``(q i8 [N, K], s [N])``: symmetric per output channel."""
    wf = w.float()
    s = (wf.abs().amax(dim=1) / 127.0).clamp(min=_EPS).to(scale_dtype)
    q = torch.round(wf / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: torch.Tensor, group: int, scale_dtype: torch.dtype = torch.float32):
    """``(q u8 [N, K/2] packed, s [N, K/group], z u8 [N, K/group])``: asymmetric group-wise."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    s = ((hi - lo) / 15.0).clamp(min=_EPS).to(scale_dtype)
    sf = s.float()
    z = torch.round(-lo / sf).clamp(0, 15)
    q = (torch.round(g / sf[..., None]) + z[..., None]).clamp(0, 15)
    return pack_int4(q.reshape(n, k)), s, z.to(torch.uint8)


def quantize_fp8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32):
    """``(q f8e4m3 [N, K], s 0-d)``: per-tensor scale amax / 448."""
    wf = w.float()
    s = (wf.abs().amax() / FP8_MAX).clamp(min=_EPS).to(scale_dtype)
    q = (wf / s.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


def quantize_weight(w: torch.Tensor, mode: str, group: int = 0,
                    scale_dtype: torch.dtype = torch.float32) -> tuple:
    """The stored tensors of ``mode``: (q, scales) or, for int4, (q, scales, zeros)."""
    if mode == "int8":
        return quantize_int8(w, scale_dtype)
    if mode == "int4":
        return quantize_int4(w, group, scale_dtype)
    if mode == "fp8":
        return quantize_fp8(w, scale_dtype)
    raise PassError(f"quantize: unknown weight format '{mode}' (valid: int8, int4, fp8)")


def dequantize_weight(parts: tuple, mode: str, group: int = 0) -> torch.Tensor:
    q, s = parts[0], parts[1]
    z = parts[2] if len(parts) > 2 else None
    return dequantize_reference(q, s, z, group=group if mode == "int4" else 0)


def relative_error(w: torch.Tensor, parts: tuple, mode: str, group: int = 0) -> float:
    """``||dequant(parts) - W||_F / ||W||_F``."""
    wf = w.float()
    norm = wf.norm().item()
    diff = (dequantize_weight(parts, mode, group) - wf).norm().item()
    return diff / norm if norm > 0 else diff


def stored_types(shape, mode: str, group: int, scale_dtype: DType) -> list[TensorType]:
    n, k = shape
    if mode == "int8":
        return [TensorType((n, k), DType.i8), TensorType((n,), scale_dtype)]
    if mode == "int4":
        return [TensorType((n, k // 2), DType.u8), TensorType((n, k // group), scale_dtype),
                TensorType((n, k // group), DType.u8)]
    return [TensorType((n, k), DType.f8e4m3), TensorType((), scale_dtype)]


# ----- which linears -----------------------------------------------------------------------------

_LINEARS = ("core.linear", "quant.linear", "quant.linear_a8", "llm.linear_act", "core.matmul")
#: the ops whose param weight quantize replaces (llm.linear_act keeps its activation epilogue)
QUANTIZABLE = ("core.linear", "llm.linear_act")


def _reaches_output(v: Value, graph: Graph) -> bool:
    """Whether ``v`` flows into a graph output without passing through another GEMM."""
    outputs = {id(o) for o in graph.outputs}
    seen, todo = set(), [v]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if id(x) in outputs:
            return True
        for u in x.uses:
            # a pipeline stage returns what it sends on: the residual stream, not logits
            if u.op.name not in _LINEARS and u.op.name != "dist.send":
                todo.extend(u.op.results)
    return False


def is_lm_head(linear: Op, graph: Graph, embedding_weights: set[str]) -> bool:
    name = linear.operands[1].producer.attrs["name"]
    return ("lm_head" in name or name in embedding_weights
            or _reaches_output(linear.results[0], graph))


def _layer(linear: Op, wname: str) -> str:
    where = str(linear.loc.module) if linear.loc and linear.loc.module else ""
    return f"layer '{where or wname}' (weight '{wname}')"


def _candidates(graph: Graph, skip: str) -> tuple[list[Op], list[Op]]:
    """(linears to quantize, linears skipped as LM head)."""
    embedding_weights = {op.operands[0].producer.attrs["name"] for op in graph.ops
                         if op.name == "core.embedding" and op.operands
                         and op.operands[0].producer is not None
                         and op.operands[0].producer.name == "param"}
    todo, skipped = [], []
    for op in list(graph.ops):
        if op.name not in QUANTIZABLE or len(op.operands) < 2:
            continue
        w = op.operands[1]
        if w.producer is None or w.producer.name != "param" or w.type.rank != 2 \
                or not w.type.dtype.is_float or w.type.dtype is DType.f8e4m3:
            continue
        if skip == "lm_head" and is_lm_head(op, graph, embedding_weights):
            skipped.append(op)
        else:
            todo.append(op)
    return todo, skipped


# ----- activation-aware input scales (AWQ, SmoothQuant) -------------------------------------------

AWQ_GRID = 20
_MIN_SCALE = 1e-5


def smoothquant_scales(x_amax: torch.Tensor, weights: list[torch.Tensor],
                       alpha: float) -> torch.Tensor:
    """``s_j = amax|x_j|^alpha / amax|W[:, j]|^(1 - alpha)`` (the weights' max over every layer
    that reads x): dividing x by s and multiplying W's columns by s leaves x @ W^T unchanged
    and balances their ranges."""
    w_amax = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = x_amax.float().clamp(min=_MIN_SCALE).pow(alpha) / \
        w_amax.clamp(min=_MIN_SCALE).pow(1.0 - alpha)
    return s.clamp(min=_MIN_SCALE)


def awq_scales(x_mean: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
               group: int, grid: int = AWQ_GRID) -> tuple[torch.Tensor, float]:
    """AWQ: ``s = mean|x|^a`` (normalised to geometric mean 1) for the ``a`` in
    ``0, 1/grid, ..., 1`` that minimises the summed squared output error of the int4 layers
    on the sample activations ``x``.  ``a = 0`` is plain RTN, so the search never does worse
    than RTN on the sample."""
    xf = x.float()
    refs = [xf @ w.float().t() for w in weights]
    base = x_mean.float().clamp(min=1e-4)
    best = (float("inf"), torch.ones_like(base), 0.0)
    for i in range(grid + 1):
        a = i / grid
        s = base.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, refs):
            parts = quantize_int4(w.float() * s, group)
            w_eff = dequantize_weight(parts, "int4", group) / s
            err += float((xf @ w_eff.t() - ref).pow(2).sum())
        if err < best[0]:
            best = (err, s, a)
    return best[1], best[2]


_NORMS = {"llm.rms_norm": (1,), "llm.add_rms_norm": (2,), "core.layer_norm": (1, 2)}


def _foldable(x: Value, members: list[Op], width) -> Optional[tuple[Op, tuple[int, ...]]]:
    """(op, operand indices) whose ``param`` operands can absorb ``x / s``: a norm (or the
    decomposed norm's weight multiply) whose result ``x`` only the quantized layers read."""
    p = x.producer
    mine = {id(m) for m in members}
    if p is None or any(id(u.op) not in mine for u in x.uses) or x is not p.results[0]:
        return None
    idx = _NORMS.get(p.name)
    if idx is None and p.name == "core.mul" and len(p.operands) == 2:
        for i in (0, 1):
            w = p.operands[i]
            if w.producer is not None and w.producer.name == "param" and w.type.rank == 1 \
                    and w.type.shape[0] == width and p.operands[1 - i].type.rank > 1:
                idx = (i,)
    if idx is None or len(p.operands) <= max(idx):
        return None
    for i in idx:
        w = p.operands[i]
        if w.producer is None or w.producer.name != "param" or w.type.rank != 1 \
                or w.type.shape[0] != width or not w.type.dtype.is_float:
            return None
    return p, idx


def apply_input_scale(rw: Rewriter, x: Value, members: list[Op], s: torch.Tensor,
                      tag: str, stats) -> Value:
    """Make the quantized layers read ``x / s``: fold ``1/s`` into the producing norm's weight
    (and bias) when only these layers read its result, else insert ``core.mul``."""
    width = x.type.shape[-1]
    inv = (1.0 / s).float()
    fold = _foldable(x, members, width)
    if fold is not None:
        p, idx = fold
        off = float(p.attrs.get("weight_offset", 0.0) or 0.0)
        rw.loc = p.loc
        with rw.insertion_point(before=p):
            for i in idx:
                w = p.operands[i]
                wname = w.producer.attrs["name"]
                o = off if i == idx[0] and p.name != "core.layer_norm" else 0.0

                def scaled(t, _o=o):
                    return ((t.float() + _o) * inv - _o).to(t.dtype)
                new = rw.derived_param(f"{wname}.{tag}.smoothed", [w], scaled, type=w.type,
                                       how=f"{tag}-input-scale")
                rw.set_operand(p, i, new)
                if not w.uses:
                    rw.erase_op(w.producer)
        stats.bump("input scales folded into norms")
        return x
    first = members[0]
    w0 = first.operands[1].producer.attrs["name"]
    rw.loc = first.loc
    with rw.insertion_point(before=first):
        t = TensorType((width,), x.type.dtype)
        inv_p = rw.derived_param(f"{w0}.{tag}.input_scale", [], lambda: inv.to(t.dtype.torch),
                                 type=t, how=f"{tag}-input-scale")
        y = rw.op("core.mul", x, inv_p)
    stats.bump("input scales as multiplies")
    return y


# ----- the pass ----------------------------------------------------------------------------------


class _Once:
    """Quantizes one weight (times the input scale ``smooth``, if any) once; the derived
    entries (q, scales, zeros) share the result."""

    def __init__(self, fmt: str, group: int, scale_dtype: torch.dtype,
                 smooth: Optional[torch.Tensor] = None):
        self.fmt, self.group, self.scale_dtype, self.smooth = fmt, group, scale_dtype, smooth
        self.parts: Optional[tuple] = None

    def __call__(self, w: torch.Tensor) -> tuple:
        if self.parts is None:
            wf = w.float() if self.smooth is None else w.float() * self.smooth[None, :]
            self.parts = quantize_weight(wf, self.fmt, self.group, self.scale_dtype)
        return self.parts

    def part(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda w: self(w)[i]

    def effective(self, w: torch.Tensor) -> torch.Tensor:
        """The float weight the quantized layer multiplies the *original* input by."""
        wq = dequantize_weight(self(w), self.fmt, self.group)
        return wq if self.smooth is None else wq / self.smooth[None, :]


def _act_roundtrip(x: torch.Tensor, mode: str, scale: Optional[float]) -> torch.Tensor:
    """What the activation quantization of ``mode`` makes of ``x`` (for the statistics)."""
    from irlm.ops.quant import per_token_scales, quantize_act_reference
    act = ACT_QUANT.get(mode)
    if act is None:
        return x
    how, dt = act
    s = per_token_scales(x, dt) if how == "per_token" else torch.tensor(scale)
    return quantize_act_reference(x, s, dt).float() * s


INT4_GROUPS = (128, 64, 32)   # the group sizes int4 kernels are tuned for, largest first


def _int4_group(op: Op, group: int) -> int:
    """The int4 group of one linear: ``group`` when given (it must divide the input features),
    else the largest of :data:`INT4_GROUPS` that does."""
    k = op.operands[1].type.shape[1]
    where = _layer(op, op.operands[1].producer.attrs["name"])
    if not isinstance(k, int) or k % 2:
        raise PassError(f"quantize: int4 needs an even, static number of input features; "
                        f"{where} has {k}")
    if group:
        if k % group:
            raise PassError(f"quantize: option group={group} does not divide the {k} input "
                            f"features of {where} (use a group that divides it, e.g. "
                            f"{next((g for g in INT4_GROUPS if k % g == 0), 2)}, or leave "
                            f"group unset to choose per layer)")
        return group
    fits = [g for g in INT4_GROUPS if k % g == 0]
    if not fits:
        raise PassError(f"quantize: none of the int4 groups {', '.join(map(str, INT4_GROUPS))} "
                        f"divides the {k} input features of {where}; give option group= "
                        f"explicitly (a divisor of {k})")
    return fits[0]


def _tag(mode: str, group: int, sdt: DType) -> str:
    tag = {"int8": "int8", "int4": f"int4g{group}", "int4-awq": f"awq-int4g{group}",
           "w8a8-sq": "sq-int8", "fp8": "fp8", "fp8-weight": "fp8"}[mode]
    return tag + ("" if sdt is DType.f32 else "-f16s")


@register_pass("quantize", options={
    "mode": Option(str, "int8", "int8 | int4 (weight-only RTN), int4-awq (activation-aware "
                   "int4), w8a8-sq (SmoothQuant int8 weights + per-token int8 activations), "
                   "fp8 (e4m3 weights + static e4m3 activations), fp8-weight (e4m3 weights)",
                   choices=list(MODES)),
    "group": Option(int, 0, "int4: input features that share one scale and zero point; 0: "
                    "per layer, the largest of 128, 64, 32 that divides its input features"),
    "skip": Option(str, "lm_head", "lm_head: keep the LM head in full precision; none: "
                   "quantize every linear", choices=["lm_head", "none"]),
    "scale_dtype": Option(str, "f32", "dtype of the stored scales", choices=["f32", "f16"]),
    "measure": Option(bool, True, "quantize each weight now to report its relative error in "
                      "the statistics (needs the weight data)"),
    "calib": Option(str, "", "calibration set for int4-awq, w8a8-sq, fp8: a .json list of "
                    "token-id lists, or a text file (prompts separated by blank lines; needs "
                    "tokenizer=); default: the built-in text"),
    "tokenizer": Option(str, "", "tokenizer.json (or its directory) for a text calib"),
    "alpha": Option(float, 0.5, "w8a8-sq: migration strength (0: all range stays in the "
                    "activations, 1: all moves into the weights)"),
    "fuse": Option(bool, True, "fuse the inserted quantize/dequantize ops into quant.linear / "
                   "quant.linear_a8 (the fuse-quant pass) before returning"),
})
def quantize(graph: Graph, ctx):
    """Quantize the linear layers: insert quantize/dequantize ops around each core.linear
    over a param (weights derived lazily; activation-aware modes calibrated on sample
    prompts), then fuse them into quant.linear / quant.linear_a8 unless fuse=false.
    Statistics: per-layer relative weight error and, when calibrated, output error."""
    o = ctx.options
    mode = o.mode
    if mode not in MODES:  # options are checked by the registry; this guards direct calls
        raise PassError(f"quantize: unknown mode '{mode}' (valid: {', '.join(MODES)})")
    fmt = WEIGHT_FORMAT[mode]
    if fmt == "int4" and o.group < 0:
        raise PassError(f"quantize: option 'group' must be a positive number of input "
                        f"features for mode {mode} (or 0 to choose per layer), got {o.group}")
    if not 0.0 <= o.alpha <= 1.0:
        raise PassError(f"quantize: option alpha={o.alpha} must lie in [0, 1]")
    sdt = DType.parse(o.scale_dtype)
    todo, skipped = _candidates(graph, o.skip)
    # Check every layer before changing anything: an error leaves the graph as it was.
    group_of = {id(op): _int4_group(op, o.group) if fmt == "int4" else 0 for op in todo}
    if not todo:
        ctx.stats.bump("linears skipped (lm_head)", len(skipped))
        return
    store = ensure_weight_store(graph)
    obs = None
    if mode in CALIBRATED:
        from .calibration import load_calibration, observe
        prompts = load_calibration(o.calib, o.tokenizer)
        obs = observe(graph, prompts, todo)
        ctx.stats.counters["calibration prompts"] = obs.prompts
        ctx.stats.counters["calibration tokens"] = obs.tokens
    groups: dict[int, list[Op]] = {}
    for op in todo:
        groups.setdefault(id(op.operands[0]), []).append(op)
    rw = Rewriter(graph, ctx.stats)
    errors: list[float] = []
    out_errors: list[float] = []
    for members in groups.values():
        x = members[0].operands[0]
        group = group_of[id(members[0])]     # members share their input, so their features
        tag = _tag(mode, group, sdt)
        if fmt == "int4":
            ctx.stats.bump(f"linears with int4 group {group}", len(members))
        st = obs.inputs[id(members[0])] if obs is not None else None
        smooth = None
        if mode in ("int4-awq", "w8a8-sq"):
            weights = [store.get(m.operands[1].producer.attrs["name"]) for m in members]
            if mode == "w8a8-sq":
                smooth = smoothquant_scales(st.absmax, weights, o.alpha)
            else:
                smooth, a = awq_scales(st.mean_abs, st.sample(), weights, group)
                ctx.stats.counters[f"awq exponent {_wname(members[0])}"] = a
            x_in = apply_input_scale(rw, x, members, smooth, tag, ctx.stats)
        else:
            x_in = x
        act_scale = None
        act = ACT_QUANT.get(mode)
        if act is not None:
            how, adt = act
            rw.loc = members[0].loc
            with rw.insertion_point(before=members[0]):
                if how == "per_token":
                    xq, xs = rw.op("quant.quantize_per_token", x_in, dtype=adt)
                else:
                    act_scale = max(st.amax, 1e-8) / FP8_MAX
                    t = TensorType((), DType.f32)
                    xs = rw.derived_param(f"{_wname(members[0])}.{tag}.input_scale", [],
                                          lambda v=act_scale: torch.tensor(v), type=t,
                                          how=f"{tag}-calibrated")
                    xq = rw.op("quant.quantize", x_in, xs, dtype=adt)
                x_in = rw.op("quant.dequantize", xq, xs, dtype=x.type.dtype)
        for op in members:
            w = op.operands[1]
            wname = w.producer.attrs["name"]
            once = _Once(fmt, group, sdt.torch, smooth)
            types = stored_types(w.type.shape, fmt, group, sdt)
            suffixes = ["", ".scales", ".zeros"][:len(types)]
            rw.loc = op.loc
            with rw.insertion_point(before=op):
                stored = [rw.derived_param(f"{wname}.{tag}{sfx}", [w], once.part(i), type=t,
                                           how=f"quantize-{tag}{sfx.replace('.', '-')}")
                          for i, (sfx, t) in enumerate(zip(suffixes, types))]
                wd = rw.op("quant.dequantize", *stored, axis=0, group=group,
                           dtype=w.type.dtype)
                new = rw.op(op.name, x_in, wd, *op.operands[2:], **op.attrs,
                            result_types=[op.results[0].type])
            if o.measure:
                _measure(ctx, store, w, wname, once, mode, st, act_scale, errors, out_errors)
            rw.replace_op(op, new)
            ctx.stats.bump("linears quantized")
            if not w.uses and not any(v is w for v in graph.outputs):
                rw.erase_op(w.producer)
    if skipped:
        ctx.stats.bump("linears skipped (lm_head)", len(skipped))
    for name, vals in (("rel error", errors), ("output error", out_errors)):
        if vals:
            ctx.stats.counters[f"{name} mean"] = float(f"{sum(vals) / len(vals):.4g}")
            ctx.stats.counters[f"{name} max"] = float(f"{max(vals):.4g}")
    if o.fuse:
        from .quant_fuse import fuse_quantized
        fuse_quantized(graph, ctx.stats)


def _wname(op: Op) -> str:
    return op.operands[1].producer.attrs["name"]


def _measure(ctx, store, w: Value, wname: str, once: _Once, mode: str, st, act_scale,
             errors: list, out_errors: list) -> None:
    try:
        wt = store.get(wname)
    except IRLMError:
        ctx.stats.bump("error not measured (no weight data)")
        return
    wf = wt.float()
    w_eff = once.effective(wt)
    norm = wf.norm().item()
    err = (w_eff - wf).norm().item() / (norm or 1.0)
    errors.append(err)
    ctx.stats.counters[f"rel error {wname}"] = float(f"{err:.4g}")
    if st is None:
        return
    x = st.sample()
    ref = x @ wf.t()
    if once.smooth is not None:
        xa = _act_roundtrip(x / once.smooth, mode, act_scale) * once.smooth
    else:
        xa = _act_roundtrip(x, mode, act_scale)
    got = xa @ w_eff.t()
    oerr = (got - ref).norm().item() / (ref.norm().item() or 1.0)
    out_errors.append(oerr)
    ctx.stats.counters[f"output error {wname}"] = float(f"{oerr:.4g}")
