"""Builder: the one way to create ops with their types inferred from the registry."""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence, Union

from .errors import IRError
from .ir import UNKNOWN_LOC, Graph, Location, Op, Value
from .registry import get_op_def
from .types import TensorType


def make_op(name: str, operands: Sequence[Value], attrs: Optional[dict[str, Any]] = None,
            loc: Location = UNKNOWN_LOC, result_types: Optional[list[TensorType]] = None,
            result_names: Optional[list[Optional[str]]] = None) -> Op:
    """Create a detached op: check operands and attributes, infer (or take) result types."""
    d = get_op_def(name)
    where = name + (f" at {loc}" if loc else "")
    problem = d.check_operand_count(len(operands))
    if problem:
        raise IRError(f"{where}: {problem}")
    for i, v in enumerate(operands):
        if not isinstance(v, Value):
            raise IRError(f"{where}: operand {i} is {type(v).__name__}, not a Value")
    attrs = d.normalize_attrs(attrs or {}, where)
    if result_types is None:
        result_types = infer_types(name, [v.type for v in operands], attrs, where)
    return Op(name, list(operands), list(result_types), attrs, loc, result_names)


def infer_types(name: str, operand_types: list[TensorType], attrs: dict[str, Any],
                where: str = "") -> list[TensorType]:
    """Result types of ``name`` applied to operands of ``operand_types`` (attrs normalized)."""
    d = get_op_def(name)
    try:
        out = d.infer(operand_types, attrs)
    except IRError as e:
        raise IRError(f"{where or name}: {e}") from None
    except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        # Inference rules index shapes by attribute values; a malformed attribute surfaces here.
        raise IRError(f"{where or name}: invalid operands or attributes "
                      f"({type(e).__name__}: {e})") from None
    return list(out)


class Builder:
    """Creates ops (types inferred by the registry) at an insertion point: appended to the
    graph, or before / after an anchor op.  :class:`irlm.passes.Rewriter` is a Builder that
    also records each change for the pass manager."""

    def __init__(self, graph: Graph, before: Optional[Op] = None, loc: Location = UNKNOWN_LOC,
                 after: Optional[Op] = None):
        self.graph = graph
        self.loc = loc
        self._before: Optional[Op] = None
        self._after: Optional[Op] = None
        self.set_insertion_point(before, after)

    # ----- where new ops go ---------------------------------------------------------------
    @property
    def before(self) -> Optional[Op]:
        return self._before

    def set_insertion_point(self, before: Optional[Op] = None, after: Optional[Op] = None) -> None:
        """New ops go before ``before`` or after ``after`` (neither: at the graph's end).
        After-insertion keeps order: two ops created after X appear in creation order."""
        if before is not None and after is not None:
            raise IRError("give an insertion point before an op or after one, not both")
        self._before, self._after = before, after

    @contextlib.contextmanager
    def insertion_point(self, before: Optional[Op] = None, after: Optional[Op] = None):
        """``with b.insertion_point(after=op): ...`` then restore the previous point."""
        saved = self._before, self._after
        self.set_insertion_point(before, after)
        try:
            yield
        finally:
            self._before, self._after = saved

    def insert(self, op: Op) -> Op:
        """Link a detached op (from :func:`make_op`) at the insertion point."""
        if self._before is not None:
            self.graph.insert_before(self._before, op)
        elif self._after is not None:
            self.graph.insert_after(self._after, op)
            self._after = op
        else:
            self.graph.append(op)
        return op

    # ----- creating ops -------------------------------------------------------------------
    def create(self, name: str, operands: Sequence[Value] = (), attrs: Optional[dict] = None,
               loc: Optional[Location] = None, result_types=None, result_names=None) -> Op:
        op = make_op(name, operands, attrs, self.loc if loc is None else loc, result_types,
                     result_names)
        return self.insert(op)

    def op(self, name: str, *operands: Value, loc: Optional[Location] = None,
           result_types: Optional[list[TensorType]] = None,
           **attrs) -> Union[Value, list[Value]]:
        """``b.op("core.add", x, y)`` → the result value (a list when the op has several).

        Give ``result_types`` when you know them to skip type inference (the verifier still
        checks them)."""
        op = self.create(name, operands, attrs, loc, result_types)
        return op.results[0] if len(op.results) == 1 else op.results

    def param(self, weight_name: str, type: TensorType, loc: Optional[Location] = None) -> Value:
        return self.create("param", (), {"name": weight_name, "type": type}, loc).result

    def constant(self, value, loc: Optional[Location] = None) -> Value:
        """A ``core.constant`` holding ``value`` (a tensor or a Python number/list)."""
        import torch
        return self.create("core.constant", (), {"value": torch.as_tensor(value)}, loc).result
