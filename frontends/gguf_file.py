"""Reading a GGUF file: its metadata as Python values, its tensor table, and one tensor's data.

The layout (GGUF v2/v3, little-endian; llama.cpp's ggml/docs/gguf.md)::

    "GGUF"  version:u32  tensor_count:u64  kv_count:u64
    kv_count x   key:string  type:u32  value          (an array: elem_type:u32 count:u64 elems)
    tensor_count x  name:string  n_dims:u32  dims:u64[n_dims]  ggml_type:u32  offset:u64
    padding to general.alignment (default 32), then the tensor data

Why not ``gguf.GGUFReader``: it builds a numpy view for every element of every array, and a
vocabulary is two arrays of ~50k strings (tokens, merges), so opening SmolLM2's file takes 3-4 s
of CPU, most of ``irlm compile``'s loading time.  This reader decodes the same header with
``struct`` in about 0.1 s.  Everything else comes from the ``gguf`` package: the type enums, the
block sizes (``GGML_QUANT_SIZES``) and the dequantization (``gguf.quants.dequantize``; Q4_0,
Q4_1 and Q8_0 blocks are dequantized by torch with the same float32 arithmetic); the tests check
that this reader and ``GGUFReader`` agree on metadata and tensors.
"""
from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .loaded_model import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType) with a fixed size → struct format
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_TYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


MAX_DIMS = 8             # GGML tensors have at most 4; a larger count is a corrupt header
MAX_ARRAY_DEPTH = 8      # real metadata nests arrays at most 2 deep


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor is and how it is stored."""
    name: str
    shape: tuple[int, ...]      # torch order (outermost first); GGUF lists innermost first
    ggml_type: Any              # gguf.GGMLQuantizationType
    offset: int                 # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """An open GGUF file: ``metadata`` (key → Python value) and ``tensors`` (name → info)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such GGUF file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path}: not a GGUF file (it starts with {magic!r}; a "
                                 f"GGUF file starts with {GGUF_MAGIC!r})")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError, ValueError, OverflowError,
                MemoryError) as e:
            raise ModelLoadError(f"{self.path}: truncated or corrupt GGUF header "
                                 f"({type(e).__name__}: {e})") from None

    # ----- header ---------------------------------------------------------------------------
    def _parse(self) -> None:
        import gguf
        buf = memoryview(self._data)
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
        if version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise ModelLoadError(f"{self.path}: GGUF version {version}{hint} is not supported "
                                 f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        pos = 24
        self.metadata: dict[str, Any] = {}
        # every entry takes at least 13 (metadata) or 24 (tensor) bytes: a count the file
        # cannot hold is refused before the loop, not discovered one entry at a time
        if kv_count * 13 + tensor_count * 24 > len(buf):
            raise ModelLoadError(f"{self.path}: truncated or corrupt GGUF header (it claims "
                                 f"{kv_count} metadata entries and {tensor_count} tensors, more "
                                 f"than its {len(buf)} bytes hold)")
        for _ in range(kv_count):
            key, pos = _read_string(buf, pos)
            (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            self.metadata[key], pos = _read_value(buf, pos, vtype)
        raw = []
        for _ in range(tensor_count):
            name, pos = _read_string(buf, pos)
            (n_dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            if n_dims > MAX_DIMS:
                raise ModelLoadError(f"{self.path}: tensor '{name}' has {n_dims} dimensions "
                                     f"(GGUF tensors have at most {MAX_DIMS})")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
            pos += 8 * n_dims
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            raw.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or \
                not 1 <= alignment <= 1 << 16 or alignment & (alignment - 1):
            raise ModelLoadError(f"{self.path}: general.alignment must be a power of two in "
                                 f"[1, 65536], got {alignment!r:.40}")
        data_start = -(-pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, offset in raw:
            try:
                qtype = gguf.GGMLQuantizationType(ggml_type)
            except ValueError:
                raise ModelLoadError(f"{self.path}: tensor '{name}' has GGML type {ggml_type}, "
                                     f"which this gguf package does not know") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            numel = int(np.prod(shape)) if shape else 1
            nbytes = numel // block * type_size
            start = data_start + offset
            if start + nbytes > len(self._data):
                raise ModelLoadError(f"{self.path}: tensor '{name}' ends past the end of the "
                                     f"file (truncated download?)")
            self.tensors[name] = GGUFTensorInfo(name, shape, qtype, start, nbytes)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"{self.path}: has no general.architecture metadata")
        return arch

    def torch_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    # ----- tensor data ----------------------------------------------------------------------
    def dequantize(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as float32 in torch order (dequantized if stored quantized)."""
        from gguf.quants import dequantize
        info = self.tensors[name]
        fast = _TORCH_DEQUANT.get(getattr(info.ggml_type, "name", ""))
        if fast is not None:
            raw = self._data[info.offset:info.offset + info.nbytes]
            with warnings.catch_warnings():      # read-only map: only ever read
                warnings.simplefilter("ignore", UserWarning)
                blocks = torch.from_numpy(np.asarray(raw))
            return fast(blocks).reshape(info.shape)
        # One row of bytes per innermost row, the layout gguf.quants.dequantize expects.
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        raw = self._data[info.offset:info.offset + info.nbytes].reshape(rows, -1)
        try:
            values = dequantize(raw, info.ggml_type)
        except NotImplementedError:
            raise ModelLoadError(f"{self.path}: tensor '{name}' is stored as "
                                 f"{info.ggml_type.name}, which the gguf package cannot "
                                 f"dequantize") from None
        # np.array copies: F32 data comes back as a read-only view of the memory-mapped file
        values = np.array(values, dtype=np.float32)
        return torch.from_numpy(values).reshape(info.shape)


# ----- the common block formats, dequantized by torch ---------------------------------------------
# The same arithmetic as gguf.quants (float32, in the same order, so the same bits: the tests
# compare them) without numpy's per-row Python loop: about 10x faster on SmolLM2's Q4_1 file,
# seconds of ``irlm compile``.

def _f16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes ``start:start+2`` of each block (a little-endian f16) as float32 [blocks, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    """Q4_1: 32 weights a block, ``d * q + m``; f16 d, f16 m, then 16 bytes of nibbles (weights
    0..15 the low nibbles, 16..31 the high ones)."""
    b = raw.reshape(-1, 20)
    qs = b[:, 4:]
    q = torch.cat((qs & 0xF, qs >> 4), 1).float()
    return (_f16_field(b, 0) * q + _f16_field(b, 2)).reshape(-1)


def _dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    """Q4_0: 32 weights a block, ``d * (q - 8)``; f16 d, then 16 bytes of nibbles."""
    b = raw.reshape(-1, 18)
    qs = b[:, 2:]
    q = (torch.cat((qs & 0xF, qs >> 4), 1).to(torch.int8) - 8).float()
    return (_f16_field(b, 0) * q).reshape(-1)


def _dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    """Q8_0: 32 weights a block, ``q * d``; f16 d, then 32 int8."""
    b = raw.reshape(-1, 34)
    q = b[:, 2:].contiguous().view(torch.int8).float()
    return (q * _f16_field(b, 0)).reshape(-1)


_TORCH_DEQUANT = {"Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1, "Q8_0": _dequant_q8_0}


def _read_string(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    return bytes(buf[pos:pos + n]).decode("utf-8"), pos + n


def _read_value(buf: memoryview, pos: int, vtype: int, depth: int = 0) -> tuple[Any, int]:
    if vtype == _STRING:
        return _read_string(buf, pos)
    if vtype == _ARRAY:
        elem_type, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if depth >= MAX_ARRAY_DEPTH:
            raise ValueError(f"metadata arrays nested deeper than {MAX_ARRAY_DEPTH}")
        if count > len(buf) - pos:          # every element takes at least one byte
            raise ValueError(f"an array of {count} elements cannot fit in the file")
        if elem_type in _NUMPY_TYPES:
            dt = np.dtype(_NUMPY_TYPES[elem_type]).newbyteorder("<")
            values = np.frombuffer(buf, dtype=dt, count=count, offset=pos)
            return values.tolist(), pos + count * dt.itemsize
        out = []
        for _ in range(count):
            v, pos = _read_value(buf, pos, elem_type, depth + 1)
            out.append(v)
        return out, pos
    fmt = _SCALAR_FORMATS.get(vtype)
    if fmt is None:
        raise ValueError(f"unknown GGUF value type {vtype}")
    (v,) = struct.unpack_from(fmt, buf, pos)
    return v, pos + struct.calcsize(fmt)
