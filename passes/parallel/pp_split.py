"""pp-split: cut the paged inference form into pipeline stages by layers.

Stage s runs layers ``s*L/S`` to ``(s+1)*L/S - 1``; every value that crosses a cut is sent
with ``dist.send`` and received with ``dist.recv`` (params and constants are copied instead).
:func:`split_for_pipeline` returns every stage's graph, built structurally (a Builder per
stage); the ``pp-split`` pass rewrites its graph into one stage through the rewriter.
See docs/parallelism.md.
"""
from __future__ import annotations

from irlm.builder import Builder
from irlm.ir import Graph, Op, Value
from irlm.registry import CONSTANT_LIKE, ops_with_trait

from ..rewriting.rewriter import Rewriter
from .tp_split import TPSplitError, _err

class PPSplitError(TPSplitError):
    """pp-split cannot cut this graph into the stages asked for."""


_NORMS = ("core.layer_norm", "llm.rms_norm", "llm.add_rms_norm")
_COPYABLE = ops_with_trait(CONSTANT_LIKE)   # copied into each stage, never sent


def _layer_start(att: Op, prev: Op, pos: dict) -> int:
    """Where the layer of ``att`` starts: its input norm, found by walking back from the query
    through the first computed operand of each op; stops after ``prev`` (the previous layer's
    attention).  Any cut between ``prev`` and ``att`` is correct (what crosses it is sent);
    cutting at the norm sends the fewest values (the residual stream and rotary tables)."""
    at, v = pos[id(att)], att.operands[0]
    while True:
        p = v.producer
        if p is None or p.name in _COPYABLE or pos[id(p)] <= pos[id(prev)]:
            return at
        at = pos[id(p)]
        if p.name in _NORMS:
            return at
        computed = [x for x in p.operands if x.producer is None or
                    x.producer.name not in _COPYABLE]
        if not computed:
            return at
        v = computed[0]


def check_pipeline(graph: Graph, stages: int) -> int:
    """Refuse a graph that cannot be cut into ``stages`` equal stages; the layer count."""
    atts = [op for op in graph.ops if op.name == "llm.paged_attention"]
    if stages < 1:
        raise PPSplitError(f"pp-split: stages={stages}: must be at least 1")
    if any(op.dialect == "dist" for op in graph.ops):
        raise PPSplitError(f"pp-split: graph @{graph.name} is already split (has dist ops)")
    if not atts:
        raise PPSplitError("pp-split: the graph has no llm.paged_attention (run "
                           "substitute-attention first: compile at -O0 or above)")
    if len(atts) % stages:
        raise PPSplitError(f"pp-split: stages={stages}: {len(atts)} layers cannot be cut into "
                           f"{stages} equal stages")
    caches = {id(a.operand("kv_cache")) for a in atts}
    if len(caches) != 1 or atts[0].operand("kv_cache").producer is not None:
        raise _err(atts[0], "pp-split: the layers do not share one KV cache graph input")
    return len(atts)


def split_for_pipeline(graph: Graph, stages: int) -> list[Graph]:
    """Cut ``graph`` (the paged inference form) into ``stages`` per-stage graphs by layers.

    Stage s runs the ops from layer ``s*L/S``'s input norm up to the next stage's cut.  Every
    value that crosses a cut (the residual stream, the rotary tables...) is sent with
    ``dist.send`` and received with ``dist.recv``; ``param`` and ``core.constant`` ops are
    copied instead of sent.  Each stage keeps the graph's inputs (one calling convention);
    its KV cache holds its own layers only (``layer`` renumbered).  A stage other than the last
    returns what it sent; the last stage returns the logits.  Run them with
    :func:`irlm.runtime.distributed.run_ranks`.  ``graph`` is left unchanged."""
    from irlm.ir import Graph as G
    L = check_pipeline(graph, stages)
    ops = list(graph.ops)
    atts = [op for op in ops if op.name == "llm.paged_attention"]
    per = L // stages
    pos = {id(op): i for i, op in enumerate(ops)}
    cuts = [0]
    for s in range(1, stages):
        cuts.append(_layer_start(atts[s * per], atts[s * per - 1], pos))
    cuts.append(len(ops))
    copyable = _COPYABLE
    cache = atts[0].operand("kv_cache")
    out = []
    for s in range(stages):
        lo, hi = cuts[s], cuts[s + 1]
        g = G(graph.name, graph.weights)
        g.dims = dict(graph.dims)
        b = Builder(g)
        vmap: dict[int, Value] = {}
        for v in graph.inputs:
            t = v.type
            if v is cache:
                shape = list(t.shape)
                shape[0] = per
                t = t.with_shape(tuple(shape))
            vmap[id(v)] = g.add_input(t, v.name)

        def clone(op: Op) -> Op:
            attrs = dict(op.attrs)
            if op.name == "llm.paged_attention":
                attrs["layer"] = op.attrs["layer"] - s * per
            new = b.create(op.name, [vmap[id(x)] for x in op.operands], attrs, op.loc,
                           result_types=[r.type for r in op.results],
                           result_names=[r.name for r in op.results])
            for r, nr in zip(op.results, new.results):
                vmap[id(r)] = nr
            return new

        def crossing(at: int) -> list[Value]:
            """Values defined before op ``at`` (not inputs, params, constants) read at or
            after it (or returned)."""
            live = []
            seen = set()
            later = ops[at:]
            wanted = [x for op in later for x in op.operands] + \
                (list(graph.outputs) if at < len(ops) else [])
            for x in wanted:
                p = x.producer
                if p is None or p.name in copyable or pos[id(p)] >= at or id(x) in seen:
                    continue
                seen.add(id(x))
                live.append(x)
            return live

        if s > 0:
            for tag, x in enumerate(crossing(lo)):
                r = b.create("dist.recv", [], {"peer": s - 1, "type": x.type, "tag": tag,
                                               "plan": f"pipeline stage {s} <- {s - 1}"},
                             x.producer.loc, result_names=[x.name])
                vmap[id(x)] = r.results[0]
        for op in ops[lo:hi]:
            for x in op.operands:
                if id(x) not in vmap and x.producer is not None and \
                        x.producer.name in copyable:
                    clone(x.producer)
            clone(op)
        if s < stages - 1:
            sent = []
            for tag, x in enumerate(crossing(hi)):
                if id(x) not in vmap and x.producer.name in copyable:
                    clone(x.producer)
                snd = b.create("dist.send", [vmap[id(x)]], {
                    "peer": s + 1, "tag": tag, "plan": f"pipeline stage {s} -> {s + 1}"},
                    x.producer.loc)
                sent.append(snd.results[0])
            g.set_outputs(sent)
        else:
            g.set_outputs([vmap[id(v)] for v in graph.outputs])
        # drop what this stage does not need (e.g. params copied for nothing)
        rw = Rewriter(g)
        for op in reversed(list(g.ops)):
            if op.name in copyable and not op.results[0].uses:
                rw.erase_op(op)
        out.append(g)
    return out


def split_stage(graph: Graph, stages: int, stage: int, stats=None) -> Graph:
    """Rewrite ``graph`` in place into stage ``stage`` of ``split_for_pipeline(graph, stages)``."""
    if stages < 1:
        raise PPSplitError(f"pp-split: stages={stages}: must be at least 1")
    if not 0 <= stage < stages:
        raise PPSplitError(f"pp-split: stage={stage} is not a stage of {stages} "
                           f"(0 to {stages - 1})")
    if stages == 1:
        check_pipeline(graph, 1)
        return graph
    new = split_for_pipeline(graph, stages)[stage]
    if stats is not None:
        for kind in ("dist.send", "dist.recv"):
            stats.counters[f"{kind} inserted"] += sum(op.name == kind for op in new.ops)
    # A pass rewrites the graph object it was given: move the stage's ops into it.
    Rewriter(graph).replace_body(new)
    return graph


def _register_pp() -> None:
    from ..options import Option
    from ..registry import register_pass

    @register_pass("pp-split", options={
        "stages": Option(int, 2, "pipeline stages (the layer count must divide evenly)"),
        "stage": Option(int, 0, "the stage whose graph this run produces"),
    })
    def _pass(graph, ctx):
        """Pipeline-parallel split of the inference form by layers: stage `stage` of
        `stages`, joined to its neighbours by dist.send/dist.recv (docs/parallelism.md)."""
        o = ctx.options
        split_stage(graph, o["stages"], o["stage"], ctx.stats)


_register_pp()
