"""Running an export in onnxruntime (CPU), ``irlm``-domain nodes included.

onnxruntime has no kernel for ``irlm.PagedAttention``; :func:`onnxruntime_session` registers
one through onnxruntime-extensions' Python custom ops, backed by irlm's reference
implementation (irlm/ops/llm.py), so the inference form runs end to end: prefill then decode,
with the KV cache as graph input and output.  onnxruntime-extensions serves Python ops from its
own domain and with scalar attributes only, so a copy of the model
(``<model>.onnxruntime.onnx``, beside it to share the external data) moves the custom nodes
into that domain and carries list attributes as JSON strings.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from irlm.errors import IRLMError

from .custom_ops import CUSTOM_OPS, DOMAIN, PAGED_ATTENTION


def onnxruntime_session(model_path, threads: int = 1, optimize: bool = True):
    """An onnxruntime CPU InferenceSession for an exported model.  ``optimize=False`` keeps
    onnxruntime to basic graph rewrites: its extended ones replace DequantizeLinear + MatMul
    of int8 weights with a kernel that also quantizes the activations (dynamic int8), which
    is faster but no longer the model's arithmetic."""
    import onnx
    import onnxruntime as ort
    path = Path(model_path)
    model = onnx.load(str(path), load_external_data=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if any(n.domain == DOMAIN for n in model.graph.node):
        path = _with_python_custom_ops(model, path, opts)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(session, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run ``session`` on torch tensors (by input name); outputs as torch tensors."""
    feeds = {}
    for i in session.get_inputs():
        if i.name not in inputs:
            raise IRLMError(f"missing input {i.name}")
        feeds[i.name] = _to_numpy(inputs[i.name])
    return [torch.from_numpy(np.ascontiguousarray(o)) for o in session.run(None, feeds)]


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    if x.dtype == torch.bfloat16:
        import ml_dtypes
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.detach().cpu().numpy()


def _with_python_custom_ops(model, path: Path, opts) -> Path:
    import onnx
    from onnxruntime_extensions import get_library_path
    from onnxruntime_extensions._ocos import default_opset_domain
    _register_reference_ops()
    contrib = default_opset_domain()
    for n in model.graph.node:
        if n.domain != DOMAIN:
            continue
        if n.op_type not in CUSTOM_OPS:
            raise IRLMError(f"{n.name}: no reference kernel for {DOMAIN}.{n.op_type}")
        n.domain = contrib
        n.op_type = _PY_OP_TYPE[n.op_type]
        _attrs_as_json(n)
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", 23),
                               onnx.helper.make_opsetid(contrib, 1)])
    out = path.with_name(path.stem + ".onnxruntime.onnx")
    onnx.save_model(model, str(out))
    opts.register_custom_ops_library(get_library_path())
    return out


def _attrs_as_json(node) -> None:
    """Every attribute as one JSON string attribute ``attrs`` (the Python op reads it)."""
    from onnx import helper
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("attrs", json.dumps(
        {k: (list(v) if isinstance(v, Sequence) else v) for k, v in values.items()}))])


_PY_OP_TYPE = {PAGED_ATTENTION.name: "IrlmPagedAttention"}
_registered = False


def _register_reference_ops() -> None:
    global _registered
    if _registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op
    f, i = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32

    @onnx_op(op_type=_PY_OP_TYPE[PAGED_ATTENTION.name], inputs=[f, f, f, f, i, i, i],
             outputs=[f, f], attrs={"attrs": PyCustomOpDef.dt_string})
    def paged_attention(q, k, v, cache, tables, q_lens, cached_lens, attrs):
        from irlm.registry import get_op_def
        a = json.loads(attrs)
        cache = torch.from_numpy(np.array(cache))   # the op writes it: a private copy
        out = get_op_def("llm.paged_attention").run_reference(
            [torch.from_numpy(np.asarray(x)) for x in (q, k, v)] + [cache] +
            [torch.from_numpy(np.asarray(x)) for x in (tables, q_lens, cached_lens)],
            {"layer": a["layer"], "scale": a.get("scale"),
             "sliding_window": a.get("sliding_window", 0),
             "alibi_slopes": tuple(a.get("alibi_slopes", ())),
             "kv_scales": tuple(a.get("kv_scales", ()))})[0]
        return out.numpy(), cache.numpy()
    _registered = True
