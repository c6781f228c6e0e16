"""The verifier: is a graph well formed?

Checks, for every op: it is registered; its attributes match the schema; its operands are
defined earlier in the graph (SSA); use lists agree with operand lists; its result types equal
what the registry infers; symbolic dims are declared; params exist in the weight store with
the declared type.  Graph outputs must be defined.  Each finding names the op, its result and
its source location; :func:`verify` raises one :class:`VerificationError` listing them all.
"""
from __future__ import annotations

from .builder import infer_types
from .errors import IRError, VerificationError
from .ir import Graph, Op
from .registry import get_op_def
from .types import format_type


def verify(graph: Graph) -> None:
    problems = find_problems(graph)
    if problems:
        raise VerificationError(problems)


def find_problems(graph: Graph, max_problems: int = 50) -> list[str]:
    out: list[str] = []
    defined: set[int] = set()
    # (op, operand index, value) of every use a defined value lists: the operand check then
    # costs O(1) instead of a scan of the value's uses (quadratic in a value's fan-out)
    listed: set[tuple[int, int, int]] = set()

    def define(v):
        defined.add(id(v))
        listed.update((id(u.op), u.index, id(v)) for u in v.uses)

    def check_symbols(t, where):
        missing = t.free_symbols() - set(graph.dims)
        if missing:
            out.append(f"{where}: type {t} uses undeclared dimension(s) "
                       f"{', '.join(sorted(missing))}")

    for i, v in enumerate(graph.inputs):
        if v.producer is not None:
            out.append(f"graph input {i} ({v.label()}) is also the result of {v.producer.name}")
        check_symbols(v.type, f"graph input {v.label()}")
        define(v)

    count = 0
    prev = None
    for op in graph.ops:
        count += 1
        if op.graph is not graph:
            out.append(f"{op.describe()}: op is linked into the graph but belongs to another")
        if op.prev is not prev:
            out.append(f"{op.describe()}: broken op list (prev link)")
        prev = op
        _check_op(graph, op, defined, listed, out, check_symbols)
        for r in op.results:
            define(r)
        if len(out) >= max_problems:
            return out
    if count != len(graph):
        out.append(f"graph @{graph.name}: op count {len(graph)} disagrees with the op list ({count})")
    for i, v in enumerate(graph.outputs):
        if id(v) not in defined:
            out.append(f"graph output {i} ({v.label()}) is not defined in the graph")
    if not out:           # rules across ops assume each op is well formed
        from .registry import graph_checks
        for check in graph_checks():
            out.extend(check(graph))
    return out


def _check_op(graph: Graph, op: Op, defined: set[int], listed: set[tuple[int, int, int]],
              out: list[str], check_symbols) -> None:
    where = op.describe()
    try:
        d = get_op_def(op.name)
    except IRError as e:
        out.append(f"{where}: {e}")
        return
    problem = d.check_operand_count(len(op.operands))
    if problem:
        out.append(f"{where}: {problem}")
        return
    for i, v in enumerate(op.operands):
        name = d.operand_names[min(i, len(d.operand_names) - 1)]
        if id(v) not in defined:
            out.append(f"{where}: operand {i} ({name}) {v.label()} is not defined before its use")
        elif (id(op), i, id(v)) not in listed:
            out.append(f"{where}: operand {i} ({name}) {v.label()} does not list this op as a use")
    for r in op.results:
        for u in r.uses:
            if u.op.graph is not graph or u.index >= len(u.op.operands) \
                    or u.op.operands[u.index] is not r:
                out.append(f"{where}: result {r.label()} has a stale use by {u.op.name}")
        check_symbols(r.type, where)
    try:
        attrs = d.normalize_attrs(op.attrs, op.name)
    except IRError as e:
        out.append(f"{where}: {e}")
        return
    if attrs != op.attrs:
        diff = sorted(k for k in attrs if attrs.get(k) is not op.attrs.get(k)
                      and _differs(attrs.get(k), op.attrs.get(k)))
        if diff:
            out.append(f"{where}: attribute(s) {', '.join(diff)} do not match the schema's "
                       f"types (run them through make_op)")
    try:
        inferred = infer_types(op.name, [v.type for v in op.operands], attrs)
    except IRError as e:
        out.append(f"{op.describe()}: {e}")
        return
    if len(inferred) != len(op.results):
        out.append(f"{where}: has {len(op.results)} results but {op.name} produces "
                   f"{len(inferred)} here")
        return
    for r, t in zip(op.results, inferred):
        if r.type != t:
            out.append(f"{where}: result {r.label()} is declared {format_type(r.type)} "
                       f"but {op.name} infers {format_type(t)}")
    if op.name == "param" and graph.weights is not None:
        name = op.attrs["name"]
        if name not in graph.weights:
            out.append(f"{where}: weight '{name}' is not in the weight store")
        elif graph.weights.type_of(name) != op.results[0].type:
            out.append(f"{where}: weight '{name}' is {graph.weights.type_of(name)} in the store "
                       f"but the param declares {op.results[0].type}")


def _differs(a, b) -> bool:
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                    and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
    return a != b
