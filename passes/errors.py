"""Errors raised by the pass infrastructure.

Each is an :class:`irlm.errors.IRLMError`, so the CLI prints it as one line and exits non-zero,
except :class:`PassFailedError`, a bug in a pass, which is an
:class:`irlm.errors.InternalError` (the CLI offers ``--debug`` for its traceback).
Messages name the thing (pass, option, pattern, plugin file), the place (pipeline column,
stage, op) and what would be valid.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Optional

from irlm.errors import InternalError, IRLMError


class PassError(IRLMError):
    """A pass or pipeline was used wrongly: unknown pass, unknown option, bad option value."""


class PipelineSyntaxError(PassError):
    """Pipeline text that does not parse or names something unknown; carries the column."""

    def __init__(self, text: str, column: Optional[int], message: str):
        self.text, self.column, self.detail = text, column, message
        where = f"pipeline '{text}'"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {message}")


class PassFailedError(InternalError):
    """A pass raised something other than an IRLMError (a bug in the pass, not the user's
    input); the message names the pass or pattern and the line that raised."""


class PassVerificationError(PassError):
    """The verifier rejected the graph a pass produced."""


class RewriteError(PassError):
    """A pattern misused the rewriter (type-changing replacement, change without success...)."""


class RewriteLimitError(PassError):
    """The greedy driver hit its rewrite bound: some patterns keep undoing each other."""


class NumericsError(PassError):
    """``--check-numerics`` found a pass whose outputs drift, or cannot check the graph."""


class PluginError(PassError):
    """A ``--pass-plugin`` file is missing or fails to load."""


def closest(word: str, valid: Iterable[str]) -> Optional[str]:
    """The valid name the user most likely meant: the only one that extends ``word``
    (``int4`` -> ``int4-awq``), else the most similar one, if any is similar enough."""
    valid = sorted(valid)
    longer = [v for v in valid if v.startswith(word) and v != word]
    if word and len(longer) == 1:
        return longer[0]
    hint = difflib.get_close_matches(word, valid, 1, cutoff=0.6)
    return hint[0] if hint else None


def did_you_mean(word: str, valid: Iterable[str], what: str = "") -> str:
    """``"; did you mean 'canonicalize'? (valid: a, b, c)"`` for an error message."""
    valid = sorted(valid)
    hint = closest(word, valid)
    out = f"; did you mean '{hint}'?" if hint else ""
    listing = ", ".join(valid) if valid else "none"
    return f"{out} ({what + ': ' if what else 'valid: '}{listing})"
