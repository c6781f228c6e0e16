"""``irlm opt FILE [--pipeline P] [-o OUT]``: run a pass pipeline over an IR file."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("opt", help="run a pass pipeline over an IR file and print the result")
    p.add_argument("file", help="IR text file ('-' for standard input)")
    p.add_argument("--pipeline", default="", help="comma-separated passes, e.g. 'canonicalize,dce'")
    p.add_argument("-o", "--output", help="write the result here instead of standard output")
    p.set_defaults(func=run)


def run(args) -> int:
    from .ir import load
    g = load(args.file)
    if args.pipeline.strip():
        from ..errors import IRLMError
        raise IRLMError("--pipeline: the pass manager is not available yet")
    text = str(g)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
