"""The ``irlm`` command line.

Each subcommand lives in ``irlm/cli/<name>.py`` and provides ``add_parser(subparsers)``;
its one-line summary is in ``SUMMARIES`` below, so that ``irlm --help`` imports no command;
the parser it adds sets ``func``.  Every user mistake surfaces as an :class:`IRLMError` (or an
``OSError`` for a missing file) and is printed here as one line, with exit status 1; argparse
usage errors exit with status 2.  Anything else is a bug in irlm (or in a pass plugin): it is
printed as one ``irlm: internal error:`` line that says to re-run with ``--debug``, which
prints the traceback (of user errors too).  Warnings print as one ``irlm: warning:`` line
each (with ``--debug``, in Python's form with the source location).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from typing import Iterable, Optional, Sequence

from ..errors import InternalError, IRLMError, ParseError

#: Each command's one-line summary, as ``irlm --help`` lists it; the command's module is
#: ``irlm/cli/<name with - as _>.py``.
SUMMARIES = {
    "ir": "read IR text files",
    "opt": "run a pass pipeline over an IR file and print the result",
    "compile": "compile a model into an output directory (IR dumps, later an engine)",
    "build": "build an engine from an IR file (an edited dump) and its weights",
    "run": "generate text with a compiled engine",
    "export-onnx": "lower an IR file or engine directory to ONNX (model.onnx)",
    "serve": "serve an engine (OpenAI API, KServe v2 HTTP/gRPC, metrics)",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``irlm: error: irlm compile: argument --max-batch:
    invalid int value: 'x' (irlm compile --help shows the usage)``, exit status 2.  The
    subcommands' parsers are of this class too (argparse makes them with the parent's)."""

    def error(self, message: str):
        self.exit(2, f"irlm: error: {self.prog}: {message} ({self.prog} --help shows the "
                     f"usage)\n")


def build_parser(only: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The whole command line, or (``only``) the full parsers of the named commands and a
    one-line stub of every other.  Building a command's parser imports what its flags list
    (passes, quant modes: torch), over a second; ``irlm --help`` and ``--version`` need none."""
    p = _Parser(prog="irlm", description="A graph compiler for LLM inference.")
    p.add_argument("--version", action="version", version=f"irlm {_version()}")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of any error (for bug reports)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    full = set(SUMMARIES) if only is None else set(only)
    import importlib
    for name, summary in SUMMARIES.items():
        if name in full:
            importlib.import_module(f"irlm.cli.{name.replace('-', '_')}").add_parser(sub)
        else:
            sub.add_parser(name, help=summary)
    for command in sub.choices.values():   # --debug also after the command name
        _add_debug_flag(command)
    return p


def _command_in(argv: Sequence[str]) -> tuple:
    """The command named in ``argv`` (its first word that is not a top-level flag), as a
    1-tuple, or ``()`` when there is none or it is not a command."""
    for word in argv:
        if not word.startswith("-"):
            return (word,) if word in SUMMARIES else ()
    return ()


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of any error (for bug reports)")
    for action in parser._actions:   # nested commands (irlm ir check)
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_flag(child)


def _version() -> str:
    from .. import __version__
    return __version__


def _located(e: ParseError) -> str:
    """``FILE:LINE:COL: message`` (the library's text says ``FILE:LINE:COL: error: ...``)."""
    where = e.filename + (f":{e.line}:{e.column or 1}" if e.line is not None else "")
    return f"{where}: {e.detail}"


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"irlm: warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(only=_command_in(argv)).parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        with warnings.catch_warnings():
            if not debug:       # one line each, as errors are; --debug keeps Python's form
                warnings.showwarning = _one_line_warning
            return args.func(args) or 0
    except IRLMError as e:
        if debug:
            traceback.print_exc()
        print(f"irlm: error: {_located(e) if isinstance(e, ParseError) else e}", file=sys.stderr)
        return 1
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print(f"irlm: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("irlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback on request
        if debug:
            traceback.print_exc()
        what = str(e) if isinstance(e, InternalError) else f"{type(e).__name__}: {e}"
        hint = "" if debug else " (re-run with --debug for the traceback)"
        print(f"irlm: internal error: {what}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
