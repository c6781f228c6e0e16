"""The IR text parser: text in the format of :mod:`irlm.text.printer` (docs/ir.md) → a Graph.

The grammar is ``irlm/text/ir.lark``, run by lark's LALR(1) parser with an *inline* transformer:
the callbacks below run as the parser reduces each rule, so no parse tree is built; ops are
created with :func:`irlm.builder.make_op` and appended to the graph in text order.

Speed (lark spends its time per token): an op's results, operand list, attribute dictionary,
result types and location are one token each, and their insides are decoded by functions
cached on the token's text (a 30-layer model has a few dozen distinct attribute dictionaries
and types).  Attribute dictionaries and dimension expressions are parsed by a second, stateless
lark parser built from the same grammar (``_values_parser``).  ``_Lexer`` replaces lark's
contextual lexer with one regex match per token.

Every malformed input raises :class:`irlm.errors.ParseError` (``FILE:LINE:COL: error: ...``):
lark's syntax errors are reworded (what was found, what was expected), semantic errors point at
the offending token, and anything unforeseen is caught and reported at the op being built.
"""
from __future__ import annotations

import copy
import difflib
import json
import re
import threading
from pathlib import Path
from typing import Any, Optional

import sympy
import torch
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.lexer import Lexer

from ..builder import make_op
from ..errors import IRError, ParseError
from ..ir import UNKNOWN_LOC, Graph, Location, Value
from ..registry import REQUIRED, Ident, OpDef, coerce_attr, get_op_def
from ..types import DType, TensorType, format_expr, format_type, normalize_dim, sym

__all__ = ["parse_graph", "parse_file"]

_GRAMMAR = (Path(__file__).with_name("ir.lark")).read_text()

# Words that lex as keywords where an attribute value may stand, so no dimension may take them.
_RESERVED_DIM_NAMES = frozenset({"inf", "nan", "true", "false"})

_VALUE_RE = re.compile(r"%[A-Za-z0-9_.$-]+")
_TYPE_RE = re.compile(r"tensor<[^<>\n]*>")
_CACHE_LIMIT = 20000


class _TextError(Exception):
    """An error ``offset`` characters into a one-line token; the caller knows where it is."""

    def __init__(self, offset: int, message: str):
        super().__init__(message)
        self.offset, self.message = offset, message


class _TokenError(Exception):
    """An error at a token of the values parser (positions relative to what it parsed)."""

    def __init__(self, token: Token, message: str, offset: int = 0):
        super().__init__(message)
        self.token, self.message, self.offset = token, message, offset


def _cache_put(cache: dict, key, value):
    if len(cache) > _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


# ----- strings ----------------------------------------------------------------------------------
# String literals use JSON's escapes (the printer writes \" \\ \n \t \r and \uXXXX).

def _unquote(text: str) -> str:
    """The value of a string literal (quotes included)."""
    if "\\" not in text:
        return text[1:-1]
    try:
        return json.loads(text, strict=False)
    except ValueError as e:
        raise _TextError(getattr(e, "pos", 0), f"invalid escape in string {text}") from None


# ----- attribute values and dimension expressions -----------------------------------------------
# Integers fold as Python ints; a bare identifier stays an Ident (a dtype or a dim: the op's
# attribute schema decides); arithmetic on identifiers builds a sympy expression over
# irlm.types.sym symbols, with ``a // b`` as ``floor(a / b)`` like irlm.types.format_expr.

def _show(v) -> str:
    if isinstance(v, float):
        return f"the number {float.__repr__(v)}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, torch.Tensor):
        return "a dense constant"
    return str(v) if isinstance(v, (Ident, sympy.Basic)) else repr(v)


def _as_dim(v, op: Token):
    if isinstance(v, Ident):
        return sym(str(v))
    if isinstance(v, bool) or not isinstance(v, (int, sympy.Basic)):
        raise _TokenError(op, f"'{op}' needs integers or dimension names, got {_show(v)}")
    return v


def _fold(v):
    """A constant sympy result back to int, so `2*3` is 6 and `seq - seq` is 0."""
    if isinstance(v, sympy.Basic) and v.is_Integer:
        return int(v)
    return v


# ----- the lexer --------------------------------------------------------------------------------

_SKIP = re.compile(r"(?:[ \t\f\r\n]|#[^\n]*)*")  # whitespace and comments (never backtracks)
_WORD = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_WORD_RE = re.compile(_WORD)
_WORD_TERMINALS = ("IDENT", "OPNAME")


class _Lexer(Lexer):
    """lark's contextual lexer, specialised for this grammar (lark's own spends ~half of the
    parse time): per parser state, ONE compiled alternation of the terminals that state accepts,
    and whitespace skipped without making tokens.

    Names and keywords are all matched as one word, then typed by what the state accepts: a
    keyword if the state takes that keyword, else IDENT or OPNAME (so ``dim`` is the keyword at
    the top of a file but an attribute name in ``{dim = 1}``, as with lark's contextual lexer).
    Errors are lark's own exceptions, as lark's lexer raises them.
    """

    __future_interface__ = 2

    def __init__(self, conf):
        self.terminals = {t.name: t for t in conf.terminals}
        self.ignore = frozenset(conf.ignore)
        self.keywords = {t.pattern.value: t.name for t in conf.terminals
                         if t.pattern.type == "str" and _WORD_RE.fullmatch(t.pattern.value)}
        self.by_state: dict[Any, tuple] = {}
        self.root = self._build(set(self.terminals) - self.ignore)

    def _build(self, accepts) -> tuple:
        """(regex, {keyword text: type}, word types accepted) for a set of terminal names."""
        keyword_names = set(self.keywords.values())
        plain = [self.terminals[n] for n in accepts
                 if n in self.terminals and n not in keyword_names and n not in _WORD_TERMINALS]
        # lark's order: priority, then literals before patterns, longer literals first.
        plain.sort(key=lambda t: (-t.priority, t.pattern.type != "str", -len(t.pattern.value)))
        groups = [f"(?P<{t.name}>{t.pattern.to_regexp()})" for t in plain]
        keywords = {text: name for text, name in self.keywords.items() if name in accepts}
        words = tuple(n for n in _WORD_TERMINALS if n in accepts)
        if keywords or words:
            groups.append(f"(?P<WORD>{_WORD})")
        regex = re.compile("|".join(groups)) if groups else None
        if regex is not None and regex.groups != len(groups):
            raise AssertionError("terminal patterns must not capture")  # lastgroup relies on it
        return regex, keywords, words

    def _state_lexer(self, states, state) -> tuple:
        """The lexer of parser state ``state``, built on first use."""
        spec = self.by_state[state] = self._build(set(states[state]))
        return spec

    def lex(self, lexer_state, parser_state):
        text_slice = lexer_state.text
        text = getattr(text_slice, "text", text_slice)
        pos = getattr(text_slice, "start", 0)
        end = getattr(text_slice, "end", len(text))
        line, line_start = 1, 0
        skip = _SKIP.match
        by_state, states = self.by_state, parser_state.parse_conf.states
        stack = parser_state.state_stack  # the parser pushes and pops this list in place
        while True:
            if pos < end and text[pos] in " \t\f\r\n#":
                nxt = skip(text, pos, end).end()
                n = text.count("\n", pos, nxt)
                if n:
                    line += n
                    line_start = text.rfind("\n", pos, nxt) + 1
                pos = nxt
            if pos >= end:
                return
            spec = by_state.get(stack[-1])  # the parser's current state
            regex, keywords, words = spec or self._state_lexer(states, stack[-1])
            m = regex.match(text, pos, end) if regex is not None else None
            kind = m.lastgroup if m is not None else None
            if kind == "WORD":
                value = m.group()
                kind = keywords.get(value)
                if value in _MALFORMED and text.startswith(("<", "("), m.end()):
                    kind = None  # `tensor<` or `loc(` that did not lex as a type or location
                elif kind is None:
                    if "IDENT" in words and "." not in value:
                        kind = "IDENT"
                    elif "OPNAME" in words:
                        kind = "OPNAME"
            if kind is None:
                self._error(text, pos, end, line, pos - line_start + 1, parser_state)
            value = m.group()
            tok = Token(kind, value, pos, line, pos - line_start + 1)
            lexer_state.last_token = tok
            pos = m.end()
            yield tok

    def _error(self, text, pos, end, line, col, parser_state):
        accepts = {n for n in parser_state.parse_conf.states[parser_state.position]
                   if n in self.terminals or n == "$END"} - self.ignore
        regex, keywords, _ = self.root
        m = regex.match(text, pos, end)
        if m is None:
            raise UnexpectedCharacters(text, pos, line, col, allowed=accepts, state=parser_state)
        kind = m.lastgroup
        if kind == "WORD":
            kind = keywords.get(m.group()) or ("OPNAME" if "." in m.group() else "IDENT")
        raise UnexpectedToken(Token(kind, m.group(), pos, line, col), accepts, state=parser_state)


@v_args(inline=True)
class _ValueCallbacks(Transformer):
    """Callbacks of the value rules; stateless, shared by every parse."""

    def int(self, tok):
        try:
            return int(tok)
        except ValueError:  # more digits than Python converts
            raise _TokenError(tok, f"integer literal too long ({len(tok)} digits)") from None

    def float(self, tok):
        return float(tok)

    def inf(self, tok):
        return float("inf")

    def nan(self, tok):
        return float("nan")

    def ident(self, tok):
        return Ident(tok)

    def string(self, tok):
        try:
            return _unquote(tok)
        except _TextError as e:
            raise _TokenError(tok, e.message, e.offset) from None

    def true(self, tok):
        return True

    def false(self, tok):
        return False

    def list(self, *items):
        return [] if items == (None,) else list(items)

    def neg(self, op, v):
        if isinstance(v, float):
            return -v
        return _fold(-_as_dim(v, op))

    def add(self, a, op, b):
        if type(a) is int and type(b) is int:
            return a + b
        return _fold(_as_dim(a, op) + _as_dim(b, op))

    def sub(self, a, op, b):
        if type(a) is int and type(b) is int:
            return a - b
        return _fold(_as_dim(a, op) - _as_dim(b, op))

    def mul(self, a, op, b):
        if type(a) is int and type(b) is int:
            return a * b
        return _fold(_as_dim(a, op) * _as_dim(b, op))

    def floordiv(self, a, op, b):
        a, b = _as_dim(a, op), _as_dim(b, op)
        if b == 0:
            raise _TokenError(op, "division by zero in a dimension expression")
        if type(a) is int and type(b) is int:
            return a // b
        return _fold(sympy.floor(sympy.sympify(a) / b))

    def call(self, name, *args):
        fn = {"max": sympy.Max, "min": sympy.Min}.get(str(name))
        if fn is None:
            raise _TokenError(name, f"unknown function '{name}' (dimension expressions allow "
                                    "max(...) and min(...))")
        return _fold(fn(*(_as_dim(a, name) for a in args)))

    def type_value(self, tok):
        try:
            return _parse_type_text(tok.value)[0]
        except _TextError as e:
            raise _TokenError(tok, e.message, e.offset) from None

    def dense(self, kw, type_tok, body):
        t = self.type_value(type_tok)
        try:
            return _dense_tensor(t, body)
        except ValueError as e:
            raise _TokenError(kw, f"bad dense constant: {e}") from None

    def attr_entry(self, name, value):
        return name, value

    def attr_dict(self, *entries):
        return () if entries == (None,) else entries

    def dim_expr(self, v):
        return v


_values_lark: Optional[Lark] = None
_values_lock = threading.Lock()


def _values_parser() -> Lark:
    """The stateless parser of attribute dictionaries, dimension expressions, and (to explain
    errors) the other composite terminals."""
    global _values_lark
    if _values_lark is None:
        with _values_lock:
            if _values_lark is None:
                _values_lark = Lark(_GRAMMAR, parser="lalr", lexer=_Lexer,
                                    transformer=_ValueCallbacks(),
                                    start=["attr_dict", "dim_expr", "results", "operands",
                                           "result_types"], maybe_placeholders=True)
    return _values_lark


# ----- tensor types, locations, attribute dictionaries (cached per token text) ------------------

_DTYPES = {d.value: d for d in DType}
_STATIC_DIM = re.compile(r"[0-9]+\Z")
_TYPE_CACHE: dict[str, tuple[TensorType, frozenset]] = {}
_TYPES_CACHE: dict[str, tuple] = {}
_LOC_CACHE: dict[str, Location] = {}
_ATTRS_CACHE: dict[str, tuple] = {}


def _parse_dim_text(text: str, offset: int):
    """The dim written as ``[text]`` in a tensor type, ``text`` starting at ``offset``."""
    try:
        v = _values_parser().parse(text, start="dim_expr")
    except _TokenError as e:
        raise _TextError(offset + e.token.column - 1 + e.offset, e.message) from None
    except UnexpectedInput as e:
        _, col, message = _describe_syntax_error(e, text, _values_parser())
        raise _TextError(offset + col - 1, f"bad dimension expression '{text}': {message}") \
            from None
    if isinstance(v, Ident):
        v = sym(str(v))
    if isinstance(v, bool) or not isinstance(v, (int, sympy.Basic)):
        raise _TextError(offset, f"bad dimension expression '{text}': a dimension is an "
                                 "integer expression over dimension names")
    try:
        return normalize_dim(v)
    except IRError as e:
        raise _TextError(offset, f"bad dimension expression '{text}': {e}") from None


def _split_type(inner: str) -> list[tuple[int, str]]:
    """Split ``[a]x[b]x576xbf16`` at the ``x`` outside brackets → [(offset, part), ...]."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(inner):
        if c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
            if depth < 0:
                raise _TextError(i, f"unbalanced '{c}' in a tensor type")
        elif c == "x" and depth == 0:
            parts.append((start, inner[start:i]))
            start = i + 1
    if depth:
        raise _TextError(len(inner), "unclosed '[' or '(' in a tensor type")
    parts.append((start, inner[start:]))
    return parts


def _parse_type_text(text: str) -> tuple[TensorType, frozenset]:
    """``tensor<...>`` → (its TensorType, the names of the dimension symbols it uses)."""
    hit = _TYPE_CACHE.get(text)
    if hit is not None:
        return hit
    base = len("tensor<")
    parts = _at(base, _split_type, text[base:-1])
    dt_off, dt_text = parts[-1]
    dtype = _DTYPES.get(dt_text.strip())
    if dtype is None:
        what = f"unknown dtype '{dt_text.strip()}'" if dt_text.strip() else "missing dtype"
        raise _TextError(base + dt_off, f"{what} in {text} (valid: {', '.join(_DTYPES)})")
    dims = []
    for off, part in parts[:-1]:
        p = part.strip()
        off += base + (len(part) - len(part.lstrip()))
        if _STATIC_DIM.match(p):
            dims.append(int(p))
        elif len(p) >= 2 and p[0] == "[" and p[-1] == "]":
            dims.append(_parse_dim_text(p[1:-1], off + 1))
        else:
            what = "a dimension is empty" if not p else f"'{p}' is not a dimension"
            raise _TextError(off, f"malformed tensor type {text}: {what} (write an integer "
                                  "or a [symbolic expression])")
    t = TensorType(dims, dtype)
    try:
        format_type(t)  # whatever parses must print
    except IRError as e:
        raise _TextError(base, f"malformed tensor type {text}: {e}") from None
    return _cache_put(_TYPE_CACHE, text, (t, frozenset(t.free_symbols())))


def _parse_result_types(text: str) -> tuple:
    """``: tensor<...>, tensor<...>`` → ((offset, TensorType, symbol names), ...)."""
    hit = _TYPES_CACHE.get(text)
    if hit is not None:
        return hit
    out = tuple((m.start(),) + _at(m.start(), _parse_type_text, m.group())
                for m in _TYPE_RE.finditer(text))
    return _cache_put(_TYPES_CACHE, text, out)


def _at(offset: int, fn, *args):
    """``fn(*args)`` with _TextError offsets shifted by ``offset``."""
    try:
        return fn(*args)
    except _TextError as e:
        raise _TextError(offset + e.offset, e.message) from None


_STR = r'"([^"\\\n]*+(?:\\.[^"\\\n]*+)*+)"'
_LOC_RE = re.compile(r"loc\(\s*" + _STR + r"\s*(?:" + _STR + r"\s*:\s*([0-9]+)\s*)?\)\Z")


def _parse_loc_text(text: str) -> Location:
    hit = _LOC_CACHE.get(text)
    if hit is not None:
        return hit
    m = _LOC_RE.match(text)
    if m is None:
        raise _TextError(0, f"malformed location {text}: expected loc(\"module.path\") or "
                            "loc(\"module.path\" \"file.py\":LINE)")
    module = _at(m.start(1) - 1, _unquote, '"' + m.group(1) + '"')
    file = _at(m.start(2) - 1, _unquote, '"' + m.group(2) + '"') if m.group(2) is not None \
        else ""
    line = int(m.group(3)) if m.group(3) is not None else 0
    return _cache_put(_LOC_CACHE, text, Location(module, file, line))


def _parse_attrs_text(text: str) -> tuple:
    """``{k = v, ...}`` → ((name, value, offset of the name), ...); values as the parser
    makes them (Ident, sympy, lists), to be coerced by the op's schema."""
    hit = _ATTRS_CACHE.get(text)
    if hit is None:
        try:
            entries = _values_parser().parse(text, start="attr_dict")
        except _TokenError as e:
            raise _TextError(e.token.column - 1 + e.offset, e.message) from None
        except UnexpectedInput as e:
            _, col, message = _describe_syntax_error(e, text, _values_parser())
            raise _TextError(col - 1, message) from None
        hit = tuple((k.value, v, k.column - 1) for k, v in entries)
        if any(_has_tensor(v) for _, v, _ in hit):
            return hit  # tensors are mutable: never share one between ops
        _cache_put(_ATTRS_CACHE, text, hit)
    return hit


def _has_tensor(v) -> bool:
    stack = [v]  # iterative: a list may be nested deeper than Python's recursion limit
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            return True
        if isinstance(x, list):
            stack.extend(x)
    return False


def _dense_tensor(t: TensorType, body) -> torch.Tensor:
    """The tensor that ``dense<t, body>`` denotes; ValueError says why there is none."""
    if not t.is_static:
        raise ValueError(f"a dense constant needs a static type, got {format_type(t)}")
    if t.dtype is DType.i4:
        raise ValueError("dense constants of dtype i4 are not supported (use i8)")
    # Walk the nesting level by level (no recursion, and the depth is the declared rank).
    level = [body]
    for depth, n in enumerate(t.shape):
        nxt = []
        for x in level:
            if not isinstance(x, list) or len(x) != n:
                got = f"a list of {len(x)}" if isinstance(x, list) else _show(x)
                raise ValueError(f"values do not match {format_type(t)}: expected a list of {n} "
                                 f"at depth {depth}, got {got}")
            nxt.extend(x)
        level = nxt
    dt = t.dtype
    for x in level:
        if dt is DType.bool:
            ok = isinstance(x, bool)
        elif dt.is_float:
            ok = isinstance(x, (int, float)) and not isinstance(x, bool)
        else:
            ok = isinstance(x, int) and not isinstance(x, bool)
        if not ok:
            kind = "true or false" if dt is DType.bool else \
                ("numbers" if dt.is_float else "integers")
            raise ValueError(f"{dt.value} values must be {kind}, got {_show(x)}")
    try:
        if dt is DType.f8e4m3:  # torch builds no float8 tensor from a Python list
            flat = torch.tensor(level, dtype=torch.float32).to(dt.torch)
        else:
            flat = torch.tensor(level, dtype=dt.torch)
    except (RuntimeError, OverflowError, TypeError) as e:
        raise ValueError(f"values do not fit dtype {dt.value}: {e}") from None
    return flat.reshape(t.shape)


def _attr_symbols(v, out: set) -> None:
    """Names of the dimension symbols in a coerced attribute value."""
    if isinstance(v, sympy.Basic):
        out.update(s.name for s in v.free_symbols)
    elif isinstance(v, TensorType):
        out.update(v.free_symbols())
    elif isinstance(v, (list, tuple)):
        for x in v:
            _attr_symbols(x, out)


def _check_printable(v) -> None:
    """Raise IRError if a coerced dim attribute could not be printed back."""
    if isinstance(v, (list, tuple)):
        for x in v:
            _check_printable(x)
    elif isinstance(v, sympy.Basic):
        format_expr(v)


# ----- the stateful callbacks of the main parser ------------------------------------------------

class _State:
    """What one parse has seen so far."""

    def __init__(self, filename: str, text: str, weights):
        self.filename = filename
        self.text = text
        self.graph = Graph("main", weights=weights)
        self.dim_names: set[str] = set()
        self.values: dict[str, tuple[Value, int, int]] = {}  # "%name" -> (value, line, col)
        self.result_types: list[TensorType] = []
        self.pos = (1, 1)  # the op being built, for errors no token pins down

    def error(self, tok: Token, message: str, offset: int = 0) -> ParseError:
        return ParseError(self.filename, tok.line, tok.column + offset, message)

    def error_at(self, pos, message: str) -> ParseError:
        return ParseError(self.filename, pos[0], pos[1], message)

    def check_dims(self, tok: Token, names, offset: int = 0) -> None:
        if names and not names <= self.dim_names:
            missing = sorted(names - self.dim_names)[0]
            m = re.search(r"(?<![A-Za-z0-9_])" + re.escape(missing) + r"(?![A-Za-z0-9_])",
                          tok.value[offset:])
            raise self.error(tok, f"undeclared dimension '{missing}' (declare it before the "
                                  f"graph: dim {missing} = [MIN, MAX])",
                             offset + (m.start() if m else 0))

    def type(self, tok: Token) -> TensorType:
        try:
            t, names = _parse_type_text(tok.value)
        except _TextError as e:
            raise self.error(tok, e.message, e.offset) from None
        self.check_dims(tok, names)
        return t

    def result_types_of(self, tok: Token) -> list[TensorType]:
        try:
            parsed = _parse_result_types(tok.value)
        except _TextError as e:
            raise self.error(tok, e.message, e.offset) from None
        out = []
        for offset, t, names in parsed:
            self.check_dims(tok, names, offset)
            out.append(t)
        return out

    def use(self, name: str, tok: Token, offset: int = 0) -> Value:
        hit = self.values.get(name)
        if hit is None:
            later = self._defined_later(name, tok.start_pos + offset)
            what = f"use of value '{name}' before its definition at {later[0]}:{later[1]}" \
                if later else f"use of undefined value '{name}'"
            raise self.error(tok, what, offset)
        return hit[0]

    def _defined_later(self, name: str, pos: int) -> Optional[tuple[int, int]]:
        """Where ``name`` is defined after ``pos``, for a better message (error path only)."""
        m = re.compile(r"(?m)^[ \t]*(?:%[A-Za-z0-9_.$-]+[ \t]*,[ \t]*)*(" + re.escape(name) +
                       r")[ \t]*[,=]").search(self.text, pos)
        return _line_col(self.text, m.start(1)) if m else None

    def check_new(self, name: str, tok: Token, offset: int, seen: set) -> None:
        hit = self.values.get(name)
        if hit is not None or name in seen:
            where = f" (first defined at {hit[1]}:{hit[2]})" if hit else ""
            raise self.error(tok, f"redefinition of value '{name}'{where}", offset)
        seen.add(name)


def _names_in(tok: Optional[Token]) -> list[tuple[str, int]]:
    """The %names in a RESULTS or OPERANDS token, with their offsets."""
    if tok is None:
        return []
    return [(m.group(), m.start()) for m in _VALUE_RE.finditer(tok.value)]


@v_args(inline=True)
class _Callbacks(Transformer):
    """Callbacks of the main parser; ``st`` is the _State of the parse under way."""

    st: _State

    def values(self, *toks):
        return toks

    def types(self, *toks):
        return toks

    def args(self, *pairs):
        return pairs

    def arg(self, name, type_tok):
        return name, type_tok

    # --- declarations ----------------------------------------------------------------------------
    def dim_decl(self, kw, name, lo, hi):
        st = self.st
        if name in _RESERVED_DIM_NAMES:
            raise st.error(name, f"'{name}' is a keyword and cannot name a dimension")
        if name in st.dim_names:
            raise st.error(name, f"dimension '{name}' is declared twice")
        try:
            st.graph.declare_dim(name.value, int(lo), int(hi))
        except (IRError, ValueError) as e:
            raise st.error(lo, f"dimension '{name}': {e}") from None
        st.dim_names.add(name.value)

    def graph_head(self, kw, name, args, result_types):
        st = self.st
        if name[1:2] == '"':
            try:
                st.graph.name = _unquote(name.value[1:])
            except _TextError as e:
                raise st.error(name, e.message, 1 + e.offset) from None
        else:
            st.graph.name = name.value[1:]
        seen: set = set()
        for vtok, ttok in args or ():
            st.check_new(vtok.value, vtok, 0, seen)
            v = st.graph.add_input(st.type(ttok), vtok.value[1:])
            st.values[vtok.value] = (v, vtok.line, vtok.column)
        st.result_types = [st.type(t) for t in result_types or ()]

    # --- ops -------------------------------------------------------------------------------------
    def op(self, results, opname, operands, attrs, types, loc):
        st = self.st
        first = results if results is not None else opname
        st.pos = (first.line, first.column)
        name = opname.value
        try:
            try:
                opdef = get_op_def(name)
            except IRError as e:
                raise st.error(opname, str(e)) from None
            operand_values = [st.use(n, operands, off) for n, off in _names_in(operands)]
            result_types = st.result_types_of(types) if types is not None else []
            self._finish(opdef, name, opname, results, operand_values, attrs, result_types,
                         loc)
        except ParseError:
            raise
        except Exception as e:  # a bug or an input nobody foresaw: still a ParseError, here
            raise st.error_at(st.pos, f"{name}: {type(e).__name__}: {e}") from e

    def param_op(self, results, kw, name_tok, attrs, types, loc):
        st = self.st
        st.pos = (results.line, results.column)
        try:
            result_types = st.result_types_of(types)
            if len(result_types) != 1:
                raise st.error(types, f"param has one result type, not {len(result_types)}")
            try:
                weight = _unquote(name_tok.value)
            except _TextError as e:
                raise st.error(name_tok, e.message, e.offset) from None
            extra = {"name": weight, "type": result_types[0]}
            self._finish(get_op_def("param"), "param", kw, results, [], attrs, result_types,
                         loc, extra)
        except ParseError:
            raise
        except Exception as e:
            raise st.error_at(st.pos, f"param: {type(e).__name__}: {e}") from e

    def _finish(self, opdef: OpDef, name: str, name_tok: Token, results, operand_values,
                attrs_tok, result_types, loc_tok, extra=None):
        """Check the result names, build the op with make_op (declared result types kept as
        written) and append it to the graph."""
        st = self.st
        result_names = _names_in(results)
        if len(result_types) != len(result_names):
            raise st.error(results or name_tok,
                           f"{name}: {len(result_names)} result name(s) but "
                           f"{len(result_types)} result type(s)")
        seen: set = set()
        for n, off in result_names:
            st.check_new(n, results, off, seen)
        attr_map: dict[str, Any] = {}
        entries = ()
        if attrs_tok is not None:
            try:
                entries = _parse_attrs_text(attrs_tok.value)
            except _TextError as e:
                raise st.error(attrs_tok, e.message, e.offset) from None
            for k, v, off in entries:
                if k in attr_map or (extra and k in extra):
                    why = " (param's name and type are written outside the braces)" \
                        if extra and k in extra else ""
                    raise st.error(attrs_tok, f"attribute '{k}' is given twice{why}", off)
                attr_map[k] = v
        if extra:
            attr_map.update(extra)
        if loc_tok is not None:
            try:
                loc = _parse_loc_text(loc_tok.value)
            except _TextError as e:
                raise st.error(loc_tok, e.message, e.offset) from None
        else:
            loc = UNKNOWN_LOC
        try:
            op = make_op(name, operand_values, attr_map, loc, result_types,
                         [n[1:] for n, _ in result_names] or None)
        except IRError as e:
            raise self._diagnose(opdef, name, name_tok, len(operand_values), attrs_tok, entries,
                                 e) from None
        # Dimension symbols in attributes are known only once the schema has coerced them
        # (``seq`` is a dim in ``{end = seq}`` but ``bf16`` a dtype in ``{dtype = bf16}``).
        for k, _, off in entries:
            if opdef.attrs[k].kind in ("dim", "dims", "type"):
                syms: set = set()
                _attr_symbols(op.attrs[k], syms)
                if not syms <= st.dim_names:
                    missing = sorted(syms - st.dim_names)[0]
                    raise st.error(attrs_tok, f"undeclared dimension '{missing}' in attribute "
                                              f"'{k}'", off)
                try:
                    _check_printable(op.attrs[k])
                except IRError as e:
                    raise st.error(attrs_tok, f"attribute '{k}': {e}", off) from None
        op.text_pos = (st.filename, st.pos[0], st.pos[1])
        st.graph.append(op)
        if results is not None:
            for (n, off), v in zip(result_names, op.results):
                st.values[n] = (v, results.line, results.column + off)

    def _diagnose(self, opdef: OpDef, name, name_tok, n_operands, attrs_tok, entries,
                  err: IRError) -> ParseError:
        """make_op refused the op: find the token to blame (its message says why)."""
        st = self.st
        problem = opdef.check_operand_count(n_operands)
        if problem:
            return st.error(name_tok, f"{name} {problem}")
        for k, v, off in entries:
            spec = opdef.attrs.get(k)
            if spec is None:
                valid = ", ".join(opdef.attrs) or "none"
                hint = difflib.get_close_matches(k, list(opdef.attrs), 1)
                hint = f"; did you mean '{hint[0]}'?" if hint else ""
                return st.error(attrs_tok, f"{name}: unknown attribute '{k}' (valid: {valid})"
                                           f"{hint}", off)
            try:
                coerce_attr(v, spec, f"{name}: attribute '{k}'")
            except IRError as e:
                return st.error(attrs_tok, str(e), off)
        given = {k for k, _, _ in entries}
        for k, spec in opdef.attrs.items():
            if spec.default is REQUIRED and k not in given:
                return st.error(name_tok, f"{name}: missing required attribute '{k}' "
                                          f"({spec.kind})")
        return st.error(name_tok, str(err))

    # --- the end ---------------------------------------------------------------------------------
    def return_stmt(self, kw, values):
        st = self.st
        st.pos = (kw.line, kw.column)
        values = values or ()
        outs = [st.use(t.value, t) for t in values]
        declared = st.result_types
        if len(outs) != len(declared):
            raise st.error(kw, f"return has {len(outs)} value(s) but graph @{st.graph.name} "
                               f"declares {len(declared)} result type(s)")
        for i, (v, tok, t) in enumerate(zip(outs, values, declared)):
            if v.type != t:
                raise st.error(tok, f"returned value {tok} has type {format_type(v.type)} but "
                                    f"result {i} of graph @{st.graph.name} is declared "
                                    f"{format_type(t)}")
        st.graph.set_outputs(outs)

    def graph(self, *children):
        return self.st.graph

    def start(self, *children):
        return self.st.graph


# ----- syntax errors ----------------------------------------------------------------------------

# How lark's terminal names read in messages (punctuation and keywords show as themselves).
_TERMINAL_TEXT = {
    "VALUE": "'%name'", "GRAPH_NAME": "'@name'", "IDENT": "a name", "OPNAME": "an op name",
    "INT": "an integer", "FLOAT": "a number", "STRING": "a string", "TYPE": "'tensor<...>'",
    "LOC": "'loc(...)'", "DENSE": "'dense<...>'", "$END": "end of input",
    "RESULTS": "'%name ='", "OPERANDS": "'(%operand, ...)'", "ATTRS": "'{attributes}'",
    "RESULT_TYPES": "': tensor<...>'",
}

# Composite terminals: when one was expected but did not lex, the rule of the same shape
# finds the exact spot and what was wrong there.
_COMPOSITES = {"RESULTS": ("results", "%"), "OPERANDS": ("operands", "("),
               "ATTRS": ("attr_dict", "{"), "RESULT_TYPES": ("result_types", ":")}

_MALFORMED = {
    "tensor": ("malformed tensor type", "tensor<DIMxDIMx...xDTYPE> on one line, like "
                                        "tensor<[batch]x576xbf16>"),
    "loc": ("malformed location", "loc(\"module.path\") or loc(\"module.path\" "
                                  "\"file.py\":LINE) on one line"),
    "dense": ("malformed dense constant", "dense<tensor<...>, [values]>"),
}


def _why_malformed(text: str, pos: int) -> str:
    """What is wrong with the `tensor<...>` / `loc(...)` / `dense<...>` at ``pos``."""
    end = text.find("\n", pos)
    line = text[pos:end if end >= 0 else len(text)]
    word = _WORD_RE.match(line).group()
    opener, closer = ("(", ")") if word == "loc" else ("<", ">")
    if not line.startswith(opener, len(word)):
        return f" ('{opener}' must follow '{word}')"
    if word == "tensor":
        inner = line[len(word) + 1:]
        stop = min((i for i in (inner.find(">"), inner.find("<")) if i >= 0), default=-1)
        if stop < 0:
            return " (no closing '>' on this line)"
        return " ('<' inside it)" if inner[stop] == "<" else ""
    if closer not in line:
        return f" (no closing '{closer}' on this line)"
    return ""


def _describe_terminal(name: str, lark: Lark) -> str:
    if name in _TERMINAL_TEXT:
        return _TERMINAL_TEXT[name]
    try:
        pattern = lark.get_terminal(name).pattern
    except (KeyError, AttributeError):
        return name
    return f"'{pattern.value}'" if pattern.type == "str" else name.lower()


def _expected_text(names, lark: Lark) -> str:
    items = sorted({_describe_terminal(n, lark) for n in names or ()})
    if not items:
        return ""
    if len(items) == 1:
        return f"; expected {items[0]}"
    if len(items) == 2:
        return f"; expected {items[0]} or {items[1]}"
    return "; expected one of " + ", ".join(items)


def _end_position(text: str) -> tuple[int, int]:
    return text.count("\n") + 1, len(text) - (text.rfind("\n") + 1) + 1


def _accepted(e: UnexpectedInput) -> set:
    """The terminals that can really come next.  The sets lark attaches to its errors come
    from LALR lookaheads, which merge contexts (after `%a` in `%a core.add` they offer ')', as
    if in an operand list), so try each one on a copy of the parser state, callbacks off."""
    candidates = set(e.expected if isinstance(e, UnexpectedToken) else (e.allowed or ()))
    state = getattr(e, "state", None)
    if state is None or not hasattr(state, "parse_conf"):
        return candidates
    conf = copy.copy(state.parse_conf)
    conf.callbacks = {}  # lark runs no callbacks then: no side effects, no semantic errors
    out = set()
    for name in candidates:
        trial = state.copy(deepcopy_values=False)
        trial.parse_conf = conf
        try:
            trial.feed_token(Token(name, ""), name == "$END")
        except Exception:
            continue
        out.add(name)
    return out or candidates


def _describe_syntax_error(e: UnexpectedInput, text: str, lark: Lark) -> tuple[int, int, str]:
    """(line, col, message) for a lark error in ``text``."""
    if isinstance(e, UnexpectedToken):
        tok = e.token
        expected = _accepted(e)
        if tok.type == "$END":
            line, col = _end_position(text)
            return line, col, "unexpected end of input" + _expected_text(expected, lark)
        malformed = _MALFORMED.get(tok.value)
        if malformed and expected & {"TYPE", "RESULT_TYPES", "LOC", "DENSE"}:
            what, form = malformed
            return (tok.line, tok.column,
                    f"{what}{_why_malformed(text, tok.start_pos)}: expected {form}")
        shown = tok.value if len(tok) <= 40 else tok.value[:37] + "..."
        return tok.line, tok.column, f"unexpected '{shown}'" + _expected_text(expected, lark)
    if isinstance(e, UnexpectedCharacters):
        pos = e.pos_in_stream
        ch = text[pos] if pos is not None and pos < len(text) else ""
        what = "unterminated string" if ch == '"' else f"unexpected character {ch!r}"
        return e.line, e.column, what + _expected_text(_accepted(e), lark)
    line, col = getattr(e, "line", None), getattr(e, "column", None)
    if not isinstance(line, int) or not isinstance(col, int):
        line, col = _end_position(text)
    return line, col, f"syntax error ({type(e).__name__})"


def _explain_composite(e: UnexpectedInput, text: str) -> Optional[tuple[int, int, str]]:
    """If a composite terminal was expected where the error is and its first character is
    there, parse from that spot with the composite's rule, which names the actual problem."""
    expected = e.expected if isinstance(e, UnexpectedToken) else (e.allowed or set())
    pos = e.token.start_pos if isinstance(e, UnexpectedToken) else e.pos_in_stream
    if pos is None:
        return None
    for terminal, (rule, opener) in _COMPOSITES.items():
        if terminal not in expected or not text.startswith(opener, pos):
            continue
        # Blank what precedes, keeping newlines, so positions come out absolute.
        blanked = re.sub(r"[^\n]", " ", text[:pos]) + text[pos:]
        try:
            _values_parser().parse(blanked, start=rule)
        except _TokenError as inner:
            return inner.token.line, inner.token.column + inner.offset, inner.message
        except UnexpectedInput as inner:
            if isinstance(inner, UnexpectedToken) and set(inner.expected) == {"$END"}:
                what = _TERMINAL_TEXT[terminal].strip("'")
                return (*_line_col(text, pos),
                        f"'{what}' must be written on one line")
            return _describe_syntax_error(inner, blanked, _values_parser())
        except Exception:
            return None
    return None


def _line_col(text: str, pos: int) -> tuple[int, int]:
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


# ----- entry points -----------------------------------------------------------------------------

# A Lark instance holds its transformer, and ours keeps the state of a parse, so each parse
# takes an instance from this pool (building one takes ~50 ms; normally there is just one).
_pool: list[tuple[Lark, _Callbacks]] = []
_pool_lock = threading.Lock()


def _acquire() -> tuple[Lark, _Callbacks]:
    with _pool_lock:
        if _pool:
            return _pool.pop()
    cb = _Callbacks()
    return Lark(_GRAMMAR, parser="lalr", lexer=_Lexer, start="start", transformer=cb,
                maybe_placeholders=True), cb


def _release(entry) -> None:
    with _pool_lock:
        _pool.append(entry)


def parse_graph(text: str, filename: str = "<string>", weights=None) -> Graph:
    """Parse IR text into a Graph; raise ParseError (``FILE:LINE:COL: error: ...``) if it is
    malformed.  ``weights`` becomes the graph's weight store (what ``param`` ops read)."""
    if isinstance(text, (bytes, bytearray)):
        text = _decode(bytes(text), filename)
    if not isinstance(text, str):
        raise ParseError(filename, None, None, f"expected IR text, got {type(text).__name__}")
    if text.startswith("\ufeff"):  # a byte-order mark some editors write
        text = text[1:]
    lark, cb = _acquire()
    st = _State(filename, text, weights)
    cb.st = st
    try:
        return lark.parse(text)
    except ParseError:
        raise
    except UnexpectedInput as e:
        try:
            where = _explain_composite(e, text) or _describe_syntax_error(e, text, lark)
        except Exception:  # explaining must not be what fails
            where = (*_line_col(text, e.pos_in_stream or 0), "syntax error")
        raise ParseError(filename, *where) from None
    except RecursionError:
        raise st.error_at(st.pos, "input nested too deeply") from None
    except Exception as e:  # never let anything but a ParseError escape
        raise st.error_at(st.pos, f"{type(e).__name__}: {e}") from e
    finally:
        cb.st = None
        _release((lark, cb))


def parse_file(path, weights=None) -> Graph:
    """Parse the IR file at ``path`` (error messages name it as given)."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ParseError(name, None, None, f"cannot read file: {e.strerror or e}") from None
    return parse_graph(_decode(data, name), name, weights)


def _decode(data: bytes, filename: str) -> str:
    binary = _binary_kind(data[:4096])
    if binary is not None:
        raise ParseError(filename, None, None, f"not IR text: {binary}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        head = data[:e.start]
        line = head.count(b"\n") + 1
        col = len(head[head.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        raise ParseError(filename, line, col, "the file is not valid UTF-8") from None


def _binary_kind(head: bytes):
    """What a binary file handed over as IR text is, with what to do instead (None: text).
    IR text never holds a NUL byte; model files start with one within their first bytes."""
    if head.startswith(b"GGUF"):
        return "a GGUF model file (compile it: irlm compile --gguf FILE -o OUT)"
    if len(head) > 9 and head[8:9] == b"{" and b"\0" in head[:8]:
        return "a safetensors weights file (give it to --weights)"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "a binary file (a zip archive or pickle, e.g. a PyTorch checkpoint)"
    if b"\0" in head:
        return "a binary file"
    return None
