"""Derived weights for fusions: concatenated projections and transposed matrices.

A fusion that merges GEMMs needs their weights side by side.  It never copies tensors while
the graph is rewritten: it registers a *derived* entry in the weight store (computed from the
original entries on first use, see :meth:`irlm.weights.WeightStore.add_derived`) and reads it
with a new ``param`` op.  The derived entry's name says what it holds::

    model.layers.0.self_attn.q_proj+k_proj+v_proj.weight   = concat(q, k, v) along rows
    transformer.h.0.mlp.c_fc.weight.T                      = transpose of c_fc.weight

A graph parsed from text without ``--weights`` has no store; its params are then declared
(type known, data absent) so that fusions still rewrite and print it, and running it says
that the data is missing.
"""
from __future__ import annotations

from typing import Sequence

import torch

from irlm.errors import IRLMError
from irlm.ir import Graph, Value
from irlm.types import TensorType, normalize_dim
from irlm.weights import WeightStore


def fused_name(names: Sequence[str]) -> str:
    """``a.b.q.weight, a.b.k.weight`` -> ``a.b.q+k.weight``: shared prefix and suffix kept."""
    parts = [n.split(".") for n in names]
    prefix = 0
    while all(len(p) > prefix for p in parts) and len({p[prefix] for p in parts}) == 1:
        prefix += 1
    suffix = 0
    while all(len(p) - prefix > suffix for p in parts) and \
            len({p[len(p) - 1 - suffix] for p in parts}) == 1:
        suffix += 1
    middles = [".".join(p[prefix:len(p) - suffix]) for p in parts]
    head, tail = parts[0][:prefix], parts[0][len(parts[0]) - suffix:] if suffix else []
    return ".".join(head + ["+".join(middles)] + tail)


def param_name(v: Value) -> str:
    return v.producer.attrs["name"]


def ensure_weight_store(graph: Graph) -> WeightStore:
    """The graph's weight store; for a graph without one, a store that declares each param's
    type (so derived weights can be registered) and has no data."""
    if graph.weights is None:
        store = WeightStore()
        for p in graph.params():
            name, t = p.attrs["name"], p.attrs["type"]
            if name not in store:
                store.add_lazy(name, t, _no_data(name), "declared in the IR text")
        graph.weights = store
    return graph.weights


def _no_data(name: str):
    def load():
        raise IRLMError(f"weight '{name}' has no data: the graph was read from IR text without "
                        f"its weights (pass --weights FILE)")
    return load


def concat_params(rw, params: Sequence[Value], dim: int = 0) -> Value:
    """A param reading ``concat(params, dim)``, derived lazily from the stored weights."""
    ensure_weight_store(rw.graph)
    types = [p.type for p in params]
    shape = list(types[0].shape)
    shape[dim] = normalize_dim(sum(t.shape[dim] for t in types))
    return rw.derived_param(fused_name([param_name(p) for p in params]), params,
                            lambda *ws: torch.cat(ws, dim),
                            type=TensorType(shape, types[0].dtype), how="concat")


def transposed_param(rw, param: Value) -> Value:
    """A param reading the transpose of a 2-D weight ([in, out] -> [out, in]), derived lazily."""
    ensure_weight_store(rw.graph)
    rows, cols = param.type.shape
    return rw.derived_param(param_name(param) + ".T", [param],
                            lambda w: w.t().contiguous(),
                            type=TensorType((cols, rows), param.type.dtype), how="transpose")
