"""User-facing errors.

Every error a user can provoke is an :class:`IRLMError`; the CLI prints its message on one line
and exits non-zero.  Errors about IR text carry ``file:line:col``; errors about ops carry the
op, its result name and its source location.
"""
from __future__ import annotations


class IRLMError(Exception):
    """Base class of every error that is the user's to fix, not a bug in irlm."""


class InternalError(Exception):
    """A bug in irlm (or in a pass plugin), not the user's to fix.  The CLI prints it on one
    line with "re-run with --debug for the traceback"; ``--debug`` shows the traceback."""


class IRError(IRLMError):
    """An ill-formed graph, op or type (raised by builders, inference and the verifier)."""


class VerificationError(IRError):
    """The verifier rejected a graph; ``problems`` lists every finding, the message the first."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


class ParseError(IRLMError):
    """Malformed IR text: the message is ``FILE:LINE:COL: error: ...``."""

    def __init__(self, filename: str, line: int | None, column: int | None, message: str):
        self.filename, self.line, self.column, self.detail = filename, line, column, message
        where = filename
        if line is not None:
            where += f":{line}:{column if column is not None else 1}"
        super().__init__(f"{where}: error: {message}")
