"""Element types, dimensions and tensor types.

A dimension is either a Python ``int`` or a symbolic expression (a sympy integer expression over
named symbols such as ``batch`` and ``tokens``).  Symbols are declared once per graph with an
inclusive ``[min, max]`` range, like a TensorRT optimization profile; expressions such as
``batch*seq`` appear after reshapes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Union

import sympy

from .errors import IRError

if TYPE_CHECKING:      # annotations only: the IR core imports torch on first use
    import torch


class DType(enum.Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    f8e4m3 = "f8e4m3"
    i64 = "i64"
    i32 = "i32"
    i8 = "i8"
    u8 = "u8"
    i4 = "i4"  # packed two per byte in storage; one int8 per element in the interpreter
    bool = "bool"

    def __repr__(self) -> str:
        return f"DType.{self.value}"

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_int(self) -> bool:
        return self in _INTS

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def torch(self) -> "torch.dtype":
        """The torch dtype that holds this type's values in the reference implementations."""
        return _torch_dtypes()[0][self]

    @staticmethod
    def from_torch(dt: "torch.dtype") -> "DType":
        from_torch = _torch_dtypes()[1]
        try:
            return from_torch[dt]
        except KeyError:
            raise IRError(f"torch dtype {dt} has no irlm equivalent "
                          f"(supported: {', '.join(str(t) for t in from_torch)})") from None

    @staticmethod
    def parse(text: str) -> "DType":
        try:
            return DType(text)
        except ValueError:
            raise IRError(f"unknown dtype '{text}' (valid: {', '.join(d.value for d in DType)})") from None


_FLOATS = {DType.f32, DType.f16, DType.bf16, DType.f8e4m3}
_INTS = {DType.i64, DType.i32, DType.i8, DType.u8, DType.i4}
_BITS = {DType.f32: 32, DType.f16: 16, DType.bf16: 16, DType.f8e4m3: 8, DType.i64: 64,
         DType.i32: 32, DType.i8: 8, DType.u8: 8, DType.i4: 4, DType.bool: 8}


@lru_cache(maxsize=None)
def _torch_dtypes():
    """(irlm → torch, torch → irlm) dtype maps.  Built on first use so that the IR core, and
    with it ``irlm --help``, does not import torch (over a second of start-up)."""
    import torch
    to_torch = {DType.f32: torch.float32, DType.f16: torch.float16, DType.bf16: torch.bfloat16,
                DType.f8e4m3: torch.float8_e4m3fn, DType.i64: torch.int64, DType.i32: torch.int32,
                DType.i8: torch.int8, DType.u8: torch.uint8, DType.i4: torch.int8,
                DType.bool: torch.bool}
    return to_torch, {v: k for k, v in to_torch.items() if k is not DType.i4}


Dim = Union[int, sympy.Expr]


@lru_cache(maxsize=None)
def sym(name: str) -> sympy.Symbol:
    """The symbol for a named dimension; symbolic dims are positive integers."""
    return sympy.Symbol(name, integer=True, positive=True)


def normalize_axis(axis: int, rank: int) -> int:
    """A possibly negative axis (torch's convention) as an index in ``range(rank)``; a scalar
    (rank 0) takes axis 0 or -1 like torch.  An IRError when out of range.  The one axis
    normalizer: ops, passes and frontends all call this."""
    n = max(rank, 1)
    if not -n <= axis < n:
        raise IRError(f"axis {axis} is out of range for rank {rank}")
    return axis % n


def normalize_dim(d) -> Dim:
    """Turn ints, sympy integers and constant expressions into ``int``; keep symbolic ones."""
    if isinstance(d, bool):
        raise IRError(f"a dimension must be an integer, not {d!r}")
    if isinstance(d, int):
        return d
    if isinstance(d, sympy.Basic):
        d = sympy.sympify(d)
        if d.is_Integer:
            return int(d)
        if d.free_symbols:
            return d
        raise IRError(f"dimension {d} is not an integer")
    raise IRError(f"a dimension must be an int or a symbolic expression, not {type(d).__name__}")


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:
        return True
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def dim_product(dims) -> Dim:
    p = sympy.Integer(1)
    for d in dims:
        p = p * d
    return normalize_dim(sympy.expand(p))


def format_dim(d: Dim) -> str:
    """Text form of a dimension: ``576`` or ``[batch*seq]``."""
    if isinstance(d, int):
        return str(d)
    return "[" + format_expr(d) + "]"


def format_expr(e) -> str:
    """Deterministic text of a dimension expression using ``+ - * //`` and parentheses."""
    if isinstance(e, int):
        return str(e)
    return _format_expr(e)


@lru_cache(maxsize=4096)
def _format_expr(e: sympy.Expr) -> str:
    if e.is_Integer:
        return str(int(e))
    if e.is_Symbol:
        return e.name
    if isinstance(e, sympy.Add):
        terms = sorted(e.args, key=sympy.default_sort_key)
        # constants last reads naturally: seq + 1
        terms = [t for t in terms if not t.is_Number] + [t for t in terms if t.is_Number]
        out = _format_expr(terms[0])
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                out += " - " + _paren(-t, sympy.Add)
            else:
                out += " + " + _paren(t, sympy.Add)
        return out
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        factors = sorted(sympy.Mul.make_args(rest), key=sympy.default_sort_key)
        parts = [_paren(f, sympy.Mul) for f in factors]
        if coeff == -1:
            return "-" + "*".join(parts)
        if coeff != 1:
            parts.insert(0, str(coeff))
        return "*".join(parts)
    if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
        return "*".join([_paren(e.base, sympy.Mul)] * int(e.exp))
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if den.is_Integer or den.is_Symbol or isinstance(den, (sympy.Mul, sympy.Add)):
            # `//` is left-associative: a product in the denominator needs parentheses
            den_text = _format_expr(den) if (den.is_Integer or den.is_Symbol) \
                else f"({_format_expr(den)})"
            return f"{_paren(num, sympy.Mul)} // {den_text}"
    if isinstance(e, (sympy.Max, sympy.Min)):
        name = "max" if isinstance(e, sympy.Max) else "min"
        args = sorted(e.args, key=sympy.default_sort_key)
        return f"{name}(" + ", ".join(_format_expr(a) for a in args) + ")"
    raise IRError(f"dimension expression {e} cannot be written in IR text")


def _paren(e, ctx) -> str:
    s = _format_expr(e)
    if isinstance(e, sympy.Add) or (ctx is sympy.Mul and isinstance(e, sympy.floor)):
        return f"({s})"
    return s


@dataclass(frozen=True)
class DimRange:
    """The inclusive range of a symbolic dimension."""
    min: int
    max: int

    def __post_init__(self):
        if not (0 <= self.min <= self.max):
            raise IRError(f"invalid dimension range [{self.min}, {self.max}]")


class TensorType:
    """The static type of a value: a shape of dims and an element type."""

    __slots__ = ("shape", "dtype", "_hash")

    def __init__(self, shape, dtype: DType):
        if not isinstance(dtype, DType):
            raise IRError(f"expected a DType, got {dtype!r}")
        self.shape: tuple[Dim, ...] = tuple(normalize_dim(d) for d in shape)
        self.dtype = dtype
        self._hash = None

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Dim:
        return dim_product(self.shape)

    def free_symbols(self) -> set[str]:
        out: set[str] = set()
        for d in self.shape:
            if not isinstance(d, int):
                out |= {s.name for s in d.free_symbols}
        return out

    def with_shape(self, shape) -> "TensorType":
        return TensorType(shape, self.dtype)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(self.shape, dtype)

    def __eq__(self, other) -> bool:
        if not isinstance(other, TensorType):
            return NotImplemented
        return (self.dtype is other.dtype and len(self.shape) == len(other.shape)
                and all(dims_equal(a, b) for a, b in zip(self.shape, other.shape)))

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((self.dtype, len(self.shape)))
        return self._hash

    def __str__(self) -> str:
        return format_type(self)

    def __repr__(self) -> str:
        return f"TensorType({format_type(self)})"


def format_type(t: TensorType) -> str:
    """``tensor<[batch]x[seq]x576xbf16>``; a scalar is ``tensor<f32>``."""
    parts = [format_dim(d) for d in t.shape]
    parts.append(t.dtype.value)
    return "tensor<" + "x".join(parts) + ">"
