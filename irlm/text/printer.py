"""The IR text printer: Graph → the text format of docs/ir.md, which irlm.text.parser reads back.

Printing is on the hot path of every IR dump (after each pass, for every layer of a model), so
it avoids per-op sympy work: type strings are cached by shape, locations by value, op
definitions by name, and dimension expressions by irlm.types.format_expr's own cache.
"""
from __future__ import annotations

import re
from typing import Any

import sympy
import torch

from ..errors import IRError
from ..ir import Graph, Location, Op, Value
from ..registry import REQUIRED, AttrSpec, OpDef, get_op_def
from ..types import DType, TensorType, format_expr, format_type

__all__ = ["print_graph", "format_attr_value", "quote_string"]

# A name the printer may keep: what the parser's VALUE and GRAPH_NAME terminals accept.
_NAME_RE = re.compile(r"[A-Za-z0-9_.$-]+\Z")

# ----- strings -----------------------------------------------------------------------------------
# JSON's escapes.  Besides quotes, backslashes and control characters, escape what Python's
# str.splitlines treats as line breaks (\x85, U+2028/9) so a dump's lines are its text lines, and
# lone surrogates, which cannot be written as UTF-8.
_NEEDS_ESCAPE = re.compile('[\x00-\x1f"\\\\\x7f\x85\u2028\u2029\ud800-\udfff]')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_char(m: re.Match) -> str:
    c = m.group()
    return _ESCAPES.get(c) or f"\\u{ord(c):04x}"


def quote_string(s: str) -> str:
    """``s`` as an IR string literal, ``"..."``."""
    if _NEEDS_ESCAPE.search(s) is None:
        return '"' + s + '"'
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, s) + '"'


# ----- caches -----------------------------------------------------------------------------------
_TYPE_TEXT: dict[tuple, str] = {}
_LOC_TEXT: dict[Location, str] = {}
_CACHE_LIMIT = 20000


def _type_text(t: TensorType) -> str:
    key = (t.shape, t.dtype)
    s = _TYPE_TEXT.get(key)
    if s is None:
        s = format_type(t)
        if len(_TYPE_TEXT) > _CACHE_LIMIT:
            _TYPE_TEXT.clear()
        _TYPE_TEXT[key] = s
    return s


def _loc_text(loc: Location) -> str:
    s = _LOC_TEXT.get(loc)
    if s is None:
        s = "loc(" + quote_string(loc.module)
        if loc.file or loc.line:  # the line is kept even without a file: nothing is lost
            s += f" {quote_string(loc.file)}:{int(loc.line)}"
        s += ")"
        if len(_LOC_TEXT) > _CACHE_LIMIT:
            _LOC_TEXT.clear()
        _LOC_TEXT[loc] = s
    return s


# ----- attribute values -------------------------------------------------------------------------

def _fmt_float(v: float) -> str:
    return float.__repr__(float(v))  # shortest text that round-trips; 'inf', '-inf', 'nan'


def _fmt_scalar_list(x) -> str:
    """Nested lists of Python scalars (from Tensor.tolist()) as IR text."""
    if isinstance(x, list):
        return "[" + ", ".join(map(_fmt_scalar_list, x)) + "]"
    if x is True:
        return "true"
    if x is False:
        return "false"
    if isinstance(x, float):
        return _fmt_float(x)
    return str(x)


def _fmt_dense(t: torch.Tensor) -> str:
    dtype = DType.from_torch(t.dtype)
    ttype = TensorType(tuple(t.shape), dtype)
    if dtype.is_float and dtype is not DType.f32:
        # tolist() on bf16/f16/f8 gives each element's exact value as a Python float
        t = t.float()
    return f"dense<{_type_text(ttype)}, {_fmt_scalar_list(t.tolist())}>"


def format_attr_value(v: Any) -> str:
    """An attribute value as IR text (the inverse of the parser's value rules)."""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return int.__repr__(int(v))
    if isinstance(v, float):
        return _fmt_float(v)
    if isinstance(v, str):
        return quote_string(v)
    if isinstance(v, DType):
        return v.value
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(format_attr_value, v)) + "]"
    if isinstance(v, TensorType):
        return _type_text(v)
    if isinstance(v, sympy.Basic):
        if v.is_Integer:
            return str(int(v))
        return format_expr(v)
    if isinstance(v, torch.Tensor):
        return _fmt_dense(v)
    raise IRError(f"an attribute value of type {type(v).__name__} cannot be written in IR text: "
                  f"{v!r}")


def _is_default(v: Any, spec: AttrSpec) -> bool:
    d = spec.default
    if d is REQUIRED or isinstance(v, torch.Tensor) or type(v) is not type(d):
        return False
    try:
        return bool(v == d)
    except Exception:  # exotic values compare however they like; printing them is never wrong
        return False


# ----- the printer ------------------------------------------------------------------------------

class _Printer:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.names: dict[Value, str] = {}
        self.used: set[str] = set()
        self.next_number = 0
        self.defs: dict[str, OpDef | None] = {}

    # --- names -----------------------------------------------------------------------------------
    def assign_names(self) -> None:
        """Keep every valid, first-come unique Value.name; number the rest %0, %1, ...
        skipping numbers already taken, so print → parse → print is the identity."""
        names, used = self.names, self.used
        unnamed = []
        for v in self.graph.values():
            n = v.name
            if n is not None and n not in used and _NAME_RE.match(n):
                used.add(n)
                names[v] = "%" + n
            else:
                unnamed.append(v)
        for v in unnamed:
            names[v] = self.fresh()

    def fresh(self) -> str:
        while str(self.next_number) in self.used:
            self.next_number += 1
        n = str(self.next_number)
        self.used.add(n)
        self.next_number += 1
        return "%" + n

    def name(self, v: Value) -> str:
        n = self.names.get(v)
        if n is None:  # a value from outside the graph: print something, the parser will object
            n = self.names[v] = self.fresh()
        return n

    # --- ops -------------------------------------------------------------------------------------
    def opdef(self, name: str):
        try:
            return self.defs[name]
        except KeyError:
            try:
                d = get_op_def(name)
            except IRError:
                d = None  # print unknown ops all the same (the parser will name the problem)
            self.defs[name] = d
            return d

    def attrs_text(self, op: Op, skip=()) -> str:
        attrs = op.attrs
        d = self.opdef(op.name)
        specs = d.attrs if d is not None else {}
        items = []
        for k in sorted(attrs):
            v = attrs[k]
            if v is None or k in skip:
                continue
            spec = specs.get(k)
            if spec is not None and _is_default(v, spec):
                continue
            try:
                items.append(k + " = " + format_attr_value(v))
            except IRError as e:
                raise IRError(f"{op.describe()}: attribute '{k}': {e}") from None
        return ", ".join(items)

    def op_line(self, op: Op) -> str:
        names = self.names
        results = op.results
        parts = ["  "]
        if results:
            if len(results) == 1:
                parts.append(names.get(results[0]) or self.name(results[0]))
            else:
                parts.append(", ".join(names.get(r) or self.name(r) for r in results))
            parts.append(" = ")
        if op.name == "param" and isinstance(op.attrs.get("name"), str):
            parts.append("param ")
            parts.append(quote_string(op.attrs["name"]))
            attrs = self.attrs_text(op, skip=("name", "type"))
        else:
            parts.append(op.name)
            if op.operands:
                parts.append("(" + ", ".join(names.get(v) or self.name(v)
                                             for v in op.operands) + ")")
            attrs = self.attrs_text(op) if op.attrs else ""
        if attrs:
            parts.append(" {" + attrs + "}")
        if results:
            parts.append(" : ")
            parts.append(", ".join(_type_text(r.type) for r in results))
        if op.loc:
            parts.append(" ")
            parts.append(_loc_text(op.loc))
        return "".join(parts)

    # --- the graph -------------------------------------------------------------------------------
    def run(self) -> str:
        g = self.graph
        self.assign_names()
        lines = []
        for name, r in g.dims.items():
            lines.append(f"dim {name} = [{r.min}, {r.max}]")
        if lines:
            lines.append("")
        gname = g.name if _NAME_RE.match(g.name or "") else quote_string(g.name or "")
        args = ", ".join(f"{self.name(v)}: {_type_text(v.type)}" for v in g.inputs)
        outs = ", ".join(_type_text(v.type) for v in g.outputs)
        lines.append(f"graph @{gname}({args}) -> ({outs}) {{")
        op_line = self.op_line
        lines.extend(op_line(op) for op in g.ops)
        ret = ", ".join(self.name(v) for v in g.outputs)
        lines.append("  return " + ret if ret else "  return")
        lines.append("}")
        lines.append("")
        return "\n".join(lines)


def printed_names(graph: Graph) -> dict[Value, str]:
    """The name (without ``%``) each value of ``graph`` prints with: its own when valid and
    unique, else a number.  A structural copy named this way prints, and names what passes
    derive from it, exactly as a print → parse round trip would."""
    p = _Printer(graph)
    p.assign_names()
    return {v: n[1:] for v, n in p.names.items()}


def print_graph(graph: Graph) -> str:
    """The text of ``graph`` (ends with a newline); ``str(graph)`` calls this."""
    return _Printer(graph).run()
