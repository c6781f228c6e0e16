"""``--check-numerics``: run the reference interpreter before and after every pass.

The graph runs on seeded random inputs (floats ~ N(0, 1); integers in ``[0, int_max)``, where
``int_max`` defaults to the smallest table an input indexes, e.g. the vocabulary of an
embedding; symbolic dims take small values inside their declared ranges).  After each pass its
outputs are compared with the input graph's: the first pass whose outputs drift by more than
``atol + rtol * max|reference|`` stops the pipeline, and the error names it together with the
values (matched by name across the pass) that changed most.

Values are matched by name, so every value gets one before the first pass: a graph built in
memory (``irlm compile``'s trace) takes the names it prints with, those of
``OUT/ir/00-frontend.irlm``, and values a pass creates are named ``s<stage>.<n>`` after it.  A
value that survives a pass keeps its name, so the first one that drifts, and the new op that
feeds it, are found at every ``-O`` level.  A pipeline that passes prints one summary line.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import IO, Optional

import sympy
import torch

from irlm.errors import IRLMError
from irlm.interpreter import Interpreter, RunResult
from irlm.ir import Graph, Value
from irlm.types import DType

from .errors import NumericsError
from .instrument import Instrument

#: Default relative tolerance per output dtype (integers and bools must match exactly).
DEFAULT_RTOL = {DType.f32: 1e-4, DType.f16: 2e-3, DType.bf16: 1.6e-2, DType.f8e4m3: 1.3e-1}
DEFAULT_ATOL = 1e-6
DEFAULT_INT_MAX = 16
_INT_RANGE = {DType.i4: 8, DType.i8: 128, DType.u8: 256}


# ----- inputs ----------------------------------------------------------------------------------


def symbol_values(graph: Graph) -> dict[sympy.Symbol, int]:
    """Small, distinct values for the graph's symbolic dims (3, 4, 5, ... clamped to ranges),
    so a pass that confuses two dims shows up as a shape error or a drift."""
    from irlm.types import sym
    names = set(graph.dims)
    for v in graph.inputs:
        names |= v.type.free_symbols()
    out = {}
    for i, name in enumerate(sorted(names)):
        want = 3 + i
        r = graph.dims.get(name)
        if r is not None:
            want = min(max(want, r.min), r.max)
        out[sym(name)] = want
    return out


def index_bound(v: Value) -> Optional[int]:
    """The largest valid index + 1 for an integer input, from the tables it indexes."""
    bounds = []
    for use in v.uses:
        o = use.op
        table = None
        if o.name == "core.embedding" and use.index == 1:
            table = o.operands[0].type.shape[0]
        elif o.name in ("core.index_select", "core.gather") and use.index == 1:
            t = o.operands[0].type
            table = t.shape[o.attrs["dim"] % t.rank]
        if isinstance(table, int):
            bounds.append(table)
    return min(bounds) if bounds else None


def random_input(v: Value, bindings: dict, gen: torch.Generator,
                 int_max: Optional[int] = None) -> torch.Tensor:
    """A seeded random tensor for input ``v``: floats ~ N(0, 1), fair booleans, integers in
    ``[0, int_max)`` (default: the size of the table ``v`` indexes, else 16)."""
    shape = []
    for d in v.type.shape:
        n = d if isinstance(d, int) else d.subs(bindings)
        if not getattr(n, "is_Integer", isinstance(n, int)):
            raise NumericsError(f"--check-numerics: cannot choose a size for dimension {d} of "
                                f"input {v.label()}")
        shape.append(int(n))
    dt = v.type.dtype
    if dt.is_float:
        return torch.randn(shape, generator=gen).to(dt.torch)
    if dt is DType.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    hi = int_max if int_max is not None else (index_bound(v) or DEFAULT_INT_MAX)
    hi = max(1, min(hi, _INT_RANGE.get(dt, hi)))
    return torch.randint(0, hi, shape, generator=gen).to(dt.torch)


#: Functions ``(graph, seed, int_max) -> list of inputs, or None`` tried in order before the
#: generic random inputs, for graphs whose inputs must satisfy relations random tensors break.
INPUT_MAKERS: list = []


def register_input_maker(fn) -> None:
    """Add a maker of valid inputs for some kind of graph (see :data:`INPUT_MAKERS`)."""
    INPUT_MAKERS.append(fn)


def make_inputs(graph: Graph, seed: int = 0, int_max: Optional[int] = None) -> list[torch.Tensor]:
    """Seeded random inputs that respect each input's dtype and valid index range."""
    for maker in INPUT_MAKERS:
        out = maker(graph, seed, int_max)
        if out is not None:
            return out
    gen = torch.Generator().manual_seed(seed)
    bindings = symbol_values(graph)
    return [random_input(v, bindings, gen, int_max) for v in graph.inputs]


# ----- the paged inference form ----------------------------------------------------------------

PAGED_INPUTS = ("q_lens", "cached_lens", "block_tables", "kv_cache")


def paged_inference_inputs(graph: Graph, seed: int, int_max: Optional[int]):
    """Valid inputs for a graph in the paged inference form (irlm/ops/llm.py): two requests,
    one prefilling a chunk after a cached prefix and one decoding a token, with disjoint block
    tables, a random cache, and ``position_ids`` that continue each request's cached prefix."""
    from irlm.types import sym
    by_name = {v.name: v for v in graph.inputs}
    if not all(n in by_name for n in PAGED_INPUTS):
        return None
    q_lens, cached = [3, 1], [2, 5]
    cache_t = by_name["kv_cache"].type
    bs = cache_t.shape[3]
    if not isinstance(bs, int):
        return None
    per_req = max(-(-(c + q) // bs) for c, q in zip(cached, q_lens))
    values = {}  # symbol -> value, for the dims the metadata fixes
    for name, dim_index, n in (("q_lens", 0, len(q_lens)), ("block_tables", 1, per_req),
                               ("kv_cache", 1, len(q_lens) * per_req + 1)):
        d = by_name[name].type.shape[dim_index]
        if not isinstance(d, int):
            if not d.is_Symbol:
                return None
            values[d] = n
    tokens = sum(q_lens)
    for name in ("input_ids", "position_ids"):
        if name in by_name and by_name[name].type.rank >= 1:
            d = by_name[name].type.shape[0]
            if not isinstance(d, int) and d.is_Symbol:
                values[d] = tokens
    for s, n in values.items():
        r = graph.dims.get(s.name)
        if r is not None and not r.min <= n <= r.max:
            return None  # this graph cannot take the standard example: fall back
    bindings = {**symbol_values(graph), **values}
    gen = torch.Generator().manual_seed(seed)
    n_blocks = len(q_lens) * per_req + 1
    order = torch.randperm(n_blocks, generator=gen)[: len(q_lens) * per_req]
    special = {
        "q_lens": torch.tensor(q_lens, dtype=torch.int32),
        "cached_lens": torch.tensor(cached, dtype=torch.int32),
        "block_tables": order.reshape(len(q_lens), per_req).to(torch.int32),
        "position_ids": torch.cat([torch.arange(c, c + q) for c, q in zip(cached, q_lens)]),
    }
    out = []
    for v in graph.inputs:
        x = special.get(v.name)
        if x is None:
            x = random_input(v, bindings, gen, int_max)
        out.append(x.to(v.type.dtype.torch))
    return out


register_input_maker(paged_inference_inputs)


# ----- comparing -------------------------------------------------------------------------------


@dataclass
class Difference:
    max_abs: float        # largest |a - b| (inf where only one side is NaN)
    scale: float          # largest finite |a|: what "relative" is relative to

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else \
            (0.0 if self.max_abs == 0 else float("inf"))


def difference(ref: torch.Tensor, new: torch.Tensor) -> Difference:
    a, b = ref.detach().double(), new.detach().double()
    if a.shape != b.shape:
        return Difference(float("inf"), 0.0)
    if a.numel() == 0:
        return Difference(0.0, 0.0)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    same = (a == b) | (nan_a & nan_b)  # equal infinities and shared NaNs are no difference
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    diff = torch.where(nan_a ^ nan_b, torch.full_like(a, float("inf")), diff)
    finite = a[torch.isfinite(a)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return Difference(float(diff.max()), scale)


def signature(graph: Graph) -> tuple:
    return (tuple((v.name, str(v.type)) for v in graph.inputs),
            tuple(str(v.type) for v in graph.outputs))


# ----- the instrument --------------------------------------------------------------------------


class CheckNumerics(Instrument):
    """Compare every pass's outputs with the input graph's on the same random inputs."""

    def __init__(self, atol: Optional[float] = None, rtol: Optional[float] = None, seed: int = 0,
                 int_max: Optional[int] = None, top: int = 3, stream: Optional[IO[str]] = None):
        self.atol = DEFAULT_ATOL if atol is None else atol
        self.rtol = rtol
        self.seed = seed
        self.int_max = int_max
        self.top = top
        self.stream = stream
        self.baseline: Optional[RunResult] = None    # outputs to compare against
        self.previous: Optional[RunResult] = None    # the last stage's values, for localizing
        self.previous_graph_names: set[str] = set()
        self.inputs: list[torch.Tensor] = []
        self.signature: tuple = ()
        self.checked = 0
        self.disabled = False
        self.rebaselined = 0
        self.worst: Optional[tuple] = None     # (relative to tolerance, stage label, Difference)
        self.new_names: set[str] = set()       # values the last pass created

    def tolerance(self, dtype: DType, scale: float) -> float:
        rtol = self.rtol if self.rtol is not None else DEFAULT_RTOL.get(dtype, 0.0)
        atol = self.atol if (dtype.is_float or self.rtol is not None) else 0.0
        return atol + rtol * scale

    def _run(self, graph: Graph, when: str) -> RunResult:
        try:
            # fresh copies: ops with side effects (the paged KV cache) write into inputs
            return Interpreter(graph).run([x.clone() for x in self.inputs], capture=True)
        except IRLMError as e:
            raise NumericsError(f"--check-numerics: the reference interpreter failed on the "
                                f"graph {when}: {e}") from e

    def _baseline(self, graph: Graph, when: str) -> None:
        self.inputs = make_inputs(graph, self.seed, self.int_max)
        self.signature = signature(graph)
        self.baseline = self.previous = self._run(graph, when)

    def before_pipeline(self, graph, pipeline, stage_offset):
        params = [o for o in graph.params()]
        if params and graph.weights is None:
            raise NumericsError(
                f"--check-numerics: graph @{graph.name} reads {len(params)} weight(s) (e.g. "
                f"'{params[0].attrs['name']}') but has no weight store, so numerics cannot be "
                f"checked; give the weights (irlm opt --weights FILE) or drop --check-numerics")
        name_values(graph)
        self._baseline(graph, "before any pass")

    def after_pass(self, graph, result):
        stage = result.stage
        if self.disabled:
            return
        self.new_names = set(name_values(graph, f"s{stage.index}."))
        if signature(graph) != self.signature:
            self._note(f"numerics: {stage.label} changed the graph's inputs or outputs; later "
                       f"passes are compared with its result")
            self.rebaselined += 1
            try:
                self._baseline(graph, f"after {stage.label}")
            except NumericsError as e:
                # not the pass's fault: random inputs do not suit the new signature
                self.disabled = True
                self._note(f"numerics: cannot run the new graph on random inputs, so later "
                           f"passes are not checked ({e})")
            return
        run = self._run(graph, f"after {stage.label}")
        worst = None
        for i, (v, ref, new) in enumerate(zip(graph.outputs, self.baseline.outputs, run.outputs)):
            d = difference(ref, new)
            tol = self.tolerance(v.type.dtype, d.scale)
            if d.max_abs > tol and (worst is None or d.relative > worst[2].relative):
                worst = (i, v, d, tol)
            share = d.max_abs / tol if tol > 0 else (0.0 if d.max_abs == 0 else float("inf"))
            if self.worst is None or share > self.worst[0]:
                self.worst = (share, stage.label, d)
        self.checked += 1
        if worst is not None:
            raise NumericsError(self._report(graph, stage, worst, run))
        self.previous = run

    def after_pipeline(self, graph, report):
        self._note(self.summary())

    def summary(self) -> str:
        """``numerics: 17 passes checked ... worst drift 3.1e-07 (2% of tolerance) after pass
        'fuse-rope' (stage 12)``: one line for a pipeline that passed."""
        line = f"numerics: {self.checked} pass(es) checked against the reference interpreter " \
               f"(seed {self.seed}), none drifted"
        if self.worst is not None and self.worst[0] > 0:
            share, label, d = self.worst
            line += f"; worst drift {d.max_abs:.3g} ({share:.0%} of its tolerance) after {label}"
        elif self.checked:
            line += "; every output bit-identical"
        if self.rebaselined:
            line += f"; {self.rebaselined} pass(es) changed the graph's signature and became " \
                    f"the new reference"
        if self.disabled:
            line += "; later passes were not checked (see above)"
        return line

    def _report(self, graph: Graph, stage, worst, run: RunResult) -> str:
        i, v, d, tol = worst
        lines = [f"--check-numerics: {stage.label} changed the graph's outputs: output {i} "
                 f"({v.label()}) differs by up to {d.max_abs:.4g} (max |reference| {d.scale:.4g}, "
                 f"tolerance {tol:.3g})"]
        diffs = self._value_differences(graph, run)
        if diffs:
            first = diffs[0]
            lines.append(f"  first value that differs (in graph order): {_describe(first)}")
            made = self._created_inputs(first[1].producer)
            if made:
                lines.append("  it reads what this pass created: "
                             + "; ".join(op.describe() for op in made))
            ranked = sorted(diffs, key=lambda t: (-t[2].relative, t[0]))[: self.top]
            lines.append("  values that differ most (same name and shape before and after):")
            lines += [f"    {_describe(t)}" for t in ranked]
        else:
            lines.append("  no value kept its name across the pass, so none can be compared")
        return "\n".join(lines)

    def _created_inputs(self, op) -> list:
        """The ops this pass created that feed ``op``, looking through other new ops: where a
        drift that first shows in ``op`` comes from when the pass replaced what fed it."""
        out, seen, work = [], set(), [op]
        while work and len(out) < 3:
            for v in work.pop().operands:
                p = v.producer
                if p is None or id(p) in seen or v.name not in self.new_names:
                    continue
                seen.add(id(p))
                out.append(p)
                work.append(p)
        return out

    def _value_differences(self, graph: Graph, run: RunResult):
        """(position, value, Difference) for each value whose name and shape survive the pass
        and whose contents changed, in graph order."""
        out = []
        before = self.previous.captured
        pos = 0
        for o in graph.ops:
            for r in o.results:
                pos += 1
                if r.name is None or r.name not in before or r.name not in run.captured:
                    continue
                a, b = before[r.name], run.captured[r.name]
                if a.shape != b.shape:
                    continue
                d = difference(a, b)
                if d.max_abs > self.tolerance(r.type.dtype, d.scale):
                    out.append((pos, r, d))
        return out

    def _note(self, text: str) -> None:
        (self.stream or sys.stderr).write(text + "\n")


def name_values(graph: Graph, prefix: Optional[str] = None) -> list[str]:
    """Name every unnamed value of ``graph`` (in place) and return the names given.  Without
    ``prefix``: the names the graph prints with (so they match a dump of it); with one:
    ``PREFIX0``, ``PREFIX1``, ... (unused elsewhere in the graph)."""
    unnamed = [v for v in graph.values() if v.name is None]
    if not unnamed:
        return []
    if prefix is None:
        from irlm.text.printer import printed_names
        names = printed_names(graph)
        for v in unnamed:
            v.name = names[v]
        return [v.name for v in unnamed]
    taken = {v.name for v in graph.values()}
    given, n = [], 0
    for v in unnamed:
        while f"{prefix}{n}" in taken:
            n += 1
        v.name = f"{prefix}{n}"
        given.append(v.name)
        n += 1
    return given


def _describe(item) -> str:
    """``core.sub (%d) at model.layers.0: max |diff| 3.8 (relative 2)``."""
    _, v, d = item
    where = v.producer.describe()
    if len(v.producer.results) > 1:
        where = f"{v.label()} of {where}"
    return f"{where}: max |diff| {d.max_abs:.4g} (relative {d.relative:.3g})"
