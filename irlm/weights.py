"""The lazy weight store behind ``param`` ops.

A graph never holds weight data: a ``param`` op names an entry here, and the entry knows the
tensor's type and how to load it (from a memory-mapped safetensors file, a GGUF tensor that is
dequantized on first use, an in-memory tensor, or a function of other entries, e.g. the
concatenation that QKV fusion creates).  Loading happens only when something (the reference
interpreter, an engine writer) asks for the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from .errors import IRError, IRLMError
from .types import DType, TensorType


@dataclass
class WeightEntry:
    type: TensorType
    loader: Callable[[], torch.Tensor]
    source: str  # human-readable origin, for error messages and dumps


class WeightStore:
    def __init__(self):
        self._entries: dict[str, WeightEntry] = {}
        self._cache: dict[str, torch.Tensor] = {}
        self.cache_loaded = True

    # ----- adding entries -----------------------------------------------------------------
    def add_tensor(self, name: str, tensor: torch.Tensor, source: str = "memory") -> TensorType:
        t = TensorType(tuple(tensor.shape), DType.from_torch(tensor.dtype))
        if tensor.device.type == "meta":
            def loader():
                raise IRLMError(f"weight '{name}' has no data: it was traced on the meta device")
            self._put(name, WeightEntry(t, loader, "meta"))
        else:
            self._put(name, WeightEntry(t, lambda: tensor, source))
        return t

    def add_lazy(self, name: str, type: TensorType, loader: Callable[[], torch.Tensor],
                 source: str = "lazy") -> TensorType:
        self._put(name, WeightEntry(type, loader, source))
        return type

    def add_derived(self, name: str, type: TensorType, inputs: Iterable[str],
                    fn: Callable[..., torch.Tensor], how: str = "derived") -> TensorType:
        """An entry computed from other entries on first use (fusion, quantization, sharding)."""
        inputs = list(inputs)
        for i in inputs:
            self.type_of(i)
        return self.add_lazy(name, type, lambda: fn(*[self.get(i) for i in inputs]),
                             f"{how}({', '.join(inputs)})")

    def add_safetensors(self, path, prefix: str = "", rename: Optional[Callable[[str], str]] = None
                        ) -> list[str]:
        """Register every tensor of a safetensors file, memory-mapped, without reading data."""
        from safetensors import safe_open
        path = Path(path)
        names = []
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise IRLMError(f"{path}: cannot open as safetensors: {e}") from None
        for key in f.keys():
            sl = f.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise IRLMError(f"{path}: tensor '{key}' has unsupported dtype {sl.get_dtype()}")
            name = prefix + (rename(key) if rename else key)
            t = TensorType(tuple(sl.get_shape()), dtype)
            self._put(name, WeightEntry(t, (lambda k=key: f.get_tensor(k)), str(path)))
            names.append(name)
        return names

    def _put(self, name: str, entry: WeightEntry) -> None:
        self._entries[name] = entry
        self._cache.pop(name, None)

    # ----- queries ------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def entry(self, name: str) -> WeightEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise IRError(f"weight '{name}' is not in the weight store") from None

    def type_of(self, name: str) -> TensorType:
        return self.entry(name).type

    def get(self, name: str) -> torch.Tensor:
        """The tensor's data (loaded on first use); checked against the declared type."""
        if name in self._cache:
            return self._cache[name]
        e = self.entry(name)
        t = e.loader()
        if tuple(t.shape) != tuple(e.type.shape) or DType.from_torch(t.dtype) != e.type.dtype \
                and not (e.type.dtype is DType.i4 and t.dtype == torch.int8):
            raise IRError(f"weight '{name}' from {e.source} loaded as {tuple(t.shape)} "
                          f"{t.dtype}, but its type is {e.type}")
        if self.cache_loaded:
            self._cache[name] = t
        return t

    def drop_cache(self) -> None:
        self._cache.clear()

    def nbytes(self) -> int:
        total = 0
        for e in self._entries.values():
            n = e.type.numel()
            if isinstance(n, int):
                total += n * e.type.dtype.bits // 8
        return total


_SAFETENSORS_DTYPES = {"F32": DType.f32, "F16": DType.f16, "BF16": DType.bf16,
                       "F8_E4M3": DType.f8e4m3, "I64": DType.i64, "I32": DType.i32,
                       "I8": DType.i8, "U8": DType.u8, "BOOL": DType.bool}
