"""IR graph -> ``model.onnx`` + ``model.onnx.data`` (external weights), checked.

:func:`export_onnx` checks every op against the converter table first (registry.py), so an
unsupported op fails the export before anything is written; then it converts op by op, writes
weights straight into the external data file, names every ONNX tensor after its IR value, stores
the symbolic dims' ranges as model metadata (``irlm.dims``) and the TensorRT optimization
profile they imply (``irlm.profile``), writes ``build_trt.sh`` (the trtexec command line), and
runs ``onnx.checker`` with full shape inference on the saved model.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import onnx
import sympy
from onnx import helper

from irlm.errors import IRLMError
from irlm.ir import Graph
from irlm.types import format_expr

from . import custom_ops
from .context import ExternalData, LoweringContext, value_info
from .registry import check_lowerable, get_converters

OPSET = 23
#: ONNX IR version written: 10 is what onnxruntime >= 1.17 and TensorRT 10's parser read
IR_VERSION = 10
MODEL_FILE = "model.onnx"
BUILD_SCRIPT = "build_trt.sh"
PLUGIN_LIBRARY = "libirlm_trt_plugins.so"


@dataclass
class OnnxExport:
    """What an export wrote."""
    model_path: Path
    data_path: Path
    inputs: list[str]
    outputs: list[str]
    dims: dict[str, tuple[int, int]]
    #: input name -> [(min, opt, max)] per axis: the TensorRT optimization profile
    profile: dict[str, list[tuple[int, int, int]]]
    custom_nodes: list[str] = field(default_factory=list)   # "irlm.PagedAttention (name)"
    build_script: Optional[Path] = None

    def summary(self) -> str:
        custom = f", {len(self.custom_nodes)} irlm custom nodes" if self.custom_nodes else ""
        return f"wrote {self.model_path} (+ {self.data_path.name}{custom})"


def export_onnx(graph: Graph, out_dir, *, model_file: str = MODEL_FILE, check: bool = True,
                metadata: Optional[dict[str, str]] = None) -> OnnxExport:
    """Lower ``graph`` to ONNX in ``out_dir``; raises UnsupportedOpsError naming every op that
    does not lower (and writes nothing then)."""
    from irlm.verifier import verify
    verify(graph)
    check_lowerable(graph)
    _check_dim_sources(graph)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / model_file
    data_path = out / (model_file + ".data")
    external = ExternalData(data_path)
    try:
        model, ctx = _build_model(graph, external, metadata or {})
    finally:
        external.close()
    onnx.save_model(model, str(model_path))
    if check:
        check_model(model_path)
    dims = {k: (r.min, r.max) for k, r in graph.dims.items()}
    result = OnnxExport(model_path, data_path, [i.name for i in model.graph.input],
                        [o.name for o in model.graph.output], dims,
                        optimization_profile(graph, ctx),
                        [f"{custom_ops.DOMAIN}.{n.op_type} ({n.name})"
                         for n in custom_ops.custom_nodes(model)])
    result.build_script = write_build_script(result)
    return result


def check_model(path: Path) -> None:
    """onnx.checker with full shape inference; a failure is a bug in a converter."""
    custom_ops.register_schemas()
    onnx.checker.check_model(str(path), full_check=True)


def _check_dim_sources(graph: Graph) -> None:
    known = set()
    for v in graph.inputs:
        known |= {d.name for d in v.type.shape if not isinstance(d, int) and d.is_Symbol}
    for v in graph.values():
        missing = v.type.free_symbols() - known
        if missing:
            raise IRLMError(f"dimension {sorted(missing)[0]} of {v.label()} is not the size of any "
                            f"graph input's axis, so the ONNX graph cannot compute it")


def _build_model(graph: Graph, external: ExternalData, metadata: dict[str, str]):
    ctx = LoweringContext(graph, external)
    table = get_converters()
    for op in graph.ops:
        ctx.op = op
        first = len(ctx.nodes)
        names = table[op.name].convert(ctx, op)
        if len(names) != len(op.results):
            raise AssertionError(f"converter for {op.name} returned {len(names)} names")
        for r, n in zip(op.results, names):
            ctx.bind(r, _rename(ctx, first, n, r.name))
    ctx.op = None
    outputs = []
    for i, v in enumerate(graph.outputs):
        want = v.name if v.name and not v.name.isdigit() else f"output_{i}"
        outputs.append(_graph_output(ctx, ctx.name(v), want, v.type))
        ctx.bind(v, outputs[-1].name)
    for v in graph.inputs:   # stateful inputs (the KV cache) come back updated
        latest = ctx.current_cache.get(id(v))
        if latest is not None:
            outputs.append(_graph_output(ctx, latest, f"{ctx.name(v)}_out", v.type))
    inputs = [value_info(ctx.name(v), v.type) for v in graph.inputs]
    io = {i.name for i in inputs} | {o.name for o in outputs}
    infos = []
    for op in graph.ops:
        for r in op.results:
            n = ctx._names.get(id(r))   # (not ctx.name: that would write unread weights)
            if op.name != "param" and n not in io:
                infos.append(value_info(n, r.type))
    produced = {o for node in ctx.nodes for o in node.output}
    infos = [i for i in infos if i.name in produced]
    g = helper.make_graph(ctx.nodes, graph.name, inputs, outputs, ctx.initializers,
                          value_info=infos)
    model = helper.make_model(g, producer_name="irlm", producer_version=_version(),
                              opset_imports=[helper.make_opsetid(d, v)
                                             for d, v in sorted(ctx.opsets.items())])
    model.ir_version = IR_VERSION
    meta = {"irlm.dims": json.dumps({k: [r.min, r.max] for k, r in graph.dims.items()}),
            "irlm.profile": json.dumps({k: v for k, v in optimization_profile(graph, ctx).items()}),
            **metadata}
    helper.set_model_props(model, meta)
    return model, ctx


def _rename(ctx: LoweringContext, first: int, name: str, ir_name: Optional[str]) -> str:
    """Give the tensor a converter produced for an IR result the IR value's name."""
    if not ir_name:
        return name
    own = [n for n in ctx.nodes[first:] if name in n.output]
    if not own:
        return name   # an input, initializer or earlier tensor passed through
    new = ctx.unique(ir_name)
    for n in ctx.nodes[first:]:
        for seq in (n.input, n.output):
            for i, x in enumerate(seq):
                if x == name:
                    seq[i] = new
    return new


def _graph_output(ctx: LoweringContext, name: str, want: str, t):
    """A graph output named ``want``: the producing node's output renamed (an input or an
    initializer returned as is goes through an Identity)."""
    produced = any(name in n.output for n in ctx.nodes)
    if name == want and produced:
        return value_info(name, t)
    new = want if want not in ctx._used else ctx.unique(want)
    ctx._used.add(new)
    if not produced:
        ctx.nodes.append(helper.make_node("Identity", [name], [new], name=ctx.unique(new + "/id")))
    else:
        for n in ctx.nodes:
            for seq in (n.input, n.output):
                for i, x in enumerate(seq):
                    if x == name:
                        seq[i] = new
        for key, bound in list(ctx._names.items()):
            if bound == name:
                ctx._names[key] = new
    return value_info(new, t)


def optimization_profile(graph: Graph, ctx: Optional[LoweringContext] = None
                         ) -> dict[str, list[tuple[int, int, int]]]:
    """(min, opt, max) per input axis from the dims' ranges; opt is the max (TensorRT tunes
    its kernels for opt; edit build_trt.sh to tune for a smaller typical shape)."""
    lo = {sympy.Symbol(k, integer=True, positive=True): r.min for k, r in graph.dims.items()}
    hi = {sympy.Symbol(k, integer=True, positive=True): r.max for k, r in graph.dims.items()}
    out = {}
    for v in graph.inputs:
        axes = []
        for d in v.type.shape:
            if isinstance(d, int):
                axes.append((d, d, d))
            else:
                a, b = int(d.subs(lo)), int(d.subs(hi))
                axes.append((a, b, b))
        out[ctx.name(v) if ctx else v.name] = axes
    return out


def trtexec_command(export: OnnxExport, engine: str = "model.plan",
                    plugins: Optional[str] = None) -> list[str]:
    """The trtexec command line that builds a TensorRT engine from the export."""
    cmd = ["trtexec", f"--onnx={export.model_path.name}", f"--saveEngine={engine}",
           "--stronglyTyped"]
    for i, what in enumerate(("min", "opt", "max")):
        shapes = ",".join(f"{name}:" + "x".join(str(a[i]) for a in axes)
                          for name, axes in export.profile.items() if axes)
        if shapes:
            cmd.append(f"--{what}Shapes={shapes}")
    if export.custom_nodes:
        cmd.append(f"--dynamicPlugins={plugins or PLUGIN_LIBRARY}")
    return cmd


def write_build_script(export: OnnxExport) -> Path:
    path = export.model_path.parent / BUILD_SCRIPT
    plugin_note = ("# the irlm custom nodes need the plugin library: cmake -S kernels "
                   "-B build/kernels && cmake --build build/kernels\n"
                   f"# (IRLM_TRT_PLUGINS=path/to/{PLUGIN_LIBRARY})\n"
                   ) if export.custom_nodes else ""
    plugins = "${IRLM_TRT_PLUGINS:-" + PLUGIN_LIBRARY + "}" if export.custom_nodes else None
    cmd = trtexec_command(export, plugins="__PLUGINS__")
    line = " ".join(shlex.quote(c) for c in cmd).replace("__PLUGINS__", plugins or "")
    path.write_text("#!/bin/sh\n# Build a TensorRT engine from the irlm ONNX export "
                    "(docs/tensorrt.md).\n# Shapes: the optimization profile from the graph's "
                    "dimension ranges (min, opt, max).\n" + plugin_note +
                    'cd "$(dirname "$0")"\n' + line + ' "$@"\n', encoding="utf-8")
    path.chmod(0o755)
    return path


def _version() -> str:
    from irlm import __version__
    return __version__


__all__ = ["export_onnx", "OnnxExport", "check_model", "optimization_profile",
           "trtexec_command", "format_expr"]
