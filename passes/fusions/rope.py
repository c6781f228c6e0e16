"""``fuse-rope``: rotary position embedding written out in core ops -> ``llm.rope``.

The two layouts models use::

    rotate_half (Llama, NeoX, Qwen, Mistral, Phi):  x*cos + cat(-x[..., d/2:], x[..., :d/2])*sin
    interleaved (GPT-J, CodeGen):                   x*cos + stack(-x[..., 1::2], x[..., ::2], -1)
                                                             .flatten(-2)*sin

``cos`` and ``sin`` stay operands, computed once per step from position_ids x inv_freq as the
model wrote them, so whatever shapes inv_freq (Llama-3's rope scaling, NTK, YaRN) needs no
pattern of its own.  The halves may be slices or a ``split`` (``chunk``); the add and the
multiplies take their operands in either order; ``x*cos - cat(x[..., d/2:], -x[..., :d/2])*sin``
is the same rotation with the sign moved.  Partial rotary embedding (NeoX, Phi, GPT-J:
``cat(rope(x[..., :r]), x[..., r:])``) folds into one ``llm.rope`` whose cos has r < d entries.

Checked: every slice, split, concat and stack is on the last axis with the bounds the
equation needs (halves of d, even and odd entries); cos and sin have one type, x's dtype, and
do not broadcast x to a bigger shape; the rotated pieces have one use.
"""
from __future__ import annotations

from typing import Optional

from irlm.ir import Op, Value

from ..rewriting.driver import pattern_pass
from ..rewriting.pattern import Var, op, rule, same_type
from .constraints import is_last_axis, keeps_type, slices_last_axis, static_last_dim

x, cos, sin = Var("x"), Var("cos"), Var("sin")

# rotate_half(x) = cat(-upper, lower) with lower = x[..., :d/2], upper = x[..., d/2:]
lower = op("core.slice")(x).named("lower") | op("core.split")(x).result(0).named("halves")
upper = op("core.slice")(x).named("upper") | op("core.split")(x).result(1).named("halves")
rotate_half = op("core.concat")(op("core.neg")(upper.one_use()).one_use(),
                                lower.one_use()).named("concat")
minus_rotate_half = op("core.concat")(upper.one_use(),
                                      op("core.neg")(lower.one_use()).one_use()).named("concat")

# rotate_pairs(x) = stack(-odd, even, -1).flatten(-2) with even = x[..., ::2], odd = x[..., 1::2]
even = op("core.slice")(x).named("even")
odd = op("core.slice")(x).named("odd")
rotate_pairs = op("core.reshape")(
    op("core.concat")(op("core.unsqueeze")(op("core.neg")(odd.one_use()).one_use()).one_use(),
                      op("core.unsqueeze")(even.one_use()).one_use()).named("stack").one_use()
).named("flatten")

x_cos = op("core.mul")(x, cos).named("x_cos").one_use()


def rotated_sin(rotation):
    return op("core.mul")(rotation.one_use(), sin).named("rot_sin").one_use()


@rule(op("core.add")(x_cos, rotated_sin(rotate_half)))
def rope_rotate_half(m, rw):
    """x*cos + cat(-x[..., d/2:], x[..., :d/2])*sin = rope(x, cos, sin){rotate_half}"""
    return _fuse(m, rw, "rotate_half") if _halves_ok(m) else None


@rule(op("core.sub")(x_cos, rotated_sin(minus_rotate_half)))
def rope_rotate_half_negated(m, rw):
    """x*cos - cat(x[..., d/2:], -x[..., :d/2])*sin = rope(x, cos, sin){rotate_half}"""
    return _fuse(m, rw, "rotate_half") if _halves_ok(m) else None


@rule(op("core.add")(x_cos, rotated_sin(rotate_pairs)))
def rope_interleaved(m, rw):
    """x*cos + stack(-x[..., 1::2], x[..., ::2], -1).flatten(-2)*sin
    = rope(x, cos, sin){interleaved}"""
    return _fuse(m, rw, "interleaved") if _pairs_ok(m) else None


@rule(op("core.concat")(
    op("llm.rope")(op("core.slice")(x).named("rotated_part") | x, cos, sin).named("rope")
    .one_use(),
    op("core.slice")(x).named("passed_part")))
def rope_partial(m, rw):
    """cat(rope(x[..., :r], cos, sin), x[..., r:]) = rope(x, cos, sin)   (cos has r entries)"""
    d, r = static_last_dim(m.x), static_last_dim(m.cos)
    rank = m.x.type.rank
    if d is None or r is None or not is_last_axis(m.root.attrs["dim"], rank):
        return None
    if "rotated_part" in m and not slices_last_axis(m.rotated_part, 0, r):
        return None
    if "rotated_part" not in m and r != d:
        return None
    if not slices_last_axis(m.passed_part, r, d - r):
        return None
    if not keeps_type(m.root.results[0], m.x):
        return None
    return rw.op("llm.rope", m.x, m.cos, m.sin, style=m.rope.attrs["style"])


def _fuse(m, rw, style: str) -> Optional[Value]:
    """The checks every form shares, then the fused op."""
    d = static_last_dim(m.x)
    if d is None or d % 2 or not m.x.type.dtype.is_float:
        return None
    if not (same_type(m.cos, m.sin) and m.cos.type.dtype is m.x.type.dtype
            and static_last_dim(m.cos) == d):
        return None
    if not (keeps_type(m.x_cos.results[0], m.x) and keeps_type(m.rot_sin.results[0], m.x)
            and keeps_type(m.root.results[0], m.x)):
        return None
    return rw.op("llm.rope", m.x, m.cos, m.sin, style=style)


def _halves_ok(m) -> bool:
    """The concat joins x[..., d/2:] and x[..., :d/2] on the last axis; each half is a slice
    of the last axis or a piece of a split of it into two halves."""
    d = static_last_dim(m.x)
    rank = m.x.type.rank
    if d is None or d % 2 or not is_last_axis(m.concat.attrs["dim"], rank):
        return False
    half = d // 2
    if "halves" in m:
        split: Op = m.halves
        if not (is_last_axis(split.attrs["dim"], rank) and list(split.attrs["sizes"]) == [half,
                                                                                      half]):
            return False
    if "lower" in m and not slices_last_axis(m.lower, 0, half):
        return False
    return "upper" not in m or slices_last_axis(m.upper, half, half)


def _pairs_ok(m) -> bool:
    """stack(-odd, even) on a new last axis, flattened back to x's shape."""
    d = static_last_dim(m.x)
    rank = m.x.type.rank
    if d is None or d % 2:
        return False
    if not (slices_last_axis(m.even, 0, d // 2, step=2) and
            slices_last_axis(m.odd, 1, d // 2, step=2)):
        return False
    stack: Op = m.stack
    if not is_last_axis(stack.attrs["dim"], rank + 1):
        return False
    if not all(is_last_axis(u.producer.attrs["dim"], rank + 1) for u in stack.operands):
        return False
    return same_type(m.flatten.results[0], m.x)


ROPE_PATTERNS = [rope_rotate_half, rope_rotate_half_negated, rope_interleaved, rope_partial]

fuse_rope = pattern_pass("fuse-rope", ROPE_PATTERNS)
