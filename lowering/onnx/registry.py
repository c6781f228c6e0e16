"""The ONNX converter table: one converter per irlm op, each with a capability check.

A converter is registered once per op name (:func:`converter`).  Its ``check(op)`` says, before
anything is built, whether this particular op (its attributes, operand types) can be lowered,
and returns the reason when not; its ``convert(ctx, op)`` emits the ONNX nodes and returns one
tensor name per op result.  :func:`unsupported_ops` walks a graph with the checks only, so an
export fails with every unsupported op named, with its source location, before a byte is
written (the torch-tensorrt converter-table design, without the silent fallback).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from irlm.errors import IRLMError
from irlm.ir import Graph, Op

CheckFn = Callable[[Op], Optional[str]]
ConvertFn = Callable[["object", Op], list]


@dataclass(frozen=True)
class Converter:
    op_name: str
    convert: ConvertFn
    check: Optional[CheckFn] = None
    #: how the op lowers, for docs and the coverage listing: "Attention (opset 23)", ...
    onnx: str = ""

    def why_not(self, op: Op) -> Optional[str]:
        return self.check(op) if self.check is not None else None


CONVERTERS: dict[str, Converter] = {}


def converter(op_name: str, onnx: str = "", check: Optional[CheckFn] = None):
    """Register the decorated ``fn(ctx, op) -> [result tensor names]`` for ``op_name``."""
    def register(fn: ConvertFn) -> ConvertFn:
        if op_name in CONVERTERS:
            raise ValueError(f"two ONNX converters for {op_name}")
        CONVERTERS[op_name] = Converter(op_name, fn, check, onnx)
        return fn
    return register


def get_converters() -> dict[str, Converter]:
    from . import convert_core, convert_llm, convert_quant  # noqa: F401  (fill the table)
    return CONVERTERS


@dataclass(frozen=True)
class Unsupported:
    op: Op
    reason: str

    def __str__(self) -> str:
        return f"{self.op.describe()}: {self.reason}"


class UnsupportedOpsError(IRLMError):
    """Ops of a graph that have no ONNX lowering; ``problems`` lists each one."""

    def __init__(self, graph_name: str, problems: list[Unsupported]):
        self.problems = problems
        first = problems[0]
        more = f" (and {len(problems) - 1} more: " + "; ".join(
            str(p) for p in problems[1:4]) + ("; ..." if len(problems) > 4 else "") + ")" \
            if len(problems) > 1 else ""
        super().__init__(f"cannot lower @{graph_name} to ONNX: {first}{more}")


def unsupported_ops(graph: Graph) -> list[Unsupported]:
    """Every op of ``graph`` that cannot be lowered, with the reason (empty: all lower)."""
    table = get_converters()
    out = []
    for op in graph.ops:
        conv = table.get(op.name)
        if conv is None:
            out.append(Unsupported(op, f"no ONNX converter for {op.name}"))
            continue
        reason = conv.why_not(op)
        if reason:
            out.append(Unsupported(op, reason))
    return out


def check_lowerable(graph: Graph) -> None:
    """Raise :class:`UnsupportedOpsError` naming every op that cannot be lowered."""
    problems = unsupported_ops(graph)
    if problems:
        raise UnsupportedOpsError(graph.name, problems)
