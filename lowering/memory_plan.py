"""Liveness-based activation memory planning for the native engine.

Every value an op produces (not weights, not graph inputs) needs storage from its definition to
its last use.  View ops (reshape, transpose, slice, split, ...) produce no storage of their own:
they alias their operand, whose storage then lives until the view's last use.  Storages whose
lifetimes do not overlap can share memory; :func:`plan_activation_memory` places each storage at
an offset of one arena (largest first, at the lowest offset free for its whole lifetime) and
reports the arena's size.  Sizes are evaluated at given values of the symbolic dims — for an
engine, its largest step (``tokens = max_num_tokens``) — so the plan bounds every step's
activation memory.

The CUDA executor uses the plan to reserve activation memory before it sizes the KV pool from
what is left (irlm/runtime/runners/cuda_graphs.py); buffers themselves still come from torch's caching
allocator, which reuses freed blocks in the same liveness order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import sympy

from irlm.ir import Graph, Value
from irlm.registry import CONSTANT_LIKE, VIEW, ops_with_trait
from irlm.types import sym

#: ops whose results alias their first operand's storage (the registry's view trait)
VIEW_OPS = ops_with_trait(VIEW)
#: ops that own no activation storage (weights, constants)
CONSTANT_OPS = ops_with_trait(CONSTANT_LIKE)
ALIGN = 256


@dataclass
class Buffer:
    name: str
    size: int          # bytes, aligned
    start: int         # index of the defining op
    end: int           # index of the last op that reads it (or the end, for outputs)
    offset: int = -1


@dataclass
class MemoryPlan:
    buffers: list[Buffer] = field(default_factory=list)
    arena_bytes: int = 0          # the planned arena
    naive_bytes: int = 0          # every activation in its own buffer
    peak_live_bytes: int = 0      # the most bytes live at one time: no plan can do better

    def summary(self) -> str:
        return (f"{len(self.buffers)} activation buffers: arena {self.arena_bytes / 2**20:.1f} "
                f"MiB (peak live {self.peak_live_bytes / 2**20:.1f} MiB, no reuse "
                f"{self.naive_bytes / 2**20:.1f} MiB)")


def plan_activation_memory(graph: Graph, dims: Mapping[str, int]) -> MemoryPlan:
    """Plan the activations of ``graph`` with its symbolic dims set to ``dims``."""
    subs = {sym(k): v for k, v in dims.items()}
    root: dict[int, Value] = {}          # value -> the value whose storage it aliases
    buffers: dict[int, Buffer] = {}
    ops = list(graph.ops)
    for i, op in enumerate(ops):
        for r in op.results:
            if op.name in VIEW_OPS:
                base = root.get(id(op.operands[0]), op.operands[0])
                root[id(r)] = base
                continue
            if op.name in CONSTANT_OPS:
                continue
            size = _bytes(r, subs)
            buffers[id(r)] = Buffer(r.name or f"%{i}", size, i, i)
        for v in op.operands:
            b = buffers.get(id(root.get(id(v), v)))
            if b is not None:
                b.end = max(b.end, i)
    for v in graph.outputs:
        b = buffers.get(id(root.get(id(v), v)))
        if b is not None:
            b.end = len(ops)
    plan = MemoryPlan(sorted(buffers.values(), key=lambda b: (-b.size, b.start)))
    placed: list[Buffer] = []
    for b in plan.buffers:
        clashes = sorted((p.offset, p.offset + p.size) for p in placed
                         if p.start <= b.end and b.start <= p.end)
        offset = 0
        for lo, hi in clashes:
            if offset + b.size <= lo:
                break
            offset = max(offset, hi)
        b.offset = offset
        placed.append(b)
    plan.arena_bytes = max((b.offset + b.size for b in plan.buffers), default=0)
    plan.naive_bytes = sum(b.size for b in plan.buffers)
    live = [0] * (len(ops) + 1)
    for b in plan.buffers:
        for i in range(b.start, b.end + 1):
            live[i] += b.size
    plan.peak_live_bytes = max(live, default=0)
    return plan


def _bytes(v: Value, subs) -> int:
    n = 1
    for d in v.type.shape:
        n *= d if isinstance(d, int) else int(sympy.sympify(d).subs(subs))
    size = max(1, n * v.type.dtype.bits // 8)
    return -(-size // ALIGN) * ALIGN
