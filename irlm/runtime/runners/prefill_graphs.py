"""Steps with prompt tokens as piecewise CUDA graphs: the token-wise ops captured, attention eager.

A prefill step of an 8B model launches ~800 kernels from the interpreter's Python loop; below a
few hundred tokens the host takes longer to issue them than the GPU to run them (128 tokens,
H200: 52 ms wall against ~6-10 ms of kernels, benchmarks/gpu_decode.py --sections prefill), and
that host time is the TTFT of a short prompt.  Decode steps avoid it with whole-step graphs;
prompt steps cannot, since the attention's work depends on each request's lengths.

So a step of T prompt (and decode) tokens is padded to a token bucket Tb, and the graph is cut
at the ops that mix tokens (paged attention, the last-token gather, sorts and reductions along
the tokens axis: :func:`mixes_tokens`).  Every stretch between them computes each token's row
from that token's rows alone (linears, norms, rotary, activations, views), so it is captured
once per bucket and replayed: the padding rows compute garbage that no real row reads.  The
cut ops run eagerly on the first T rows with the step's real lengths, exactly as an eager step
runs them, and their results are copied into the static buffers the next stretch reads.
The host then spends one replay per stretch and one eager call per attention.

Every value that crosses a cut has the tokens as its outermost axis, after axes of size 1 only,
so that the first T tokens are a prefix of it (checked when the plan is built; a graph where
that does not hold keeps eager prompt steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import sympy
import torch

from irlm.interpreter import RefContext, cached_dim
from irlm.ir import Graph, Op, Value
from irlm.registry import VIEW, get_op_def

#: token buckets a prompt step is padded to (at most 2x padding); larger steps run eagerly,
#: where the kernels outlast the host's launches anyway
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)

#: ops whose result rows depend on other tokens' rows (or on the step's request layout)
TOKEN_MIXING = frozenset({
    "llm.paged_attention", "llm.rope_paged_attention", "llm.last_tokens", "core.scaled_dot_product_attention",
    "core.triu", "core.tril", "core.histc", "core.scatter", "dist.send", "dist.recv"})


def mixes_tokens(op: Op, tok: sympy.Symbol) -> bool:
    """Whether ``op`` may compute a token's row from other tokens' rows: a TOKEN_MIXING op, a
    non-view op that reduces, sorts, gathers, slices, splits or concatenates along an axis
    whose size involves ``tok``, or a matrix product that contracts over one."""
    if op.name in TOKEN_MIXING:
        return True
    d = get_op_def(op.name)
    if d.has_trait(VIEW) and op.name != "core.slice":
        return False
    if not op.operands:
        return False

    def tokenish(dim) -> bool:
        return not isinstance(dim, int) and tok in dim.free_symbols

    shapes = [v.type.shape for v in op.operands if v.type is not None]
    if op.name in ("core.matmul", "core.bmm"):
        return tokenish(shapes[0][-1]) or (len(shapes) > 1 and tokenish(shapes[1][-2]))
    if op.name == "core.linear":
        return tokenish(shapes[0][-1])
    x = shapes[0]
    axes = []
    if "dim" in op.attrs:
        axes = [op.attrs["dim"]]
    elif "axis" in op.attrs:                # dist.all_gather
        axes = [op.attrs["axis"]]
    elif "dims" in op.attrs:
        axes = list(op.attrs["dims"]) or list(range(len(x)))   # () reduces every axis
    return any(tokenish(x[a]) for a in axes if -len(x) <= a < len(x))


@dataclass
class _Segment:
    graph: bool                     # captured (token-wise ops) or eager (token-mixing ops)
    ops: list[Op]
    index: int = -1                 # the captured graph's index in a bucket's list
    #: eager: ids of values whose last eager use is this op, to drop after it
    drops: list[list[int]] = field(default_factory=list)


class PiecewisePrefill:
    """The piecewise graphs of one :class:`~irlm.runtime.runners.cuda_graphs.CudaGraphRunner`.
    ``why`` says why the graph cannot be cut this way (then ``max_tokens`` is 0 and every
    prompt step runs op by op); None when it can."""

    def __init__(self, runner, buckets=PREFILL_BUCKETS):
        self.runner = runner
        g: Graph = runner.graph
        self.graph = g
        self.why: Optional[str] = None
        self.segments: list[_Segment] = []
        self._entries: dict[int, dict] = {}
        self._pool = None
        self._dims: dict = {}                   # compiled dims (interpreter.cached_dim)
        self._values: Optional[dict] = None     # value id -> Value, for static_bytes
        max_tokens = runner.max_num_tokens or buckets[-1]
        self.buckets = tuple(b for b in buckets if b <= max_tokens)
        names = [v.name for v in g.inputs]
        ids = g.inputs[names.index("input_ids")].type.shape[0]
        if not isinstance(ids, sympy.Symbol) or not self.buckets:
            self.why = "the token count is not a symbolic dim"
            return
        self.tok = ids
        self._plan()

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1] if self.buckets and self.why is None else 0

    # ----- the cut, once per graph -------------------------------------------------------------
    def _plan(self) -> None:
        g, tok = self.graph, self.tok

        def tok_only(v: Value) -> bool:
            return all(isinstance(d, int) or d.free_symbols <= {tok} for d in v.type.shape)

        producer: dict[int, int] = {}          # value id -> index of its segment (-1: input)
        for v in g.inputs:
            producer[id(v)] = -1
        segs: list[_Segment] = []
        for op in g.ops:
            eager = mixes_tokens(op, tok) or not all(
                tok_only(v) for v in list(op.operands) + list(op.results))
            if not segs or segs[-1].graph == eager:
                segs.append(_Segment(graph=not eager, ops=[]))
            segs[-1].ops.append(op)
            for r in op.results:
                producer[id(r)] = len(segs) - 1
        # values read outside the segment that made them: cut-crossing values
        self.exports: set[int] = set()          # made by a captured segment, read elsewhere
        self.imports: set[int] = set()          # made eagerly (or inputs), read by a capture
        crossing: list[Value] = []
        for i, s in enumerate(segs):
            for op in s.ops:
                for v in op.operands:
                    p = producer[id(v)]
                    if p == i:
                        continue
                    if p >= 0 and segs[p].graph and id(v) not in self.exports:
                        self.exports.add(id(v))
                        crossing.append(v)
                    if s.graph and (p < 0 or not segs[p].graph) and id(v) not in self.imports:
                        self.imports.add(id(v))
                        crossing.append(v)
        for v in g.outputs:
            p = producer[id(v)]
            if p >= 0 and segs[p].graph and id(v) not in self.exports:
                self.exports.add(id(v))
                crossing.append(v)
        #: value id -> (its tokens axis, that axis' dim): the first axis whose size involves
        #: the tokens, after axes of size 1 only (so the first T tokens are a prefix of it)
        self.rows: dict[int, tuple[int, object]] = {}
        for v in crossing:
            shape = v.type.shape
            axes = [i for i, d in enumerate(shape)
                    if not isinstance(d, int) and tok in d.free_symbols]
            if not axes:
                continue                        # not per token (a weight, a constant)
            if len(axes) > 1 or any(d != 1 for d in shape[:axes[0]]):
                self.why = f"{v.label()} crosses a cut with tokens not its outermost axis"
                return
            self.rows[id(v)] = (axes[0], shape[axes[0]])
        if not any(s.graph for s in segs):
            self.why = "no token-wise ops to capture"
            return
        n = 0
        last_eager_use: dict[int, tuple[int, int]] = {}
        for si, s in enumerate(segs):
            if s.graph:
                s.index, n = n, n + 1
            else:
                for oi, op in enumerate(s.ops):
                    for v in op.operands:
                        last_eager_use[id(v)] = (si, oi)
        keep = {id(v) for v in g.outputs}
        for si, s in enumerate(segs):
            if not s.graph:
                s.drops = [[] for _ in s.ops]
        for vid, (si, oi) in last_eager_use.items():
            if vid not in keep:
                segs[si].drops[oi].append(vid)
        self.segments = segs
        self._input_rows = [i for i, v in enumerate(g.inputs) if id(v) in self.imports]

    def static_bytes(self, tokens: int) -> int:
        """Bytes the static buffers of one bucket of ``tokens`` hold (values that cross a cut;
        a capture's temporaries come on top), for sizing the KV pool."""
        if self.why is not None:
            return 0
        b = {self.tok: tokens}
        total = 0
        if self._values is None:
            self._values = {id(v): v for op in self.graph.ops for v in op.results}
            self._values.update({id(v): v for v in self.graph.inputs})
        for vid in self.exports | self.imports:
            v = self._values[vid]
            if vid not in self.rows:
                continue
            n = 1
            for d in v.type.shape:
                n *= int(cached_dim(self._dims, d)(b))
            total += n * v.type.dtype.torch.itemsize
        return total

    def bucket(self, tokens: int) -> Optional[int]:
        if self.why is not None:
            return None
        return next((b for b in self.buckets if b >= tokens), None)

    # ----- one step ----------------------------------------------------------------------------
    def run(self, feeds: list, state: dict, tokens: int) -> torch.Tensor:
        """The graph's output for a step of ``tokens`` tokens (feeds: the graph's inputs in
        order, the step's real tensors on the device)."""
        tb = self.bucket(tokens)
        entry = self._entries.get(tb) or self._capture(tb)
        statics = entry["statics"]
        interp = self.runner._interp
        g = self.graph
        ctx = RefContext(g, interp.weights, interp.bind_inputs(feeds), state, interp.device,
                         interp._dims)
        env = {id(v): x for v, x in zip(g.inputs, feeds)}
        b = ctx.bindings
        rows = {vid: (a, int(cached_dim(self._dims, d)(b))) for vid, (a, d) in self.rows.items()}
        for i in self._input_rows:             # inputs a capture reads (ids, positions)
            vid = id(g.inputs[i])
            s = statics[vid]
            an = rows.get(vid)
            if an is None:
                s.copy_(feeds[i], non_blocking=True)
                continue
            a, n = an
            s.narrow(a, 0, n).copy_(feeds[i], non_blocking=True)
            s.narrow(a, n, s.shape[a] - n).zero_()      # padding: token 0 at position 0
        graphs = entry["graphs"]
        overrides = interp.overrides
        for seg in self.segments:
            if seg.graph:
                graphs[seg.index].replay()
                continue
            for op, drops in zip(seg.ops, seg.drops):
                args = []
                for v in op.operands:
                    x = env.get(id(v))
                    if x is None:
                        x = statics[id(v)]
                        an = rows.get(id(v))
                        if an is not None:
                            x = x.narrow(an[0], 0, an[1])
                    args.append(x)
                ctx.op = op
                impl = overrides.get(op.name) or get_op_def(op.name).reference
                for r, x in zip(op.results, impl(ctx, args, op.attrs)):
                    env[id(r)] = x
                    s = statics.get(id(r))
                    if s is not None:               # read by a later capture
                        an = rows.get(id(r))
                        (s.narrow(an[0], 0, an[1]) if an else s).copy_(x)
                for vid in drops:
                    env.pop(vid, None)
        out = []
        for v in g.outputs:
            x = env.get(id(v))
            if x is None:                           # made by a capture: the caller's copy
                x = statics[id(v)]
                an = rows.get(id(v))
                x = (x.narrow(an[0], 0, an[1]) if an else x).clone()
            out.append(x)
        self.runner.stats["prefill_replays"] += 1
        return out[0]

    def _capture(self, tb: int) -> dict:
        """Capture bucket ``tb``'s graphs: one prompt of ``tb`` tokens whose keys and values go
        to the scratch block, run once eagerly first (kernel compiles, library handles)."""
        from irlm.kernels.ops import FreshSuffix
        from .cuda_graphs import _cu
        r = self.runner
        dev, g = r.device, self.graph
        ids = torch.zeros(tb, dtype=torch.int64, device=dev)
        pos = torch.zeros(tb, dtype=torch.int64, device=dev)     # within any rotary table
        q_lens = torch.full((1,), tb, dtype=torch.int32, device=dev)
        cached = torch.zeros(1, dtype=torch.int32, device=dev)
        tables = torch.full((1, -(-tb // r.block_size)), r._scratch, dtype=torch.int32,
                            device=dev)
        feeds = r._feeds(ids, pos, q_lens, cached, tables)
        state = {"decode": False, "fresh": FreshSuffix.of([tb], [0]), "max_q_len": tb,
                 "max_kv_len": tb, "cu_q_lens": _cu(q_lens)}
        interp = r._interp
        self._warm_up(feeds, state)
        ctx = RefContext(g, interp.weights, interp.bind_inputs(feeds), state, dev, interp._dims)
        statics: dict[int, torch.Tensor] = {}
        for i in self._input_rows:
            statics[id(g.inputs[i])] = feeds[i].clone()
        env = {id(v): x for v, x in zip(g.inputs, feeds)}
        graphs = []
        overrides = interp.overrides

        def call(op, args):
            ctx.op = op
            impl = overrides.get(op.name) or get_op_def(op.name).reference
            return impl(ctx, args, op.attrs)

        for seg in self.segments:
            if seg.graph:
                def body(seg=seg):
                    local: dict[int, torch.Tensor] = {}
                    for op in seg.ops:
                        args = [local[id(v)] if id(v) in local else statics[id(v)]
                                for v in op.operands]
                        for res, x in zip(op.results, call(op, args)):
                            local[id(res)] = x
                    return {vid: x for vid, x in local.items() if vid in self.exports}
                replayable, made = self._record(body)
                statics.update(made)            # the temporaries went back to the pool
                graphs.append(replayable)
                continue
            for op in seg.ops:
                args = [env[id(v)] if id(v) in env else statics[id(v)] for v in op.operands]
                for res, x in zip(op.results, call(op, args)):
                    env[id(res)] = x
                    if id(res) in self.imports:
                        statics[id(res)] = x.clone()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        entry = {"graphs": graphs, "statics": statics}
        self._entries[tb] = entry
        r.stats["prefill_captures"] += 1
        return entry

    def _warm_up(self, feeds: list, state: dict) -> None:
        """One eager run of the capture's step, on a side stream, before any capture: kernels
        compile, libraries make their handles, load-time tactics time their candidates."""
        dev = self.runner.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self.runner._interp.run(feeds, state=state)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)

    def _record(self, body):
        """Capture ``body()`` (which runs one segment's ops and returns the values it exports)
        as a CUDA graph; returns (the graph, those values, now static)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        cg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cg, pool=self._pool):
            made = body()
        return cg, made

    @property
    def captured(self) -> bool:
        """Whether any bucket's graphs are captured (and hold memory)."""
        return bool(self._entries)

    def release(self) -> None:
        self._entries.clear()
        self._pool = None
