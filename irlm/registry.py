"""The op registry: each op is defined exactly once.

An :class:`OpDef` states an op's operands, its attribute schema (types and defaults), how it
infers result types from operand types, and its reference semantics (torch on the CPU).  The
builder, the verifier, the text parser, the reference interpreter and the passes all read the
same definition.

Operand specs: ``"x"`` is required, ``"bias?"`` optional (may be absent at the end), and
``"inputs*"`` variadic (one or more; only as the last spec).

Attribute kinds: ``int float bool str dtype ints floats strs dim dims type tensor``.  ``dim`` is
an int or a symbolic expression; ``dims`` a list of them (shapes); ``type`` a TensorType;
``tensor`` a small dense torch tensor (constants).
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import sympy

from .errors import IRError
from .types import DType, TensorType, normalize_dim

if TYPE_CHECKING:      # annotations only: the IR core imports torch on first use
    import torch

REQUIRED = object()

ATTR_KINDS = ("int", "float", "bool", "str", "dtype", "ints", "floats", "strs", "dim", "dims",
              "type", "tensor")


@dataclass(frozen=True)
class AttrSpec:
    kind: str
    default: Any = REQUIRED
    choices: Optional[tuple] = None
    optional: bool = False  # may be None (absent) with no default

    def __post_init__(self):
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"unknown attribute kind {self.kind}")


def attr(kind: str, default: Any = REQUIRED, choices: Optional[Sequence] = None) -> AttrSpec:
    """An attribute of ``kind``; give ``default=None`` for an optional one."""
    return AttrSpec(kind, default, tuple(choices) if choices else None, default is None)


# ----- traits: what passes, lowering and runtime may assume about an op -------------------------
#: The result aliases operand 0's storage (reshape, transpose, slice, ...): no new buffer.
VIEW = "view"
#: A view that keeps element order (reshape, squeeze, unsqueeze): two in a row are one reshape.
RESHAPE_LIKE = "reshape-like"
#: Computes each output element from the operand elements at the same (broadcast) index.
ELEMENTWISE = "elementwise"
#: An elementwise nonlinearity a layer applies after a linear (relu, gelu, silu, ...).
ACTIVATION = "activation"
#: Produces a value from attributes alone, no operands (param, constant).
CONSTANT_LIKE = "constant-like"
#: The first two operands may be swapped.
COMMUTATIVE = "commutative"
#: Has an effect beyond its results (collectives, cache writes): never erased or merged.
HAS_SIDE_EFFECTS = "has-side-effects"

TRAITS = (VIEW, RESHAPE_LIKE, ELEMENTWISE, ACTIVATION, CONSTANT_LIKE, COMMUTATIVE,
          HAS_SIDE_EFFECTS)

InferFn = Callable[[list[Optional[TensorType]], dict[str, Any]], list[TensorType]]
RefFn = Callable[..., list["torch.Tensor"]]


@dataclass
class OpDef:
    name: str
    operands: tuple[str, ...]
    attrs: dict[str, AttrSpec]
    infer: InferFn
    reference: RefFn
    doc: str = ""
    pure: bool = True          # no side effects: removable when unused, mergeable by CSE
    commutative: bool = False  # the first two operands may be swapped
    traits: frozenset[str] = frozenset()   # TRAITS; pure/commutative are among them

    @property
    def operand_names(self) -> list[str]:
        return [o.rstrip("?*") for o in self.operands]

    def has_trait(self, trait: str) -> bool:
        return trait in self.traits

    def operand_index(self, name: str) -> int:
        """The position of operand ``name`` (``"kv_cache"`` of llm.paged_attention is 3)."""
        names = self.operand_names
        if name not in names:
            raise IRError(f"{self.name} has no operand '{name}' (operands: {', '.join(names)})")
        return names.index(name)

    def check_operand_count(self, n: int) -> Optional[str]:
        required = sum(1 for o in self.operands if not o.endswith(("?", "*")))
        variadic = any(o.endswith("*") for o in self.operands)
        if variadic:
            if n < len(self.operands):
                return f"expects at least {len(self.operands)} operands, got {n}"
        elif not (required <= n <= len(self.operands)):
            want = str(required) if required == len(self.operands) else \
                f"{required} to {len(self.operands)}"
            return f"expects {want} operands ({', '.join(self.operands)}), got {n}"
        return None

    def operand_slots(self, operands: Sequence) -> dict[str, Any]:
        """Name -> operand (a list for a variadic spec, None for an absent optional)."""
        out: dict[str, Any] = {}
        for i, spec in enumerate(self.operands):
            name = spec.rstrip("?*")
            if spec.endswith("*"):
                out[name] = list(operands[i:])
            else:
                out[name] = operands[i] if i < len(operands) else None
        return out

    def run_reference(self, operands: Sequence[Any], attrs: Optional[dict[str, Any]] = None,
                      ctx: Any = None) -> list[Any]:
        """Run the reference implementation on torch tensors outside a graph.

        ``attrs`` may be partial: they are checked and completed with the schema's defaults
        here, so callers (tests, benchmarks, kernel fallbacks) never build a full attribute
        dict by hand and never go stale when the op gains an attribute.
        """
        return self.reference(ctx, list(operands), self.normalize_attrs(dict(attrs or {})))

    def normalize_attrs(self, attrs: dict[str, Any], where: str = "") -> dict[str, Any]:
        """Check ``attrs`` against the schema, coerce their values, and fill in defaults."""
        where = where or self.name
        for k in attrs:
            if k not in self.attrs:
                valid = ", ".join(self.attrs) or "none"
                hint = difflib.get_close_matches(k, list(self.attrs), 1)
                hint = f"; did you mean '{hint[0]}'?" if hint else ""
                raise IRError(f"{where}: unknown attribute '{k}' (valid: {valid}){hint}")
        out = {}
        for k, spec in self.attrs.items():
            if k in attrs and attrs[k] is not None:
                out[k] = coerce_attr(attrs[k], spec, f"{where}: attribute '{k}'")
            elif spec.default is REQUIRED:
                raise IRError(f"{where}: missing required attribute '{k}' ({spec.kind})")
            else:
                out[k] = spec.default
        return out


_REGISTRY: dict[str, OpDef] = {}


def define_op(name: str, operands: Sequence[str], attrs: Optional[dict[str, AttrSpec]] = None, *,
              infer: InferFn, reference: RefFn, doc: str = "", pure: bool = True,
              commutative: bool = False, traits: Sequence[str] = ()) -> OpDef:
    if name in _REGISTRY:
        raise ValueError(f"op {name} is defined twice")
    unknown = set(traits) - set(TRAITS)
    if unknown:
        raise ValueError(f"op {name}: unknown traits {sorted(unknown)} (traits: {TRAITS})")
    all_traits = set(traits) | ({COMMUTATIVE} if commutative else set()) | \
        (set() if pure else {HAS_SIDE_EFFECTS})
    if RESHAPE_LIKE in all_traits:
        all_traits.add(VIEW)
    if ACTIVATION in all_traits:
        all_traits.add(ELEMENTWISE)
    d = OpDef(name, tuple(operands), dict(attrs or {}), infer, reference, doc, pure, commutative,
              frozenset(all_traits))
    _REGISTRY[name] = d
    return d


def get_op_def(name: str) -> OpDef:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        hint = difflib.get_close_matches(name, list(_REGISTRY), 1)
        hint = f"; did you mean '{hint[0]}'?" if hint else ""
        raise IRError(f"unknown op '{name}'{hint}") from None


#: checks of a whole graph that a dialect registers (rules across ops: the verifier runs them
#: after the per-op checks); each returns its problems, one line each
_GRAPH_CHECKS: list = []


def register_graph_check(fn) -> None:
    """Add ``fn(graph) -> list[str]`` to the verifier's whole-graph checks."""
    _GRAPH_CHECKS.append(fn)


def graph_checks() -> list:
    _ensure_loaded()
    return list(_GRAPH_CHECKS)


def has_op(name: str) -> bool:
    _ensure_loaded()
    return name in _REGISTRY


def all_ops() -> dict[str, OpDef]:
    _ensure_loaded()
    return dict(_REGISTRY)


def ops_with_trait(trait: str) -> frozenset[str]:
    """The names of every registered op with ``trait``."""
    _ensure_loaded()
    if trait not in TRAITS:
        raise ValueError(f"unknown trait {trait!r} (traits: {', '.join(TRAITS)})")
    return frozenset(n for n, d in _REGISTRY.items() if trait in d.traits)


def has_trait(op_name: str, trait: str) -> bool:
    """Whether the op named ``op_name`` has ``trait`` (False for an unknown op)."""
    _ensure_loaded()
    d = _REGISTRY.get(op_name)
    return d is not None and trait in d.traits


def is_dead(op) -> bool:
    """An op that may be erased: registered, free of side effects, and nothing (no op, no
    graph output) reads any of its results.  The one dead-op predicate of every pass."""
    _ensure_loaded()
    d = _REGISTRY.get(op.name)
    if d is None or not d.pure:
        return False
    outputs = op.graph.outputs if op.graph is not None else ()
    return not any(r.uses or any(r is o for o in outputs) for r in op.results)


_loaded = False


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from . import ops  # noqa: F401  (defines the built-in dialects)


# ----- attribute coercion ----------------------------------------------------------------------

def coerce_attr(v: Any, spec: AttrSpec, what: str) -> Any:
    k = spec.kind
    try:
        if k == "int":
            out = _int(v)
        elif k == "float":
            out = _float(v)
        elif k == "bool":
            if not isinstance(v, bool):
                raise TypeError
            out = v
        elif k == "str":
            if not isinstance(v, str):
                raise TypeError
            out = v
        elif k == "dtype":
            out = v if isinstance(v, DType) else DType.parse(_ident(v))
        elif k == "ints":
            out = tuple(_int(x) for x in _seq(v))
        elif k == "floats":
            out = tuple(_float(x) for x in _seq(v))
        elif k == "strs":
            out = tuple(x if isinstance(x, str) else _raise() for x in _seq(v))
        elif k == "dim":
            out = _dim(v)
        elif k == "dims":
            out = tuple(_dim(x) for x in _seq(v))
        elif k == "type":
            if not isinstance(v, TensorType):
                raise TypeError
            out = v
        elif k == "tensor":
            if not _is_tensor(v):
                raise TypeError
            out = v
        else:  # pragma: no cover
            raise TypeError
    except IRError as e:
        raise IRError(f"{what}: {e}") from None
    except (TypeError, ValueError):
        raise IRError(f"{what} must be {_KIND_TEXT[k]}, got {_show(v)}") from None
    if spec.choices is not None and out not in spec.choices:
        raise IRError(f"{what} must be one of {', '.join(map(repr, spec.choices))}, got {_show(out)}")
    return out


_KIND_TEXT = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
              "dtype": "a dtype", "ints": "a list of integers", "floats": "a list of numbers",
              "strs": "a list of strings", "dim": "a dimension (integer or expression)",
              "dims": "a list of dimensions", "type": "a tensor type",
              "tensor": "a dense tensor"}


class Ident(str):
    """A bare identifier from IR text (a dtype name or a dimension symbol, by schema)."""


def _is_tensor(v) -> bool:
    # Without importing torch: the IR core (and `irlm --help`) runs without it, and no value
    # can be a tensor before torch is imported.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Tensor)


def _raise():
    raise TypeError


def _show(v) -> str:
    if _is_tensor(v):
        return f"a tensor of shape {tuple(v.shape)}"
    return repr(v) if not isinstance(v, Ident) else str(v)


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError
    return int(v)


def _float(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError
    return float(v)


def _ident(v) -> str:
    if isinstance(v, str):
        return str(v)
    raise TypeError


def _seq(v):
    if isinstance(v, (list, tuple)):
        return v
    raise TypeError


def _dim(v):
    if isinstance(v, bool):
        raise TypeError
    if isinstance(v, int):
        return v
    if isinstance(v, Ident):
        from .types import sym
        return sym(str(v))
    if isinstance(v, sympy.Basic):
        return normalize_dim(v)
    raise TypeError
