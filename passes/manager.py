"""The pass manager: runs a pipeline over a graph with instruments plugged in.

Debugging is a property of the pipeline, not of each pass: the manager verifies the graph
after every pass (by default) and calls every :class:`~irlm.passes.instrument.Instrument`
before and after each pass, so printing, dumping, timing, statistics and the numerics check
work for every pass, including ones loaded from plugins.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from irlm.errors import IRLMError, VerificationError
from irlm.ir import Graph
from irlm.verifier import find_problems

from .context import PassContext, Statistics
from .errors import PassError, PassFailedError, PassVerificationError
from .pipeline import PassInvocation, Pipeline, as_pipeline
from .registry import get_pass


@dataclass
class Stage:
    """One pass of a run: ``index`` numbers it in dumps (after ``00-input``)."""
    index: int
    invocation: PassInvocation

    @property
    def name(self) -> str:
        return self.invocation.name

    @property
    def label(self) -> str:
        return f"pass '{self.invocation}' (stage {self.index})"


@dataclass
class StageResult:
    stage: Stage
    stats: Statistics
    seconds: float                 # running the pass
    verify_seconds: float = 0.0    # verifying what it produced
    ops_before: int = 0            # the graph's op count before and after the pass
    ops_after: int = 0


@dataclass
class PipelineReport:
    pipeline: Pipeline
    stages: list[StageResult] = field(default_factory=list)
    input_verify_seconds: float = 0.0
    instrument_seconds: dict[str, float] = field(default_factory=dict)  # per instrument type

    @property
    def seconds(self) -> float:
        return sum(s.seconds + s.verify_seconds for s in self.stages) + self.input_verify_seconds


class PassManager:
    """``PassManager("canonicalize,cse,dce").run(graph)``.

    ``instruments`` see every pass; ``verify_each`` runs the verifier on the input and after
    every pass; ``stage_offset`` is how many numbered stages the caller has already dumped
    (``00``..``stage_offset - 1``): the first pass is then stage ``stage_offset``.  With 0, the
    input is stage ``00`` and the first pass stage ``01``.
    """

    def __init__(self, pipeline: Union[str, Pipeline, Sequence], instruments: Sequence = (),
                 verify_each: bool = True, stage_offset: int = 0):
        self.pipeline = as_pipeline(pipeline)
        self.instruments = list(instruments)
        self.verify_each = verify_each
        self.stage_offset = stage_offset

    def run(self, graph: Graph) -> PipelineReport:
        report = PipelineReport(self.pipeline)
        # Check every pass and its options before running anything.
        planned = [(inv, get_pass(inv.name), inv.resolved_options()) for inv in self.pipeline]
        if self.verify_each:
            t0 = time.perf_counter()
            problems = find_problems(graph)
            report.input_verify_seconds = time.perf_counter() - t0
            if problems:
                raise PassVerificationError(f"the input graph is invalid (before any pass): "
                                            f"{VerificationError(problems)}")
        call = self._timed_call(report)
        for inst in self.instruments:
            call(inst.before_pipeline, graph, self.pipeline, self.stage_offset)
        for i, (inv, info, options) in enumerate(planned):
            stage = Stage(max(self.stage_offset, 1) + i, inv)
            ctx = PassContext(inv.name, options)
            for inst in self.instruments:
                call(inst.before_pass, graph, stage)
            ops_before = len(graph)
            t0 = time.perf_counter()
            try:
                info.run(graph, ctx)
            except (PassError, PassFailedError) as e:
                self._failed(graph, stage, e)
                raise
            except IRLMError as e:
                self._failed(graph, stage, e)
                raise PassError(f"{stage.label}: {e}") from e
            except Exception as e:  # noqa: BLE001 - a bug in the pass: name it, not a traceback
                from .rewriting.driver import _user_frame
                self._failed(graph, stage, e)
                raise PassFailedError(f"{stage.label} failed: {type(e).__name__}: {e}"
                                      f"{_user_frame(e)}") from e
            seconds = time.perf_counter() - t0
            result = StageResult(stage, ctx.stats, seconds, ops_before=ops_before,
                                 ops_after=len(graph))
            if self.verify_each:
                t0 = time.perf_counter()
                problems = find_problems(graph)
                result.verify_seconds = time.perf_counter() - t0
                if problems:
                    err = PassVerificationError(f"{stage.label} produced invalid IR: "
                                                f"{VerificationError(problems)}")
                    self._failed(graph, stage, err)
                    raise err
            report.stages.append(result)
            for inst in self.instruments:
                call(inst.after_pass, graph, result)
        for inst in self.instruments:
            call(inst.after_pipeline, graph, report)
        return report

    @staticmethod
    def _timed_call(report: PipelineReport):
        """Call an instrument hook, adding its time to the report (``--timing`` shows what
        printing, dumping and the numerics check cost)."""
        def call(hook, *args):
            t0 = time.perf_counter()
            try:
                return hook(*args)
            finally:
                name = type(hook.__self__).__name__
                report.instrument_seconds[name] = report.instrument_seconds.get(name, 0.0) + \
                    time.perf_counter() - t0
        return call

    def _failed(self, graph: Graph, stage: Stage, error: BaseException) -> None:
        for inst in self.instruments:
            try:
                inst.pass_failed(graph, stage, error)
            except Exception:  # noqa: BLE001 - never hide the original error
                pass


def run_pipeline(graph: Graph, pipeline: Union[str, Pipeline, Sequence], *,
                 instruments: Sequence = (), verify_each: bool = True) -> PipelineReport:
    """Run ``pipeline`` over ``graph`` in place (see :class:`PassManager`)."""
    return PassManager(pipeline, instruments, verify_each).run(graph)


def run_pass(graph: Graph, name: str, **options) -> Statistics:
    """Run one pass by name with options (no instruments, no verification); its stats."""
    info = get_pass(name)
    ctx = PassContext(name, info.resolve(options))
    info.run(graph, ctx)
    return ctx.stats
