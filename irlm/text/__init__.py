"""irlm.text: the IR text format (the contract: every graph prints, and the text parses back).

:mod:`.printer` (``print_graph``), :mod:`.parser` (``parse_graph``, ``parse_file``) and the
lark grammar ``ir.lark``.  docs/ir.md describes the syntax.
"""
from .parser import parse_file, parse_graph
from .printer import print_graph

__all__ = ["print_graph", "parse_graph", "parse_file"]
