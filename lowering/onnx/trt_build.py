"""ONNX export -> serialized TensorRT engine, through TensorRT's Python API.

The network is the ONNX export (TensorRT's ONNX parser reads it; the ``irlm``-domain nodes
resolve to the plugin library's creators), the optimization profile comes from the graph's
dimension ranges, and the precision flags from the compile's dtype and quantization mode.
``tensorrt`` is imported only here and only when an engine is built: where it is not
installed, :func:`require_tensorrt` stops with one line that says so and what to run instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from irlm.errors import IRLMError

from .export import BUILD_SCRIPT, PLUGIN_LIBRARY, OnnxExport

ENGINE_FILE = "model.plan"


class TensorRTUnavailable(IRLMError):
    """TensorRT's Python package is not importable here."""


def require_tensorrt():
    """The ``tensorrt`` module, or TensorRTUnavailable with the way forward."""
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"--target tensorrt: TensorRT is not installed (import tensorrt: {e}); "
            f"--target onnx writes the same network as model.onnx plus {BUILD_SCRIPT}, the "
            f"trtexec command line that builds the engine where TensorRT is") from None
    return tensorrt


def find_plugin_library(explicit: Optional[str] = None) -> Optional[Path]:
    """The plugin library: ``explicit``, else $IRLM_TRT_PLUGINS, else the CMake build tree."""
    for cand in (explicit, os.environ.get("IRLM_TRT_PLUGINS"),
                 Path(__file__).resolve().parents[2] / "build" / "kernels" / PLUGIN_LIBRARY):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def precision_flags(trt, dtype: str, quant: Optional[str]) -> list:
    """Builder flags for a weakly typed network (a strongly typed one takes its types from the
    ONNX tensors and Q/DQ nodes instead)."""
    flags = {"f16": [trt.BuilderFlag.FP16], "bf16": [trt.BuilderFlag.BF16]}.get(dtype, [])
    if quant in ("int8", "w8a8-sq"):
        flags.append(trt.BuilderFlag.INT8)
    elif quant == "fp8":
        flags.append(trt.BuilderFlag.FP8)
    elif quant in ("int4", "int4-awq"):
        flags.append(trt.BuilderFlag.INT4)
    return flags


def build_engine(export: OnnxExport, engine_path=None, *, dtype: str = "f32",
                 quant: Optional[str] = None, strongly_typed: bool = True,
                 plugin_library: Optional[str] = None,
                 workspace_bytes: Optional[int] = None) -> Path:
    """Parse ``export.model_path``, build with its optimization profile, serialize."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    if export.custom_nodes:
        lib = find_plugin_library(plugin_library)
        if lib is None:
            raise IRLMError(f"{export.model_path} has irlm custom nodes "
                            f"({', '.join(export.custom_nodes[:2])}, ...): build the plugin "
                            f"library (cmake -S kernels -B build/kernels && cmake --build "
                            f"build/kernels) and pass it with IRLM_TRT_PLUGINS=PATH")
        trt.init_libnvinfer_plugins(logger, "")
        # the library exports getCreators / setLoggerFinder (TensorRT's plugin-library
        # interface), which load_library reads
        trt.get_plugin_registry().load_library(str(lib))
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(export.model_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = f" (node {first.node_name()}, {first.node_operator()})" if first else ""
        raise IRLMError(f"TensorRT's ONNX parser rejected {export.model_path}{where}: "
                        f"{first.desc() if first else 'no error reported'}")
    config = builder.create_builder_config()
    if not strongly_typed:
        for f in precision_flags(trt, dtype, quant):
            config.set_flag(f)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, axes in export.profile.items():
        profile.set_shape(name, tuple(a[0] for a in axes), tuple(a[1] for a in axes),
                          tuple(a[2] for a in axes))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise IRLMError(f"TensorRT could not build an engine from {export.model_path} "
                        f"(its log above says why)")
    path = Path(engine_path) if engine_path else export.model_path.parent / ENGINE_FILE
    path.write_bytes(bytes(serialized))
    return path
