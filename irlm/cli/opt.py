"""``irlm opt FILE [--pipeline P | -O1] [-o OUT]``: run a pass pipeline over an IR file.

All pipeline and instrumentation flags come from :func:`irlm.passes.add_pipeline_arguments`,
so ``irlm compile`` accepts the same ones.  ``irlm opt --list-passes`` shows every registered
pass (after loading ``--pass-plugin`` files) with its options.
"""
from __future__ import annotations

import sys

from . import SUMMARIES


def add_parser(sub) -> None:
    from irlm.passes import add_pipeline_arguments
    p = sub.add_parser("opt", help=SUMMARIES["opt"],
                       description="Run a pass pipeline over an IR file and print the result.")
    p.add_argument("file", nargs="?", help="IR text file ('-' for standard input)")
    p.add_argument("-o", "--output", help="write the result here instead of standard output")
    p.add_argument("--weights", metavar="FILE", action="append", default=[],
                   help="safetensors file(s) holding the graph's params (for --check-numerics "
                        "and passes that derive weights)")
    p.add_argument("--list-passes", action="store_true",
                   help="list the registered passes, their options and the -O levels, and exit")
    p.add_argument("--list-pipelines", action="store_true",
                   help="list the named pipelines (-O0/-O1/-O2 and their causal-LM forms, "
                        "which irlm compile runs on decoders) and exit")
    add_pipeline_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from irlm.errors import IRLMError
    from irlm.passes import pipeline_from_args, run_pipeline_from_args
    if args.list_pipelines:
        pipeline_from_args(_no_pipeline(args))  # loads the plugins (they may add pipelines)
        sys.stdout.write(list_pipelines())
        return 0
    if args.list_passes:
        pipeline_from_args(_no_pipeline(args))  # loads the plugins
        sys.stdout.write(list_passes())
        return 0
    if not args.file:
        raise IRLMError("opt: give an IR file to optimize (or '-' for standard input)")
    pipeline_from_args(args)  # a bad pipeline is reported before a big file is read
    graph = _load(args.file, args.weights)
    run_pipeline_from_args(graph, args)
    from irlm.text.printer import print_graph
    text = print_graph(graph)
    if not text.endswith("\n"):
        text += "\n"
    if args.output:
        from irlm.safe_io import write_text
        write_text(args.output, text)      # whole or not at all, never through a link
    else:
        sys.stdout.write(text)
    return 0


def _no_pipeline(args):
    import argparse
    ns = argparse.Namespace(**vars(args))
    ns.opt_level, ns.pipeline, ns.default_opt_level = None, None, None
    return ns


def _load(path: str, weight_files):
    from irlm.text.parser import parse_file, parse_graph
    store = None
    if weight_files:
        from irlm.weights import WeightStore
        store = WeightStore()
        for w in weight_files:
            store.add_safetensors(w)
    if path == "-":                # bytes: parse_graph reports bad UTF-8 with its position
        stdin = getattr(sys.stdin, "buffer", sys.stdin)
        return parse_graph(stdin.read(), "<stdin>", weights=store)
    return parse_file(path, weights=store)


def list_pipelines() -> str:
    """``NAME: TEXT`` per named pipeline (irlm.passes.levels defines the -O levels)."""
    from irlm.passes import NAMED_PIPELINES
    width = max(map(len, NAMED_PIPELINES), default=0)
    return "".join(f"{name:<{width}}  {text or '(no passes)'}\n"
                   for name, text in NAMED_PIPELINES.items())


def list_passes() -> str:
    from irlm.passes import NAMED_PIPELINES, all_passes
    from irlm.passes.levels import LEVELS
    lines = ["passes:"]
    for name, info in all_passes().items():
        lines.append(f"  {name}" + (f"  -- {info.summary}" if info.summary else ""))
        for key, opt in info.options.items():
            lines.append(f"      {key}: {opt.describe()}")
    from irlm.passes.levels import level_name
    lines.append("optimization levels (irlm opt runs the first form; irlm compile the "
                 "causal-LM form on decoders, the first on other models):")
    for name in LEVELS:
        lines.append(f"  -{name}: {NAMED_PIPELINES[name] or '(no passes)'}")
        lines.append(f"  -{name} causal LM: "
                     f"{NAMED_PIPELINES[level_name(name, causal_lm=True)] or '(no passes)'}")
    lines.append("(irlm opt --list-pipelines shows every named pipeline)")
    return "\n".join(lines) + "\n"
