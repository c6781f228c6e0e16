"""Reading request fields: type checks whose errors name the field (``max_tokens: must be an
integer >= 1, got 'ten'``), and SamplingParams built from them with the same care."""
from __future__ import annotations

import math
import re
from typing import Any

from ..runtime.errors import SamplingParamsError
from ..runtime.sampling import SamplingParams
from .errors import bad_field

_MISSING = object()


class Fields:
    """A JSON object being read; ``where`` prefixes field names (``parameters.top_k``)."""

    def __init__(self, body: Any, where: str = ""):
        if not isinstance(body, dict):
            raise bad_field(where.rstrip(".") or "body", "must be a JSON object")
        self.body, self.where = body, where

    def name(self, key: str) -> str:
        return f"{self.where}{key}"

    def has(self, key: str) -> bool:
        return self.body.get(key) is not None

    def get(self, key: str, default=None):
        v = self.body.get(key)
        return default if v is None else v

    def int(self, key: str, default=_MISSING, lo=None, hi=None):
        v = self.body.get(key)
        if v is None:
            if default is _MISSING:
                raise bad_field(self.name(key), "is required")
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad_field(self.name(key), f"must be an integer, got {v!r}")
        self._range(key, v, lo, hi)
        return v

    def float(self, key: str, default=_MISSING, lo=None, hi=None):
        v = self.body.get(key)
        if v is None:
            if default is _MISSING:
                raise bad_field(self.name(key), "is required")
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise bad_field(self.name(key), f"must be a number, got {v!r}")
        self._range(key, v, lo, hi)
        return float(v)

    def bool(self, key: str, default=False):
        v = self.body.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise bad_field(self.name(key), f"must be true or false, got {v!r}")
        return v

    def str(self, key: str, default=_MISSING):
        v = self.body.get(key)
        if v is None:
            if default is _MISSING:
                raise bad_field(self.name(key), "is required")
            return default
        if not isinstance(v, str):
            raise bad_field(self.name(key), f"must be a string, got {type(v).__name__}")
        return v

    def str_list(self, key: str) -> list[str]:
        """A string or a list of strings (``stop``); [] when absent."""
        v = self.body.get(key)
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            raise bad_field(self.name(key), "must be a non-empty string or a list of them")
        return v

    def int_list(self, key: str) -> list[int]:
        v = self.body.get(key)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                              and t >= 0 for t in v):
            raise bad_field(self.name(key), "must be a list of token ids (integers >= 0)")
        return v

    def _range(self, key, v, lo, hi):
        if lo is not None and v < lo or hi is not None and v > hi:
            span = (f"in [{lo}, {hi}]" if lo is not None and hi is not None
                    else f">= {lo}" if lo is not None else f"<= {hi}")
            raise bad_field(self.name(key), f"must be {span}, got {v!r}")

    def reject_unknown(self, allowed: set[str], ignored: set[str] = frozenset()) -> None:
        for k in self.body:
            if k not in allowed and k not in ignored:
                raise bad_field(self.name(k), "is not a supported field")


_PARAM_RE = re.compile(r"SamplingParams\.(\w+) (.*)")


def sampling_params(names: dict[str, str] | None = None, **kwargs) -> SamplingParams:
    """``SamplingParams(**kwargs)``; a bad value is a 400 naming the request's field
    (``names`` maps SamplingParams names to the protocol's, e.g. top_k -> runtime_top_k)."""
    try:
        return SamplingParams(**kwargs)
    except SamplingParamsError as e:
        m = _PARAM_RE.match(str(e))
        if not m:
            raise bad_field("parameters", str(e)) from None
        field = (names or {}).get(m.group(1), m.group(1))
        raise bad_field(field, m.group(2)) from None
