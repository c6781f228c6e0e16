"""The ``irlm`` ONNX domain: custom nodes for what no standard or contrib op expresses.

Each entry names the node, its inputs, outputs and attributes exactly as the plugin library
(kernels/CMakeLists.txt builds ``libirlm_trt_plugins.so``; kernels/plugins/irlm_plugins.cpp)
registers its TensorRT plugin creators, so a TensorRT ONNX parser maps each node to its plugin
by (domain-less) op type, plugin version and namespace.  docs/onnx.md lists them for users.
"""
from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "irlm"
DOMAIN_VERSION = 1
#: the TensorRT plugin namespace and version the plugin library registers its creators under
PLUGIN_NAMESPACE = "irlm"
PLUGIN_VERSION = "1"


@dataclass(frozen=True)
class CustomOp:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, str]      # name -> ONNX attribute type (INT, FLOAT, FLOATS, ...)
    doc: str
    type_vars: dict[str, str]       # input/output name -> type variable of TYPE_VARS


#: type variables of the custom ops' inputs and outputs
TYPE_VARS = {
    "T": ("tensor(float)", "tensor(float16)", "tensor(bfloat16)"),
    "C": ("tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int8)",
          "tensor(float8e4m3fn)"),
    "I": ("tensor(int32)",),
}


PAGED_ATTENTION = CustomOp(
    "PagedAttention",
    inputs=("query", "key", "value", "kv_cache", "block_tables", "q_lens", "cached_lens"),
    outputs=("output", "kv_cache_out"),
    attributes={"layer": "INT", "scale": "FLOAT", "sliding_window": "INT",
                "alibi_slopes": "FLOATS", "kv_scales": "FLOATS"},
    doc="llm.paged_attention: causal attention of packed tokens [tokens, heads, head_dim] over "
        "the paged KV cache [layers, blocks, 2, block_size, kv_heads, head_dim], writing this "
        "step's keys and values first. kv_cache_out is kv_cache updated (the plugin aliases "
        "it in place); the next layer's node reads it, and the graph returns it.",
    type_vars={"query": "T", "key": "T", "value": "T", "kv_cache": "C", "block_tables": "I",
               "q_lens": "I", "cached_lens": "I", "output": "T", "kv_cache_out": "C"})

CUSTOM_OPS = {op.name: op for op in (PAGED_ATTENTION,)}


def custom_nodes(model) -> list:
    """The ``irlm``-domain nodes of an ONNX ModelProto."""
    return [n for n in model.graph.node if n.domain == DOMAIN]


_registered = False


def register_schemas() -> None:
    """Register the irlm domain's op schemas with onnx, so onnx.checker verifies each custom
    node's inputs, outputs and attribute types like a standard node's."""
    global _registered
    if _registered:
        return
    from onnx import defs
    attr_type = {"INT": defs.OpSchema.AttrType.INT, "FLOAT": defs.OpSchema.AttrType.FLOAT,
                 "FLOATS": defs.OpSchema.AttrType.FLOATS}
    for op in CUSTOM_OPS.values():
        try:
            defs.get_schema(op.name, DOMAIN_VERSION, DOMAIN)
            continue   # registered by an earlier import in this process
        except defs.SchemaError:
            pass
        schema = defs.OpSchema(
            op.name, DOMAIN, DOMAIN_VERSION, doc=op.doc,
            inputs=[defs.OpSchema.FormalParameter(n, op.type_vars[n]) for n in op.inputs],
            outputs=[defs.OpSchema.FormalParameter(n, op.type_vars[n]) for n in op.outputs],
            type_constraints=[(var, list(types), "") for var, types in TYPE_VARS.items()],
            attributes=[defs.OpSchema.Attribute(n, attr_type[t], "", required=(n == "layer"))
                        for n, t in op.attributes.items()])
        defs.register_schema(schema)
    _registered = True
