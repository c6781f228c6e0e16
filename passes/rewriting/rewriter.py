"""The rewriter: the one way passes and patterns mutate a graph.

Because every change goes through here, the greedy driver learns what changed (and re-visits
the ops affected), statistics count themselves, and a bad change (a replacement of a different
type, erasing a used op) is caught at the point where it happens, naming the pattern.

New ops go before the op being rewritten by default (the driver sets the insertion point),
take its source location, and a replacement value takes over the name of the value it
replaces, so dumps stay readable and ``--check-numerics`` can follow values across passes.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from irlm.builder import Builder, make_op
from irlm.errors import IRLMError
from irlm.ir import Graph, Location, Op, Value
from irlm.types import DType, TensorType

from ..context import Statistics
from ..errors import RewriteError
from .pattern import same_type


class RewriteListener:
    """Told about every change the rewriter makes (the greedy driver is one)."""

    def op_created(self, op: Op) -> None: ...
    def op_erased(self, op: Op) -> None: ...
    def op_modified(self, op: Op) -> None: ...
    def value_replaced(self, old: Value, new: Value, users: list[Op]) -> None: ...


class Rewriter(Builder):
    """Create, replace and erase ops in ``graph``; derive new weights.  A
    :class:`irlm.Builder` (the same ``op``/``create``/``constant``/``param`` and insertion
    points) that counts and reports every change, so the pass manager knows what changed.

    ``rw.op("core.reshape", x, shape=(4, 8))`` creates an op at the insertion point and returns
    its result; ``rw.replace_op(op, value)`` replaces ``op``'s result and erases it;
    ``rw.replace_all_uses_with(old, new)`` redirects the readers of one value.
    """

    def __init__(self, graph: Graph, stats: Optional[Statistics] = None,
                 listener: Optional[RewriteListener] = None):
        super().__init__(graph)
        self.stats = stats if stats is not None else Statistics()
        self.listener = listener or RewriteListener()
        self.change_count = 0          # bumps on every mutation; lets callers detect changes
        self.pattern_name: Optional[str] = None  # the pattern now rewriting, for errors

    def set_insertion_point(self, before: Optional[Op] = None, after: Optional[Op] = None) -> None:
        try:
            super().set_insertion_point(before, after)
        except IRLMError as e:
            raise RewriteError(str(e)) from None

    def insert(self, op: Op) -> Op:
        """Link a detached op (from :func:`irlm.builder.make_op`) at the insertion point."""
        super().insert(op)
        self.change_count += 1
        self.stats.counters["ops created"] += 1
        self.listener.op_created(op)
        return op

    def create(self, name: str, operands: Sequence[Value] = (), attrs: Optional[dict] = None,
               loc: Optional[Location] = None, result_types: Optional[list[TensorType]] = None,
               result_names: Optional[list[Optional[str]]] = None) -> Op:
        """Create ``name`` (types inferred by the registry) at the insertion point."""
        try:
            new = make_op(name, operands, attrs, self.loc if loc is None else loc, result_types,
                          result_names)
        except IRLMError as e:
            raise RewriteError(self._where() + str(e)) from None
        return self.insert(new)

    # ----- replacing and erasing ----------------------------------------------------------
    def replace_all_uses_with(self, old: Value, new: Value, check_type: bool = True,
                              except_in: Optional[Op] = None) -> None:
        """Every reader of ``old`` (and the graph outputs) reads ``new`` instead; with
        ``except_in``, that op keeps reading ``old`` (e.g. the collective that consumes it).

        ``new`` must have ``old``'s type; an unnamed ``new`` takes ``old``'s name."""
        if old is new:
            return
        if check_type and not same_type(old.type, new.type):
            raise RewriteError(self._where() + f"cannot replace {old.label()} ({old.type}) with "
                               f"{new.label()} of a different type ({new.type})")
        users = old.users
        was_output = any(o is old for o in self.graph.outputs)
        if except_in is None:
            old.replace_all_uses_with(new)
        else:
            for u in list(old.uses):
                if u.op is not except_in:
                    u.op.set_operand(u.index, new)
            if was_output:
                self.graph._replace_output(old, new)
        if was_output and old.producer is None:  # a graph input returned directly
            self.graph._replace_output(old, new)
        if new.name is None and old.name is not None and old.producer is not None:
            new.name, old.name = old.name, None
        self.change_count += 1
        self.listener.value_replaced(old, new, users)

    def replace_op(self, op: Op, new: Union[Value, Op, Sequence[Value]],
                   check_type: bool = True) -> None:
        """Replace each result of ``op`` with the matching new value, then erase ``op``."""
        if isinstance(new, Op):
            new = new.results
        elif isinstance(new, Value):
            new = [new]
        new = list(new)
        if len(new) != len(op.results):
            raise RewriteError(self._where() + f"{op.describe()} has {len(op.results)} results "
                               f"but {len(new)} replacement(s) were given")
        for old, n in zip(op.results, new):
            self.replace_all_uses_with(old, n, check_type)
        self.erase_op(op)

    def erase_op(self, op: Op) -> None:
        """Remove ``op``, whose results must be unused."""
        outputs = self.graph.outputs
        for r in op.results:
            if r.uses or (outputs and _is_in(r, outputs)):
                reader = r.uses[0].op.describe() if r.uses else "the graph outputs"
                raise RewriteError(self._where() + f"cannot erase {op.describe()}: {r.label()} is "
                                   f"still read by {reader}")
        self.graph.erase(op)
        self.change_count += 1
        self.stats.counters["ops erased"] += 1
        self.listener.op_erased(op)

    def set_operand(self, op: Op, index: int, value: Value, check_type: bool = True) -> None:
        """Make operand ``index`` of ``op`` read ``value`` (its type must not change, unless
        ``check_type=False``: the caller then re-infers the result types with retype)."""
        if check_type and not same_type(op.operands[index].type, value.type):
            raise RewriteError(self._where() + f"operand {index} of {op.describe()} is "
                               f"{op.operands[index].type}, cannot set it to {value.type}")
        op.set_operand(index, value)
        self.change_count += 1
        self.listener.op_modified(op)

    def replace_body(self, other: Graph) -> None:
        """Make the graph hold ``other``'s inputs, ops, outputs and dims, leaving ``other``
        empty: for a pass that builds its result as a new graph (pp-split's stage) but must
        rewrite the graph object it was given."""
        g = self.graph
        for op in list(g.ops):
            self.listener.op_erased(op)
        g.inputs, g.outputs, g.dims = other.inputs, other.outputs, other.dims
        g.first, g.last, g._num_ops = other.first, other.last, other._num_ops
        for op in g.ops:
            op.graph = g
            self.listener.op_created(op)
        other.inputs, other.outputs, other.dims = [], [], {}
        other.first, other.last, other._num_ops = None, None, 0
        self.change_count += 1

    def retype(self, value: Value, type: TensorType) -> None:
        """Give ``value`` (a graph input, or a result whose op's operands changed) a new
        type; the verifier checks the readers after the pass."""
        if value.type == type:
            return
        value.type = type
        self.change_count += 1
        if value.producer is not None:
            self.listener.op_modified(value.producer)

    def set_attrs(self, op: Op, attrs: dict[str, Any]) -> None:
        """Replace ``op``'s attributes (normalized by the registry), allowing the result types
        to change (callers re-infer them with :meth:`retype`)."""
        from irlm.registry import get_op_def
        try:
            op.attrs = get_op_def(op.name).normalize_attrs(dict(attrs), op.describe())
        except IRLMError as e:
            raise RewriteError(self._where() + str(e)) from None
        self.change_count += 1
        self.listener.op_modified(op)

    def update_attrs(self, op: Op, **attrs: Any) -> None:
        """Change attributes of ``op`` in place; its result types must stay the same."""
        new = make_op(op.name, op.operands, {**op.attrs, **attrs}, op.loc)
        for old_r, new_r in zip(op.results, new.results):
            if not same_type(old_r.type, new_r.type):
                raise RewriteError(self._where() + f"changing {', '.join(attrs)} of "
                                   f"{op.describe()} changes its type to {new_r.type}; create a "
                                   f"new op instead")
        op.attrs = new.attrs
        self.change_count += 1
        self.listener.op_modified(op)

    # ----- weights ------------------------------------------------------------------------
    def derived_param(self, name: str, inputs: Iterable[Union[Value, Op, str]],
                      fn: Callable[..., torch.Tensor], *, type: Optional[TensorType] = None,
                      how: str = "derived") -> Value:
        """A new weight ``name`` = ``fn(*input weights)``, computed lazily on first use, and a
        ``param`` op that reads it.

        ``inputs`` are ``param`` values (or their ops, or weight names).  The new weight's type
        is found by running ``fn`` on meta tensors unless ``type`` is given.  Example (QKV)::

            qkv = rw.derived_param(f"{prefix}.qkv.weight", [wq, wk, wv],
                                   lambda q, k, v: torch.cat([q, k, v]), how="concat")
        """
        store = self.graph.weights
        if store is None:
            raise RewriteError(self._where() + f"cannot create weight '{name}': graph "
                               f"@{self.graph.name} has no weight store")
        names = [self._weight_name(i) for i in inputs]
        if type is None:
            type = _infer_weight_type(fn, [store.type_of(n) for n in names], name)
        source = f"{how}({', '.join(names)})"
        if name in store:
            entry = store.entry(name)
            if entry.source != source or not same_type(entry.type, type):
                raise RewriteError(self._where() + f"weight '{name}' already exists in the store "
                                   f"(from {entry.source}); pick another name")
        else:
            store.add_derived(name, type, names, fn, how)
            self.stats.counters["weights derived"] += 1
        return self.create("param", (), {"name": name, "type": type}).result

    def _weight_name(self, x) -> str:
        if isinstance(x, str):
            return x
        op = x.producer if isinstance(x, Value) else x
        if not isinstance(op, Op) or op.name != "param":
            raise RewriteError(self._where() + f"derived weights are computed from param values "
                               f"or weight names, got {x!r}")
        return op.attrs["name"]

    def _where(self) -> str:
        return f"pattern '{self.pattern_name}': " if self.pattern_name else ""


def _is_in(v: Value, values: list[Value]) -> bool:
    for o in values:
        if o is v:
            return True
    return False


def _infer_weight_type(fn, types: list[TensorType], name: str) -> TensorType:
    metas = [torch.empty([int(d) for d in t.shape], dtype=t.dtype.torch, device="meta")
             for t in types]
    try:
        out = fn(*metas)
    except Exception as e:  # noqa: BLE001 - the function is the caller's
        raise RewriteError(f"cannot infer the type of derived weight '{name}' by running its "
                           f"function on meta tensors ({type(e).__name__}: {e}); pass type=") \
            from None
    return TensorType(tuple(out.shape), DType.from_torch(out.dtype))
