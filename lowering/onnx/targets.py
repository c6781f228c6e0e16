"""The ONNX and TensorRT targets as the CLI calls them: IR file in, model (or engine) out.

``irlm compile --target onnx|tensorrt`` and ``irlm export-onnx`` are thin wrappers over
:func:`lower_to_target` and :func:`load_ir`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from irlm.errors import IRLMError

from .export import OnnxExport, export_onnx

TARGETS = ("engine", "onnx", "tensorrt")


def check_target(target: str) -> None:
    """Fail before any work: an unknown target, or TensorRT missing for --target tensorrt."""
    if target not in TARGETS:
        raise IRLMError(f"--target {target}: unknown target (valid: {', '.join(TARGETS)})")
    if target == "tensorrt":
        from .trt_build import require_tensorrt
        require_tensorrt()


def lower_to_target(graph, out_dir, target: str = "onnx", *, dtype: str = "f32",
                    quant: Optional[str] = None, metadata: Optional[dict] = None
                    ) -> tuple[OnnxExport, Optional[Path]]:
    """Export ``graph`` to ONNX in ``out_dir``; for ``tensorrt`` also build model.plan."""
    check_target(target)
    meta = {"irlm.dtype": dtype, **({"irlm.quant": quant} if quant else {}), **(metadata or {})}
    export = export_onnx(graph, out_dir, metadata=meta)
    engine = None
    if target == "tensorrt":
        from .trt_build import build_engine
        engine = build_engine(export, dtype=dtype, quant=quant)
    return export, engine


def load_ir(path, weight_files: Sequence[str] = ()):
    """An IR file (with its weights from safetensors files), or an engine directory
    (plan.irlm + weights.safetensors)."""
    from irlm.text.parser import parse_graph
    from irlm.weights import WeightStore
    p = Path(path)
    if p.is_dir():
        from irlm.lowering.engine_format import MANIFEST, PLAN_FILE, WEIGHTS_FILE
        if not (p / MANIFEST).is_file():
            raise IRLMError(f"{p}: a directory that is not an engine (no {MANIFEST}); give an "
                            f"IR file or an engine directory")
        weight_files = [str(p / WEIGHTS_FILE), *weight_files]
        p = p / PLAN_FILE
    if not p.is_file():
        raise IRLMError(f"{p}: no such file")
    store = None
    if weight_files:
        store = WeightStore()
        for w in weight_files:
            if not Path(w).is_file():
                raise IRLMError(f"--weights {w}: no such file")
            store.add_safetensors(w)
    return parse_graph(p.read_text(encoding="utf-8"), str(p), weights=store)
