"""The reference interpreter: runs any graph on the CPU, op by op.

Each op runs its registry reference implementation (torch on the CPU).  Symbolic dims are
bound from the shapes of the inputs and checked against their declared ranges.  Any
intermediate value can be captured by name, which is what accuracy bisection
(``--check-numerics``) builds on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import sympy
import torch

from .errors import IRError, IRLMError
from .ir import Graph, Op, Value
from .registry import get_op_def
from .types import TensorType, format_dim


def compile_dim(d) -> Callable[[Mapping[sympy.Symbol, int]], Any]:
    """A fast evaluator of one (possibly symbolic) dim over ``{Symbol: int}`` bindings: a
    plain lookup or a compiled expression.  sympy's ``subs`` takes 0.1-0.2 ms a call, a
    large share of an eager step's host time over a few hundred reshapes.  It gives a
    number (callers check it is whole); a symbol missing from the bindings raises KeyError."""
    if isinstance(d, int):
        return lambda b, d=d: d
    if isinstance(d, sympy.Symbol):
        return lambda b, d=d: b[d]
    syms = sorted(d.free_symbols, key=lambda s: s.name)
    f = sympy.lambdify(syms, d, modules="math")
    return lambda b: f(*(b[s] for s in syms))


def cached_dim(cache: dict, d) -> Callable[[Mapping[sympy.Symbol, int]], Any]:
    """:func:`compile_dim` of ``d``, compiled once into ``cache``."""
    f = cache.get(d)
    if f is None:
        f = cache[d] = compile_dim(d)
    return f


class RefContext:
    """What a reference implementation may use besides its operands.  ``dims``: a cache of
    compiled dims (:func:`compile_dim`) that outlives one run (the interpreter keeps one per
    graph)."""

    def __init__(self, graph: Graph, weights, bindings: dict[sympy.Symbol, int],
                 state: dict[str, Any], device=None,
                 dims: Optional[dict[Any, Callable]] = None):
        self.graph = graph
        self.device = device  # where ops that create tensors put them (None: the CPU)
        self.weights = weights
        self.bindings = bindings
        self.state = state  # mutable per-run state (e.g. the reference paged KV cache)
        self.op: Optional[Op] = None
        self._dims = {} if dims is None else dims

    def dim(self, d) -> int:
        if isinstance(d, int):
            return d
        try:
            v = cached_dim(self._dims, d)(self.bindings)
        except KeyError:
            raise IRError(f"dimension {format_dim(d)} is not bound by the inputs") from None
        if v != int(v):
            raise IRError(f"dimension {format_dim(d)} is {v} here, not an integer")
        return int(v)

    def load_weight(self, name: str, type: TensorType) -> torch.Tensor:
        if self.weights is None:
            raise IRLMError(f"the graph reads weight '{name}' but no weight store was given")
        return self.weights.get(name)


@dataclass
class RunResult:
    outputs: list[torch.Tensor]
    captured: dict[str, torch.Tensor] = field(default_factory=dict)


class Interpreter:
    """Runs a graph op by op.

    ``overrides`` maps op names to implementations with the reference signature
    ``fn(ctx, args, attrs) -> list[Tensor]``; executors use it to put kernels in place of
    reference implementations while keeping everything else.  ``device`` is where ops that
    create tensors (constants, arange, full) put them."""

    def __init__(self, graph: Graph, weights=None, check_types: bool = True,
                 overrides: Optional[Mapping[str, Any]] = None, device=None):
        self.graph = graph
        self.weights = weights if weights is not None else graph.weights
        self.check_types = check_types
        self.overrides = dict(overrides or {})
        self.device = device
        self._dims: dict[Any, Callable] = {}   # compiled dims, shared by every run

    def bind_inputs(self, inputs: Sequence[torch.Tensor]) -> dict[sympy.Symbol, int]:
        g = self.graph
        if len(inputs) != len(g.inputs):
            raise IRLMError(f"graph @{g.name} takes {len(g.inputs)} inputs, got {len(inputs)}")
        bindings: dict[sympy.Symbol, int] = {}
        pending = []
        for v, x in zip(g.inputs, inputs):
            if not isinstance(x, torch.Tensor):
                raise IRLMError(f"input {v.label()} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != v.type.rank:
                raise IRLMError(f"input {v.label()} has rank {x.dim()}, expected {v.type}")
            want = v.type.dtype.torch
            if x.dtype != want:
                raise IRLMError(f"input {v.label()} has dtype {x.dtype}, expected {v.type}")
            for d, n in zip(v.type.shape, x.shape):
                if isinstance(d, int):
                    if d != n:
                        raise IRLMError(f"input {v.label()} has shape {tuple(x.shape)}, "
                                        f"expected {v.type}")
                elif d.is_Symbol:
                    if d in bindings and bindings[d] != n:
                        raise IRLMError(f"dimension {d} is {bindings[d]} in one input and {n} "
                                        f"in {v.label()}")
                    bindings[d] = int(n)
                else:
                    pending.append((v, d, int(n)))
        for v, d, n in pending:
            try:
                got = cached_dim(self._dims, d)(bindings)
            except KeyError:
                got = d.subs(bindings)      # for the message: what is left unbound
            if got != n:
                raise IRLMError(f"input {v.label()}: dimension {format_dim(d)} should be "
                                f"{got}, got {n}")
        for s, n in bindings.items():
            r = g.dims.get(s.name)
            if r is not None and not (r.min <= n <= r.max):
                raise IRLMError(f"dimension {s.name} = {n} is outside its range "
                                f"[{r.min}, {r.max}]")
        return bindings

    def run(self, inputs: Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]],
            capture: Union[Iterable[str], bool] = (), state: Optional[dict] = None) -> RunResult:
        """Run the graph.  ``capture`` names values to return (True: every value)."""
        g = self.graph
        if isinstance(inputs, Mapping):
            missing = [v.name for v in g.inputs if v.name not in inputs]
            if missing:
                raise IRLMError(f"missing input(s): {', '.join('%' + m for m in missing)}")
            inputs = [inputs[v.name] for v in g.inputs]
        ctx = RefContext(g, self.weights, self.bind_inputs(inputs),
                         state if state is not None else {}, self.device, self._dims)
        env: dict[int, torch.Tensor] = {id(v): x for v, x in zip(g.inputs, inputs)}
        capture_all = capture is True
        wanted = set() if capture_all or capture is False else set(capture)
        captured: dict[str, torch.Tensor] = {}
        for v, x in zip(g.inputs, inputs):
            if capture_all or v.name in wanted:
                captured[v.name] = x
        keep = {id(v) for v in g.outputs}
        last_use = {} if capture_all else self._last_uses()
        for op in g.ops:
            args = [env[id(v)] for v in op.operands]
            ctx.op = op
            impl = self.overrides.get(op.name) or get_op_def(op.name).reference
            try:
                results = impl(ctx, args, op.attrs)
            except IRLMError:
                raise
            except Exception as e:
                raise IRError(f"{op.describe()}: reference implementation failed: "
                              f"{type(e).__name__}: {e}") from e
            if len(results) != len(op.results):
                raise IRError(f"{op.describe()}: reference returned {len(results)} results")
            for r, x in zip(op.results, results):
                if self.check_types:
                    self._check(op, r, x, ctx)
                env[id(r)] = x
                if capture_all or r.name in wanted:
                    captured[r.name] = x
            if not capture_all:
                for v in op.operands:
                    if last_use.get(id(v)) is op and id(v) not in keep:
                        env.pop(id(v), None)
        missing = wanted - set(captured)
        if missing:
            raise IRLMError(f"no value named {', '.join('%' + m for m in sorted(missing))}")
        return RunResult([env[id(v)] for v in g.outputs], captured)

    def _last_uses(self) -> dict[int, Op]:
        out: dict[int, Op] = {}
        for op in self.graph.ops:
            for v in op.operands:
                out[id(v)] = op
        return out

    def _check(self, op: Op, r: Value, x: torch.Tensor, ctx: RefContext) -> None:
        want = tuple(ctx.dim(d) for d in r.type.shape)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != want or \
                x.dtype != r.type.dtype.torch:
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x)
            raise IRError(f"{op.describe()}: reference produced {got} for {r.label()}, "
                          f"but its type is {r.type} = {want}")


def run_graph(graph: Graph, inputs, weights=None, capture=()) -> RunResult:
    return Interpreter(graph, weights).run(inputs, capture)
