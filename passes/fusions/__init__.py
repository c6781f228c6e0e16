"""irlm.passes.fusions: the fusion passes, one module (and one pass) per fusion.

======================  =================================================  =================
pass                    rewrites                                           into
======================  =================================================  =================
``fuse-linear``         x @ Wᵀ, x @ W (+ b) with a weight param            core.linear
``fuse-rms-norm``       x * rsqrt(mean(x², -1) + eps) * w (casts, Gemma)   llm.rms_norm
``fuse-layer-norm``     (x - mean) * rsqrt(var + eps) * w + b              core.layer_norm
``fuse-residual-norm``  rms_norm(x + r, w), x + r read later               llm.add_rms_norm
``fuse-rope``           x*cos + rotate_half(x)*sin, interleaved, partial   llm.rope
``remove-repeat-kv``    sdpa(q, repeat_kv(k), repeat_kv(v))                sdpa{enable_gqa}
``fuse-qkv``            N linears of one input                             linear + split
``fuse-gated-mlp``      act(linear(x, Wg)) * linear(x, Wu)                 llm.gated_act
``fuse-bias-act``       act(linear(x, W, b)), act(x @ W + b)               llm.linear_act
``fuse-activations``    written-out gelu / silu formulas                   core.gelu / silu
``fuse-all``            all of the above, in :data:`FUSION_PASSES` order
======================  =================================================  =================

:data:`FUSION_PIPELINE` is the pipeline text the -O2 level uses.  Every fusion works on the
traced form and on the paged inference form, before or after ``substitute-attention``.
The fused ops are defined in irlm/ops/fused.py; docs/fusions.md describes each rule.
"""
from __future__ import annotations

from irlm.ir import Graph

from ..context import PassContext
from ..registry import get_pass, register_pass
from . import (activations, bias_act, gated_mlp, layer_norm, linear, qkv,  # noqa: F401
               repeat_kv, residual_norm, rms_norm, rope)

#: The fusion passes in the order they run (projections as core.linear before the fusions
#: that read it; norms before the residual fusion that reads llm.rms_norm; the activation
#: formulas are part of fuse-gated-mlp and fuse-bias-act).
FUSION_PASSES = ("fuse-linear", "fuse-rms-norm", "fuse-layer-norm", "fuse-residual-norm",
                 "fuse-rope", "remove-repeat-kv", "fuse-qkv", "fuse-gated-mlp", "fuse-bias-act")

#: What the -O2 pipeline runs: canonical, deduplicated input, the fusions, then cleanup.
FUSION_PIPELINE = ",".join(("canonicalize", "cse") + FUSION_PASSES + ("canonicalize", "dce"))


@register_pass("fuse-all")
def fuse_all(graph: Graph, ctx: PassContext) -> None:
    """Run every fusion pass, in FUSION_PASSES order (statistics are summed)."""
    for name in FUSION_PASSES:
        sub = PassContext(name, get_pass(name).resolve())
        get_pass(name).run(graph, sub)
        ctx.stats.merge(sub.stats)


__all__ = ["FUSION_PASSES", "FUSION_PIPELINE", "fuse_all"]
