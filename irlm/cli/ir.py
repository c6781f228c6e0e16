"""``irlm ir check FILE`` and ``irlm ir print FILE``."""
from __future__ import annotations

import sys

from . import SUMMARIES


def add_parser(sub) -> None:
    p = sub.add_parser("ir", help=SUMMARIES["ir"])
    isub = p.add_subparsers(dest="ir_command", metavar="ACTION")
    isub.required = True
    c = isub.add_parser("check", help="parse and verify an IR file")
    c.add_argument("file", help="IR text file ('-' for standard input)")
    c.set_defaults(func=check)
    pr = isub.add_parser("print", help="parse, verify and print an IR file in canonical form")
    pr.add_argument("file", help="IR text file ('-' for standard input)")
    pr.set_defaults(func=print_ir)


def load(path: str):
    """Parse and verify an IR file; errors carry file:line:col."""
    from ..text.parser import parse_file, parse_graph
    from ..verifier import verify
    # bytes, not text: parse_graph reports bad UTF-8 with its position, not a traceback
    g = parse_graph(getattr(sys.stdin, "buffer", sys.stdin).read(), "<stdin>") if path == "-" \
        else parse_file(path)
    verify(g)
    return g


def check(args) -> int:
    g = load(args.file)
    print(f"{args.file}: ok ({len(g)} ops)")
    return 0


def print_ir(args) -> int:
    sys.stdout.write(str(load(args.file)))
    return 0
