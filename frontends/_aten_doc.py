"""Generates docs/supported-ops.md from the conversion table:

    python -m irlm.frontends._aten_doc > docs/supported-ops.md

(tests/test_frontend_trace.py checks that the checked-in file is current).
"""
from __future__ import annotations

from ._aten_converters import CONVERTERS, DROPPED_OPS, MAPPING_DOC, SYMBOLIC_INT_OPS


def supported_ops_markdown() -> str:
    """docs/supported-ops.md, generated from this table."""
    lines = [
        "# ATen ops supported by the tracing frontend",
        "",
        "`irlm.frontends.trace` converts the graph `torch.export` produces, op by op, with the",
        "table in `frontends/_aten_converters.py`. An ATen op that is not listed here stops the",
        "trace with an error naming the op, the module path and the source line it came from;",
        "there is no fallback. To support a new op, add a converter function to the table (and,",
        "if irlm has no op for it, define one in `irlm/ops/core.py`), then regenerate this file:",
        "",
        "    python -m irlm.frontends._aten_doc > docs/supported-ops.md",
        "",
        "Numbers in the graph become 0-d `core.constant`s of the dtype torch promotes to, and",
        "every change of dtype is an explicit `core.cast`. Shapes of reshapes, expands, splits and",
        "fills are the ones torch computed, written over the symbolic dims `batch` and `seq`.",
        "",
        "## Tracing a model",
        "",
        "```python",
        "from irlm.frontends import trace",
        "graph = trace(model, {\"input_ids\": ids, \"attention_mask\": mask},",
        "              dims={\"batch\": (1, 8), \"seq\": (1, 2048)})",
        "print(graph)  # the IR text; graph.weights holds the parameters",
        "```",
        "",
        "- Dim 0 of every input is `batch`, dim 1 is `seq`; the example's sizes must be at least",
        "  2 (torch.export makes a size of 1 a constant), the graph accepts the whole range.",
        "  `dynamic=False` traces static shapes.",
        "- Hugging Face models are traced with `use_cache=False`; the outputs are `logits`",
        "  (causal LMs) or `last_hidden_state` (encoders). `_attn_implementation` may be",
        "  `\"sdpa\"` (kept as `core.scaled_dot_product_attention`) or `\"eager\"`. Mixture-of-experts",
        "  models trace with their `grouped_mm` (default) or `batched_mm` experts implementation;",
        "  the `eager` one loops over the experts a token picked, which no graph can express.",
        "- Parameters, buffers and lifted constants become `param` ops named by their state-dict",
        "  key, in a lazy weight store (`weights=` a loader's store, or the module's own tensors;",
        "  a model on the `meta` device traces without any weight data). A lifted constant of at",
        "  most 16 elements (a tensor the model's code makes, e.g. `torch.tensor(0.0)` in a mask",
        "  helper) becomes a `core.constant` instead, so passes see its value.",
        "- Every op records the innermost module path and model source line it came from;",
        "  errors name both.",
        "",
        f"## Converted ops ({len(CONVERTERS)})",
        "",
        "| ATen op | becomes |",
        "| --- | --- |",
    ]
    for name in sorted(CONVERTERS):
        lines.append(f"| `{name}` | {MAPPING_DOC[name]} |")
    lines += [
        "",
        "## Symbolic integer arithmetic (no ops)",
        "",
        "These compute sizes; their values are torch's symbolic expressions, translated into",
        "irlm dims (`s0*s1` → `batch*seq`) and folded into the attributes of the ops using them.",
        "",
    ]
    lines += [f"- `{name}`" for name in sorted(SYMBOLIC_INT_OPS)]
    lines += ["", "## Dropped (no ops)", ""]
    lines += [f"- `{name}`: {why}" for name, why in sorted(DROPPED_OPS.items())]
    lines += [
        "",
        "## Handled by the driver",
        "",
        "- `operator.getitem`: picks one result of a multi-result op.",
        "- In-place ops (`add_`, `div_`, `index_put_`, ...): when one writes a tensor the graph",
        "  computed itself, which is neither a view nor viewed, it is converted as its functional",
        "  twin (`aten.add.Tensor` for `aten.add_.Tensor`) whose result replaces the tensor for",
        "  later readers. Any other mutation (of a view, an input, a parameter), an in-place op",
        "  without a functional converter, and higher-order ops (autocast and grad-mode regions)",
        "  make the frontend run torch's functionalization first",
        "  (`ExportedProgram.run_decompositions({})`), which rewrites them into the ops above.",
        "- Parameters, buffers and larger lifted constants: `param` ops named by their state-dict",
        "  key; lifted constants of at most 16 elements: `core.constant`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(supported_ops_markdown(), end="")
