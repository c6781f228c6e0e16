"""tp-split: tensor-parallel splitting of the paged inference form into per-rank graphs.

The plan is derived from dataflow that the pass proves, never from names (docs/parallelism.md):

* **attention** (per ``llm.paged_attention``): the query, key and value operands must each come,
  through only ``core.reshape`` / ``core.transpose`` / ``llm.rope`` (x operand, cos/sin of size
  1 on the heads dim), from results 0, 1, 2 of one ``core.split`` of one ``core.linear`` with a
  ``param`` weight (and optionally a ``param`` bias): the fused QKV projection.  It becomes
  column-parallel: rank r keeps query heads ``[r*H/N, (r+1)*H/N)`` and the kv heads they read.
  With KV >= N, kv heads are split the same way (KV % N == 0); with KV < N (N % KV == 0) each
  rank keeps the one kv head its query heads share, so a kv head is *replicated* on N/KV ranks.
  The KV cache input then holds the rank's kv heads only.  Every use of the sharded values is
  followed; one that is not a reshape (mapped dim for dim), transpose, rope or the attention
  is refused.
* **O projection**: the attention output, through reshapes/transposes, must reach a
  ``core.linear`` as its input's last dim: it becomes row-parallel (the rank's input columns of
  the weight) followed by ``dist.all_reduce``.  A row-parallel linear's ``param`` bias is taken
  off the linear and added once after the reduction (in the partial sums it would count N
  times).
* **gated MLP** (per ``llm.gated_act``): its input must be a one-use ``core.linear`` with a
  ``param`` weight (the fused gate|up projection).  Column-parallel with each half split the
  same way: rank r keeps gate rows ``[r*I/N, (r+1)*I/N)`` and the same up rows, so
  ``gated_act`` pairs the right halves.  Its output reaches the down projection: row-parallel
  + ``dist.all_reduce``.
* **non-gated MLP** (OPT, GPT-2): fc1 is an ``llm.linear_act``, or a ``core.linear`` whose one
  use is an activation; column-parallel (rows and bias sliced alike), fc2 row-parallel.
  GPT-2's Conv1D (``matmul`` by a ``[in, out]`` param + bias add) is first rewritten into
  ``core.linear`` over a transposed derived weight; OPT's query scaling by a constant (an
  elementwise op whose other operand has every dim 1) is followed like a reshape.
* **LM head**: a graph output produced by a ``core.linear`` with a ``param`` weight of vocab V:
  column-parallel (V/N rows per rank) + ``dist.all_gather`` of the logits along the last axis.
  When V % N != 0 it stays replicated.
* **token embedding**: a ``core.embedding`` over a ``param`` table whose ids are graph input 0
  (the token ids): vocab-parallel when V % N == 0, the same rows as the LM head's shard (a tied
  table is one shard).  A masked local lookup + ``dist.all_reduce`` completes it.

Everything else (norms, residual adds, rotary tables) is replicated: every rank computes it on
the same (all-reduced) values.  Weight shards are derived weights, sliced lazily from the
stored tensors; their names say the slice (``...weight#tp2.r0[q0:2,k0:1,v0:1]``) and each
collective's ``plan`` attribute names the projection it completes, so the dump shows the plan.

Pipeline stages: :func:`split_for_pipeline` cuts the same form into equal groups of layers joined
by ``dist.send``/``dist.recv`` (see its doc); the registered pass ``pp-split{stages,stage}``
makes one stage's graph.

Refused with an :class:`~irlm.errors.IRError` naming the op: heads or intermediate size not
divisible by N, a KV head count that neither divides nor is divided by N, an attention or
gated MLP whose dataflow does not match, a row-parallel projection whose bias is not a 1-D
weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from irlm.builder import Builder, infer_types
from irlm.errors import IRError
from irlm.ir import Graph, Op, Value
from irlm.ops.llm import KV_CACHE_AXIS
from irlm.registry import ACTIVATION, CONSTANT_LIKE, get_op_def, ops_with_trait

from ..rewriting.rewriter import Rewriter
from irlm.types import TensorType, dim_product, dims_equal


class TPSplitError(IRError):
    """tp-split cannot prove a split of this graph."""


def _err(op: Optional[Op], why: str) -> TPSplitError:
    where = f"{op.describe()}: " if op is not None else ""
    return TPSplitError(f"tp-split: {where}{why}")


@dataclass
class _Shard:
    """A weight operand to replace with a derived slice of the stored weight."""
    op: Op
    index: int
    new_name: str
    shape: tuple
    fn: Callable[[torch.Tensor], torch.Tensor]
    how: str


@dataclass
class _Plan:
    size: int
    rank: int
    shards: list[_Shard] = field(default_factory=list)
    attrs: list[tuple[Op, dict]] = field(default_factory=list)
    collectives: list[tuple[Op, str, dict]] = field(default_factory=list)  # after op: kind, attrs
    kv_cache: Optional[Value] = None
    kv_heads_local: Optional[int] = None
    seen: set = field(default_factory=set)  # ids of ops already planned
    # row-parallel linears with a bias: the bias moves after the all_reduce, or the sum
    # would hold it N times
    biases: dict = field(default_factory=dict)
    # vocab-parallel token embeddings: (core.embedding op, first row, rows on this rank,
    # the unsplit table's name)
    embeddings: list = field(default_factory=list)


def _static(d, op, what) -> int:
    if not isinstance(d, int):
        raise _err(op, f"{what} is not static ({d})")
    return d


def _param_name(v: Value, op: Op, what: str) -> str:
    p = v.producer
    if p is None or p.name != "param":
        raise _err(op, f"the {what} is not a weight (param); cannot shard it")
    return p.attrs["name"]


def _shard_tag(size, rank, spec):
    return f"#tp{size}.r{rank}[{spec}]"


def _rows(w, ranges):
    return torch.cat([w[a:b] for a, b in ranges], 0).contiguous()


def _add_row_shard(plan: _Plan, op: Op, index: int, ranges: list[tuple[int, int]], spec: str,
                   graph: Graph) -> None:
    name = _param_name(op.operands[index], op, "weight" if index == 1 else "bias")
    t = graph.weights.type_of(name)
    rows = sum(b - a for a, b in ranges)
    plan.shards.append(_Shard(op, index, name + _shard_tag(plan.size, plan.rank, spec),
                              (rows,) + tuple(t.shape[1:]),
                              lambda w, r=tuple(ranges): _rows(w, r), f"rows{list(ranges)}"))


def _add_col_shard(plan: _Plan, op: Op, a: int, b: int, graph: Graph) -> None:
    name = _param_name(op.operands[1], op, "weight")
    t = graph.weights.type_of(name)
    plan.shards.append(_Shard(op, 1, name + _shard_tag(plan.size, plan.rank, f"cols{a}:{b}"),
                              (t.shape[0], b - a),
                              lambda w, a=a, b=b: w[:, a:b].contiguous(), f"cols[{a}:{b}]"))


# ----- following a sharded value ---------------------------------------------------------------

def _map_reshape(op: Op, in_shape, dim: int, f: int):
    """The output dim of ``op`` (a reshape) that carries input dim ``dim`` split in f
    contiguous chunks, and the reshape's new target shape; None if it cannot be proven."""
    out_shape = list(op.results[0].type.shape)
    prefix = dim_product(list(in_shape[:dim]))
    for j in range(len(out_shape)):
        if dims_equal(dim_product(out_shape[:j]), prefix) and isinstance(out_shape[j], int) \
                and out_shape[j] % f == 0 and out_shape[j] >= f:
            new = list(out_shape)
            new[j] = out_shape[j] // f
            return j, new
    return None


_SCALAR_ARITH = ("core.mul", "core.div", "core.add", "core.sub")


def _is_scalar_operand(op: Op, index: int, v: Value) -> bool:
    """Whether ``v`` (operand ``index`` of an elementwise op) meets a scalar-like other
    operand: every dim 1 (OPT scales the query by a constant), so the op acts the same on
    each shard and keeps ``v``'s rank.  A sharded divisor or subtrahend is not accepted."""
    if len(op.operands) != 2 or (index == 1 and op.name in ("core.div", "core.sub")):
        return False
    other = op.operands[1 - index]
    t = other.type
    return t.rank <= v.type.rank and all(isinstance(d, int) and d == 1 for d in t.shape)


def _follow(plan: _Plan, v: Value, dim: int, f: int, terminal: Callable[[Op, int, int], bool],
            what: str) -> None:
    """Plan the retyping of every use of ``v`` (sharded along ``dim`` in f chunks) until each
    path reaches an op that ``terminal(op, operand_index, dim)`` accepts."""
    g = v.producer.graph if v.producer is not None else None
    if g is not None and any(o is v for o in g.outputs):
        raise _err(v.producer, f"the sharded {what} is a graph output")
    for use in list(v.uses):
        op = use.op
        if terminal(op, use.index, dim):
            continue
        if op.name == "core.reshape":
            m = _map_reshape(op, v.type.shape, dim, f)
            if m is None:
                raise _err(op, f"cannot prove which dim of this reshape carries the {what} "
                               f"split {f} ways (dim {dim} of {v.type})")
            j, new = m
            plan.attrs.append((op, {"shape": tuple(new)}))
            _follow(plan, op.results[0], j, f, terminal, what)
        elif op.name == "core.transpose":
            r = v.type.rank
            d0, d1 = op.attrs["dim0"] % r, op.attrs["dim1"] % r
            nd = d1 if dim == d0 else d0 if dim == d1 else dim
            _follow(plan, op.results[0], nd, f, terminal, what)
        elif op.name in _SCALAR_ARITH and _is_scalar_operand(op, use.index, v):
            _follow(plan, op.results[0], dim, f, terminal, what)
        elif op.name == "llm.rope" and use.index == 0:
            cos = op.operands[1].type
            k = dim - (v.type.rank - cos.rank)
            if k >= 0 and not (isinstance(cos.shape[k], int) and cos.shape[k] == 1):
                raise _err(op, f"cos/sin vary along the split dim of the {what}")
            if dim == v.type.rank - 1:
                raise _err(op, f"the {what} is split along the rotary dim")
            _follow(plan, op.results[0], dim, f, terminal, what)
        else:
            raise _err(op, f"unrecognized use of the {what} (split {f} ways along dim {dim} "
                           f"of {v.type}); tp-split only follows reshape, transpose, rope and "
                           f"arithmetic with a scalar")


def _row_parallel(plan: _Plan, graph: Graph, what: str, global_in: int):
    """A terminal that accepts a core.linear reading the sharded value as its input's last
    dim: slice the weight's input columns, all-reduce the output."""
    n, r = plan.size, plan.rank

    def terminal(op: Op, index: int, dim: int) -> bool:
        if op.name != "core.linear" or index != 0:
            return False
        x = op.operands[0]
        if dim != x.type.rank - 1:
            raise _err(op, f"reads the {what} split along dim {dim}, not its input features")
        bias = op.operands[2] if len(op.operands) > 2 else None
        if bias is not None:
            _param_name(bias, op, "bias")
            if bias.type.rank != 1:
                raise _err(op, f"the bias {bias.type} of a row-parallel projection is not 1-D")
        w = graph.weights.type_of(_param_name(op.operands[1], op, "weight"))
        if w.shape[1] != global_in:
            raise _err(op, f"weight {w} does not read {global_in} input features")
        if id(op) in plan.seen:
            raise _err(op, "reached twice")
        plan.seen.add(id(op))
        loc = op.loc.module or op.results[0].name or "?"
        step = global_in // n
        _add_col_shard(plan, op, r * step, (r + 1) * step, graph)
        plan.collectives.append((op, "dist.all_reduce", {
            "group_size": n, "op": "sum",
            "plan": f"row-parallel {loc}: in-features {r * step}:{(r + 1) * step} of "
                    f"{global_in} on rank {r}, partial sums added over {n} ranks"
                    + (", then the bias (replicated)" if bias is not None else "")}))
        if bias is not None:
            plan.biases[id(op)] = bias
        return True
    return terminal


# ----- attention -------------------------------------------------------------------------------

_CHAIN = ("core.reshape", "core.transpose", "llm.rope")


def _source(v: Value) -> Value:
    while v.producer is not None:
        p = v.producer
        if p.name in _CHAIN or (p.name in _SCALAR_ARITH and _is_scalar_operand(p, 0, p.operands[0])):
            v = p.operands[0]
        else:
            return v
    return v


def _plan_attention(plan: _Plan, graph: Graph, att: Op) -> None:
    n, r = plan.size, plan.rank
    q, k, v, cache = att.operands[:4]
    H = _static(q.type.shape[1], att, "the query head count")
    KV = _static(k.type.shape[1], att, "the kv head count")
    d = _static(q.type.shape[2], att, "the head size")
    dv = _static(v.type.shape[2], att, "the value head size")
    if H % n:
        raise _err(att, f"{H} query heads are not divisible by tp size {n}")
    if KV % n == 0:
        kvl, ks = KV // n, r * (KV // n)
    elif n % KV == 0:
        kvl, ks = 1, r // (n // KV)   # kv head replicated on n/KV ranks
    else:
        raise _err(att, f"{KV} kv heads neither divide nor are divisible by tp size {n}")
    hl, qs = H // n, r * (H // n)
    srcs = [_source(x) for x in (q, k, v)]
    split = srcs[0].producer
    if split is None or split.name != "core.split" or \
            [s.producer for s in srcs] != [split] * 3 or \
            [s.result_index for s in srcs] != [0, 1, 2]:
        raise _err(att, "query, key and value do not come from results 0, 1, 2 of one "
                        "core.split of a fused QKV projection (through reshape/transpose/rope/"
                        "scalar arithmetic)")
    x = split.operands[0]
    if split.attrs["dim"] % x.type.rank != x.type.rank - 1:
        raise _err(split, "the QKV split is not along the features")
    # GPT-2 reshapes the projection's output ([tokens, 3h] -> [1, tokens, 3h]) before the
    # split: a one-use reshape that keeps the feature dim is followed back.
    reshapes = []
    while x.producer is not None and x.producer.name == "core.reshape" and len(x.uses) == 1 \
            and x.producer.operands[0].type.shape[-1:] == x.type.shape[-1:]:
        reshapes.append(x.producer)
        x = x.producer.operands[0]
    lin = x.producer
    if lin is None or lin.name != "core.linear" or len(x.uses) != 1:
        raise _err(split, "the split input is not a one-use core.linear (fused QKV projection)")
    sizes = [_static(s, split, "a split size") for s in split.attrs["sizes"]]
    if sizes != [H * d, KV * d, KV * dv]:
        raise _err(split, f"split sizes {sizes} are not [heads*head_dim, kv_heads*head_dim, "
                          f"kv_heads*head_dim] = {[H * d, KV * d, KV * dv]}")
    if plan.kv_cache is None:
        plan.kv_cache, plan.kv_heads_local = cache, kvl
    elif cache is not plan.kv_cache or kvl != plan.kv_heads_local:
        raise _err(att, "layers use different KV caches or kv head counts")
    if cache.producer is not None:
        raise _err(att, "the KV cache is not a graph input")

    ranges = [(qs * d, (qs + hl) * d), (H * d + ks * d, H * d + (ks + kvl) * d),
              (H * d + KV * d + ks * dv, H * d + KV * d + (ks + kvl) * dv)]
    spec = f"q{qs}:{qs + hl},k{ks}:{ks + kvl},v{ks}:{ks + kvl}"
    _add_row_shard(plan, lin, 1, ranges, spec, graph)
    if len(lin.operands) > 2:
        _add_row_shard(plan, lin, 2, ranges, spec, graph)
    plan.attrs.append((split, {"sizes": (hl * d, kvl * d, kvl * dv)}))
    for rs in reshapes:
        shape = list(rs.attrs["shape"])
        shape[-1] = hl * d + kvl * d + kvl * dv
        plan.attrs.append((rs, {"shape": tuple(shape)}))
    if att.attrs.get("alibi_slopes"):
        plan.attrs.append((att, {"alibi_slopes": tuple(att.attrs["alibi_slopes"][qs:qs + hl])}))
    if id(att) in plan.seen:
        raise _err(att, "planned twice")
    plan.seen.add(id(att))

    for i, (val, f, what) in enumerate(((split.results[0], n, "query heads"),
                                        (split.results[1], KV // kvl, "key heads"),
                                        (split.results[2], KV // kvl, "value heads"))):
        def at_attention(op, index, dim, i=i, f=f):
            if op is not att:
                return False
            if index != i or dim != 1:
                raise _err(op, f"operand {index} is reached from QKV part {i} along dim {dim}")
            return True
        if f > 1:
            _follow(plan, val, split.attrs["dim"] % split.operands[0].type.rank, f, at_attention,
                    what)
    # The attention output [tokens, H, dv] holds the rank's heads: on to the O projection.
    _follow(plan, att.results[0], 1, n, _row_parallel(plan, graph, "attention heads", H * dv),
            "attention output")


# ----- gated MLP -------------------------------------------------------------------------------

def _plan_gated_mlp(plan: _Plan, graph: Graph, act: Op) -> None:
    n, r = plan.size, plan.rank
    x = act.operands[0]
    lin = x.producer
    if lin is None or lin.name != "core.linear" or len(x.uses) != 1:
        raise _err(act, "its input is not a one-use core.linear (fused gate|up projection)")
    two_i = _static(x.type.shape[-1], act, "the gate|up width")
    inter = two_i // 2
    if inter % n:
        raise _err(act, f"intermediate size {inter} is not divisible by tp size {n}")
    il = inter // n
    ranges = [(r * il, (r + 1) * il), (inter + r * il, inter + (r + 1) * il)]
    spec = f"gate{r * il}:{(r + 1) * il},up{r * il}:{(r + 1) * il}"
    _add_row_shard(plan, lin, 1, ranges, spec, graph)
    if len(lin.operands) > 2:
        _add_row_shard(plan, lin, 2, ranges, spec, graph)
    _follow(plan, act.results[0], act.results[0].type.rank - 1, n,
            _row_parallel(plan, graph, "gated MLP intermediate", inter), "gated MLP output")


# ----- non-gated MLP (GPT-2, OPT) ---------------------------------------------------------------

#: where llm.paged_attention reads the KV cache
_CACHE = get_op_def("llm.paged_attention").operand_index("kv_cache")
ACTIVATIONS = ops_with_trait(ACTIVATION)


def _plan_mlp(plan: _Plan, graph: Graph, fc1: Op, out: Value, what: str) -> None:
    """fc1 (``llm.linear_act``, or a ``core.linear`` whose ``out`` is its activation) becomes
    column-parallel, rows and bias sliced alike; ``out`` reaches fc2, row-parallel."""
    n, r = plan.size, plan.rank
    inter = _static(fc1.results[0].type.shape[-1], fc1, "the intermediate size")
    if inter % n:
        raise _err(fc1, f"intermediate size {inter} is not divisible by tp size {n}")
    il = inter // n
    spec = f"rows{r * il}:{(r + 1) * il}"
    _add_row_shard(plan, fc1, 1, [(r * il, (r + 1) * il)], spec, graph)
    if len(fc1.operands) > 2:
        _add_row_shard(plan, fc1, 2, [(r * il, (r + 1) * il)], spec, graph)
    plan.seen.add(id(fc1))
    _follow(plan, out, out.type.rank - 1, n, _row_parallel(plan, graph, what, inter),
            f"{what} output")


def _unfused_mlp_candidates(graph: Graph, plan: _Plan) -> list[tuple[Op, Value]]:
    """``core.linear`` (param weight) -> one-use activation -> only ``core.linear`` inputs: an
    MLP left unfused (e.g. below -O2's linear_act fusion)."""
    found = []
    for lin in graph.ops:
        if lin.name != "core.linear" or id(lin) in plan.seen or \
                lin.operands[1].producer is None or lin.operands[1].producer.name != "param":
            continue
        y = lin.results[0]
        if len(y.uses) != 1 or y.uses[0].op.name not in ACTIVATIONS:
            continue
        act = y.uses[0].op
        uses = act.results[0].uses
        if uses and all(u.op.name == "core.linear" and u.index == 0 for u in uses):
            found.append((lin, act.results[0]))
    return found


# ----- GPT-2's Conv1D --------------------------------------------------------------------------

def _conv1d_as_linear(graph: Graph) -> int:
    """Rewrite ``matmul(x, W[in, out])`` with a ``param`` W (+ a one-use add of a 1-D param
    bias) into ``core.linear(x, W.T[, b])``, so the plan sees one projection form.  ``W.T`` is
    a derived weight, named as the bias-act fusion names it.  Returns the rewrites made."""
    from irlm.passes.fusions.weights import ensure_weight_store
    rw = Rewriter(graph)
    count = 0
    for mm in list(graph.ops):
        if mm.name != "core.matmul":
            continue
        x, w = mm.operands
        wp = w.producer
        if wp is None or wp.name != "param" or w.type.rank != 2 or x.type.rank < 2:
            continue
        store = ensure_weight_store(graph)
        name = wp.attrs["name"] + ".T"
        t = TensorType((w.type.shape[1], w.type.shape[0]), w.type.dtype)
        if name not in store:
            store.add_derived(name, t, [wp.attrs["name"]], lambda m: m.t().contiguous(),
                              how="transpose")
        with rw.insertion_point(before=mm):
            wt = rw.create("param", [], {"name": name, "type": t}, wp.loc)
        operands, last = [x, wt.results[0]], mm
        y = mm.results[0]
        add = y.uses[0].op if len(y.uses) == 1 else None
        if add is not None and add.name == "core.add" and not any(o is y for o in graph.outputs):
            b = add.operands[1 - y.uses[0].index]
            if b.producer is not None and b.producer.name == "param" and b.type.rank == 1 and \
                    b.type.shape[0] == t.shape[0]:
                operands.append(b)
                last = add
        with rw.insertion_point(before=last):
            lin = rw.create("core.linear", operands, {}, last.loc,
                            result_names=[last.results[0].name])
        rw.replace_all_uses_with(last.results[0], lin.results[0], check_type=False)
        rw.erase_op(last)
        if last is not mm:
            rw.erase_op(mm)
        if not w.uses and not any(o is w for o in graph.outputs):
            rw.erase_op(wp)
        count += 1
    return count


# ----- LM head ---------------------------------------------------------------------------------

def _plan_lm_head(plan: _Plan, graph: Graph) -> None:
    n, r = plan.size, plan.rank
    for out in graph.outputs:
        lin = out.producer
        if lin is None or lin.name != "core.linear" or id(lin) in plan.seen or \
                lin.operands[1].producer is None or lin.operands[1].producer.name != "param":
            continue
        vocab = out.type.shape[-1]
        if not isinstance(vocab, int) or vocab % n:
            continue  # stays replicated
        vl = vocab // n
        spec = f"vocab{r * vl}:{(r + 1) * vl}"
        _add_row_shard(plan, lin, 1, [(r * vl, (r + 1) * vl)], spec, graph)
        if len(lin.operands) > 2:
            _add_row_shard(plan, lin, 2, [(r * vl, (r + 1) * vl)], spec, graph)
        plan.seen.add(id(lin))
        loc = lin.loc.module or out.name or "?"
        plan.collectives.append((lin, "dist.all_gather", {
            "axis": out.type.rank - 1, "group_size": n,
            "plan": f"vocab-parallel {loc}: logits {r * vl}:{(r + 1) * vl} of {vocab} on rank "
                    f"{r}, gathered from {n} ranks"}))


# ----- token embedding -------------------------------------------------------------------------

def _plan_embedding(plan: _Plan, graph: Graph) -> None:
    """The token embedding (a ``core.embedding`` over a 2-D ``param`` table whose ids are the
    inference form's token ids, graph input 0, through reshapes only) becomes vocab-parallel
    when its V rows divide by N: rank r holds rows ``[r*V/N, (r+1)*V/N)``, looks up the ids
    clamped into that range, zeroes the rows of ids outside it, and an all_reduce sums the one
    non-zero row of each token.  Other embeddings (OPT's and GPT-2's positions) read computed or
    other ids and stay replicated: splitting them would cost an all_reduce for a small table."""
    n, r = plan.size, plan.rank
    token_ids = graph.inputs[0] if graph.inputs else None
    for op in graph.ops:
        if op.name != "core.embedding" or id(op) in plan.seen:
            continue
        table, ids = op.operands
        if table.producer is None or table.producer.name != "param" or table.type.rank != 2:
            continue
        while ids.producer is not None and ids.producer.name == "core.reshape":
            ids = ids.producer.operands[0]
        if ids is not token_ids:
            continue
        vocab = table.type.shape[0]
        if not isinstance(vocab, int) or vocab % n:
            continue  # stays replicated, as an LM head of that vocab does
        vl = vocab // n
        # named as the LM head's shard of the same rows, so a tied table is sliced once
        _add_row_shard(plan, op, 0, [(r * vl, (r + 1) * vl)], f"vocab{r * vl}:{(r + 1) * vl}",
                       graph)
        plan.seen.add(id(op))
        plan.embeddings.append((op, r * vl, vl, table.producer.attrs["name"]))


def _mask_embedding(rw: Rewriter, op: Op, first: int, rows: int, n: int, table: str) -> None:
    """Rewrite the (already sharded) ``core.embedding`` ``op`` into the masked local lookup
    followed by the all_reduce that completes it."""
    ids = op.operands[1]
    idt = ids.type.dtype.torch
    loc = op.loc

    def add(name, operands, attrs=None):
        with rw.insertion_point(before=op):
            return rw.create(name, operands, attrs or {}, loc).results[0]

    def const(v):
        return add("core.constant", [], {"value": torch.tensor(v, dtype=idt)})

    local = add("core.sub", [ids, const(first)])
    # clamped, so the lookup stays inside the shard; an id was outside the rank's rows exactly
    # when clamping moved it
    idx = add("core.minimum", [add("core.maximum", [local, const(0)]), const(rows - 1)])
    outside = add("core.ne", [idx, local])
    rw.set_operand(op, 1, idx)
    infer = infer_types(op.name, [v.type for v in op.operands], op.attrs, op.describe())
    y = op.results[0]
    rw.retype(y, infer[0])
    name = y.name
    vocab = rows * n
    loc_name = loc.module or table
    with rw.insertion_point(after=op):
        mask = rw.create("core.unsqueeze", [outside], {"dim": -1}, loc)
        masked = rw.create("core.masked_fill", [y, mask.results[0]], {"value": 0.0}, loc)
        red = rw.create("dist.all_reduce", [masked.results[0]], {
            "group_size": n, "op": "sum",
            "plan": f"vocab-parallel {loc_name}: rows {first}:{first + rows} of {vocab} on rank "
                    f"{first // rows}, other ids zeroed, summed over {n} ranks"}, loc)
    rw.replace_all_uses_with(y, red.results[0], check_type=False, except_in=masked)
    if name is not None:
        red.results[0].name, y.name = name, f"{name}_local"


# ----- the split -------------------------------------------------------------------------------

def plan_rank(graph: Graph, size: int, rank: int) -> _Plan:
    """Prove the split of ``graph`` for rank ``rank`` of ``size``; changes nothing."""
    if size < 1 or not 0 <= rank < size:
        raise TPSplitError(f"tp-split: rank {rank} is not in a group of size {size}")
    from irlm.passes.fusions.weights import ensure_weight_store
    ensure_weight_store(graph)  # IR text without --weights: shapes are enough to plan
    plan = _Plan(size, rank)
    # A pipeline stage (dist.send / dist.recv) splits like a whole graph: what crosses the
    # cut is replicated across the stage's tp ranks.  Collectives mean it is tp-split already.
    if any(op.name in ("dist.all_reduce", "dist.all_gather") for op in graph.ops):
        raise TPSplitError(f"tp-split: graph @{graph.name} is already split (has dist "
                           f"collectives)")
    atts = [op for op in graph.ops if op.name == "llm.paged_attention"]
    if not atts:
        raise TPSplitError("tp-split: the graph has no llm.paged_attention (run "
                           "substitute-attention and the fusions first: compile at -O2)")
    for att in atts:
        _plan_attention(plan, graph, att)
    for act in [op for op in graph.ops if op.name == "llm.gated_act"]:
        _plan_gated_mlp(plan, graph, act)
    for fc1 in [op for op in graph.ops if op.name == "llm.linear_act"]:
        _plan_mlp(plan, graph, fc1, fc1.results[0], "MLP intermediate")
    for fc1, out in _unfused_mlp_candidates(graph, plan):
        _plan_mlp(plan, graph, fc1, out, "MLP intermediate")
    cache = plan.kv_cache
    others = [u.op for u in cache.uses if u.op.name != "llm.paged_attention" or u.index != _CACHE]
    if others:
        raise _err(others[0], "reads the KV cache, which tp-split shards by kv heads")
    _plan_lm_head(plan, graph)
    _plan_embedding(plan, graph)
    return plan


def split_rank(graph: Graph, size: int, rank: int, stats=None) -> Graph:
    """Rewrite ``graph`` in place into rank ``rank``'s graph of a ``size``-way split.
    ``stats`` (a pass's ``ctx.stats``) counts the weights sharded and collectives inserted."""
    if size == 1:
        return graph
    conv = 0
    if any(op.name == "core.matmul" for op in graph.ops):
        # A refused split changes nothing: prove it on a rewritten copy first.
        trial = _trial_copy(graph)
        if _conv1d_as_linear(trial):
            plan_rank(trial, size, rank)
            conv = _conv1d_as_linear(graph)
    plan = plan_rank(graph, size, rank)
    if stats is not None:
        stats.counters["matmuls rewritten as linear"] += conv
        stats.counters["weights sharded"] += len(plan.shards)
        for _, kind, _ in plan.collectives:
            stats.counters[f"{kind} inserted"] += 1
        stats.counters["dist.all_reduce inserted"] += len(plan.embeddings)
    store = graph.weights
    rw = Rewriter(graph)
    # 1. weight shards: derived weights, new param ops (one per shard: a tied embedding and
    #    LM head read the same one)
    made: dict[str, Op] = {}
    for s in plan.shards:
        old = s.op.operands[s.index]
        src = old.producer.attrs["name"]
        t = TensorType(tuple(s.shape), store.type_of(src).dtype)
        if s.new_name not in store:
            store.add_derived(s.new_name, t, [src], s.fn, how=f"tp-shard {s.how}")
        p = made.get(s.new_name)
        if p is None:
            with rw.insertion_point(before=old.producer):
                p = made[s.new_name] = rw.create("param", [], {"name": s.new_name, "type": t},
                                                 old.producer.loc)
        rw.set_operand(s.op, s.index, p.results[0], check_type=False)  # types re-inferred in 3.
        if not old.uses and not any(o is old for o in graph.outputs):
            rw.erase_op(old.producer)
    # 2. attributes (reshape targets, split sizes, alibi slopes) and the KV cache input
    for op, attrs in plan.attrs:
        rw.set_attrs(op, {**op.attrs, **attrs})
    c = plan.kv_cache
    shape = list(c.type.shape)
    shape[KV_CACHE_AXIS["kv_heads"]] = plan.kv_heads_local
    rw.retype(c, c.type.with_shape(tuple(shape)))
    # 3. types, in order
    for op in graph.ops:
        for res, t in zip(op.results, infer_types(op.name, [v.type for v in op.operands],
                                                  op.attrs, op.describe())):
            rw.retype(res, t)
    # 4. collectives after the row-parallel projections and the LM head
    for op, kind, attrs in plan.collectives:
        bias = plan.biases.get(id(op))
        if bias is not None:
            op = _without_bias(rw, op)
        old = op.results[0]
        name = old.name
        with rw.insertion_point(after=op):
            new = rw.create(kind, [old], attrs, op.loc)
            last = new
            if bias is not None:
                last = rw.create("core.add", [new.results[0], bias], {}, op.loc)
        rw.replace_all_uses_with(old, last.results[0], check_type=False, except_in=new)
        if name is not None:
            last.results[0].name, old.name = name, f"{name}_partial"
            if last is not new:
                new.results[0].name = f"{name}_reduced"
    # 5. the vocab-parallel embeddings' masked lookups
    for op, first, rows, table in plan.embeddings:
        _mask_embedding(rw, op, first, rows, size, table)
    return graph


def _clone(graph: Graph, weights=None) -> Graph:
    """A structural copy (irlm.ir.Graph.clone) whose values carry the names they print with,
    so what the split names after them (``%x_partial``) reads as in the graph's dump; its ops
    keep the original's positions, so a refusal names the op where the user sees it."""
    from irlm.text.printer import printed_names
    vmap: dict = {}
    copy = graph.clone(weights, vmap)
    for v, name in printed_names(graph).items():
        vmap[id(v)].name = name
    return copy


def _trial_copy(graph: Graph) -> Graph:
    """A copy to prove a split on."""
    from irlm.passes.fusions.weights import ensure_weight_store
    return _clone(graph, ensure_weight_store(graph))


def _without_bias(rw: Rewriter, op: Op) -> Op:
    """Replace ``core.linear(x, w, b)`` by ``core.linear(x, w)``; returns the new op."""
    with rw.insertion_point(before=op):
        new = rw.create("core.linear", op.operands[:2], dict(op.attrs), op.loc,
                        result_names=[op.results[0].name])
    rw.replace_all_uses_with(op.results[0], new.results[0], check_type=False)
    rw.erase_op(op)
    return new


def _normalized(op: Op, attrs: dict) -> dict:
    from irlm.registry import get_op_def
    return get_op_def(op.name).normalize_attrs({**op.attrs, **attrs}, op.describe())


def split_for_tensor_parallel(graph: Graph, size: int) -> list[Graph]:
    """The ``size`` per-rank graphs of a tensor-parallel split of ``graph`` (left unchanged).
    They share ``graph``'s weight store, which gains the lazily sliced shards."""
    trial = _trial_copy(graph)
    _conv1d_as_linear(trial)
    plan_rank(trial, size, 0)  # refuse before splitting anything
    out = []
    for r in range(size):
        g = _clone(graph)
        split_rank(g, size, r)
        out.append(g)
    return out


def _register() -> None:
    from ..options import Option
    from ..registry import register_pass

    @register_pass("tp-split", options={
        "size": Option(int, 2, "ranks in the tensor-parallel group"),
        "rank": Option(int, 0, "the rank whose graph this run produces"),
    })
    def _pass(graph, ctx):
        """Tensor-parallel split of the -O2 inference form: rank `rank`'s graph of a
        `size`-way split (attention heads, gated MLP, vocab; see docs/parallelism.md)."""
        o = ctx.options
        split_rank(graph, o["size"], o["rank"], ctx.stats)


_register()
