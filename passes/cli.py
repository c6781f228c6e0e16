"""The pipeline flags, shared by ``irlm opt`` and ``irlm compile``.

::

    parser = argparse.ArgumentParser()
    irlm.passes.add_pipeline_arguments(parser)
    args = parser.parse_args()
    graph = irlm.passes.run_pipeline_from_args(graph, args)
"""
from __future__ import annotations

import argparse
from typing import Optional

from irlm.ir import Graph

from .errors import PassError
from .instrument import DumpIR, PassFilter, PrintIR, Stats, Timing
from .manager import PassManager, PipelineReport
from .numerics import CheckNumerics
from .pipeline import Pipeline, named_pipeline, parse_pipeline
from .plugins import load_plugin


def add_pipeline_arguments(parser: argparse.ArgumentParser,
                           default_level: Optional[str] = None) -> None:
    """Add ``--pipeline``, ``-O``, ``--pass-plugin`` and the instrumentation flags.

    ``default_level`` (e.g. ``"2"``) is the ``-O`` level used when neither ``-O`` nor
    ``--pipeline`` is given."""
    g = parser.add_argument_group("pass pipeline")
    after = (f"after the -O level's passes (default -O{default_level}; --replace-pipeline "
             f"runs it alone)" if default_level is not None else
             "after the -O level's passes, if both are given")
    g.add_argument("--pipeline", metavar="PIPELINE", default=None,
                   help=f"passes to run, e.g. 'canonicalize,quantize{{mode=int8}},dce' "
                        f"({after})")
    g.add_argument("-O", dest="opt_level", metavar="LEVEL", default=None,
                   help="optimization level: -O0, -O1, -O2 (irlm opt --list-pipelines shows "
                        "their passes)")
    g.set_defaults(default_opt_level=default_level)
    g.add_argument("--pass-plugin", metavar="FILE", action="append", default=[],
                   help="load a Python file that registers passes (repeatable)")
    g.add_argument("--no-verify", dest="verify_each", action="store_false",
                   help="do not run the verifier after every pass")
    d = parser.add_argument_group("pass debugging")
    d.add_argument("--print-ir-before", metavar="PASS", action="append", default=[],
                   help="print the IR to stderr before PASS (comma-separated names, or 'all')")
    d.add_argument("--print-ir-after", metavar="PASS", action="append", default=[],
                   help="print the IR to stderr after PASS (comma-separated names, or 'all')")
    d.add_argument("--dump-ir-dir", metavar="DIR",
                   help="write one numbered IR file per stage (00-input.irlm, 01-PASS.irlm, ...)")
    d.add_argument("--timing", action="store_true", help="print wall time per pass")
    d.add_argument("--stats", action="store_true",
                   help="print counters per pass and applications per pattern")
    d.add_argument("--check-numerics", action="store_true",
                   help="run the reference interpreter before and after every pass and stop "
                        "at the first pass whose outputs drift")
    d.add_argument("--numerics-atol", type=float, default=None, metavar="X",
                   help="absolute tolerance (default 1e-6)")
    d.add_argument("--numerics-rtol", type=float, default=None, metavar="X",
                   help="tolerance relative to the output's largest magnitude "
                        "(default by dtype: f32 1e-4, f16 2e-3, bf16 1.6e-2)")
    d.add_argument("--numerics-seed", type=int, default=0, metavar="N",
                   help="seed of the random inputs (default 0)")
    d.add_argument("--numerics-int-max", type=int, default=None, metavar="N",
                   help="integer inputs are drawn from [0, N) (default: the size of the "
                        "table they index, e.g. the vocabulary, else 16)")


def pipeline_from_args(args: argparse.Namespace) -> Pipeline:
    """Load the plugins, then parse ``-O`` and ``--pipeline`` into one pipeline."""
    for path in getattr(args, "pass_plugin", None) or []:
        load_plugin(path)
    level = args.opt_level
    text = args.pipeline
    if level is None and not getattr(args, "replace_pipeline", False):
        level = getattr(args, "default_opt_level", None)   # --pipeline extends the default
    pipeline = Pipeline()
    if level is not None:
        pipeline = pipeline + parse_pipeline(named_pipeline(level))
    if text is not None:
        pipeline = pipeline + parse_pipeline(text)
    return pipeline


def instruments_from_args(args: argparse.Namespace) -> list:
    return make_instruments(
        print_ir_before=args.print_ir_before, print_ir_after=args.print_ir_after,
        dump_ir_dir=args.dump_ir_dir, check_numerics=args.check_numerics,
        numerics_atol=args.numerics_atol, numerics_rtol=args.numerics_rtol,
        numerics_seed=args.numerics_seed, numerics_int_max=args.numerics_int_max,
        timing=args.timing, stats=args.stats)


def make_instruments(*, print_ir_before=(), print_ir_after=(), dump_ir_dir=None,
                     check_numerics: bool = False, numerics_atol=None, numerics_rtol=None,
                     numerics_seed: int = 0, numerics_int_max=None, timing: bool = False,
                     stats: bool = False) -> list:
    """The instruments the pipeline flags ask for (the library form of the flags)."""
    out = []
    before = PassFilter(list(print_ir_before), "--print-ir-before")
    after = PassFilter(list(print_ir_after), "--print-ir-after")
    if before or after:
        out.append(PrintIR(before, after))
    if dump_ir_dir:
        out.append(DumpIR(dump_ir_dir))
    if check_numerics:
        if numerics_int_max is not None and numerics_int_max < 1:
            raise PassError("--numerics-int-max must be at least 1")
        out.append(CheckNumerics(numerics_atol, numerics_rtol, numerics_seed, numerics_int_max))
    if timing:
        out.append(Timing())
    if stats:
        out.append(Stats())
    return out


def run_pipeline_from_args(graph: Graph, args: argparse.Namespace,
                           stage_offset: int = 0) -> Graph:
    """Run the pipeline the flags describe over ``graph`` (in place) and return it.

    ``stage_offset``: how many numbered stages the caller has already dumped (``00``..
    ``stage_offset - 1``, e.g. 1 after writing ``00-frontend.irlm``); the first pass is then
    stage ``stage_offset``.  ``00-input.irlm`` is written only when it is 0."""
    run_pipeline_with_report(graph, args, stage_offset)
    return graph


def run_pipeline_with_report(graph: Graph, args: argparse.Namespace,
                             stage_offset: int = 0) -> PipelineReport:
    pipeline = pipeline_from_args(args)
    manager = PassManager(pipeline, instruments_from_args(args),
                          verify_each=getattr(args, "verify_each", True),
                          stage_offset=stage_offset)
    return manager.run(graph)
