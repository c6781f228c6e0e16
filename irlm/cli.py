"""The ``irlm`` command line.

Each subcommand lives in ``irlm/commands/<name>.py`` and provides ``add_parser(subparsers)``;
the parser it adds sets ``func``.  Every user mistake surfaces as an :class:`IRLMError` (or an
``OSError`` for a missing file) and is printed here as one line, with exit status 1; argparse
usage errors exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import IRLMError, ParseError

COMMANDS = ("ir", "opt", "compile", "run", "export_onnx", "serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="irlm", description="A graph compiler for LLM inference.")
    p.add_argument("--version", action="version", version=f"irlm {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import importlib
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"irlm.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"irlm.commands.{name}":
                continue  # command not built yet
            raise
        mod.add_parser(sub)
    return p


def _version() -> str:
    from . import __version__
    return __version__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except IRLMError as e:
        # parse errors already read "FILE:LINE:COL: error: ..."
        print(str(e) if isinstance(e, ParseError) else f"irlm: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"irlm: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("irlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
