"""Kernel selection for the float linears (``core.linear`` in bf16 / fp16) on a GPU.

By default a linear runs its reference, ``F.linear`` (cuBLAS).  A decode step of a few rows is
bound by reading the weights, and there cuBLAS's GEMM does not always read them as fast as a
GEMV that streams each row once (:mod:`irlm.kernels.gemv`).  :class:`DenseLinearPlan` runs
when the CUDA runner loads an engine: it groups the linears by weight shape and dtype, checks
once per dtype that irlm's GEMV computes the reference op here, and times the two on each
group's weights at each of the decode graphs' small row counts (``tactics.SMALL_ROWS``: 1, 2,
4, 8).  A linear whose group chose the GEMV for a row count runs it for calls of exactly that
many rows; everything else (other row counts, other dtypes, weights that are not params) runs
``F.linear`` as before.  :meth:`DenseLinearPlan.summary` reports each group's choice and times
(the runner's ``linear_tactics``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from irlm.ir import Graph

from . import tactics
from .quant_linears import _param


class DenseLinearPlan:
    """The small-batch paths of every float linear (see the module doc)."""

    def __init__(self, timer: Optional[tactics.Timer] = None):
        self.gemv_rows: dict[int, frozenset] = {}   # id(op) -> the row counts its GEMV runs
        self.choices: dict[tuple, tactics.Choice] = {}    # (rows, n, k, dtype) -> the choice
        self.gemv_ok: dict = {}                # dtype -> the GEMV checked and right here
        self._timer = timer

    # ----- load time ----------------------------------------------------------------------------
    def prepare(self, graph: Graph, weights, device) -> "DenseLinearPlan":
        from irlm.kernels.gemv import gemv_supported
        if not tactics.enabled():       # IRLM_TACTICS=0: cuBLAS throughout, nothing checked
            return self
        device = tactics.resolve_device(device)
        groups: dict[tuple, list] = {}
        for op in graph.ops:
            if op.name != "core.linear":
                continue
            name = _param(op, 1)
            xdt = op.operands[0].type.dtype.torch
            if name is None:
                continue
            w = weights.get(name)
            if w is None or not tactics.on_device(w, device) or not gemv_supported(xdt, w):
                continue
            groups.setdefault((int(w.shape[0]), int(w.shape[1]), xdt), []).append((op, w))
        for key, members in groups.items():
            n, k, dtype = key
            if not self._gemv(device, dtype):
                continue
            won = set()
            for rows in tactics.SMALL_ROWS:
                choice = tactics.choose(device, ("linear", rows, n, k, str(dtype)),
                                        _candidates(members, rows, k, dtype, device), "cublas",
                                        self._timer)
                self.choices[(rows,) + key] = choice
                if choice.chosen == "gemv":
                    won.add(rows)
            if won:
                for op, _ in members:
                    self.gemv_rows[id(op)] = frozenset(won)
        return self

    def _gemv(self, device, dtype) -> bool:
        if dtype not in self.gemv_ok:
            self.gemv_ok[dtype] = gemv_matches_reference(device, dtype)
        return self.gemv_ok[dtype]

    # ----- run time -----------------------------------------------------------------------------
    def overrides(self) -> dict:
        return {"core.linear": self.linear} if self.gemv_rows else {}

    def linear(self, ctx, x, a):
        xv, w = x[0], x[1]
        bias = x[2] if len(x) > 2 else None
        k = xv.shape[-1]
        rows = xv.numel() // k if k else 0
        if rows in self.gemv_rows.get(id(ctx.op), ()) \
                and (bias is None or bias.is_contiguous()):
            from irlm.kernels.gemv import gemv
            y = gemv(xv.reshape(rows, k), w, bias)
            return [y.reshape(tuple(xv.shape[:-1]) + (w.shape[0],))]
        return [F.linear(xv, w, bias)]

    def summary(self) -> dict[str, str]:
        return {f"{rows} row{'s' if rows > 1 else ''} {n}x{k} "
                f"{str(dt).replace('torch.', '')}": repr(c)
                for (rows, n, k, dt), c in self.choices.items()}


def _candidates(members, rows, k, dtype, device) -> dict:
    """The closures that tactics.choose times for ``rows`` rows: each runs every distinct
    weight of the group once, as a decode step does (more bytes than the L2 cache holds for a
    real model)."""
    from irlm.kernels.gemv import gemv
    seen, ws = set(), []
    for _, w in members:
        if w.data_ptr() not in seen:
            seen.add(w.data_ptr())
            ws.append(w)
    x = torch.randn(rows, k, dtype=dtype, device=device)

    def cublas():
        for w in ws:
            F.linear(x, w)

    def irlm_gemv():
        for w in ws:
            gemv(x, w)
    return {"cublas": cublas, "gemv": irlm_gemv}


def gemv_matches_reference(device, dtype=torch.bfloat16) -> bool:
    """Run irlm's dense GEMV once on a small random weight (odd row count, two row blocks of x,
    a bias) and compare with an fp32 matmul; False if it differs or cannot run (no GPU)."""
    from irlm.kernels.gemv import gemv
    from irlm.kernels.nvrtc import KernelError
    if torch.device(device).type != "cuda":
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    n, k = 77, 520
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    xv = torch.randn(9, k, generator=g).to(dtype)
    ref = xv.float() @ w.float().t() + b.float()
    try:
        got = gemv(xv.to(device), w.to(device), b.to(device))
    except (RuntimeError, KernelError):
        return False
    return bool(((got.float().cpu() - ref).norm() / ref.norm()) < 1e-2)
