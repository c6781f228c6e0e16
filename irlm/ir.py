"""The IR: values, ops and graphs.

A :class:`Graph` is one SSA block.  Every :class:`Value` knows the op that produced it (or that it
is a graph input) and the list of its uses, so replacing all uses of a value or erasing an op
costs O(uses).  Ops live in a doubly linked list in topological order, so inserting before or
after an op and erasing one are O(1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .errors import IRError
from .types import DimRange, TensorType


@dataclass(frozen=True)
class Location:
    """Where an op came from: the torch module path and the Python source line."""
    module: str = ""
    file: str = ""
    line: int = 0

    def __bool__(self) -> bool:
        return bool(self.module or self.file)

    def __str__(self) -> str:
        parts = []
        if self.module:
            parts.append(self.module)
        if self.file:
            parts.append(f"{self.file}:{self.line}")
        return " at ".join(parts) if parts else "<unknown>"


UNKNOWN_LOC = Location()


class Use:
    """Operand ``index`` of ``op`` reads the value."""
    __slots__ = ("op", "index")

    def __init__(self, op: "Op", index: int):
        self.op, self.index = op, index

    def __repr__(self):
        return f"Use({self.op.name}, {self.index})"


class Value:
    """An SSA value: a graph input or one result of an op."""
    __slots__ = ("type", "name", "producer", "result_index", "uses", "__weakref__")

    def __init__(self, type: TensorType, name: Optional[str] = None,
                 producer: Optional["Op"] = None, result_index: int = 0):
        self.type = type
        self.name = name
        self.producer = producer
        self.result_index = result_index
        self.uses: list[Use] = []

    @property
    def users(self) -> list["Op"]:
        seen, out = set(), []
        for u in self.uses:
            if id(u.op) not in seen:
                seen.add(id(u.op))
                out.append(u.op)
        return out

    @property
    def has_one_use(self) -> bool:
        return len(self.uses) == 1

    def replace_all_uses_with(self, new: "Value") -> None:
        if new is self:
            return
        for use in self.uses:
            use.op.operands[use.index] = new
            new.uses.append(use)
        self.uses = []
        graph = self.producer.graph if self.producer is not None else None
        if graph is not None:
            graph._replace_output(self, new)

    def label(self) -> str:
        """How messages name the value: ``%h3``; a value without a name (built in memory,
        never printed) by where it comes from: ``result 0 of core.add at model.layers.0``."""
        if self.name is not None:
            return f"%{self.name}"
        if self.producer is not None:
            p = self.producer
            return f"result {self.result_index} of {p.name}" + (f" at {p.loc}" if p.loc else "")
        return f"an unnamed {self.type} value"

    def __repr__(self) -> str:
        return f"Value(%{self.name or '?'}: {self.type})"


class Op:
    """One operation.  ``name`` is dialect-qualified (``core.add``); ``attrs`` are typed
    according to the op's schema in the registry."""
    __slots__ = ("name", "operands", "results", "attrs", "loc", "graph", "prev", "next",
                 "text_pos", "__weakref__")

    def __init__(self, name: str, operands: list[Value], result_types: list[TensorType],
                 attrs: Optional[dict[str, Any]] = None, loc: Location = UNKNOWN_LOC,
                 result_names: Optional[list[Optional[str]]] = None):
        self.name = name
        self.operands: list[Value] = list(operands)
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.loc = loc
        names = result_names or [None] * len(result_types)
        self.results = [Value(t, n, self, i) for i, (t, n) in enumerate(zip(result_types, names))]
        self.graph: Optional[Graph] = None
        self.prev: Optional[Op] = None
        self.next: Optional[Op] = None
        self.text_pos: Optional[tuple[str, int, int]] = None  # (file, line, col) when parsed

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise IRError(f"{self.name} has {len(self.results)} results, not one")
        return self.results[0]

    @property
    def dialect(self) -> str:
        return self.name.split(".", 1)[0] if "." in self.name else ""

    def operand(self, name: str) -> Value:
        """The operand the op's registry definition calls ``name`` (``op.operand("kv_cache")``
        rather than ``op.operands[3]``)."""
        from .registry import get_op_def
        return self.operands[get_op_def(self.name).operand_index(name)]

    def set_operand(self, index: int, value: Value) -> None:
        old = self.operands[index]
        old.uses = [u for u in old.uses if not (u.op is self and u.index == index)]
        self.operands[index] = value
        value.uses.append(Use(self, index))

    def describe(self) -> str:
        """How error messages name this op: ``core.add (%h3) at model.layers.0.mlp``."""
        res = ", ".join("%" + (r.name or "?") for r in self.results)
        out = self.name + (f" ({res})" if res else "")
        if self.loc:
            out += f" at {self.loc}"
        if self.text_pos:
            f, line, col = self.text_pos
            out = f"{f}:{line}:{col}: {out}"
        return out

    def __repr__(self) -> str:
        return f"Op({self.describe()})"


class Graph:
    """One SSA block with typed inputs, ops in topological order and outputs.

    ``dims`` declares each symbolic dimension's range; ``weights`` is the store that ``param``
    ops read from (may be None for a graph parsed from text without weights).
    """

    def __init__(self, name: str = "main", weights=None):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.dims: dict[str, DimRange] = {}
        self.weights = weights
        self.first: Optional[Op] = None
        self.last: Optional[Op] = None
        self._num_ops = 0

    # ----- construction -------------------------------------------------------------------
    def add_input(self, type: TensorType, name: Optional[str] = None) -> Value:
        v = Value(type, name)
        self.inputs.append(v)
        return v

    def declare_dim(self, name: str, lo: int, hi: int) -> None:
        self.dims[name] = DimRange(lo, hi)

    def set_outputs(self, values: list[Value]) -> None:
        self.outputs = list(values)

    def _link(self, op: Op) -> None:
        if op.graph is not None:
            raise IRError(f"{op.describe()} is already in a graph")
        op.graph = self
        for i, v in enumerate(op.operands):
            v.uses.append(Use(op, i))
        self._num_ops += 1

    def append(self, op: Op) -> Op:
        self._link(op)
        op.prev, op.next = self.last, None
        if self.last is None:
            self.first = op
        else:
            self.last.next = op
        self.last = op
        return op

    def insert_before(self, anchor: Op, op: Op) -> Op:
        self._link(op)
        op.prev, op.next = anchor.prev, anchor
        if anchor.prev is None:
            self.first = op
        else:
            anchor.prev.next = op
        anchor.prev = op
        return op

    def insert_after(self, anchor: Op, op: Op) -> Op:
        if anchor.next is None:
            return self.append(op)
        return self.insert_before(anchor.next, op)

    def erase(self, op: Op) -> None:
        """Remove ``op``; its results must be unused."""
        for r in op.results:
            if r.uses or any(o is r for o in self.outputs):
                raise IRError(f"cannot erase {op.describe()}: result {r.label()} is still used")
        for i, v in enumerate(op.operands):
            v.uses = [u for u in v.uses if not (u.op is op and u.index == i)]
        if op.prev is None:
            self.first = op.next
        else:
            op.prev.next = op.next
        if op.next is None:
            self.last = op.prev
        else:
            op.next.prev = op.prev
        op.prev = op.next = None
        op.graph = None
        self._num_ops -= 1

    def _replace_output(self, old: Value, new: Value) -> None:
        for i, o in enumerate(self.outputs):
            if o is old:
                self.outputs[i] = new

    # ----- queries ------------------------------------------------------------------------
    @property
    def ops(self) -> Iterator[Op]:
        """Ops in order; safe against erasing the op being visited."""
        op = self.first
        while op is not None:
            nxt = op.next
            yield op
            op = nxt

    def __len__(self) -> int:
        return self._num_ops

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        for op in self.ops:
            yield from op.results

    def find(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise IRError(f"graph @{self.name} has no value named %{name}")

    def clone(self, weights=None, value_map: Optional[dict] = None) -> "Graph":
        """A structural copy: new values and ops with the same names, types, attributes,
        locations and order; attribute values are shared (passes replace them, never mutate
        them).  ``weights``: the copy's store (default: this graph's).  ``value_map``, when
        given, is filled with ``id(old value) -> new value``."""
        vmap = value_map if value_map is not None else {}
        g = Graph(self.name, self.weights if weights is None else weights)
        g.dims = dict(self.dims)
        for v in self.inputs:
            vmap[id(v)] = g.add_input(v.type, v.name)
        for op in self.ops:
            new = Op(op.name, [vmap[id(v)] for v in op.operands], [r.type for r in op.results],
                     dict(op.attrs), op.loc, [r.name for r in op.results])
            new.text_pos = op.text_pos
            g.append(new)
            for a, b in zip(op.results, new.results):
                vmap[id(a)] = b
        g.set_outputs([vmap[id(v)] for v in self.outputs])
        return g

    def params(self) -> Iterator[Op]:
        return (op for op in self.ops if op.name == "param")

    def __str__(self) -> str:
        from .text.printer import print_graph
        return print_graph(self)
