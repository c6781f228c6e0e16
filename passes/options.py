"""Typed pass options: ``quantize{mode=int4-awq,group=128}``.

A pass declares its options once, as a dict from name to :class:`Option`::

    @register_pass("quantize", options={
        "mode": Option(str, "int8", "weight format", choices=["int8", "int4-awq"]),
        "group": Option(int, 128, "elements that share one scale"),
    })

Values come from pipeline text (``group=128``) or from Python; either way they are checked
against the option's type and choices, and a bad one is an error that names the option, the
pass and what would be valid.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .errors import PassError, closest, did_you_mean

OPTION_TYPES = (int, float, bool, str)
_TYPE_TEXT = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}

# A value may be written bare when it is made of these characters; otherwise it is quoted.
BARE_VALUE = re.compile(r"[A-Za-z0-9_.+\-]+")


@dataclass(frozen=True)
class Option:
    """One option of a pass: its Python type (int, float, bool or str), default and doc.

    ``choices`` restricts the value to a fixed set (a "choice" option); the error for any
    other value lists them.
    """
    type: type
    default: Any
    doc: str = ""
    choices: Optional[Sequence[Any]] = None

    def __post_init__(self):
        if self.type not in OPTION_TYPES:
            raise TypeError(f"option type must be one of int, float, bool, str; got {self.type!r}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        if self.default is not None:
            object.__setattr__(self, "default", self.check(self.default, "the default"))

    @property
    def kind(self) -> str:
        """``int``, ``float``, ``bool``, ``str`` or ``choice``, for listings."""
        return "choice" if self.choices else self.type.__name__

    def check(self, value: Any, what: str = "the value") -> Any:
        """Coerce a Python value to the option's type (ints are accepted for floats)."""
        t = self.type
        ok = (isinstance(value, t) and not (t is int and isinstance(value, bool))) or \
            (t is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise PassError(f"{what} must be {_TYPE_TEXT[t]}, got {value!r}")
        value = t(value)
        if self.choices is not None and value not in self.choices:
            raise PassError(f"{what} must be one of {', '.join(map(format_value, self.choices))}"
                            f", got {format_value(value)}"
                            + _hint(format_value(value), map(format_value, self.choices)))
        return value

    def parse(self, text: str, quoted: bool = False) -> Any:
        """The value that pipeline text ``text`` spells (``quoted``: it was in double quotes)."""
        t = self.type
        if t is str:
            value: Any = text
        elif quoted:
            raise PassError(f"must be {_TYPE_TEXT[t]}, got the string \"{text}\"")
        elif t is bool:
            if text not in ("true", "false"):
                raise PassError(f"must be true or false, got '{text}'")
            value = text == "true"
        elif t is int:
            try:
                value = int(text, 10)
            except ValueError:
                raise PassError(f"must be an integer, got '{text}'") from None
        else:
            try:
                value = float(text)
            except ValueError:
                raise PassError(f"must be a number, got '{text}'") from None
        if self.choices is not None and value not in self.choices:
            raise PassError(f"must be one of {', '.join(map(format_value, self.choices))}, "
                            f"got '{text}'" + _hint(text, map(format_value, self.choices)))
        return value

    def describe(self) -> str:
        """``group: int = 128 -- elements that share one scale`` for ``--list-passes``."""
        kind = "|".join(map(format_value, self.choices)) if self.choices else self.kind
        default = "" if self.default is None else f" = {format_value(self.default)}"
        return f"{kind}{default}" + (f"  {self.doc}" if self.doc else "")


def _hint(word: str, valid) -> str:
    hint = closest(word, list(valid))
    return f"; did you mean '{hint}'?" if hint else ""


def format_value(value: Any) -> str:
    """The pipeline-text spelling of an option value; parsing it gives the value back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # '2.0', '1e-05', 'inf': float() reads each back
    text = str(value)
    if BARE_VALUE.fullmatch(text) and text not in ("true", "false"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def resolve_options(pass_name: str, schema: dict[str, Option], given: dict[str, Any]
                    ) -> dict[str, Any]:
    """Check ``given`` (already typed) against ``schema`` and fill in the defaults."""
    out = {}
    for key, value in given.items():
        if key not in schema:
            raise PassError(f"pass '{pass_name}' has no option '{key}'"
                            + did_you_mean(key, schema, "options"))
        out[key] = schema[key].check(value, f"option '{key}' of pass '{pass_name}'")
    for key, opt in schema.items():
        if key not in out:
            if opt.default is None:
                raise PassError(f"pass '{pass_name}' needs option '{key}' ({opt.kind})")
            out[key] = opt.default
    return out
