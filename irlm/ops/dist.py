"""The ``dist`` dialect: collectives between the ranks of a tensor-parallel group, and
point-to-point ``send``/``recv`` between pipeline stages.

Every rank runs its own graph (``tp-split`` makes them, irlm/passes/parallel/tp_split.py); a collective
is an op that every rank of the group reaches in the same order with a tensor of one type.
Its reference implementation exchanges tensors with the other ranks through the communicator
that the multi-rank simulator (:func:`irlm.runtime.distributed.run_ranks`) puts in ``ctx.state["dist"]``.
The reduction order is fixed (rank 0 + rank 1 + ...), so every rank gets bit-identical results.

``plan`` is free text that tp-split fills in (which projection the collective completes and how
it was split), so a reader of the dump sees the sharding plan next to the collective.
"""
from __future__ import annotations

from ..errors import IRError
from ..registry import attr, define_op
from ..types import normalize_dim
from ._shape import norm_axis

REDUCE_OPS = ("sum", "max", "min")


def _check_group(a):
    if a["group_size"] < 1:
        raise IRError(f"group_size must be >= 1, got {a['group_size']}")


def _infer_all_reduce(t, a):
    _check_group(a)
    return [t[0]]


def _infer_all_gather(t, a):
    _check_group(a)
    x = t[0]
    if x.rank == 0:
        raise IRError("all_gather needs an input of rank >= 1")
    s = list(x.shape)
    d = norm_axis(a["axis"], len(s))
    s[d] = normalize_dim(s[d] * a["group_size"])
    return [x.with_shape(s)]


def _communicator(ctx, a):
    comm = (ctx.state or {}).get("dist")
    if comm is None:
        if a["group_size"] == 1:
            return None
        raise IRError(f"{ctx.op.name} with group_size {a['group_size']} needs the other ranks: "
                      f"run the per-rank graphs with irlm.runtime.distributed.run_ranks")
    if comm.size != a["group_size"]:
        raise IRError(f"{ctx.op.name} has group_size {a['group_size']} but runs in a group of "
                      f"{comm.size} ranks")
    return comm


def _ref_all_reduce(ctx, x, a):
    comm = _communicator(ctx, a)
    if comm is None:
        return [x[0]]
    return [comm.all_reduce(x[0], a["op"], ctx.op.describe())]


def _ref_all_gather(ctx, x, a):
    comm = _communicator(ctx, a)
    if comm is None:
        return [x[0]]
    return [comm.all_gather(x[0], norm_axis(a["axis"], x[0].dim()), ctx.op.describe())]


define_op(
    "dist.all_reduce", ["x"],
    {"group_size": attr("int"), "op": attr("str", "sum", REDUCE_OPS), "plan": attr("str", "")},
    infer=_infer_all_reduce, reference=_ref_all_reduce, pure=False,
    doc="Every rank of the group gets op(x of rank 0, x of rank 1, ...), reduced in rank "
        "order. plan describes the split the reduction completes (set by tp-split).")

define_op(
    "dist.all_gather", ["x"],
    {"axis": attr("int"), "group_size": attr("int"), "plan": attr("str", "")},
    infer=_infer_all_gather, reference=_ref_all_gather, pure=False,
    doc="Every rank gets concat(x of rank 0, x of rank 1, ...) along axis. plan describes "
        "the split the gather completes (set by tp-split).")


# ----- point to point (pipeline stages) --------------------------------------------------------

def _ref_send(ctx, x, a):
    comm = (ctx.state or {}).get("dist")
    if comm is None:
        raise IRError("dist.send needs the other ranks: run the per-stage graphs with "
                      "irlm.runtime.distributed.run_ranks")
    comm.send(x[0], a["peer"], a["tag"], ctx.op.describe())
    return [x[0]]


def _ref_recv(ctx, x, a):
    comm = (ctx.state or {}).get("dist")
    if comm is None:
        raise IRError("dist.recv needs the other ranks: run the per-stage graphs with "
                      "irlm.runtime.distributed.run_ranks")
    return [comm.recv(a["peer"], a["tag"], ctx.op.describe())]


define_op(
    "dist.send", ["x"], {"peer": attr("int"), "tag": attr("int", 0), "plan": attr("str", "")},
    infer=lambda t, a: [t[0]], reference=_ref_send, pure=False,
    doc="Send x to rank peer (matched by the peer's dist.recv with this rank and tag); the "
        "result is x, so a pipeline stage can return what it sent.")

define_op(
    "dist.recv", [], {"peer": attr("int"), "type": attr("type"), "tag": attr("int", 0),
                      "plan": attr("str", "")},
    infer=lambda t, a: [a["type"]], reference=_ref_recv, pure=False,
    doc="Receive a tensor of the given type from rank peer (its dist.send with this rank "
        "and tag).")
