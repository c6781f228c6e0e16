"""Kernel selection for the quantized linears (``quant.linear``, ``quant.linear_a8``) on a GPU.

:func:`plan_quantized_linears` runs when the CUDA runner loads an engine: for every quantized
linear whose stored tensors are params it picks the kernel path
(:mod:`irlm.kernels.quant_linear` has the table) and does the weight transforms that path reads
once, on the device: tinygemm's int4 packing and scale-and-zero tensor, and fp32 copies of the
scales.  The choice per op is recorded in :attr:`QuantLinearPlan.paths` (the runner reports the
counts in its ``stats``); nothing is converted again per step.

At run time the path still depends on the number of rows: small batches read the weights once
through a GEMV / tinygemm; from 17 rows int8 and int4 run the Triton GEMM of
:mod:`irlm.kernels.quant_gemm` (the weight dequantized in registers, tensor cores) up to
``quant_gemm.GEMM_MAX_M[mode]`` rows, and dequantize for a cuBLAS GEMM above (or where Triton cannot
run here).  An op whose operands fit no
fast path (an fp32 engine, a weight that is not a param, a shape the kernels do not take) runs
the op's reference implementation, as before, and is recorded as ``reference``.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F

from irlm.ir import Graph, Op

from . import tactics

_LOWP = (torch.bfloat16, torch.float16)


def _param(op: Op, i: int) -> Optional[str]:
    if i >= len(op.operands):
        return None
    p = op.operands[i].producer
    return p.attrs["name"] if p is not None and p.name == "param" else None


class QuantLinearPlan:
    """Per-op prepared weights and the overrides that run them (see the module doc)."""

    def __init__(self, timer=None):
        self.prepared: dict[int, dict] = {}
        self.paths: dict[str, str] = {}          # weight name -> path
        self.tinygemm_order: Optional[str] = None   # "high" / "low" nibble first, "" none
        self.fp8_gemv_ok: Optional[bool] = None
        self.int4_gemv_ok: dict = {}  # x dtype -> the int4 GEMV checked and right here
        self.gemm_ok: dict = {}       # (mode, group, dtype) -> Triton GEMM checked and right
        # small-batch tactics (lowering/tactics.py): key -> [(entry, weight operands)] of the
        # ops that may run irlm's GEMV for a few rows, and what timing chose per (rows,) + key
        self._gemv_groups: dict[tuple, list] = {}
        self.gemv_choices: dict[tuple, object] = {}
        self._timer = timer

    # ----- load time ----------------------------------------------------------------------------
    def prepare(self, graph: Graph, weights, device) -> "QuantLinearPlan":
        for op in graph.ops:
            if op.name not in ("quant.linear", "quant.linear_a8"):
                continue
            qname = _param(op, 1)
            path, entry = "reference", None
            if op.operands[0].type.dtype.torch in _LOWP and qname is not None:
                if op.name == "quant.linear":
                    path, entry = self._weight_only(op, weights, device)
                else:
                    path, entry = self._a8(op, weights)
            if entry is not None:
                entry["path"] = path
                self.prepared[id(op)] = entry
            self.paths[qname or op.describe()] = path
        self._choose_gemv_rows(device)
        return self

    def _choose_gemv_rows(self, device) -> None:
        """Time irlm's GEMV against the path a call of a few rows takes without it, per group
        of same-shaped weights and row count (lowering/tactics.py); the ops of a group run the
        GEMV for the row counts where it won (``entry["gemv_rows"]``)."""
        for key, members in self._gemv_groups.items():
            won = set()
            for rows in tactics.SMALL_ROWS:
                choice = tactics.choose(device, ("quant", rows) + key,
                                        self._gemv_candidates(key, members, rows, device),
                                        "default", self._timer)
                self.gemv_choices[(rows,) + key] = choice
                if choice.chosen == "gemv":
                    won.add(rows)
            for entry, _ in members:
                entry["gemv_rows"] = frozenset(won)

    def _weight_only(self, op: Op, weights, device):
        from irlm.kernels import quant_gemm as qg, quant_linear as ql
        a = op.attrs
        names = [_param(op, i) for i in range(1, 4 if a["mode"] == "int4" else 3)]
        if None in names:
            return "reference", None
        q = weights.get(names[0])
        if a["mode"] == "int8":
            if not ql.gemv_supported(torch.empty(0, dtype=torch.bfloat16), q):
                return "reference", None
            s = weights.get(names[1]).float().contiguous()
            n, k = q.shape
            if self._gemm(device, "int8", 0, op.operands[0].type.dtype.torch, n, k):
                return "int8: gemv / triton gemm / dequantize+cublas", {"scales": s, "gemm": 1}
            return "int8: gemv / dequantize+cublas", {"scales": s}
        if a["mode"] == "int4":
            group = a["group"]
            n, k = q.shape[0], q.shape[1] * 2
            if group % 16 or k % group or not q.is_contiguous():
                return "reference", None
            s = weights.get(names[1]).float().contiguous()
            z = weights.get(names[2]).contiguous()
            entry = {"scales": s, "zeros": z, "group": group}
            xdt = op.operands[0].type.dtype.torch
            gemm = self._gemm(device, "int4", group, xdt, n, k)
            if gemm:
                entry["scales_t"], entry["zeros_t"] = qg.prepare_int4_scales(s, z)
            parts = []             # the paths by row count, as the runner tries them
            if (ql.INT4_GEMV_MAX_M > 0 or tactics.enabled()) \
                    and ql.int4_gemv_supported(xdt, q, group) and self._int4_gemv(device, xdt):
                entry["gemv4"] = 1
                parts.append("gemv" if ql.INT4_GEMV_MAX_M > 0 else "gemv (1-8 rows, if faster)")
                self._gemv_groups.setdefault(("int4", n, k, group, xdt), []).append(
                    (entry, (q, s, z)))
            if xdt is torch.bfloat16 \
                    and ql.tinygemm_supported(n, k, group) and self._tinygemm(device):
                entry["packed"], entry["scale_zeros"] = ql.pack_int4_tinygemm(
                    q, s, z, high_first=self.tinygemm_order == "high")
                parts.append("tinygemm")
            if gemm:
                parts.append("triton gemm")
            return "int4: " + " / ".join(parts + ["dequantize+cublas"]), entry
        if a["mode"] == "fp8":
            ws = weights.get(names[1]).float().reshape(())
            if ql.gemv_supported(torch.empty(0, dtype=torch.bfloat16), q) \
                    and self._fp8_gemv(device):
                return "fp8 weight-only: gemv / dequantize+cublas", {"w_scale": ws, "gemv": 1}
            return "fp8 weight-only: dequantize+cublas", {"w_scale": ws}
        return "reference", None

    def _a8(self, op: Op, weights):
        from irlm.kernels import quant_linear as ql
        a = op.attrs
        ws_name = _param(op, 2)
        if ws_name is None:
            return "reference", None
        ws = weights.get(ws_name).float()
        ql.act_kernels_ok(ws.device)    # checked now, not first inside a graph capture
        n, k = op.operands[1].type.shape
        if a["mode"] == "fp8":
            xs_name = _param(op, 3)
            if xs_name is None or k % 16 or n % 16:
                return "reference", None
            xs = weights.get(xs_name).float().reshape(())
            entry = {"w_scale": ws.reshape(()), "x_scale": xs}
            q = weights.get(_param(op, 1))
            if (ql.FP8_GEMV_MAX_M > 0 or tactics.enabled()) \
                    and ql.gemv_supported(torch.empty(0, dtype=torch.bfloat16), q) \
                    and self._fp8_gemv(q.device):
                entry["x_scale_value"] = float(xs)      # a constant: read once, here
                self._gemv_groups.setdefault(
                    ("fp8-a8", n, k, op.operands[0].type.dtype.torch), []).append((entry, (q,)))
                if ql.FP8_GEMV_MAX_M > 0:
                    return "fp8: gemv / cublaslt _scaled_mm", entry
                return "fp8: gemv (1-8 rows, if faster) / cublaslt _scaled_mm", entry
            return "fp8: cublaslt _scaled_mm", entry
        if k % 8 or n % 8:
            return "reference", None
        return "w8a8: cublaslt _int_mm", {"w_scales": ws.contiguous()}

    def _tinygemm(self, device) -> bool:
        """Whether tinygemm runs here, and with which nibble order its packing reads irlm's
        int4 data (checked once on a small random weight against the dequantized reference)."""
        if self.tinygemm_order is None:
            self.tinygemm_order = next((o for o in ("high", "low")
                                        if tinygemm_matches_reference(device, o == "high")), "")
        return bool(self.tinygemm_order)

    def _gemm(self, device, mode: str, group: int, dtype, n: int, k: int) -> bool:
        """Whether the Triton weight-only GEMM takes this linear here: Triton and a GPU that
        runs it, a shape it takes, and a check, once per (mode, group, dtype), that it
        computes the reference op on a small random weight (else dequantize + cuBLAS)."""
        from irlm.kernels import quant_gemm as qg
        if dtype not in qg.DTYPES or not qg.supported(n, k, group):
            return False
        ok, why = qg.available(device)
        if not ok:
            if torch.device(device).type == "cuda" and "unavailable" not in self.gemm_ok:
                import warnings
                warnings.warn(f"the Triton weight-only GEMM cannot run: {why}; int8/int4 "
                              f"linears of 17+ rows dequantize for cuBLAS", RuntimeWarning,
                              stacklevel=2)
                self.gemm_ok["unavailable"] = False
            return False
        key = (mode, group, dtype)
        if key not in self.gemm_ok:
            self.gemm_ok[key] = gemm_matches_reference(device, mode, group, dtype)
            if self.gemm_ok[key]:
                qg.split_locks(device)      # allocated now, not inside a graph capture
        return self.gemm_ok[key]

    def _int4_gemv(self, device, dtype) -> bool:
        """Whether irlm's int4 GEMV computes the reference op here for activations of dtype
        (checked once on a small random weight; else tinygemm / the GEMM paths)."""
        if dtype not in self.int4_gemv_ok:
            self.int4_gemv_ok[dtype] = int4_gemv_matches_reference(device, dtype)
        return self.int4_gemv_ok[dtype]

    def _fp8_gemv(self, device) -> bool:
        """Whether the GEMV with e4m3 weights computes the reference op here (checked once on
        a small random weight; the paths fall back to cuBLAS(Lt) otherwise)."""
        if self.fp8_gemv_ok is None:
            self.fp8_gemv_ok = fp8_gemv_matches_reference(device)
        return self.fp8_gemv_ok

    # ----- run time -----------------------------------------------------------------------------
    def overrides(self) -> dict:
        return {"quant.linear": self.linear, "quant.linear_a8": self.linear_a8}

    def linear(self, ctx, x, a):
        entry = self.prepared.get(id(ctx.op))
        if entry is None:
            return _reference("quant.linear", ctx, x, a)
        from irlm.kernels import quant_gemm as qg, quant_linear as ql
        from irlm.ops.quant import _epilogue
        xv = x[0]
        bias_at = 4 if a["mode"] == "int4" else 3
        bias = x[bias_at] if len(x) > bias_at else None
        flat = xv.reshape(-1, xv.shape[-1])
        m = flat.shape[0]
        if a["mode"] == "int8":
            if m <= ql.GEMV_MAX_M:
                y = ql.w8a16_gemv(flat, x[1], entry["scales"], bias)
            elif "gemm" in entry and m <= qg.GEMM_MAX_M["int8"]:
                y = qg.w8a16_gemm(flat, x[1], entry["scales"], bias)
            else:
                y = F.linear(flat, ql.dequantize_int8(x[1], entry["scales"], xv.dtype), bias)
        elif a["mode"] == "fp8":
            if "gemv" in entry and m <= ql.GEMV_MAX_M:
                y = ql.fp8_gemv(flat, x[1], entry["w_scale"], bias)
            else:
                y = F.linear(flat, ql.dequantize_fp8(x[1], entry["w_scale"], xv.dtype), bias)
        else:
            gemv = "gemv4" in entry and (m <= ql.INT4_GEMV_MAX_M
                                         or m in entry.get("gemv_rows", ()))
            y = _int4_linear(entry, flat, x[1], bias, gemv)
        y = y.reshape(tuple(xv.shape[:-1]) + (y.shape[-1],))
        return [_epilogue(y, a["act"])]

    def linear_a8(self, ctx, x, a):
        entry = self.prepared.get(id(ctx.op))
        if entry is None:
            return _reference("quant.linear_a8", ctx, x, a)
        from irlm.kernels import quant_linear as ql
        from irlm.ops.quant import _epilogue
        xv = x[0]
        flat = xv.reshape(-1, xv.shape[-1])
        if a["mode"] == "fp8":
            bias = x[4] if len(x) > 4 else None
            m = flat.shape[0]
            gemv = "x_scale_value" in entry and (m <= ql.FP8_GEMV_MAX_M
                                                 or m in entry.get("gemv_rows", ()))
            y = _fp8_a8_linear(entry, flat, x[1], bias, gemv)
        else:
            bias = x[3] if len(x) > 3 else None
            y = ql.w8a8_linear(flat, x[1], entry["w_scales"], bias)
        y = y.reshape(tuple(xv.shape[:-1]) + (y.shape[-1],))
        return [_epilogue(y, a["act"])]

    def summary(self) -> dict[str, int]:
        return dict(Counter(self.paths.values()))

    def tactics_summary(self) -> dict[str, str]:
        """What timing chose per row count and group of same-shaped quantized weights."""
        return {f"{key[0]} row{'s' if key[0] > 1 else ''} "
                + " ".join(str(p).replace("torch.", "") for p in key[1:]): repr(choice)
                for key, choice in self.gemv_choices.items()}

    def _gemv_candidates(self, key, members, rows, device) -> dict:
        """Closures of ``rows`` rows over every distinct weight of a group (tactics.choose
        times them): "default", the path such a call takes without irlm's GEMV, and "gemv"."""
        k, dtype = key[2], key[-1]
        x1 = torch.randn(rows, k, dtype=dtype, device=device)
        seen, uniq = set(), []
        for entry, operands in members:
            if operands[0].data_ptr() not in seen:
                seen.add(operands[0].data_ptr())
                uniq.append((entry, operands[0]))
        run = _int4_linear if key[0] == "int4" else _fp8_a8_linear

        def default():
            for entry, q in uniq:
                run(entry, x1, q, None, False)

        def gemv():
            for entry, q in uniq:
                run(entry, x1, q, None, True)
        return {"default": default, "gemv": gemv}


def _int4_linear(entry, flat, q, bias, gemv: bool):
    """An int4 linear of ``flat``'s rows on the prepared paths: irlm's GEMV if ``gemv``, else
    by row count tinygemm, the Triton GEMM, or dequantize + cuBLAS."""
    from irlm.kernels import quant_gemm as qg, quant_linear as ql
    m = flat.shape[0]
    if gemv:
        return ql.w4a16_gemv(flat, q, entry["scales"], entry["zeros"], entry["group"], bias)
    if "packed" in entry and m <= ql.INT4_TINYGEMM_MAX_M:
        y = ql.int4_tinygemm(flat, entry["packed"], entry["group"], entry["scale_zeros"])
        return y + bias if bias is not None else y
    if "scales_t" in entry and m <= qg.GEMM_MAX_M["int4"]:
        return qg.w4a16_gemm(flat, q, entry["scales_t"], entry["zeros_t"], entry["group"], bias)
    w = ql.dequantize_int4(q, entry["scales"], entry["zeros"], entry["group"], flat.dtype)
    return F.linear(flat, w, bias)


def _fp8_a8_linear(entry, flat, q, bias, gemv: bool):
    """quant.linear_a8{fp8} of ``flat``'s rows: x rounded to e4m3, then the fp8-weight GEMV if
    ``gemv``, else cuBLASLt's fp8 GEMM."""
    from irlm.kernels import quant_linear as ql
    if gemv:
        return ql.fp8_linear_gemv(flat, q, entry["w_scale"], entry["x_scale"],
                                  entry["x_scale_value"], bias)
    return ql.fp8_linear(flat, q, entry["w_scale"], entry["x_scale"], bias)


def _reference(name, ctx, x, a):
    from irlm.registry import get_op_def
    return get_op_def(name).reference(ctx, x, a)


def fp8_gemv_matches_reference(device) -> bool:
    """Run the fp8-weight GEMV once on a small random e4m3 weight and compare with the
    reference dequantization (fp32 matmul); False if it differs or cannot run (no GPU)."""
    from irlm.kernels import quant_linear as ql
    from irlm.kernels.nvrtc import KernelError
    from irlm.passes.llm.quantize import quantize_fp8
    if torch.device(device).type != "cuda":
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    q, s = quantize_fp8(torch.randn(48, 256, generator=g))
    xv = torch.randn(3, 256, generator=g).to(torch.bfloat16)
    ref = xv.float() @ (q.float() * s).t()
    try:
        got = ql.fp8_gemv(xv.to(device), q.to(device), s.float().reshape(()).to(device))
    except (RuntimeError, KernelError):
        return False
    return bool(((got.float().cpu() - ref).norm() / ref.norm()) < 1e-2)


def int4_gemv_matches_reference(device, dtype=torch.bfloat16) -> bool:
    """Run irlm's int4 GEMV once on a small random weight (odd row count, two row blocks of
    x), both kernels (FMA at group 64, tensor cores at group 128), and compare with the
    reference dequantization (fp32 matmul); False if either differs or cannot run (no GPU)."""
    from irlm.kernels import quant_linear as ql
    from irlm.kernels.nvrtc import KernelError
    from irlm.ops.quant import dequantize_reference
    from irlm.passes.llm.quantize import quantize_int4
    if torch.device(device).type != "cuda":
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    n, k = 77, 512
    for group, tensor_cores in ((64, False), (128, True)):
        q, s, z = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group)
        xv = torch.randn(9, k, generator=g).to(dtype)
        ref = xv.float() @ dequantize_reference(q, s, z, group=group).t()
        try:
            got = ql.w4a16_gemv(xv.to(device), q.to(device), s.float().to(device),
                                z.to(device), group, tensor_cores=tensor_cores)
        except (RuntimeError, KernelError):
            return False
        if not ((got.float().cpu() - ref).norm() / ref.norm()) < 1e-2:
            return False
    return True


def tinygemm_matches_reference(device, high_first: bool = True) -> bool:
    """Run tinygemm once on a small random int4 weight packed by pack_int4_tinygemm and compare
    with the reference dequantization (fp32 matmul); False if it differs or cannot run."""
    from irlm.kernels import quant_linear as ql
    from irlm.ops.quant import dequantize_reference, pack_int4
    g = torch.Generator(device="cpu").manual_seed(0)
    n, k, group = 64, 256, 32
    qv = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
    z = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8)
    xv = torch.randn(4, k, generator=g)
    q = pack_int4(qv)
    ref = xv @ dequantize_reference(q, s, z, group=group).t()
    try:
        packed, sz = ql.pack_int4_tinygemm(q.to(device), s.to(device), z.to(device),
                                           high_first)
        got = ql.int4_tinygemm(xv.to(device, torch.bfloat16), packed, group, sz).float().cpu()
    except (RuntimeError, NotImplementedError):
        return False
    return bool(((got - ref).norm() / ref.norm()) < 2e-2)


def gemm_matches_reference(device, mode: str, group: int, dtype) -> bool:
    """Run the Triton weight-only GEMM once (mode int8 or int4 with ``group``, activations of
    ``dtype``, 40 rows: the small-batch tiles, K split 4 ways) on a small random weight and
    compare with the reference dequantization (fp32 matmul); False, with a warning saying
    why, if it differs or cannot compile or run."""
    import warnings
    from irlm.kernels import quant_gemm as qg
    from irlm.ops.quant import dequantize_reference
    from irlm.passes.llm.quantize import quantize_int4, quantize_int8
    g = torch.Generator(device="cpu").manual_seed(0)
    n, k = 96, 2048
    w = torch.randn(n, k, generator=g) * 0.05
    xv = torch.randn(40, k, generator=g).to(dtype)
    dev = torch.device(device)
    try:
        if mode == "int8":
            q, s = quantize_int8(w)
            ref = xv.float() @ dequantize_reference(q, s).t()
            got = qg.w8a16_gemm(xv.to(dev), q.to(dev), s.float().to(dev))
        else:
            q, s, z = quantize_int4(w, group)
            ref = xv.float() @ dequantize_reference(q, s, z, group=group).t()
            st, zt = qg.prepare_int4_scales(s.to(dev), z.to(dev))
            got = qg.w4a16_gemm(xv.to(dev), q.to(dev), st, zt, group)
    except Exception as e:  # noqa: BLE001 - any failure (Triton, driver): the cuBLAS path
        warnings.warn(f"the Triton weight-only GEMM ({mode}, group {group}, {dtype}) cannot "
                      f"run on {device}: {type(e).__name__}: {e}; dequantize + cuBLAS instead",
                      RuntimeWarning, stacklevel=2)
        return False
    err = ((got.float().cpu() - ref).norm() / ref.norm()).item()
    if err >= 1e-2:
        warnings.warn(f"the Triton weight-only GEMM ({mode}, group {group}, {dtype}) is off by "
                      f"{err:.3g} (relative) on {device}; dequantize + cuBLAS instead",
                      RuntimeWarning, stacklevel=2)
        return False
    return True
