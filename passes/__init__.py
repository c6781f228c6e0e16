"""irlm.passes: the pass manager, the pattern-rewrite engine and the built-in passes.

Writing a pass (see docs/writing-a-pass.md)::

    from irlm.passes import Var, op, rule, pattern_pass

    x = Var("x")

    @rule(x * 1.0)
    def mul_by_one(m, rw):
        '''x * 1 = x'''
        return m.x if m.x.type == m.root.result.type else None

    pattern_pass("fold-mul-one", [mul_by_one])

Running passes::

    from irlm.passes import run_pipeline
    run_pipeline(graph, "canonicalize,cse,dce")
"""
from .cli import add_pipeline_arguments, pipeline_from_args, run_pipeline_from_args
from .context import Options, PassContext, Statistics
from .rewriting.driver import DriverResult, PatternSet, apply_patterns, pattern_pass
from .errors import (NumericsError, PassError, PassFailedError, PassVerificationError,
                     PipelineSyntaxError, PluginError, RewriteError, RewriteLimitError)
from .instrument import DumpIR, Instrument, PassFilter, PrintIR, Stats, Timing
from .manager import PassManager, PipelineReport, run_pass, run_pipeline
from .numerics import CheckNumerics, register_input_maker
from .options import Option
from .rewriting.pattern import (ANY, Const, Match, Or, OpPattern, Pattern, RewritePattern,
                                Rule, Var, Wildcard, has_one_use, op, rule, same_type,
                                splat_value)
from .pipeline import (NAMED_PIPELINES, PassInvocation, Pipeline, named_pipeline,
                       parse_pipeline, register_named_pipeline)
from .plugins import load_plugin
from .registry import PassInfo, all_passes, get_pass, register_pass
from .rewriting.rewriter import RewriteListener, Rewriter
from . import levels  # noqa: E402,F401  (registers -O0/-O1/-O2 and their causal-lm forms)


def register_canonicalization(pattern) -> None:
    """Add a pattern to what ``canonicalize`` applies (see irlm.passes.transforms.canonicalize)."""
    from .transforms.canonicalize import register_canonicalization as _register
    _register(pattern)


__all__ = [
    "add_pipeline_arguments", "pipeline_from_args", "run_pipeline_from_args",
    "Options", "PassContext", "Statistics",
    "DriverResult", "PatternSet", "apply_patterns", "pattern_pass",
    "NumericsError", "PassError", "PassFailedError", "PassVerificationError",
    "PipelineSyntaxError", "PluginError", "RewriteError", "RewriteLimitError",
    "DumpIR", "Instrument", "PassFilter", "PrintIR", "Stats", "Timing", "CheckNumerics",
    "register_input_maker",
    "PassManager", "PipelineReport", "run_pass", "run_pipeline",
    "Option",
    "ANY", "Const", "Match", "Or", "OpPattern", "Pattern", "RewritePattern", "Rule", "Var",
    "Wildcard", "has_one_use", "op", "rule", "same_type", "splat_value",
    "NAMED_PIPELINES", "PassInvocation", "Pipeline", "named_pipeline", "parse_pipeline",
    "register_named_pipeline", "load_plugin",
    "PassInfo", "all_passes", "get_pass", "register_pass",
    "RewriteListener", "Rewriter", "register_canonicalization",
]
