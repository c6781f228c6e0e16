"""Kernel selection: which irlm kernel (irlm.kernels) runs each op on a GPU.

One table, :data:`KERNELS`: op name → an interpreter override ``fn(ctx, operands, attrs)``
that launches the kernel (falling back to the op's reference semantics for the variants a
kernel does not cover).  Every op not in the table runs its registry reference implementation
on CUDA tensors (torch: cuBLAS for the linears, views for reshapes).  The runtime's CUDA runner
(irlm/runtime/runners/cuda_graphs.py) installs the table in its interpreter.

On a CPU, the choice is the linears' dtype (:func:`default_linear_dtype`): ``irlm compile
--device cpu`` records it in the engine and the CPU runner (irlm/runtime/runners/cpu.py) uses it.
"""
from __future__ import annotations

from typing import Optional

import torch


# ----- CPU: the dtype the linears run in -------------------------------------------------------

#: the linear dtypes the CPU executor runs (irlm/runtime/runners/cpu.py)
LINEAR_DTYPES = ("f32", "f16", "bf16", "int8", "int4")


def has_fp16_weight_gemm() -> bool:
    """Whether this torch has fbgemm's f16-weight GEMM (``quantized::linear_dynamic_fp16``:
    f16 weights, f32 activations and accumulation); x86 builds do."""
    try:
        import torch.ao.nn.quantized  # noqa: F401  (registers torch.ops.quantized)
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(1, 1), None)
        return bool(torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 1), packed) == 1)
    except (RuntimeError, AttributeError, ImportError):
        return False


def default_linear_dtype(quant: Optional[str] = None) -> str:
    """The linear dtype this CPU runs an engine's linears in by default: f16 weights with f32
    activations and accumulation (fbgemm), which halves the weight traffic a decode step is
    bound by and rounds nothing but the weights (to 11 significant bits, so greedy tokens
    stay the f32 model's); f32 where torch lacks that GEMM.  ``int8`` (torch's int8 GEMM,
    bf16 inputs) for a weight-only int8 engine, whose int8 weights halve the memory traffic
    again; ``int4`` (torch's int4 GEMM, bf16 inputs) for a weight-only int4 engine.

    bf16 is never the default, even where the CPU multiplies bf16 natively: it rounds the
    activations to 8 significant bits, which changes SmolLM2's greedy tokens, and on an
    AVX512-BF16 CPU (Zen 4) fbgemm's f16-weight GEMM was faster anyway (docs/performance.md).
    ``--cpu-linear bf16`` asks for it."""
    if quant == "int8":
        return "int8"
    if quant in ("int4", "int4-awq"):
        return "int4"
    return "f16" if has_fp16_weight_gemm() else "f32"


# ----- GPU: the kernel table --------------------------------------------------------------------

def _paged_attention(ctx, x, a):
    q, key, value, cache, tables, q_lens, cached = x
    return [_attend(ctx, a, _heads(q), _heads(key), _heads(value), cache, tables, q_lens,
                    cached)]


def _rope_paged_attention(ctx, x, a):
    """Rotate q and k into new buffers and write the cache in one kernel (rope_kv_write.cu
    with the graph's cos / sin rows), then attend without writing again."""
    from irlm.kernels import ops as k
    q, key, value, cos, sin, cache, tables, q_lens, cached = x
    if cos.shape[1] > 512:              # more rotary dims than the kernel's shared rows
        from irlm.registry import get_op_def
        return get_op_def("llm.rope_paged_attention").reference(ctx, x, a)
    q, key, value = _heads(q), _heads(key), _heads(value)
    q_rot, k_rot = torch.empty_like(q), torch.empty_like(key)
    cos, sin = _rows(cos, sin)
    k.rope_kv_write(q, key, cos=cos, sin=sin, v=value, kv_cache=cache, layer=a["layer"],
                    block_tables=tables, q_lens=q_lens, cached_lens=cached,
                    cu_q_lens=ctx.state.get("cu_q_lens"),
                    style="neox" if a["style"] == "rotate_half" else "gptj", q_out=q_rot,
                    k_out=k_rot, kv_scales=a["kv_scales"] or None)
    return [_attend(ctx, a, q_rot, k_rot, value, cache, tables, q_lens, cached,
                    write_kv=False)]


def _attend(ctx, a, q, key, value, cache, tables, q_lens, cached, write_kv=True):
    """ops.paged_attention with the op's attributes and the step's state (lengths, the fresh
    suffix, the decode flag) that the runner keeps in ``ctx.state``."""
    from irlm.kernels import ops as k
    st = ctx.state
    return k.paged_attention(
        q, key, value, cache, tables, q_lens, cached, a["layer"], scale=a["scale"],
        sliding_window=a["sliding_window"],
        alibi_slopes=_slopes(st, a["alibi_slopes"], q.device), cu_q_lens=st.get("cu_q_lens"),
        max_q_len=st.get("max_q_len"), max_kv_len=st.get("max_kv_len"),
        decode=st.get("decode"), fresh=st.get("fresh"), write_kv=write_kv,
        kv_scales=a["kv_scales"] or None)


def _rows(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin rows with a contiguous last dim and one row stride between them (what
    rope_kv_write reads)."""
    if cos.stride() == sin.stride() and cos.stride(-1) == 1:
        return cos, sin
    return cos.contiguous(), sin.contiguous()


def _heads(t: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, D] with heads and D contiguous (what the attention kernels read)."""
    if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]:
        return t
    return t.contiguous()


def _slopes(state, slopes, device):
    if not slopes:
        return None
    cache = state.setdefault("alibi", {})
    if slopes not in cache:
        cache[slopes] = torch.tensor(slopes, dtype=torch.float32, device=device)
    return cache[slopes]


def _rms_norm(ctx, x, a):
    from irlm.kernels import ops as k
    from irlm.ops.fused import rms_norm_reference
    if a["weight_offset"]:
        return [rms_norm_reference(x[0], x[1], a["eps"], a["weight_offset"])]
    return [k.rms_norm(x[0].contiguous(), x[1], a["eps"])]


def _add_rms_norm(ctx, x, a):
    from irlm.kernels import ops as k
    if a["weight_offset"]:
        from irlm.ops.fused import rms_norm_reference
        total = x[0] + x[1]
        return [rms_norm_reference(total, x[2], a["eps"], a["weight_offset"]), total]
    out, total = k.fused_add_rms_norm(x[0].contiguous(), x[1].contiguous(), x[2], a["eps"])
    return [out, total]


def _gated_act(ctx, x, a):
    from irlm.kernels import ops as k
    return [k.gated_act(x[0].contiguous(), a["act"])]


def _rope(ctx, x, a):
    from irlm.kernels import ops as k
    if a["style"] != "rotate_half" or x[0].dtype != x[1].dtype and x[1].dtype != torch.float32:
        from irlm.registry import get_op_def
        return get_op_def("llm.rope").reference(ctx, x, a)
    return [k.rope_apply(x[0], x[1], x[2])]


def _grouped_mm(ctx, x, a):
    from .moe_kernels import grouped_mm
    return [grouped_mm(*x)]


def _histc(ctx, x, a):
    from .moe_kernels import histc_scatter
    if not a["max"] > a["min"]:     # torch takes the range from the data: a host read
        return [torch.histc(x[0], a["bins"], a["min"], a["max"])]
    return [histc_scatter(x[0], a["bins"], a["min"], a["max"])]


KERNELS = {
    "llm.rope": _rope,
    "llm.paged_attention": _paged_attention,
    "llm.rope_paged_attention": _rope_paged_attention,
    "llm.rms_norm": _rms_norm,
    "llm.add_rms_norm": _add_rms_norm,
    "llm.gated_act": _gated_act,
    # mixture of experts: no host read of the routing, so decode steps stay capturable
    "core.grouped_mm": _grouped_mm,
    "core.histc": _histc,
}
