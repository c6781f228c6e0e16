"""Pipelines: a list of passes with options, written as text that prints back and replays.

::

    canonicalize,fuse-rms-norm,quantize{mode=int4-awq,group=128},dce

Grammar (lark, below): passes are separated by commas; a pass may take options in braces,
``key=value`` separated by commas; a value is bare (``int4-awq``, ``128``, ``1e-5``, ``true``)
or double-quoted (``"a b"``, with ``\\"`` and ``\\\\`` escapes).  Whitespace between items is
ignored.  ``str(parse_pipeline(text))`` is ``text`` without the whitespace: values keep the
spelling they were written with.

Named pipelines (``-O0``, ``-O1``, ``-O2`` and their ``-causal-lm`` forms) expand to pipeline
text; they are defined once, in :mod:`irlm.passes.levels`, and users add their own with
:func:`register_named_pipeline`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .errors import PassError, PipelineSyntaxError, did_you_mean
from .options import format_value

# ----- named pipelines -------------------------------------------------------------------------

#: Named pipelines (the optimization levels and any a user registers) and their text; the
#: levels are filled in by irlm.passes.levels.
NAMED_PIPELINES: dict[str, str] = {}


def register_named_pipeline(name: str, text: str) -> None:
    """Define (or redefine) a named pipeline such as ``O2``; ``text`` is checked when used."""
    NAMED_PIPELINES[name] = text


def named_pipeline(name: str) -> str:
    """The text ``-O<level>`` / a named pipeline expands to (``name`` is ``O1`` or ``1``)."""
    key = name if name in NAMED_PIPELINES else f"O{name}"
    if key not in NAMED_PIPELINES:
        levels = [k for k in NAMED_PIPELINES if re.fullmatch(r"O\d+", k)]
        others = sorted(k for k in NAMED_PIPELINES if k not in levels)
        more = f"; other named pipelines: {', '.join(others)}" if others else ""
        raise PassError(f"unknown optimization level '{name}'"
                        + did_you_mean(key, levels or NAMED_PIPELINES, "levels") + more)
    return NAMED_PIPELINES[key]


# ----- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionValue:
    key: str
    value: Any
    text: str  # as spelled in the pipeline text (or formatted, when built in Python)


@dataclass(frozen=True)
class PassInvocation:
    """One pass in a pipeline with the options given to it (defaults are not listed)."""
    name: str
    options: tuple[OptionValue, ...] = ()
    column: Optional[int] = field(default=None, compare=False)

    @staticmethod
    def create(name: str, **options) -> "PassInvocation":
        """``PassInvocation.create("quantize", mode="int8")``, checked against the registry."""
        from .registry import get_pass
        info = get_pass(name)
        resolved = info.resolve(options)
        return PassInvocation(name, tuple(OptionValue(k, resolved[k], format_value(resolved[k]))
                                          for k in options))

    @property
    def given(self) -> dict[str, Any]:
        return {o.key: o.value for o in self.options}

    def resolved_options(self) -> dict[str, Any]:
        from .registry import get_pass
        return get_pass(self.name).resolve(self.given)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{o.key}={o.text}" for o in self.options) + "}"


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[PassInvocation, ...] = ()

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __iter__(self):
        return iter(self.passes)

    def __add__(self, other: "Pipeline") -> "Pipeline":
        return Pipeline(self.passes + other.passes)

    def with_options(self, name: str, **options) -> "Pipeline":
        """This pipeline with ``options`` set on every invocation of pass ``name`` (options
        already given keep their place; new ones follow in the order given here)."""
        out = []
        for p in self.passes:
            if p.name == name:
                merged = {**p.given, **options}
                p = PassInvocation.create(name, **merged)
            out.append(p)
        return Pipeline(tuple(out))

    @staticmethod
    def of(*items: Union[str, PassInvocation]) -> "Pipeline":
        """``Pipeline.of("canonicalize", PassInvocation.create("quantize", mode="int8"))``."""
        return Pipeline(tuple(i if isinstance(i, PassInvocation) else PassInvocation.create(i)
                              for i in items))


# ----- parsing -----------------------------------------------------------------------------------

_GRAMMAR = r"""
start: (item ("," item)*)?
item: NAME options?
options: "{" (option ("," option)*)? "}"
option: KEY "=" value
?value: BARE | STRING

NAME: /[A-Za-z_][A-Za-z0-9_.\-]*/
KEY: /[A-Za-z_][A-Za-z0-9_]*/
BARE: /[A-Za-z0-9_.+\-]+/
STRING: /"(\\.|[^"\\])*"/
%ignore /[ \t\r\n]+/
"""

_parser: Optional[Lark] = None

# What lark calls its terminals, in words for error messages.
_TOKEN_WORDS = {"NAME": "a pass name", "KEY": "an option name", "BARE": "a value",
                "STRING": "a quoted value", "COMMA": "','", "LBRACE": "'{'", "RBRACE": "'}'",
                "EQUAL": "'='", "$END": "the end"}


def _get_parser() -> Lark:
    global _parser
    if _parser is None:
        _parser = Lark(_GRAMMAR, parser="lalr", lexer="contextual", propagate_positions=True)
    return _parser


class _ToPipeline(Transformer):
    @v_args(inline=True)
    def option(self, key: Token, value: Token):
        return key, value

    def options(self, items):
        return list(items)

    def item(self, children):
        name = children[0]
        return name, (children[1] if len(children) > 1 else [])

    def start(self, items):
        return list(items)


def parse_pipeline(text: str, validate: bool = True) -> Pipeline:
    """Parse pipeline text.  With ``validate`` (the default) every pass and option is checked
    against the registry here, so errors carry the column they refer to."""
    try:
        tree = _get_parser().parse(text)
    except UnexpectedInput as e:
        column = getattr(e, "column", None)
        if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken)
                                            and e.token.type == "$END"):
            column = len(text.rstrip()) + 1
        raise PipelineSyntaxError(text, column, _syntax_message(e, text)) from None
    items = _ToPipeline().transform(tree)
    passes = []
    for name_tok, opts in items:
        options = []
        seen = set()
        for key_tok, value_tok in opts:
            key = str(key_tok)
            if key in seen:
                raise PipelineSyntaxError(text, key_tok.column,
                                          f"option '{key}' of pass '{name_tok}' is given twice")
            seen.add(key)
            raw = str(value_tok)
            options.append((key_tok, raw, value_tok.type == "STRING"))
        passes.append(_make_invocation(text, name_tok, options, validate))
    return Pipeline(tuple(passes))


def _make_invocation(text: str, name_tok: Token, options, validate: bool) -> PassInvocation:
    from .registry import get_pass
    name = str(name_tok)
    info = None
    if validate:
        try:
            info = get_pass(name)
        except PassError as e:
            raise PipelineSyntaxError(text, name_tok.column, str(e)) from None
    values = []
    for key_tok, raw, quoted in options:
        key = str(key_tok)
        spelled = _unquote(raw) if quoted else raw
        value: Any = spelled
        if info is not None:
            if key not in info.options:
                raise PipelineSyntaxError(
                    text, key_tok.column,
                    f"pass '{name}' has no option '{key}'" + did_you_mean(key, info.options,
                                                                          "options"))
            try:
                value = info.options[key].parse(spelled, quoted)
            except PassError as e:
                raise PipelineSyntaxError(text, key_tok.column,
                                          f"option '{key}' of pass '{name}' {e}") from None
        values.append(OptionValue(key, value, raw))
    if info is not None:
        try:
            info.resolve({v.key: v.value for v in values})  # required options present?
        except PassError as e:
            raise PipelineSyntaxError(text, name_tok.column, str(e)) from None
    return PassInvocation(name, tuple(values), name_tok.column)


def _unquote(raw: str) -> str:
    body = raw[1:-1]
    out, i = [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append(body[i + 1])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def _syntax_message(e: UnexpectedInput, text: str) -> str:
    if isinstance(e, UnexpectedCharacters):
        got = repr(text[e.pos_in_stream]) if e.pos_in_stream < len(text) else "end of pipeline"
        expected = _expected_words(e.allowed)
        return f"unexpected {got}" + (f", expected {expected}" if expected else "")
    if isinstance(e, UnexpectedEOF):
        return f"unexpected end of pipeline, expected {_expected_words(e.expected)}"
    if isinstance(e, UnexpectedToken):
        got = "end of pipeline" if e.token.type == "$END" else repr(str(e.token))
        return f"unexpected {got}, expected {_expected_words(e.expected)}"
    return str(e).splitlines()[0]


def _expected_words(names: Iterable[str]) -> str:
    words = sorted({_TOKEN_WORDS.get(n, n) for n in names})
    return " or ".join(words)


def as_pipeline(p: Union[str, Pipeline, Iterable[Union[str, PassInvocation]]]) -> Pipeline:
    """Accept pipeline text, a Pipeline, or a list of pass names / invocations."""
    if isinstance(p, Pipeline):
        return p
    if isinstance(p, str):
        return parse_pipeline(p)
    return Pipeline.of(*p)
