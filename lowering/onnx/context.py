"""The state of one IR -> ONNX lowering: names, nodes, initializers and runtime shapes.

Converters (convert_*.py) call :class:`LoweringContext` to read their operands' ONNX names,
emit nodes and constants, and turn irlm dimensions (ints or sympy expressions over named
symbols) into int64 shape tensors computed at run time from the graph inputs' shapes.
Weights become initializers whose bytes go to one external data file as they are met, so a
model of any size is written without holding its weights in a protobuf.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import sympy
import torch
from onnx import TensorProto, helper, numpy_helper

from irlm.errors import IRLMError
from irlm.ir import Graph, Op, Value
from irlm.types import DType, TensorType, format_expr

#: irlm element type -> ONNX TensorProto element type
ONNX_DTYPE = {
    DType.f32: TensorProto.FLOAT, DType.f16: TensorProto.FLOAT16,
    DType.bf16: TensorProto.BFLOAT16, DType.f8e4m3: TensorProto.FLOAT8E4M3FN,
    DType.i64: TensorProto.INT64, DType.i32: TensorProto.INT32, DType.i8: TensorProto.INT8,
    DType.u8: TensorProto.UINT8, DType.i4: TensorProto.INT4, DType.bool: TensorProto.BOOL,
}
#: tensors at least this large (bytes) go to the external data file, never inline
EXTERNAL_THRESHOLD = 1024
_ALIGN = 64


def onnx_dim(d) -> Any:
    """An irlm dim as a TensorShapeProto dim: an int, or its expression text as a dim_param."""
    return d if isinstance(d, int) else format_expr(d)


def value_info(name: str, t: TensorType):
    return helper.make_tensor_value_info(name, ONNX_DTYPE[t.dtype],
                                         [onnx_dim(d) for d in t.shape])


class ExternalData:
    """One append-only external data file that initializers point into."""

    def __init__(self, path: Path):
        self.path = path
        self.location = path.name
        self._file = open(path, "wb")
        self.offset = 0

    def add(self, name: str, array_bytes: bytes, dims: Sequence[int], elem: int):
        pad = (-self.offset) % _ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        self._file.write(array_bytes)
        t = TensorProto()
        t.name = name
        t.data_type = elem
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(self.offset)),
                     ("length", str(len(array_bytes)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += len(array_bytes)
        return t

    def close(self) -> None:
        self._file.close()


def tensor_bytes(x: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor in ONNX's raw_data layout."""
    x = x.detach().to("cpu").contiguous()
    if x.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        x = x.view(torch.uint8 if x.dtype == torch.float8_e4m3fn else torch.int16)
    return x.numpy().tobytes()


class LoweringContext:
    def __init__(self, graph: Graph, external: Optional[ExternalData]):
        self.graph = graph
        self.weights = graph.weights
        self.external = external
        self.nodes: list = []
        self.initializers: list = []
        self.opsets: dict[str, int] = {"": 23}
        self.op: Optional[Op] = None          # the op being converted (names its nodes)
        self._names: dict[int, str] = {}
        self._used: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._dims: dict[Any, str] = {}
        self._dim_sources: dict[str, tuple[str, int]] = {}
        #: a stateful input (the KV cache) -> the name of its latest updated version
        self.current_cache: dict[int, str] = {}
        self._deferred: dict[str, tuple[str, TensorType]] = {}
        for v in graph.inputs:
            self.bind(v, self.unique(v.name or "input"))
        for v in graph.inputs:
            for axis, d in enumerate(v.type.shape):
                if not isinstance(d, int) and d.is_Symbol and d.name not in self._dim_sources:
                    self._dim_sources[d.name] = (self.name(v), axis)

    # ----- names ------------------------------------------------------------------------
    def unique(self, hint: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.:/+-]", "_", hint) or "t"
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def bind(self, v: Value, name: str) -> None:
        self._names[id(v)] = name
        self._used.add(name)

    def name(self, v: Value) -> str:
        try:
            name = self._names[id(v)]
        except KeyError:
            raise IRLMError(f"{v.label()} is used before it is defined") from None
        if name in self._deferred:   # a weight is written when a node first reads it
            self.weight(*self._deferred.pop(name), name_as=name)
        return name

    def defer_weight(self, name: str, t: TensorType) -> str:
        """Reserve the initializer name of weight ``name``; its bytes are written only if a
        node reads it by name (a converter that repacks it, e.g. int4 as UINT4, does not)."""
        key = ("weight", name)
        if key in self._consts:
            return self._consts[key]
        out = self.unique(name)
        self._consts[key] = out
        self._deferred[out] = (name, t)
        return out

    def inp(self, op: Op, i: int) -> Optional[str]:
        """The ONNX name of operand ``i`` of ``op`` (None for an absent optional operand)."""
        return self.name(op.operands[i]) if i < len(op.operands) else None

    def result_name(self, op: Op, i: int = 0) -> str:
        return self.unique(op.results[i].name or op.name.split(".")[-1])

    # ----- nodes ------------------------------------------------------------------------
    def node(self, op_type: str, inputs: Sequence[Optional[str]], outputs: int | Sequence[str] = 1,
             domain: str = "", **attrs) -> list[str]:
        """Emit one node; ``outputs`` is a count (fresh names) or the names to use."""
        stem = op_type.lower()
        if self.op is not None:
            stem = (self.op.results[0].name if self.op.results else None) or \
                self.op.name.split(".")[-1]
            if self.op.loc.module:   # TensorRT layer names then show the torch module
                stem = f"{self.op.loc.module}/{stem}"
        if isinstance(outputs, int):
            outputs = [self.unique(f"{stem}/{op_type}") for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        n = helper.make_node(op_type, ["" if i is None else i for i in inputs], list(outputs),
                             name=self.unique(f"{stem}/{op_type}_node"), domain=domain or None,
                             **attrs)
        if self.op is not None and self.op.loc:
            n.doc_string = f"{self.op.name} at {self.op.loc}"
        self.nodes.append(n)
        return list(outputs)

    def node1(self, op_type: str, inputs, **attrs) -> str:
        return self.node(op_type, inputs, 1, **attrs)[0]

    # ----- constants and weights --------------------------------------------------------
    def const(self, value, dtype: Optional[DType] = None, hint: str = "const") -> str:
        """A constant tensor (numpy array, torch tensor or Python scalar/list)."""
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            if dtype is not None:
                t = t.to(dtype.torch)
            return self._tensor_initializer(t, hint, dedupe=True)
        arr = np.asarray(value)
        t = torch.from_numpy(arr.copy()) if arr.dtype != object else None
        if dtype is not None:
            t = t.to(dtype.torch)
        return self._tensor_initializer(t, hint, dedupe=True)

    def scalar(self, value, dtype: DType) -> str:
        return self.const(torch.tensor(value, dtype=dtype.torch if dtype is not DType.i4
                                       else torch.int8), dtype)

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64))

    def _tensor_initializer(self, t: torch.Tensor, hint: str, dedupe: bool,
                            name: Optional[str] = None) -> str:
        key = None
        if dedupe and t.numel() <= 16:
            key = (str(t.dtype), tuple(t.shape), tuple(t.reshape(-1).tolist()))
            if key in self._consts:
                return self._consts[key]
        name = name or self.unique(hint)
        elem = ONNX_DTYPE[DType.from_torch(t.dtype)]
        raw = tensor_bytes(t)
        if self.external is not None and len(raw) >= EXTERNAL_THRESHOLD:
            self.initializers.append(self.external.add(name, raw, list(t.shape), elem))
        else:
            self.initializers.append(helper.make_tensor(name, elem, list(t.shape), raw, raw=True))
        if key is not None:
            self._consts[key] = name
        return name

    def weight(self, name: str, t: TensorType, *, name_as: Optional[str] = None) -> str:
        """The initializer for weight ``name`` of the graph's store (written once)."""
        key = ("weight", name)
        if key in self._consts and name_as is None:
            return self._consts[key]
        if self.weights is None:
            raise IRLMError(f"the graph reads weight '{name}' but has no weight store: load the "
                            f"IR with its weights (an engine directory or a compile)")
        data = self.weights.get(name)
        if t.dtype is DType.i4:
            raise IRLMError(f"weight '{name}' is i4: export int4 weights through quant ops")
        out = self._tensor_initializer(data.to(t.dtype.torch), name, dedupe=False,
                                       name=name_as or self.unique(name))
        self._consts[key] = out
        return out

    # ----- dimensions -------------------------------------------------------------------
    def dim(self, d) -> str:
        """A 1-element int64 tensor holding dimension ``d`` at run time."""
        if isinstance(d, int):
            return self.ints([d])
        if d in self._dims:
            return self._dims[d]
        out = self._emit_expr(sympy.sympify(d))
        self._dims[d] = out
        return out

    def shape(self, dims: Sequence) -> str:
        """An int64 shape tensor for ``dims`` (a constant when every dim is static)."""
        if all(isinstance(d, int) for d in dims):
            return self.ints(dims)
        return self.node1("Concat", [self.dim(d) for d in dims], axis=0)

    def reshape_shape(self, dims: Sequence) -> str:
        """A Reshape target: a constant with -1 where only one dim is symbolic."""
        symbolic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        if len(symbolic) == 1:
            return self.ints([-1 if i == symbolic[0] else d for i, d in enumerate(dims)])
        return self.shape(dims)

    def _emit_expr(self, e) -> str:
        if e.is_Integer:
            return self.ints([int(e)])
        if e.is_Symbol:
            src = self._dim_sources.get(e.name)
            if src is None:
                raise IRLMError(f"dimension {e.name} appears in no graph input's shape, so the "
                                f"ONNX graph cannot compute it")
            if e in self._dims:
                return self._dims[e]
            name, axis = src
            out = self.node1("Shape", [name], start=axis, end=axis + 1)
            self._dims[e] = out
            return out
        if isinstance(e, sympy.Add):
            args = [self.dim(a) for a in e.args]
            return self._fold("Add", args)
        if isinstance(e, sympy.Mul):
            num, den = sympy.fraction(e)
            if den != 1:
                return self.node1("Div", [self.dim(num), self.dim(den)])
            return self._fold("Mul", [self.dim(a) for a in e.args])
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
            return self._fold("Mul", [self.dim(e.base)] * int(e.exp))
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            # dims are non-negative, so integer Div (truncation) is floor division
            return self.node1("Div", [self.dim(num), self.dim(den)])
        if isinstance(e, (sympy.Max, sympy.Min)):
            return self.node1("Max" if isinstance(e, sympy.Max) else "Min",
                              [self.dim(a) for a in e.args])
        if isinstance(e, sympy.Mod):
            return self.node1("Mod", [self.dim(a) for a in e.args])
        raise IRLMError(f"dimension expression {e} has no ONNX lowering")

    def _fold(self, op_type: str, args: list[str]) -> str:
        out = args[0]
        for a in args[1:]:
            out = self.node1(op_type, [out, a])
        return out

    # ----- small helpers converters share -------------------------------------------------
    def cast(self, name: str, src: DType, dst: DType) -> str:
        return name if src is dst else self.node1("Cast", [name], to=ONNX_DTYPE[dst])

    def operand_as(self, op: Op, i: int, dtype: DType) -> str:
        return self.cast(self.inp(op, i), op.operands[i].type.dtype, dtype)
