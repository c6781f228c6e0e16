"""``remove-repeat-kv``: grouped-query attention without the materialized key/value copies.

HF's GQA models expand k and v from kv_heads to heads before attention (``repeat_kv``:
unsqueeze, expand, reshape).  ``scaled_dot_product_attention(..., enable_gqa=True)`` reads
each kv head for its group of query heads instead, so the copies go::

    sdpa(q, repeat_kv(k, n), repeat_kv(v, n)) = sdpa(q, k, v){enable_gqa = true}

The repeat_kv matcher is ``strip_repeat_kv`` of substitute-attention (one definition of what
repeat_kv looks like), and substitute-attention accepts either form, so this pass may run
before or after it (after, there is no sdpa left and it does nothing).  Checked: both k and
v are repeated by the same factor, q has heads = kv_heads * factor.
"""
from __future__ import annotations

from irlm.ir import Op
from irlm.types import dims_equal

from ..rewriting.driver import pattern_pass
from ..rewriting.pattern import RewritePattern
from ..llm.substitute_attention import strip_repeat_kv


class RemoveRepeatKV(RewritePattern):
    """sdpa(q, repeat_kv(k), repeat_kv(v), mask) = sdpa(q, k, v, mask){enable_gqa = true}"""
    root = "core.scaled_dot_product_attention"
    name = "remove_repeat_kv"

    def match_and_rewrite(self, sdpa: Op, rw) -> bool:
        if sdpa.attrs["enable_gqa"]:
            return False
        q, k_rep, v_rep = sdpa.operands[:3]
        k, v = strip_repeat_kv(k_rep), strip_repeat_kv(v_rep)
        if k is k_rep or v is v_rep or q.type.rank != 4:
            return False
        heads, kv_heads = q.type.shape[1], k.type.shape[1]
        if not (dims_equal(k.type.shape[1], v.type.shape[1])
                and dims_equal(k_rep.type.shape[1], heads)
                and dims_equal(v_rep.type.shape[1], heads)
                and isinstance(heads, int) and isinstance(kv_heads, int)
                and heads % kv_heads == 0):
            return False
        new = rw.create(sdpa.name, [q, k, v] + sdpa.operands[3:],
                        {**sdpa.attrs, "enable_gqa": True})
        rw.replace_op(sdpa, new.results)
        return True


REPEAT_KV_PATTERNS = [RemoveRepeatKV]

remove_repeat_kv = pattern_pass("remove-repeat-kv", REPEAT_KV_PATTERNS)
