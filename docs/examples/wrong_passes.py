"""Three deliberately wrong passes, for the "find the bug" walk-through of
docs/writing-a-pass.md.  Each looks like a plausible optimization and silently changes the
model; ``irlm compile --check-numerics`` names the pass and the op.

    irlm compile --gguf model.gguf -o out --check-numerics \\
        --pass-plugin docs/examples/wrong_passes.py --pipeline "bad-eps{layer=3}"
"""
from irlm.passes import Option, Rewriter, register_pass

LAYER = {"layer": Option(int, 0, "the decoder layer to break")}


def in_layer(op, layer: int) -> bool:
    """Whether ``op`` comes from decoder layer ``layer`` (its location's module path)."""
    return op.loc.module.startswith(f"model.layers.{layer}.") or \
        op.loc.module == f"model.layers.{layer}"


@register_pass("bad-eps", options=LAYER)
def bad_eps(graph, ctx):
    """"Round" the RMSNorm epsilon of one layer up to 0.1 (it was 1e-5): every norm op that
    carries an ``eps`` attribute (llm.rms_norm, llm.add_rms_norm after -O2's fusions)."""
    rw = Rewriter(graph, ctx.stats)
    for op in graph.ops:
        if "eps" in op.attrs and in_layer(op, ctx.options.layer):
            rw.update_attrs(op, eps=0.1)
            ctx.stats.bump("eps changed")


@register_pass("swap-rope-halves", options=LAYER)
def swap_rope_halves(graph, ctx):
    """Feed the query's rotary embedding its head dimension's halves swapped, ``[x2, x1]``
    instead of ``[x1, x2]`` (the classic rotate-half mistake), in one layer: a split and a
    concat in front of the first ``llm.rope`` of that layer."""
    rope = next((op for op in graph.ops if op.name == "llm.rope"
                 and in_layer(op, ctx.options.layer)), None)
    if rope is None:
        return
    rw = Rewriter(graph, ctx.stats)
    x = rope.operands[0]
    half = x.type.shape[-1] // 2
    with rw.insertion_point(before=rope):
        x1, x2 = rw.op("core.split", x, dim=-1, sizes=[half, half], loc=rope.loc)
        swapped = rw.op("core.concat", x2, x1, dim=-1, loc=rope.loc)
    rw.set_operand(rope, 0, swapped)
    ctx.stats.bump("rope inputs swapped")


@register_pass("bad-attention-scale", options=LAYER)
def bad_attention_scale(graph, ctx):
    """Scale one layer's attention scores by 1/head_dim instead of 1/sqrt(head_dim)."""
    rw = Rewriter(graph, ctx.stats)
    for op in graph.ops:
        if op.name == "llm.paged_attention" and in_layer(op, ctx.options.layer):
            rw.update_attrs(op, scale=op.attrs["scale"] ** 2)
            ctx.stats.bump("attention scales changed")
