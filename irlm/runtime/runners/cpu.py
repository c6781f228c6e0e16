"""The CPU executor: an inference-form graph on the CPU, bound once at load.

The reference interpreter (:mod:`irlm.interpreter`, via :class:`~.interpreter.GraphRunner`)
looks every op up in the registry, evaluates symbolic dims with sympy, checks every result's
type and runs paged attention one request at a time: it states the semantics, and it is slow.
This executor runs the same graph the way :mod:`.cuda_graphs` does on a GPU:

* **bound once**: at load every op becomes one prepared Python closure over slots of a flat
  value table (params and constants are placed in the table once); symbolic dims of reshapes
  and splits are compiled to plain lookups; a step is one pass over that list, and each value
  is dropped at its last use so activations die as early as the memory plan assumes;
* **fast kernels**: linears through torch's CPU GEMM (oneDNN / MKL), in the *linear dtype*
  (below); RMSNorm through ``torch.rms_norm``; paged attention for the whole batch at once
  (:class:`AttentionPlan`): one scatter of the step's keys and values into the pool, one
  gather of every row's context through its block table, one
  ``scaled_dot_product_attention`` with a mask built once per step (causal, padding, sliding
  window, ALiBi); no per-request Python loop;
* **linear dtype**: the dtype the linears compute in.  ``f32`` keeps the graph's f32 weights
  (exactly the reference's arithmetic); ``f16`` stores the weights in f16 and keeps f32
  activations, accumulation and outputs (fbgemm's f16-weight GEMM: half the memory traffic
  of f32 and only the weights rounded, to 11 significant bits; the default, since a decode
  step is bound by reading the weights); ``bf16`` stores the linear weights in bf16 and
  rounds the linears' inputs to bf16 (opt-in: it changes greedy tokens).  Weight-only int8 engines
  (``--quant int8``) run torch's CPU int8 GEMM (``_weight_int8pack_mm``: int8 weights, one
  scale per row) and int4 engines (``--quant int4``, groups of 32..256) its int4 GEMM
  (``_weight_int4pack_mm_for_cpu``), both with bf16 inputs (linear dtypes ``int8``,
  ``int4``); with linear dtype ``f32`` (and for fp8) their weights are dequantized to f32
  once at load.  :func:`default_linear_dtype` picks per CPU and quant mode;
  ``irlm compile --device cpu`` records the pick in the engine (``config.cpu_linear``),
  ``irlm compile --cpu-linear DTYPE`` an explicit choice.

The interpreter stays the oracle: tests compare this executor's logits and greedy tokens with
the reference runner's and with Hugging Face transformers'.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import sympy
import torch
import torch.nn.functional as F

from irlm.errors import IRLMError
from irlm.interpreter import RefContext, compile_dim
from irlm.ir import Graph
from irlm.lowering.kernel_selection import LINEAR_DTYPES, default_linear_dtype
from irlm.ops.llm import KVCacheLayout, kv_cache_input
from irlm.registry import get_op_def

from .interpreter import REQUIRED_INPUTS
from ..model_runner import StepBatch

#: int4 group sizes torch's CPU int4 GEMM accepts
INT4_GROUPS = (32, 64, 128, 256)
_TORCH = {"f32": torch.float32, "bf16": torch.bfloat16}


# ----- f16 weights, f32 arithmetic ------------------------------------------------------------

def fp16_pack(w: torch.Tensor):
    """``w`` [N, K] rounded to f16 once and packed for fbgemm's f16-weight GEMM."""
    import torch.ao.nn.quantized  # noqa: F401  (registers torch.ops.quantized)
    return torch.ops.quantized.linear_prepack_fp16(w.float().contiguous(), None)


_FP16_LINEAR = None


def aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``t`` contiguous at an address that is a multiple of ``alignment`` bytes (a copy only
    where needed).  A weight read from a memory-mapped safetensors file starts wherever the
    file puts it, and torch's AVX-512 int8 GEMM (``_weight_int8pack_mm``, 4 rows or more)
    crashes the process on an int8 weight at an address that is not 64-byte aligned."""
    t = t.contiguous()
    return t if t.data_ptr() % alignment == 0 else t.clone()


def fp16_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """``x @ W^T`` with f32 inputs, f32 accumulation and outputs, W stored in f16."""
    global _FP16_LINEAR
    if _FP16_LINEAR is None:
        # The overload's C++ entry point: its Python __call__ first scans the arguments for
        # tracing-time fake script objects (never ours), a cost paid 120 times a step.
        op = torch.ops.quantized.linear_dynamic_fp16.default
        _FP16_LINEAR = getattr(op, "_op", op)
    return _FP16_LINEAR(x.float(), packed).to(x.dtype)


# ----- machine facts ---------------------------------------------------------------------------

def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:                                   # pragma: no cover (not Linux)
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in allowed:
        path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        try:
            with open(path, encoding="utf-8") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def set_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads (None: the physical cores); returns the count."""
    if threads is not None and threads < 1:
        raise IRLMError(f"--threads {threads}: must be at least 1")
    n = threads or physical_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# ----- symbolic dims ---------------------------------------------------------------------------

def _dim_fn(d) -> Callable[[dict], int]:
    """:func:`irlm.interpreter.compile_dim` as an int (the bound program's dims are whole by
    construction: the graph was type-checked)."""
    f = compile_dim(d)
    return lambda b: int(f(b))


# ----- paged attention for the whole batch -----------------------------------------------------

class AttentionPlan:
    """Everything paged attention needs that depends only on the step, not on the layer:
    where each new token's key/value goes in the pool, which pool slots each row attends over,
    and the mask.  Built once per step, shared by every layer."""

    def __init__(self, q_lens: torch.Tensor, cached: torch.Tensor, tables: torch.Tensor,
                 block_size: int):
        q_lens, cached, tables = q_lens.long(), cached.long(), tables.long()
        reqs = q_lens.shape[0]
        self.reqs = reqs
        self.block_size = block_size
        self.decode = bool((q_lens == 1).all())
        kv_lens = cached + q_lens
        self.max_q = 1 if self.decode else int(q_lens.max())
        self.max_kv = int(kv_lens.max())
        rows = torch.arange(reqs)
        if self.decode:
            row_of, i_of = rows, torch.zeros(reqs, dtype=torch.long)
        else:
            row_of = torch.repeat_interleave(rows, q_lens)
            starts = torch.cumsum(q_lens, 0) - q_lens
            i_of = torch.arange(row_of.shape[0]) - starts[row_of]
        self.row_of, self.i_of = row_of, i_of
        pos = cached[row_of] + i_of                              # each new token's position
        self.write_blocks = tables[row_of, pos // block_size]
        self.write_slots = pos % block_size
        kpos = torch.arange(self.max_kv)
        self.read_blocks = tables[:, kpos // block_size]         # [reqs, max_kv]
        self.read_slots = (kpos % block_size).expand(reqs, -1)
        qpos = cached[:, None] + torch.arange(self.max_q)[None, :]          # [reqs, max_q]
        self.dist = qpos[:, :, None] - kpos[None, None, :]       # [reqs, max_q, max_kv]
        allowed = self.dist >= 0                                 # causal; also < kv_len
        if not self.decode:      # padding query rows: let them see key 0 (no NaN), dropped later
            pad = torch.arange(self.max_q)[None, :] >= q_lens[:, None]
            allowed[:, :, 0] |= pad
        self.allowed = allowed
        self._masks: dict[tuple, torch.Tensor] = {}
        #: rows of a layer's pool viewed as [blocks * 2 * block_size, kv_heads, d]: where the
        #: step's keys then values go, and every row's keys then values (one copy, one gather)
        kv = 2 * block_size
        self.write_rows = torch.cat((self.write_blocks * kv + self.write_slots,
                                     self.write_blocks * kv + block_size + self.write_slots))
        read = self.read_blocks * kv + self.read_slots                      # [reqs, max_kv]
        self.read_rows = torch.stack((read, read + block_size), 1).reshape(-1)
        #: rope's sin with the rotate-half sign folded in, per sin tensor of this step
        self.signed_sin: dict[int, tuple] = {}
        self._head_rows: dict[int, torch.Tensor] = {}
        self._biases: dict[tuple, Optional[torch.Tensor]] = {}

    def head_rows(self, kv_heads: int) -> torch.Tensor:
        """Decode: rows of a layer's pool viewed as [blocks * 2 * block_size * kv_heads, d]
        that one ``index_select`` turns into keys then values laid out
        [2, reqs * kv_heads, max_kv, d], each (request, kv head) a contiguous matrix that a
        batched GEMM reads as it is."""
        rows = self._head_rows.get(kv_heads)
        if rows is None:
            bs = self.block_size
            base = (self.read_blocks * (2 * bs) + self.read_slots)[None, :, None, :]
            kv = torch.arange(2).view(2, 1, 1, 1) * bs
            heads = torch.arange(kv_heads).view(1, 1, kv_heads, 1)
            rows = self._head_rows[kv_heads] = ((base + kv) * kv_heads + heads).reshape(-1)
        return rows

    def decode_bias(self, window: int, slopes: tuple, heads: int,
                    kv_heads: int) -> Optional[torch.Tensor]:
        """Decode: the additive mask as [reqs * kv_heads, heads / kv_heads, max_kv] (0 or
        -inf, plus ALiBi's bias), or None when nothing is masked."""
        key = (window, slopes, heads, kv_heads)
        if key not in self._biases:
            m = self.mask(window, slopes, heads)
            if m is not None:
                if m.dtype == torch.bool:
                    m = torch.zeros(m.shape).masked_fill_(~m, float("-inf"))
                m = m.expand(self.reqs, heads, 1, self.max_kv).reshape(
                    self.reqs * kv_heads, heads // kv_heads, self.max_kv).contiguous()
            self._biases[key] = m
        return self._biases[key]

    def mask(self, window: int, slopes: tuple, heads: int) -> Optional[torch.Tensor]:
        """The SDPA mask: bool [reqs, 1, max_q, max_kv], or float with ALiBi
        [reqs, heads, max_q, max_kv]; None when nothing is masked (one token, full context)."""
        key = (window, slopes)
        m = self._masks.get(key)
        if m is None and key not in self._masks:
            allowed = self.allowed
            if window:
                allowed = allowed & (self.dist < window)
            if slopes:
                s = torch.tensor(slopes, dtype=torch.float32)
                bias = -s[None, :, None, None] * self.dist[:, None].float()
                m = bias.masked_fill(~allowed[:, None], float("-inf"))
            elif self.reqs == 1 and self.decode and bool(allowed.all()):
                m = None
            else:
                m = allowed[:, None]
            self._masks[key] = m
        return m


def _paged_attention(plan: AttentionPlan, q, k, v, cache, a) -> torch.Tensor:
    layer = a["layer"]
    ks, vs = a["kv_scales"] or (1.0, 1.0)
    pool = cache[layer]                                   # [blocks, 2, bs, kv_heads, d]
    quantized = cache.dtype != k.dtype
    if quantized:
        from irlm.ops.llm import kv_to_cache
        k, v = kv_to_cache(k, cache.dtype, ks), kv_to_cache(v, cache.dtype, vs)
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[2]
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    if plan.decode and not quantized and q.dtype == torch.float32 \
            and k.shape[-1] == v.shape[-1] and pool.is_contiguous():
        # the decode step, the hot path: one copy in, one gather out, one SDPA
        # and attention as two batched GEMMs over (request, kv head): a query head h reads kv
        # head h // group, so the group's query heads are the rows of one small GEMM.  At
        # these sizes (one query token, short contexts) that is faster than SDPA's CPU flash
        # kernel, whose tiles assume many query rows.
        pool.view(-1, kv_heads, d).index_copy_(0, plan.write_rows, torch.cat((k, v)))
        group, pairs = heads // kv_heads, plan.reqs * kv_heads
        kv = pool.view(-1, d).index_select(0, plan.head_rows(kv_heads)).view(
            2, pairs, plan.max_kv, d)
        qg = q.reshape(pairs, group, d)
        bias = plan.decode_bias(a["sliding_window"], tuple(a["alibi_slopes"]), heads, kv_heads)
        if bias is None:
            scores = torch.bmm(qg, kv[0].transpose(1, 2)).mul_(scale)
        else:
            scores = torch.baddbmm(bias, qg, kv[0].transpose(1, 2), alpha=scale)
        return torch.bmm(torch.softmax(scores, -1), kv[1]).view(plan.reqs, heads, d)
    if not quantized and k.shape[-1] == v.shape[-1] and pool.is_contiguous():
        rows = pool.view(-1, kv_heads, d)
        rows.index_copy_(0, plan.write_rows, torch.cat((k, v)))
        kv = rows.index_select(0, plan.read_rows).view(plan.reqs, 2, plan.max_kv, kv_heads, d)
        keys, vals = kv[:, 0], kv[:, 1]                   # [reqs, max_kv, kv_heads, d]
    else:
        pool[plan.write_blocks, 0, plan.write_slots] = k
        pool[plan.write_blocks, 1, plan.write_slots] = v
        keys = pool[plan.read_blocks, 0, plan.read_slots]
        vals = pool[plan.read_blocks, 1, plan.read_slots]
    dt = torch.float32
    keys = keys.to(dt) * ks if quantized else keys.to(dt)
    vals = vals.to(dt) * vs if quantized else vals.to(dt)
    if plan.decode:
        qp = q.to(dt).view(plan.reqs, 1, heads, d)
    else:
        qp = q.new_zeros((plan.reqs, plan.max_q, heads, d), dtype=dt)
        qp[plan.row_of, plan.i_of] = q.to(dt)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
        attn_mask=plan.mask(a["sliding_window"], tuple(a["alibi_slopes"]), heads),
        scale=scale, enable_gqa=heads != kv_heads)        # [reqs, heads, max_q, dv]
    out = out.transpose(1, 2)
    if plan.decode:
        out = out.reshape(plan.reqs, heads, out.shape[-1])
    else:
        out = out[plan.row_of, plan.i_of]
    return out.to(q.dtype)


# ----- binding ops -----------------------------------------------------------------------------

class _Binder:
    """Turns each op into a closure ``fn(args) -> list[Tensor]`` once."""

    def __init__(self, runner: "CpuGraphRunner", graph: Graph, linear_dtype: str):
        self.runner = runner
        self.graph = graph
        self.linear_dtype = linear_dtype
        self.ctx = RefContext(graph, None, {}, {})    # dims compiled once, cached in it
        self.params: dict[int, tuple[str, torch.dtype]] = {}     # value id -> (name, dtype)
        self.consts: dict[int, torch.Tensor] = {}
        self.stats = {"bound": 0, "reference": 0}
        self.captured: set[tuple[int, int]] = set()   # (op id, operand index) bound as weights
        self.reference_ops: set[str] = set()          # ops left to their reference impl

    def bind(self, op) -> Callable:
        if op.dialect == "dist":
            return self._collective(op)
        fn = getattr(self, "_" + op.name.replace(".", "_"), None)
        bound = fn(op) if fn is not None else None
        if bound is not None:
            self.stats["bound"] += 1
            return bound
        self.stats["reference"] += 1
        self.reference_ops.add(op.name)
        ref, ctx, attrs = get_op_def(op.name).reference, self.ctx, op.attrs

        def run_reference(args, ref=ref, attrs=attrs, op=op):
            ctx.op = op
            return ref(ctx, list(args), attrs)
        return run_reference

    def _collective(self, op) -> Callable:
        """A ``dist`` op: looked up at each call, since the process group is connected after
        the program is bound."""
        kernels, ctx, attrs = self.runner._collectives, self.ctx, op.attrs

        def run_collective(args):
            kernel = kernels.get(op.name)
            if kernel is None:
                raise IRLMError(f"{op.describe()}: this rank is not connected to its process "
                                f"group")
            ctx.op = op
            return kernel(ctx, list(args), attrs)
        return run_collective

    # views and shapes: the symbolic dims compiled to lookups
    def _core_reshape(self, op):
        fns = [_dim_fn(d) for d in op.attrs["shape"]]
        b = self.ctx.bindings
        if all(isinstance(d, int) for d in op.attrs["shape"]):
            shape = tuple(op.attrs["shape"])
            return lambda x: [x[0].reshape(shape)]
        return lambda x: [x[0].reshape([f(b) for f in fns])]

    def _core_transpose(self, op):
        d0, d1 = op.attrs["dim0"], op.attrs["dim1"]
        return lambda x: [x[0].transpose(d0, d1)]

    def _core_unsqueeze(self, op):
        d = op.attrs["dim"]
        return lambda x: [x[0].unsqueeze(d)]

    def _core_split(self, op):
        sizes, dim = op.attrs["sizes"], op.attrs["dim"]
        if not all(isinstance(s, int) for s in sizes):
            return None
        sizes = list(sizes)
        return lambda x: list(torch.split(x[0], sizes, dim))

    def _core_embedding(self, op):
        w = self._weight_param(op, 0)
        if w is not None and self.runner._store.type_of(w[0]).dtype.torch != w[1]:
            # a table stored narrower (cast-weights): gather the rows, then widen them
            self.captured.add((id(op), 0))
            table, dt = self.runner._store.get(w[0]), w[1]
            return lambda x: [F.embedding(x[1].long(), table).to(dt)]
        return lambda x: [F.embedding(x[1], x[0])] if x[1].dtype == torch.long \
            else [F.embedding(x[1].long(), x[0])]

    # linears
    def _weight_param(self, op, i: int):
        """The param feeding operand ``i`` of ``op``, if it is one (name, dtype)."""
        v = op.operands[i] if i < len(op.operands) else None
        return self.params.get(id(v)) if v is not None else None

    def _core_linear(self, op):
        w = self._weight_param(op, 1)
        if w is None or w[1] != torch.float32 or self.linear_dtype == "f32":
            return lambda x: [F.linear(x[0], x[1], x[2] if len(x) > 2 else None)]
        if self.linear_dtype == "f16":
            self.captured.add((id(op), 1))
            packed = self.runner._linear_weight((w[0], "f16"), lambda: fp16_pack(
                self.runner._store.get(w[0])))
            has_bias = len(op.operands) > 2

            def linear_f16(x):
                y = fp16_linear(x[0], packed)
                return [y + x[2] if has_bias else y]
            return linear_f16
        lin = _TORCH["bf16"]
        self.captured.add((id(op), 1))
        weight = self.runner._linear_weight(w[0], lambda: self.runner._store.get(w[0]).to(lin))
        has_bias = len(op.operands) > 2

        def linear_lowp(x):
            y = F.linear(x[0].to(lin), weight)
            y = y.to(x[0].dtype)
            return [y + x[2] if has_bias else y]
        return linear_lowp

    def _llm_linear_act(self, op):
        inner = self._core_linear(op)
        if inner is None:
            return None
        from irlm.ops.fused import ACTIVATIONS
        act = ACTIVATIONS[op.attrs["act"]]
        return lambda x: [act(inner(x)[0])]

    def _quant_linear(self, op):
        a = op.attrs
        q, s = self._weight_param(op, 1), self._weight_param(op, 2)
        z = self._weight_param(op, 3) if a["mode"] == "int4" else None
        if q is None or s is None or (a["mode"] == "int4" and z is None):
            return None
        from irlm.ops.quant import _epilogue, dequantize_reference
        act = a["act"]
        bias_at = 4 if a["mode"] == "int4" else 3
        has_bias = len(op.operands) > bias_at
        store, lin = self.runner._store, _TORCH["bf16"]
        if a["mode"] == "int8" and self.linear_dtype in ("int8", "bf16"):
            # torch's CPU int8 GEMM: int8 weights [N, K], one bf16 scale per row, bf16 inputs
            self.captured.update({(id(op), 1), (id(op), 2)})
            qw = self.runner._linear_weight(q[0], lambda: aligned(store.get(q[0])))
            scales = self.runner._linear_weight(
                (s[0], "bf16"), lambda: aligned(store.get(s[0]).to(lin)))

            def int8_linear(x):
                xv = x[0]
                flat = xv.reshape(-1, xv.shape[-1]).to(lin)
                y = torch._weight_int8pack_mm(flat, qw, scales)
                y = y.reshape(tuple(xv.shape[:-1]) + (y.shape[-1],)).to(xv.dtype)
                if has_bias:
                    y = y + x[bias_at]
                return [_epilogue(y, act)]
            return int8_linear
        k = self.runner._store.get(q[0]).shape[1] * 2 if a["mode"] == "int4" else 0
        if a["mode"] == "int4" and self.linear_dtype in ("int4", "int8", "bf16") \
                and a["group"] in INT4_GROUPS and k % a["group"] == 0:
            # torch's CPU int4 GEMM computes (q - 8) * scale + zero per group: irlm's
            # (q - z) * s is that with zero = (8 - z) * s
            self.captured.update({(id(op), 1), (id(op), 2), (id(op), 3)})
            group = a["group"]

            def pack():
                from irlm.ops.quant import unpack_int4
                qv = unpack_int4(store.get(q[0])).to(torch.int32).contiguous()
                return torch._convert_weight_to_int4pack_for_cpu(qv, 1)

            def scales_and_zeros():
                sv, zv = store.get(s[0]).float(), store.get(z[0]).float()
                return torch.stack([sv.T, ((8 - zv) * sv).T], -1).to(lin).contiguous()
            qw = self.runner._linear_weight((q[0], "int4pack"), pack)
            sz = self.runner._linear_weight((s[0], z[0], "int4sz"), scales_and_zeros)

            def int4_linear(x):
                xv = x[0]
                flat = xv.reshape(-1, xv.shape[-1]).to(lin)
                y = torch._weight_int4pack_mm_for_cpu(flat, qw, group, sz)
                y = y.reshape(tuple(xv.shape[:-1]) + (y.shape[-1],)).to(xv.dtype)
                if has_bias:
                    y = y + x[bias_at]
                return [_epilogue(y, act)]
            return int4_linear
        # Otherwise the weight is dequantized once at load (the reference's float32
        # arithmetic), and kept in bf16 when the linears compute in bf16.
        self.captured.update({(id(op), 1), (id(op), 2)} | ({(id(op), 3)} if z else set()))
        if self.linear_dtype == "f16":
            packed = self.runner._linear_weight((q[0], "f16"), lambda: fp16_pack(
                dequantize_reference(store.get(q[0]), store.get(s[0]),
                                     store.get(z[0]) if z else None, axis=0,
                                     group=a["group"])))

            def f16_linear(x):
                y = fp16_linear(x[0], packed)
                return [_epilogue(y + x[bias_at] if has_bias else y, act)]
            return f16_linear
        low = self.linear_dtype != "f32"
        w = self.runner._linear_weight((q[0], "dequant", low), lambda: dequantize_reference(
            store.get(q[0]), store.get(s[0]), store.get(z[0]) if z else None, axis=0,
            group=a["group"], dtype=lin if low else torch.float32))

        def dequant_linear(x):
            xv = x[0]
            if low:
                y = F.linear(xv.to(lin), w).to(xv.dtype)
                if has_bias:
                    y = y + x[bias_at]
            else:
                y = F.linear(xv, w if xv.dtype == w.dtype else w.to(xv.dtype),
                             x[bias_at] if has_bias else None)
            return [_epilogue(y, act)]
        return dequant_linear

    # fused llm ops
    def _llm_rms_norm(self, op):
        eps, off = op.attrs["eps"], op.attrs["weight_offset"]

        def rms(x):
            if x[0].dtype != torch.float32:
                from irlm.ops.fused import rms_norm_reference
                return [rms_norm_reference(x[0], x[1], eps, off)]
            w = x[1] + off if off else x[1]
            return [torch.rms_norm(x[0], (x[0].shape[-1],), w, eps)]
        return rms

    def _llm_add_rms_norm(self, op):
        eps, off = op.attrs["eps"], op.attrs["weight_offset"]

        def add_rms(x):
            total = x[0] + x[1]
            if total.dtype != torch.float32:
                from irlm.ops.fused import rms_norm_reference
                return [rms_norm_reference(total, x[2], eps, off), total]
            w = x[2] + off if off else x[2]
            return [torch.rms_norm(total, (total.shape[-1],), w, eps), total]
        return add_rms

    def _llm_gated_act(self, op):
        from irlm.ops.fused import ACTIVATIONS
        act = ACTIVATIONS[op.attrs["act"]]

        def gated(x):
            gate, up = x[0].chunk(2, dim=-1)
            return [act(gate) * up]
        return gated

    def _llm_rope(self, op):
        if op.attrs["style"] != "rotate_half":
            return None
        runner = self.runner

        def rope(x):
            t, cos, sin = x
            r = cos.shape[-1]
            plan = runner._plan
            if r == t.shape[-1] and plan is not None and t.dtype == sin.dtype:
                # rotate_half(t) * sin == roll(t, r/2) * [-sin_lo, sin_hi]: two ops fewer,
                # and the signed sin is made once per step for every layer
                hit = plan.signed_sin.get(id(sin))
                if hit is None or hit[0] is not sin:
                    h = r // 2
                    hit = plan.signed_sin[id(sin)] = (sin, torch.cat((-sin[..., :h],
                                                                      sin[..., h:]), -1))
                return [torch.addcmul(t * cos, t.roll(r // 2, -1), hit[1])]
            half = r // 2
            t_rot = t[..., :r] if r != t.shape[-1] else t
            x1, x2 = t_rot[..., :half], t_rot[..., half:]
            rotated = torch.cat((-x2, x1), dim=-1)
            out = t_rot * cos + rotated * sin
            return [out] if r == t.shape[-1] else [torch.cat((out, t[..., r:]), dim=-1)]
        return rope

    def _llm_paged_attention(self, op):
        a, runner = op.attrs, self.runner

        def attention(x):
            q, k, v, cache = x[0], x[1], x[2], x[3]
            return [_paged_attention(runner._plan, q, k, v, cache, a)]
        return attention

    def _llm_last_tokens(self, op):
        runner = self.runner

        def last(x):
            plan = runner._plan
            if plan is not None and plan.decode and x[0].shape[0] == plan.reqs:
                return [x[0]]
            idx = torch.cumsum(x[1].long(), 0) - 1
            return [x[0][idx]]
        return last


# ----- the step as generated Python ------------------------------------------------------------

_STEP_FILE = "<irlm cpu step>"


def _view_expr(op, args: list[str], dim_name: Callable[[Any], str]) -> Optional[str]:
    """A view op as a Python expression over its operand's local name (None: not a view the
    generator writes out)."""
    a = op.attrs
    if op.name == "core.reshape":
        dims = [str(d) if isinstance(d, int) else dim_name(d) for d in a["shape"]]
        return f"{args[0]}.reshape(({', '.join(dims)},))"
    if op.name == "core.transpose":
        return f"{args[0]}.transpose({int(a['dim0'])}, {int(a['dim1'])})"
    if op.name == "core.unsqueeze":
        return f"{args[0]}.unsqueeze({int(a['dim'])})"
    if op.name == "core.split" and all(isinstance(x, int) for x in a["sizes"]):
        return f"_split({args[0]}, {list(a['sizes'])!r}, {int(a['dim'])})"
    return None


def _generate_step(program, input_slots, output_slot, table, bindings):
    """The bound program as one straight-line Python function: every value a local, views
    written out as tensor method calls, each other op one call of its bound closure, each value
    deleted after its last use.  A step is then one Python call with no interpreter loop, no
    value table and no closure for a view -- on a CPU the per-op overhead is a large part of a
    small model's decode step.  Returns the function and ``{line: op}`` for error messages."""
    ns: dict[str, Any] = {"_split": torch.split, "_b": bindings}
    dims: dict[Any, str] = {}

    def dim_name(d) -> str:
        name = dims.get(d)
        if name is None:
            name = dims[d] = f"D{len(dims)}"
            ns["_" + name] = _dim_fn(d)
        return name

    def ref(slot: int) -> str:
        if slot in live:
            return f"v{slot}"
        ns[f"c{slot}"] = table[slot]          # a param or constant, placed once
        return f"c{slot}"

    live = set(input_slots)
    body, line_ops = [], {}
    for k, (fn, slots, outs, dead, op) in enumerate(program):
        ins = [ref(s) for s in slots]
        view = _view_expr(op, ins, dim_name)
        one = len(outs) == 1 and (view is None or op.name == "core.split")
        lhs = ", ".join(f"v{o}" for o in outs) + ("," if one else "")
        if view is not None:
            rhs = view
        else:
            ns[f"f{k}"] = fn
            rhs = f"f{k}(({', '.join(ins)}{',' if len(ins) == 1 else ''}))"
        body.append((f"{lhs} = {rhs}", op))
        live.update(outs)
        gone = [f"v{d}" for d in dead if d in live]
        if gone:
            body.append((f"del {', '.join(gone)}", None))
    head = [f"def _step({', '.join(f'v{s}' for s in input_slots)}):"]
    head += [f"    {name} = _{name}(_b)" for name in dims.values()]
    lines = head + [f"    {code}" for code, _ in body] + [f"    return v{output_slot}"]
    for i, (_, op) in enumerate(body):
        if op is not None:
            line_ops[len(head) + i + 1] = op
    source = "\n".join(lines)
    exec(compile(source, _STEP_FILE, "exec"), ns)
    ns["_step"].source = source             # what a debugger shows for "<irlm cpu step>"
    return ns["_step"], line_ops


# ----- the runner ------------------------------------------------------------------------------

class CpuGraphRunner:
    """A :class:`~irlm.runtime.model_runner.ModelRunner` that runs an inference-form graph on
    the CPU with every op bound once at load (see the module docstring)."""

    supports_device_inputs = True     # the placeholders' tokens are on the CPU already

    def __init__(self, graph: Graph, *, num_blocks: Optional[int] = None,
                 kv_cache_bytes: int = 512 << 20, max_model_len: Optional[int] = None,
                 linear_dtype: Optional[str] = None, threads: Optional[int] = None,
                 weights=None, quant: Optional[str] = None, collectives: bool = False):
        """``collectives``: the graph is one rank of a multi-rank engine; its ``dist`` ops run
        the kernels :meth:`connect_collectives` hands over (a worker's process group)."""
        dist = next((op for op in graph.ops if op.dialect == "dist"), None)
        if dist is not None and not collectives:
            raise IRLMError(f"graph @{graph.name} is one rank of a multi-rank (tp/pp) engine "
                            f"({dist.describe()}): run the whole engine (LLM.from_engine / "
                            f"irlm run start one process per rank)")
        #: op name -> kernel ``(ctx, args, attrs) -> results`` of the ``dist`` ops
        self._collectives: dict[str, Callable] = {}
        names = [v.name for v in graph.inputs]
        if sorted(names) != sorted(REQUIRED_INPUTS) or len(graph.outputs) != 1:
            raise IRLMError(f"graph @{graph.name} is not in the inference form; compile it "
                            f"with substitute-attention")
        if quant is None:
            modes = {op.attrs["mode"] for op in graph.ops if op.name == "quant.linear"}
            quant = "int8" if "int8" in modes else "int4" if "int4" in modes else None
        linear_dtype = linear_dtype or default_linear_dtype(quant)
        if linear_dtype not in LINEAR_DTYPES:
            raise IRLMError(f"linear dtype {linear_dtype!r}: expected one of "
                            f"{', '.join(LINEAR_DTYPES)}")
        # threads=None leaves torch's setting alone: the embedding process owns it
        self.threads = set_threads(threads) if threads is not None else torch.get_num_threads()
        self.graph = graph
        self.linear_dtype = linear_dtype
        self._order = [REQUIRED_INPUTS.index(n) for n in names]
        self._store = weights if weights is not None else graph.weights
        cache_t = kv_cache_input(graph).type
        dtype = cache_t.dtype.torch
        layout = KVCacheLayout.of(cache_t)
        bs = layout.block_size
        per_block = layout.block_bytes(dtype.itemsize)
        if num_blocks is None:
            num_blocks = max(2, kv_cache_bytes // per_block)
        self.block_size, self.num_blocks = int(bs), int(num_blocks)
        self.vocab_size = int(graph.outputs[0].type.shape[-1])
        tokens_range = graph.dims.get("tokens")
        self.max_num_tokens = tokens_range.max if tokens_range else None
        limit = self.num_blocks * self.block_size
        self.max_model_len = min(max_model_len or limit, limit)
        self.kv_cache = torch.zeros(*map(int, layout._replace(blocks=self.num_blocks)),
                                    dtype=dtype)
        self._plan: Optional[AttentionPlan] = None
        self._linear_weights: dict[Any, Any] = {}
        self._bind(graph)
        self.stats = {"steps": 0, **self._binder.stats,
                      "reference_ops": sorted(self._binder.reference_ops)}

    def connect_collectives(self, kernels: dict[str, Callable]) -> None:
        """Run the graph's ``dist`` ops through ``kernels`` (op name -> a kernel with the
        reference signature), e.g. :func:`irlm.runtime.distributed.comm.dist_kernels`."""
        self._collectives.update(kernels)

    # ----- load time -------------------------------------------------------------------------
    def _linear_weight(self, key, make):
        """A linear's converted weight, made once (shared by every op that reads it)."""
        w = self._linear_weights.get(key)
        if w is None:
            w = self._linear_weights[key] = make()
        return w

    def _bind(self, graph: Graph) -> None:
        binder = self._binder = _Binder(self, graph, self.linear_dtype)
        slot: dict[int, int] = {}
        table: list[Any] = []

        def new_slot(v) -> int:
            slot[id(v)] = len(table)
            table.append(None)
            return slot[id(v)]

        self._input_slots = [new_slot(v) for v in graph.inputs]
        # Symbolic dims bound by the inputs' shapes: (input index, axis, symbol)
        self._dim_sources = []
        for i, v in enumerate(graph.inputs):
            for axis, d in enumerate(v.type.shape):
                if isinstance(d, sympy.Symbol) and all(s != d for _, _, s in self._dim_sources):
                    self._dim_sources.append((i, axis, d))
        consumers: dict[int, list] = {}
        for op in graph.ops:
            for v in op.operands:
                consumers.setdefault(id(v), []).append(op)
        last_use: dict[int, int] = {}
        for i, op in enumerate(graph.ops):
            for v in op.operands:
                last_use[id(v)] = i
        keep = {id(v) for v in graph.outputs} | {id(v) for v in graph.inputs}
        program = []
        store = self._store
        widened = []            # casts of params: weights stored narrower (cast-weights)
        for i, op in enumerate(graph.ops):
            if op.name == "param":
                r = op.results[0]
                name, dt = op.attrs["name"], r.type.dtype.torch
                binder.params[id(r)] = (name, dt)
                t = store.get(name)
                table[new_slot(r)] = t if t.dtype == dt else t.to(dt)
                keep.add(id(r))
                continue
            if op.name == "core.constant":
                r = op.results[0]
                table[new_slot(r)] = op.attrs["value"].to("cpu", copy=True)
                keep.add(id(r))
                continue
            if op.name == "core.cast" and id(op.operands[0]) in binder.params:
                # a weight stored narrower than it is computed in (cast-weights): readers
                # that run the stored dtype (linears packed in f16 or bf16, embeddings) read
                # the stored weight; for any other reader it is widened once, below
                r = op.results[0]
                binder.params[id(r)] = (binder.params[id(op.operands[0])][0], r.type.dtype.torch)
                binder.captured.add((id(op), 0))
                new_slot(r)
                keep.add(id(r))
                widened.append(r)
                continue
            fn = binder.bind(op)
            ins = [slot[id(v)] for v in op.operands]
            outs = [new_slot(r) for r in op.results]
            dead = [slot[id(v)] for v in dict.fromkeys(op.operands)
                    if last_use.get(id(v)) == i and id(v) not in keep]
            program.append((fn, tuple(ins), tuple(outs), tuple(dead), op))
        # A param that every reader captured in a converted form (a linear's bf16 or int8
        # weight) needs no plain copy in the table.
        for r in [op.results[0] for op in graph.params()] + widened:
            uses = [(id(u), j) for u in consumers.get(id(r), [])
                    for j, o in enumerate(u.operands) if o is r]
            if uses and all(u in binder.captured for u in uses):
                table[slot[id(r)]] = None
            elif table[slot[id(r)]] is None:
                name, dt = binder.params[id(r)]
                table[slot[id(r)]] = store.get(name).to(dt)
        self._table = table
        self._program = program
        self._output_slot = slot[id(graph.outputs[0])]
        self._step_fn, self._line_ops = _generate_step(
            program, self._input_slots, self._output_slot, table, binder.ctx.bindings)
        if hasattr(store, "drop_cache"):
            store.drop_cache()

    # ----- one step --------------------------------------------------------------------------
    def step(self, batch: StepBatch) -> torch.Tensor:
        ids = batch.input_ids_on("cpu")
        feeds = (ids, batch.positions, batch.q_lens, batch.cached_lens, batch.block_tables,
                 self.kv_cache)
        return self.run([feeds[i] for i in self._order]).float()

    @torch.inference_mode()
    def run(self, inputs) -> torch.Tensor:
        """One step over the graph inputs in the graph's order; returns the logits."""
        by_name = dict(zip((v.name for v in self.graph.inputs), inputs))
        b = self._binder.ctx.bindings
        b.clear()
        for i, axis, s in self._dim_sources:
            b[s] = int(inputs[i].shape[axis])
        self._plan = AttentionPlan(by_name["q_lens"], by_name["cached_lens"],
                                   by_name["block_tables"], self.block_size)
        try:
            out = self._step_fn(*inputs)
        except IRLMError:
            raise
        except Exception as e:
            op = self._failed_op(e)
            where = f"{op.describe()}: " if op is not None else ""
            raise IRLMError(f"{where}CPU executor failed: {type(e).__name__}: {e}") from e
        finally:
            self._plan = None
        self.stats["steps"] += 1
        return out

    def _failed_op(self, e: BaseException):
        """The op whose line of the generated step raised ``e`` (None if not found)."""
        tb, op = e.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == _STEP_FILE:
                op = self._line_ops.get(tb.tb_lineno, op)
            tb = tb.tb_next
        return op
