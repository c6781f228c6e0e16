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
        "- In-place ops (`add_`, `index_put_`, ...) and higher-order ops (autocast and grad-mode",
        "  regions): when the exported graph has any, the frontend first runs torch's",
        "  functionalization (`ExportedProgram.run_decompositions({})`), which rewrites them into",
        "  the functional ops above.",
        "- Parameters, buffers and lifted constants: `param` ops named by their state-dict key.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(supported_ops_markdown(), end="")
