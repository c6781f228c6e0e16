"""``fuse-residual-norm``: the residual add and the next RMSNorm -> ``llm.add_rms_norm``.

A pre-norm decoder layer ends ``h = x + r; y = rms_norm(h, w)`` and reads ``h`` again as the
next residual.  ``llm.add_rms_norm(x, r, w)`` returns both ``y`` and ``h`` from one kernel
that reads x and r once.  Run after ``fuse-rms-norm``.
"""
from __future__ import annotations

from irlm.ir import Op, Value

from ..rewriting.driver import pattern_pass
from ..rewriting.pattern import Var, op, rule, same_type

residual_sum = op("core.add")(Var("x"), Var("residual")).named("add")


@rule(op("llm.rms_norm")(residual_sum, Var("w")))
def add_rms_norm(m, rw):
    """rms_norm(x + r, w) = add_rms_norm(x, r, w)#0  and  x + r = add_rms_norm(x, r, w)#1

    when x, r and x + r have one type (no broadcasting) and nothing reads x + r before the
    norm (the fused op is placed at the norm, and every reader of x + r reads result #1)."""
    total = m.add.results[0]
    if not (same_type(m.x, total) and same_type(m.residual, total)):
        return None
    if _read_before(total, m.root):
        return None
    fused = rw.create("llm.add_rms_norm", [m.x, m.residual, m.w],
                      {"eps": m.root.attrs["eps"],
                       "weight_offset": m.root.attrs["weight_offset"]})
    normed, new_total = fused.results
    rw.replace_all_uses_with(total, new_total)
    return normed


def _read_before(v: Value, anchor: Op) -> bool:
    """Does an op between ``v``'s producer and ``anchor`` read ``v``?"""
    o = v.producer.next
    while o is not None and o is not anchor:
        if any(x is v for x in o.operands):
            return True
        o = o.next
    return False


RESIDUAL_NORM_PATTERNS = [add_rms_norm]

fuse_residual_norm = pattern_pass("fuse-residual-norm", RESIDUAL_NORM_PATTERNS)
